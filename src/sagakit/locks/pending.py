"""The semantic lock: a record in a pending state, owned by the saga in the middle of it.

A saga's first step creates or changes an aggregate *in a pending state*; its
last step (or its compensation) finalizes or cancels it. In between, other
transactions must not take the half-done change for a settled one, and
another saga must not change the same aggregate on top of it::

    pending = Pending(store, "orders")

    # first step, in the handler's transaction:
    await pending.mark(ctx, order_id, "created")        # PendingElsewhere if another saga holds it
    # a reader, anywhere:
    mark = await pending.status(order_id)              # PendingRecord(..., holder=saga id) or None
    # last step, or the compensation:
    await pending.finalize(ctx, order_id)              # / pending.cancel(ctx, order_id)

The aggregate's own row keeps its business state (``PENDING``, then
``APPROVED`` or ``REJECTED``); the marker says *who* is in the middle of it
and since when, so readers can show "pending, by saga X" and writers can
refuse or wait. Marking again from the same saga is harmless; a marker is
removed only by the saga that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PendingElsewhere
from ..store import Store, Tx

if TYPE_CHECKING:
    from ..participant import Context


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """An aggregate some saga is in the middle of changing."""

    key: str
    holder: str
    change: str
    since: float

    def __str__(self) -> str:
        return f"{self.key}: pending ({self.change}), by saga {self.holder}"


class Pending:
    """Semantic-lock markers for one kind of aggregate (``space``) in a store."""

    def __init__(self, store: Store, space: str) -> None:
        self.store, self.space = store, space
        self._table = f"{store.prefix}pending"

    async def mark(self, ctx: Context, key: str, change: str = "") -> PendingRecord:
        """Mark ``key`` as being changed by this saga; refuse if another saga holds it."""
        return await self.mark_for(ctx.db, key, _holder(ctx), change, now=ctx.now)

    async def finalize(self, ctx: Context, key: str) -> bool:
        """The saga's change is now settled: drop its marker (False if it held none)."""
        return await self.clear_for(ctx.db, key, _holder(ctx))

    async def cancel(self, ctx: Context, key: str) -> bool:
        """The saga's change was undone (a compensation): drop its marker."""
        return await self.clear_for(ctx.db, key, _holder(ctx))

    async def status(self, key: str) -> PendingRecord | None:
        """Who is in the middle of changing ``key``, if anyone (for readers)."""
        async with self.store.transaction() as tx:
            return await self.status_in(tx, key)

    async def status_in(self, tx: Tx, key: str) -> PendingRecord | None:
        row = await tx.fetchone(
            f"SELECT key, holder, change, since FROM {self._table} WHERE space = ? AND key = ?",
            self.space,
            key,
        )
        return None if row is None else PendingRecord(str(row[0]), str(row[1]), str(row[2]), row[3])

    async def mark_for(
        self, tx: Tx, key: str, holder: str, change: str = "", *, now: float
    ) -> PendingRecord:
        await tx.execute(
            f"INSERT INTO {self._table} (space, key, holder, change, since) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (space, key) DO NOTHING",
            *(self.space, key, holder, change, now),
        )
        held = await self.status_in(tx, key)
        assert held is not None  # inserted, or there already
        if held.holder != holder:
            raise PendingElsewhere(str(held))
        return held

    async def clear_for(self, tx: Tx, key: str, holder: str) -> bool:
        n = await tx.execute(
            f"DELETE FROM {self._table} WHERE space = ? AND key = ? AND holder = ?",
            self.space,
            key,
            holder,
        )
        return n == 1


def _holder(ctx: Context) -> str:
    return ctx.saga_id or ctx.correlation_id or ctx.envelope.id
