"""The audit: an append-only table of every operator action and every refusal.

One line per action on one target — who (actor, role, how identified), what
(action, target), why (the reason), how it ended (``done``, ``denied``,
``failed``), from where (source address) and a digest of the target before
and after. Lines are only ever inserted: nothing in sagakit updates or
deletes them (retention leaves the table alone), and the table is plain SQL
for whoever wants to query it (``SELECT * FROM sagakit_audit``).

A command executed twice (a redelivery after a crash) finds its own line and
does nothing: ``(command_id, target)`` is unique, which makes every action
idempotent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import SagaRecord, Store, Tx

Outcome = Literal["done", "denied", "failed"]
MAX_TARGET = 500  #: characters of a target kept in a line
MAX_REASON = 2000  #: characters of a reason kept in a line (and the most an action takes)
_COLUMNS = (
    "at, actor, role, via, action, target, reason, outcome, source, "
    "before_digest, after_digest, detail, command_id"
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit."""

    at: float
    actor: str
    role: str
    via: str
    action: str
    target: str
    reason: str
    outcome: Outcome
    source: str | None = None
    before: str | None = None
    after: str | None = None
    detail: str | None = None
    command_id: str | None = None
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which lines :meth:`Audit.list` returns; every given field must match."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: str | None = None
    limit: int = 100


class Audit:
    """One store's audit table."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table = f"{store.prefix}audit"

    async def record(self, tx: Tx, e: AuditEntry) -> None:
        """Append a line inside ``tx`` (it commits, or not, with the action)."""
        await tx.execute(
            f"INSERT INTO {self.table} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            *(e.at, e.actor, e.role, e.via, e.action, e.target, e.reason, e.outcome),
            *(e.source, e.before, e.after, e.detail, e.command_id),
        )

    async def append(self, e: AuditEntry) -> None:
        """Append a line in a transaction of its own (refusals, failures)."""
        async with self.store.transaction() as tx:
            if e.command_id is None or not await self.seen(tx, e.command_id, e.target):
                await self.record(tx, e)

    def line(
        self,
        actor: Actor,
        action: str,
        target: str,
        reason: str,
        outcome: Outcome,
        source: str | None,
        detail: str | None = None,
    ) -> AuditEntry:
        """A line stamped now, its target and reason cut to what the table keeps."""
        return AuditEntry(self.store.clock.now(), actor.id, actor.role, actor.via, action,
                          target[:MAX_TARGET], reason[:MAX_REASON], outcome, source,
                          detail=detail)  # fmt: skip

    async def refusal(
        self, actor: Actor, action: str, target: str, reason: str, why: str, source: str | None
    ) -> None:
        """Append the line of a refused attempt: ``denied`` for a role that may not
        act, ``failed`` for anything else (no reason, a target the action does not fit)."""
        outcome: Outcome = "failed" if actor.may_act() else "denied"
        await self.append(self.line(actor, action, target, reason, outcome, source, why))

    async def seen(self, tx: Tx, command_id: str, target: str) -> bool:
        """Whether the command already has its line for ``target`` (it ran)."""
        row = await tx.fetchone(
            f"SELECT 1 FROM {self.table} WHERE command_id = ? AND target = ?", command_id, target
        )
        return row is not None

    async def list(self, f: AuditFilter | None = None) -> list[AuditEntry]:
        """The latest lines, newest first."""
        f = f or AuditFilter()
        conds = {"actor": f.actor, "action": f.action, "target": f.target, "outcome": f.outcome}
        given = {k: v for k, v in conds.items() if v is not None}
        where = " AND ".join(f"{k} = ?" for k in given)
        rows = await self.store.driver.read(
            f"SELECT {_COLUMNS}, seq FROM {self.table}"
            + (f" WHERE {where}" if where else "")
            + " ORDER BY seq DESC LIMIT ?",
            *given.values(),
            max(1, min(f.limit, 10_000)),
        )
        return [AuditEntry(*r) for r in rows]

    async def outcome_of(self, command_id: str, target: str) -> AuditEntry | None:
        """The line a command left for ``target``, once it has run."""
        rows = await self.store.driver.read(
            f"SELECT {_COLUMNS}, seq FROM {self.table} WHERE command_id = ? AND target = ?",
            command_id,
            target,
        )
        return AuditEntry(*rows[0]) if rows else None


def digest(rec: SagaRecord | None) -> str | None:
    """A short fingerprint of an instance's state, data and progress."""
    if rec is None:
        return None
    h = hashlib.sha256(rec.state.encode())
    for part in (rec.data, rec.progress, (rec.error or "").encode()):
        h.update(b"\0" + bytes(part))
    return h.hexdigest()[:16]
