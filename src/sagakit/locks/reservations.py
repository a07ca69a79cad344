"""Timeout-based locks in a participant's own database: the SQL shell of :mod:`.rules`.

::

    stock = app.reservations("inventory", ttl=120.0)   # its sweeper runs where inventory runs

    @inventory.command(ReserveStock)
    async def reserve(cmd: ReserveStock, ctx: sk.Context) -> None:
        await stock.reserve_all(ctx, {"sku-1": 2, "sku-7": 1})   # all or none

    @inventory.command(ConfirmStock)                           # the pivot, or after it
    async def confirm(cmd: ConfirmStock, ctx: sk.Context) -> None:
        await stock.confirm(ctx)          # ReservationExpired if the time ran out

    @inventory.command(ReleaseStock)                           # the compensation
    async def release(cmd: ReleaseStock, ctx: sk.Context) -> None:
        await stock.release(ctx)

Everything happens in the handler's transaction (``ctx.db``), so a
reservation commits with the inbox row and the reply, and a refusal rolls it
back. A resource is a pool of units (``add``); a reservation takes some (or,
with ``amount=None``, the whole item) out of it until it is confirmed
(spent), released or expired (given back).

Concurrency. Each move is one UPDATE whose WHERE clause holds the rule (the
reservation is still ``reserved``; the pool has the units), so two processes
can never both move one reservation or both take the last unit; the pool's
``CHECK (available >= 0)`` backs that up. On PostgreSQL, every operation that
gives units back locks the pool row before the reservation rows, in the same
order as a reservation takes them, and the sweeper skips pools another
transaction holds (``SKIP LOCKED``), so sweeping never blocks a saga.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, ReservationExpired, ResourceUnavailable
from ..store import Store, Tx
from .rules import (
    CONFIRMED,
    EXPIRED,
    RELEASED,
    RESERVED,
    PoolAudit,
    Reservation,
    check_request,
    confirm_refusal,
)

if TYPE_CHECKING:
    from ..participant import Context

_COLUMNS = "holder, step, resource, amount, state, expires_at"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a reservation: a saga (or any business key) and the step that took it."""

    id: str
    step: str = ""

    @classmethod
    def of(cls, ctx: Context) -> Holder:
        """The saga and step of the command being handled."""
        env = ctx.envelope
        return cls(ctx.saga_id or ctx.correlation_id or env.id, env.headers.step or "")


