"""The coordinator's durable memory: commit records, step keys, the audit log.

All three live in the App's own store. A commit record is written in one
local transaction once every branch is prepared; its presence *is* the
decision to commit (presumed abort: no record, no commit). It is forgotten
when every branch is committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..store import Store, Tx


@dataclass(frozen=True, slots=True)
class AuditLine:
    """One action on a branch or group: what, on what, how it went, who, why."""

    at: float
    node: str
    group_id: str
    resource: str | None
    action: str
    outcome: str
    actor: str
    via: str
    reason: str


class Records:
    """Commit records, step keys and the audit log in a store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.p = store.prefix

    async def decide(
        self, tx: Tx, group: str, node: str, resources: list[str], key: str | None, result: bytes
    ) -> None:
        """The commit decision; with a ``key``, also that key's result (fails if taken)."""
        now = self.store.clock.now()
        await tx.execute(
            f"INSERT INTO {self.p}twophase_records (group_id, node, resources, decided_at) "
            "VALUES (?, ?, ?, ?)",
            group,
            node,
            json.dumps(resources),
            now,
        )
        if key is not None:
            await tx.execute(
                f"INSERT INTO {self.p}twophase_keys (key, group_id, result, decided_at) "
                "VALUES (?, ?, ?, ?)",
                key,
                group,
                result,
                now,
            )

    async def forget(self, group: str) -> None:
        async with self.store.transaction() as tx:
            await tx.execute(f"DELETE FROM {self.p}twophase_records WHERE group_id = ?", group)

    async def recorded(self, node: str | None) -> dict[str, list[str]]:
        """The recorded groups of ``node`` (None: every node) and their resources."""
        sql = f"SELECT group_id, resources FROM {self.p}twophase_records"
        if node is None:
            rows = await self.store.driver.read(sql)
        else:
            rows = await self.store.driver.read(sql + " WHERE node = ?", node)
        return {r[0]: list(json.loads(r[1])) for r in rows}

    async def is_recorded(self, group: str) -> bool:
        rows = await self.store.driver.read(
            f"SELECT 1 FROM {self.p}twophase_records WHERE group_id = ?", group
        )
        return bool(rows)

    async def result_of(self, key: str) -> bytes | None:
        """The stored result of a keyed group that committed (None: never did)."""
        rows = await self.store.driver.read(
            f"SELECT result FROM {self.p}twophase_keys WHERE key = ?", key
        )
        return bytes(rows[0][0]) if rows else None

    async def audit(self, line: AuditLine) -> None:
        async with self.store.transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.p}twophase_audit (at, node, group_id, resource, action, "
                "outcome, actor, via, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                *(line.at, line.node, line.group_id, line.resource, line.action),
                *(line.outcome, line.actor, line.via, line.reason),
            )

    async def audit_lines(self, limit: int = 100, *, group: str | None = None) -> list[AuditLine]:
        """The latest audit lines, newest first (of one group if given)."""
        where, args = (" WHERE group_id = ?", [group]) if group else ("", [])
        rows = await self.store.driver.read(
            "SELECT at, node, group_id, resource, action, outcome, actor, via, reason "
            f"FROM {self.p}twophase_audit{where} ORDER BY seq DESC LIMIT ?",
            *args,
            limit,
        )
        return [AuditLine(*r) for r in rows]
