"""API tokens: created by an admin, stored as hashes, scoped by role, revocable.

A token reads ``sgk_<id>_<secret>``. The store keeps the id, the role and
the SHA-256 of the secret — never the secret itself, which is shown once, at
creation. The secret is 32 random bytes, so a plain hash (no slow KDF) is
enough: there is nothing to brute-force. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ..errors import ConfigurationError, Unauthenticated
from ..ops import Actor
from ..ops.actor import Role

if TYPE_CHECKING:
    from ..store import Store

ROLES = ("viewer", "operator", "admin")
_TOKEN = re.compile(r"^sgk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,80})$")
_NAME = re.compile(r"^[A-Za-z0-9@._+-]{1,64}$")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as listed: everything but its secret."""

    id: str
    name: str
    role: Role
    created_at: float
    created_by: str
    revoked_at: float | None = None


class Tokens:
    """One store's API tokens."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table = f"{store.prefix}console_tokens"

    async def create(
        self, role: str, *, name: str = "", created_by: str = "cli"
    ) -> tuple[TokenInfo, str]:
        """A new token; returns its info and the token itself (shown only now)."""
        if role not in ROLES:
            raise ConfigurationError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        tid = secrets.token_hex(6)
        name = name or f"{role}-{tid}"
        if not _NAME.match(name):
            raise ConfigurationError(f"a token name is 1-64 of A-Z a-z 0-9 @ . _ + -, got {name!r}")
        secret = secrets.token_urlsafe(32)
        info = TokenInfo(tid, name, cast(Role, role), self.store.clock.now(), created_by)
        async with self.store.transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.table} (id, hash, name, role, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                *(tid, _hash(secret), name, role, info.created_at, created_by),
            )
        return info, f"sgk_{tid}_{secret}"

    async def verify(self, token: str, *, via: str = "console") -> Actor:
        """The actor a token stands for; :class:`Unauthenticated` if unknown or revoked."""
        m = _TOKEN.match(token.strip())
        if m is None:
            raise Unauthenticated("not a sagakit token")
        rows = await self.store.driver.read(
            f"SELECT hash, name, role, revoked_at FROM {self.table} WHERE id = ?", m.group(1)
        )
        if not rows or not hmac.compare_digest(rows[0][0], _hash(m.group(2))):
            raise Unauthenticated("unknown token")
        if rows[0][3] is not None:
            raise Unauthenticated("revoked token")
        return Actor(f"token:{rows[0][1]}", role=rows[0][2], via=via)

    async def revoke(self, token_id: str) -> bool:
        """Revoke a token by id (the part after ``sgk_``); False if unknown or revoked."""
        async with self.store.transaction() as tx:
            n = await tx.execute(
                f"UPDATE {self.table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                self.store.clock.now(),
                token_id,
            )
        return n == 1

    async def list(self) -> list[TokenInfo]:
        rows = await self.store.driver.read(
            f"SELECT id, name, role, created_at, created_by, revoked_at FROM {self.table} "
            "ORDER BY created_at"
        )
        return [TokenInfo(*r) for r in rows]


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