class Reservations:
    """Pools of units and the timeout-based reservations on them, in one store.

    ``space`` keeps one participant's resources apart from another's when
    they share a database; ``ttl`` is the default time a reservation lives.
    """

    def __init__(self, store: Store, space: str, *, ttl: float = 60.0) -> None:
        if not space or not ttl > 0:
            raise ConfigurationError(f"Reservations need a space name and a positive ttl: {ttl}")
        self.store, self.space, self.ttl = store, space, ttl
        self._pools = f"{store.prefix}lock_pools"
        self._rows = f"{store.prefix}reservations"

    @property
    def _for_update(self) -> str:
        return " FOR UPDATE" if self.store.dialect == "postgresql" else ""

    # -- pools ---------------------------------------------------------------

    async def add(self, tx: Tx, resource: str, units: int) -> None:
        """Create ``resource`` with ``units`` units, or add them to it (restock)."""
        check_request(resource, units, self.ttl)
        await tx.execute(
            f"INSERT INTO {self._pools} (space, resource, total, available) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (space, resource) DO UPDATE SET "
            f"total = {self._pools}.total + excluded.total, "
            f"available = {self._pools}.available + excluded.available",
            self.space,
            resource,
            units,
            units,
        )

    async def clear(self) -> None:
        """Delete every pool and reservation of this space (a demo or test starting over)."""
        async with self.store.transaction() as tx:
            for table in (self._rows, self._pools):
                await tx.execute(f"DELETE FROM {table} WHERE space = ?", self.space)

    # -- in a handler ----------------------------------------------------------

    async def reserve(
        self, ctx: Context, resource: str, amount: int | None = 1, *, ttl: float | None = None
    ) -> Reservation:
        """Hold ``amount`` units (None: the whole item) for this saga step until the TTL.

        Raises :class:`~sagakit.errors.ResourceUnavailable` (a business error,
        so the saga compensates) when the units are not there. Reserving again
        from the same saga step returns the first reservation unchanged.
        """
        return (await self.reserve_all(ctx, {resource: amount}, ttl=ttl))[0]

    async def reserve_all(
        self, ctx: Context, wanted: Mapping[str, int | None], *, ttl: float | None = None
    ) -> list[Reservation]:
        """Hold several resources, all or none (a refusal rolls back those already taken)."""
        return await self.take(ctx.db, Holder.of(ctx), wanted, ttl=ttl, now=ctx.now)

    async def confirm(self, ctx: Context, *, step: str | None = None) -> list[Reservation]:
        """Make this saga's reservations here permanent (only those of ``step`` if given).

        Raises :class:`~sagakit.errors.ReservationExpired` if any of them ran
        out of time, was released, or never existed: nothing is confirmed then.
        """
        return await self.confirm_held(ctx.db, _holder(ctx, step), now=ctx.now)

    async def release(self, ctx: Context, *, step: str | None = None) -> int:
        """Give back this saga's live reservations here (a compensation); how many."""
        return await self.release_held(ctx.db, _holder(ctx, step), now=ctx.now)

    # -- with an explicit holder -----------------------------------------------

    async def take(
        self,
        tx: Tx,
        holder: Holder,
        wanted: Mapping[str, int | None],
        *,
        ttl: float | None = None,
        now: float,
    ) -> list[Reservation]:
        """Reserve each resource of ``wanted`` for ``holder``, in a fixed order."""
        ttl = self.ttl if ttl is None else ttl
        done = []
        for resource in sorted(wanted):  # one order for everyone: no deadlocks between sagas
            check_request(resource, wanted[resource], ttl)
            done.append(await self._take_one(tx, holder, resource, wanted[resource], now, ttl))
        return done

    async def confirm_held(self, tx: Tx, holder: Holder, *, now: float) -> list[Reservation]:
        held = await self._held(tx, holder, lock=True)
        if not held:
            raise ReservationExpired(f"{holder.id} holds no reservation in {self.space!r}")
        for r in held:
            refusal = confirm_refusal(r, now)
            if refusal is not None:
                raise ReservationExpired(f"{holder.id}: {refusal}")
        await tx.execute(
            f"UPDATE {self._rows} SET state = ?, updated_at = ? WHERE space = ? AND holder = ? "
            f"AND state = ?{' AND step = ?' if holder.step else ''}",
            *(CONFIRMED, now, self.space, holder.id, RESERVED),
            *((holder.step,) if holder.step else ()),
        )
        return [_with_state(r, CONFIRMED) for r in held]

    async def release_held(self, tx: Tx, holder: Holder, *, now: float) -> int:
        released = 0
        for resource in sorted({r.resource for r in await self._held(tx, holder)}):
            await self._lock_pool(tx, resource)
            amounts = await self._move(tx, RELEASED, now, resource, holder=holder)
            await self._give_back(tx, resource, sum(amounts))
            released += len(amounts)
        return released

    # -- expiry ----------------------------------------------------------------

    async def sweep(self, *, batch: int = 100) -> int:
        """Expire every overdue reservation (up to ``batch`` pools per call); how many.

        Each pool is swept in a transaction of its own; a pool another
        transaction holds is skipped until the next sweep (a reservation that
        needs its units reclaims them itself). Safe to run in several
        processes at once: each reservation expires once.
        """
        now = self.store.clock.now()
        rows = await self.store.driver.read(
            f"SELECT DISTINCT resource FROM {self._rows} WHERE space = ? AND state = ? "
            "AND expires_at <= ? LIMIT ?",
            *(self.space, RESERVED, now, batch),
        )
        expired = 0
        for (resource,) in rows:
            async with self.store.transaction() as tx:
                if await self._lock_pool(tx, resource, skip_locked=True):
                    expired += await self._reclaim(tx, resource, now)
        return expired

    # -- queries ---------------------------------------------------------------

    async def held_by(self, holder: Holder) -> list[Reservation]:
        """Every reservation of ``holder`` (all steps if its step is empty), any state."""
        async with self.store.transaction() as tx:
            return await self._held(tx, holder)

    async def audit(self) -> list[PoolAudit]:
        """The books of every pool here: total == available + reserved + confirmed."""
        held = (
            f"(SELECT COALESCE(SUM(r.amount), 0) FROM {self._rows} r "
            "WHERE r.space = p.space AND r.resource = p.resource AND r.state = ?)"
        )
        rows = await self.store.driver.read(
            f"SELECT p.resource, p.total, p.available, {held}, {held} FROM {self._pools} p "
            "WHERE p.space = ? ORDER BY p.resource",
            *(RESERVED, CONFIRMED, self.space),
        )
        return [PoolAudit(str(r[0]), *(int(v) for v in r[1:])) for r in rows]

    # -- internals -------------------------------------------------------------

    async def _take_one(
        self, tx: Tx, holder: Holder, resource: str, amount: int | None, now: float, ttl: float
    ) -> Reservation:
        existing = await self._one(tx, holder, resource)
        if existing is not None:
            return existing  # the same saga step asked again: idempotent
        got = await self._grab(tx, resource, amount)
        # Units may be sitting in overdue reservations nobody swept yet.
        if got is None and await self._reclaim(tx, resource, now):
            got = await self._grab(tx, resource, amount)
        if got is None:
            raise ResourceUnavailable(await self._shortage(tx, resource, amount))
        r = Reservation(holder.id, holder.step, resource, got, RESERVED, now + ttl)
        await tx.execute(
            f"INSERT INTO {self._rows} (space, {_COLUMNS}, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            *(self.space, r.holder, r.step, resource, got, RESERVED, r.expires_at, now, now),
        )
        return r

    async def _grab(self, tx: Tx, resource: str, amount: int | None) -> int | None:
        """Take the units out of the pool; how many, or None if they are not there."""
        if amount is None:  # the whole item: nobody may hold any of it
            row = await tx.fetchone(
                f"UPDATE {self._pools} SET available = 0 WHERE space = ? AND resource = ? "
                "AND available = total AND total > 0 RETURNING total",
                self.space,
                resource,
            )
            return None if row is None else int(row[0])
        n = await tx.execute(
            f"UPDATE {self._pools} SET available = available - ? "
            "WHERE space = ? AND resource = ? AND available >= ?",
            *(amount, self.space, resource, amount),
        )
        return amount if n == 1 else None

    async def _reclaim(self, tx: Tx, resource: str, now: float) -> int:
        """Expire the overdue reservations of one pool and give their units back."""
        amounts = await self._move(tx, EXPIRED, now, resource, overdue_at=now)
        await self._give_back(tx, resource, sum(amounts))
        return len(amounts)

    async def _move(
        self,
        tx: Tx,
        new: str,
        now: float,
        resource: str,
        *,
        holder: Holder | None = None,
        overdue_at: float | None = None,
    ) -> list[int]:
        """Move live reservations of one pool to ``new``; the amounts of those that moved."""
        where = ["space = ?", "resource = ?", "state = ?"]
        args: list[object] = [self.space, resource, RESERVED]
        if holder is not None:
            where.append("holder = ?")
            args.append(holder.id)
            if holder.step:
                where.append("step = ?")
                args.append(holder.step)
        if overdue_at is not None:
            where.append("expires_at <= ?")
            args.append(overdue_at)
        rows = await tx.fetchall(
            f"UPDATE {self._rows} SET state = ?, updated_at = ? WHERE {' AND '.join(where)} "
            "RETURNING amount",
            *(new, now, *args),
        )
        return [int(r[0]) for r in rows]

    async def _give_back(self, tx: Tx, resource: str, units: int) -> None:
        if units:
            await tx.execute(
                f"UPDATE {self._pools} SET available = available + ? "
                "WHERE space = ? AND resource = ?",
                *(units, self.space, resource),
            )

    async def _lock_pool(self, tx: Tx, resource: str, *, skip_locked: bool = False) -> bool:
        """Lock a pool's row first (PostgreSQL), so units always move pool-then-reservation."""
        if self.store.dialect != "postgresql":
            return True  # SQLite: one writer at a time already
        skip = " SKIP LOCKED" if skip_locked else ""
        row = await tx.fetchone(
            f"SELECT 1 FROM {self._pools} WHERE space = ? AND resource = ? FOR UPDATE{skip}",
            self.space,
            resource,
        )
        return row is not None

    async def _held(self, tx: Tx, holder: Holder, *, lock: bool = False) -> list[Reservation]:
        step = " AND step = ?" if holder.step else ""
        rows = await tx.fetchall(
            f"SELECT {_COLUMNS} FROM {self._rows} WHERE space = ? AND holder = ?{step} "
            f"ORDER BY resource, step{self._for_update if lock else ''}",
            *(self.space, holder.id, *((holder.step,) if holder.step else ())),
        )
        return [_reservation(r) for r in rows]

    async def _one(self, tx: Tx, holder: Holder, resource: str) -> Reservation | None:
        row = await tx.fetchone(
            f"SELECT {_COLUMNS} FROM {self._rows} WHERE space = ? AND holder = ? AND step = ? "
            "AND resource = ?",
            *(self.space, holder.id, holder.step, resource),
        )
        return None if row is None else _reservation(row)

    async def _shortage(self, tx: Tx, resource: str, amount: int | None) -> str:
        row = await tx.fetchone(
            f"SELECT available, total FROM {self._pools} WHERE space = ? AND resource = ?",
            self.space,
            resource,
        )
        if row is None:
            return f"no resource {resource!r} in {self.space!r}"
        want = "the whole item" if amount is None else f"{amount} wanted"
        return f"{resource}: {want}, {row[0]} of {row[1]} available"


def _holder(ctx: Context, step: str | None) -> Holder:
    return Holder(Holder.of(ctx).id, step or "")


def _reservation(r: Any) -> Reservation:
    return Reservation(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), float(r[5]))


def _with_state(r: Reservation, state: str) -> Reservation:
    return Reservation(r.holder, r.step, r.resource, r.amount, state, r.expires_at)
