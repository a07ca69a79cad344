"""Inventory: stock per product, held for orders by sagakit's timeout-based locks.

Each product is a pool of units in :class:`sagakit.Reservations` (the
participant's own database); a reservation holds an order's units until the
saga confirms it at its pivot. If it is not confirmed in time (the saga is
slow, stuck, or its coordinator is down) the App's sweeper gives the units
back, so a dead order never holds goods for ever; a reservation that finds no
free units reclaims overdue ones itself, so correctness never depends on the
sweeper's timing.

A confirmation that comes after the time-to-live is refused with
``inventory.ReservationExpired``; the confirm is the saga's pivot, so the
order is compensated (card refunded, credit released) instead of shipped
without stock. ``sagakit demo --lock-ttl 0.05`` makes that happen often.

Conservation, checked by :meth:`Inventory.audit`::

    received == available + reserved + confirmed     (per product)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import sagakit as sk
from sagakit.locks import Holder

from .messages import (
    ConfirmStock,
    Line,
    OutOfStock,
    ReleaseStock,
    ReservationExpired,
    ReserveStock,
    StockReserved,
)
from .service import Service

#: how long a stock reservation lives, unless ``--lock-ttl`` says otherwise
DEFAULT_TTL = 120.0


def lock_timing(ttl: float | None) -> tuple[float, float]:
    """The stock locks' time-to-live (None: the default) and a sweep interval to match."""
    if ttl is None:
        return DEFAULT_TTL, 1.0
    return ttl, min(1.0, max(0.01, ttl))


@dataclass(frozen=True)
class StockAudit:
    sku: str
    received: int
    available: int
    reserved: int
    confirmed: int

    @property
    def conserved(self) -> bool:
        return self.available >= 0 and self.received == (
            self.available + self.reserved + self.confirmed
        )


class Inventory(Service):
    name = "inventory"
    tables = {"products": "sku TEXT PRIMARY KEY, name TEXT NOT NULL"}

    def __init__(self, ttl: float = DEFAULT_TTL, sweep_every: float | None = 1.0) -> None:
        super().__init__()
        self.ttl, self.sweep_every = ttl, sweep_every
        self._locks: sk.Reservations | None = None

    def install(self, app: sk.App, store: str | sk.Store | None = None) -> sk.Participant:
        p = super().install(app, store)
        self._locks = app.reservations(self.name, ttl=self.ttl, sweep_every=self.sweep_every)
        return p

    @property
    def locks(self) -> sk.Reservations:
        if self._locks is None:
            raise RuntimeError("the inventory service is not installed in an App")
        return self._locks

    def register(self, p: sk.Participant) -> None:
        # db_only: every effect is in this service's tables (see Participant.command)
        p.command(ReserveStock, db_only=True)(self.reserve)
        p.command(ReleaseStock, db_only=True)(self.release)
        p.command(ConfirmStock, db_only=True)(self.confirm)

    async def add_product(self, sku: str, name: str, quantity: int) -> None:
        async with self._store().transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.t('products')} (sku, name) VALUES (?, ?)", sku, name
            )
            await self.locks.add(tx, sku, quantity)

    async def reset(self) -> None:
        await super().reset()
        await self.locks.clear()

    # -- handlers ----------------------------------------------------------

    async def reserve(self, cmd: ReserveStock, ctx: sk.Context) -> StockReserved:
        # All lines or none, in SKU order: raising rolls back the lines already taken.
        try:
            held = await self.locks.take(
                ctx.db, Holder(cmd.order_id), _by_sku(cmd.lines), now=ctx.now
            )
        except sk.ResourceUnavailable as exc:
            raise OutOfStock(exc.message) from exc
        return StockReserved(cmd.order_id, min(r.expires_at for r in held))

    async def release(self, cmd: ReleaseStock, ctx: sk.Context) -> None:
        # Compensation: only live reservations give stock back (idempotent).
        await self.locks.release_held(ctx.db, Holder(cmd.order_id), now=ctx.now)

    async def confirm(self, cmd: ConfirmStock, ctx: sk.Context) -> None:
        try:
            await self.locks.confirm_held(ctx.db, Holder(cmd.order_id), now=ctx.now)
        except sk.ReservationExpired as exc:
            raise ReservationExpired(f"order {cmd.order_id}: {exc.message}") from exc

    async def sweep(self) -> int:
        """Release every reservation past its time-to-live now; how many."""
        return await self.locks.sweep()

    # -- queries -----------------------------------------------------------

    async def audit(self) -> list[StockAudit]:
        return [
            StockAudit(a.resource, a.total, a.available, a.reserved, a.confirmed)
            for a in await self.locks.audit()
        ]

    async def reservation_states(self, order_id: str) -> dict[str, str]:
        return {r.resource: r.state for r in await self.locks.held_by(Holder(order_id))}


def _by_sku(lines: list[Line]) -> dict[str, int | None]:
    total: Counter[str] = Counter()
    for line in lines:
        total[line.sku] += line.quantity
    return dict(total)
