"""Inventory: stock per product and reservations that expire.

A reservation is a semantic lock with a time-to-live. The saga confirms it
once the card is charged; if it is not confirmed in time (the saga is stuck,
or its coordinator is down) the service itself gives the stock back, so a
dead order never holds goods for ever. Expired reservations are released by a
background sweeper (:meth:`Inventory.run_sweeper`) and, in any case, before
every reservation and confirmation, so correctness never depends on the
sweeper's timing.

A confirmation that finds its reservation expired takes the stock again if it
is still there; otherwise it refuses with ``inventory.ReservationExpired`` and
the saga (already past its pivot) retries it, then stops for an operator.

Conservation, checked by :meth:`Inventory.audit`::

    received == available + reserved + confirmed     (per product)
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sagakit as sk
from sagakit.store import Tx

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

log = logging.getLogger("sagakit.examples.order_fulfillment.inventory")

RESERVED, CONFIRMED, RELEASED, EXPIRED = "reserved", "confirmed", "released", "expired"
DEFAULT_TTL = 120.0


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
    tables = {
        "products": (
            "sku TEXT PRIMARY KEY, name TEXT NOT NULL, received BIGINT NOT NULL, "
            "available BIGINT NOT NULL CHECK (available >= 0)"
        ),
        "reservations": (
            "order_id TEXT NOT NULL, sku TEXT NOT NULL, quantity BIGINT NOT NULL, "
            "state TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (order_id, sku)"
        ),
    }
    indexes = [("reservations", "state, expires_at")]

    def __init__(self, ttl: float = DEFAULT_TTL) -> None:
        super().__init__()
        self.ttl = ttl
        self.expired_total = 0

    def register(self, p: sk.Participant) -> None:
        p.command(ReserveStock)(self.reserve)
        p.command(ReleaseStock)(self.release)
        p.command(ConfirmStock)(self.confirm)

    async def add_product(self, sku: str, name: str, quantity: int) -> None:
        async with self._store().transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.t('products')} (sku, name, received, available) "
                "VALUES (?, ?, ?, ?)",
                sku,
                name,
                quantity,
                quantity,
            )

    # -- handlers ----------------------------------------------------------

    async def reserve(self, cmd: ReserveStock, ctx: sk.Context) -> StockReserved:
        await self._expire(ctx.db, ctx.now)
        expires_at = ctx.now + self.ttl
        for sku, qty in _by_sku(cmd.lines).items():
            # All lines or none: raising rolls back the lines already taken.
            if not await self._take(ctx.db, sku, qty):
                raise OutOfStock(await self._shortage(ctx.db, sku, qty))
            await ctx.db.execute(
                f"INSERT INTO {self.t('reservations')} (order_id, sku, quantity, state, "
                "expires_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                cmd.order_id,
                sku,
                qty,
                RESERVED,
                expires_at,
                ctx.now,
            )
        return StockReserved(cmd.order_id, expires_at)

    async def release(self, cmd: ReleaseStock, ctx: sk.Context) -> None:
        # Compensation: only live reservations give stock back (idempotent).
        rows = await self._lines(ctx.db, cmd.order_id, RESERVED)
        for sku, qty in rows:
            if await self._move(ctx.db, cmd.order_id, sku, RESERVED, RELEASED, ctx.now):
                await self._give_back(ctx.db, sku, qty)

    async def confirm(self, cmd: ConfirmStock, ctx: sk.Context) -> None:
        await self._expire(ctx.db, ctx.now)
        rows = await ctx.db.fetchall(
            f"SELECT sku, quantity, state FROM {self.t('reservations')} WHERE order_id = ?",
            cmd.order_id,
        )
        if not rows:
            raise ReservationExpired(f"no stock reservation for order {cmd.order_id}")
        for sku, qty, state in rows:
            if state == RESERVED and await self._move(
                ctx.db, cmd.order_id, sku, RESERVED, CONFIRMED, ctx.now
            ):
                continue
            state = await self._state(ctx.db, cmd.order_id, sku)  # it moved meanwhile
            if state == EXPIRED:
                # Too late: the stock went back on the shelf. Take it again if we can
                # (raising rolls back the move as well as anything taken).
                moved = await self._move(ctx.db, cmd.order_id, sku, EXPIRED, CONFIRMED, ctx.now)
                if not moved or not await self._take(ctx.db, sku, qty):
                    raise ReservationExpired(
                        f"reservation of {qty} x {sku} for order {cmd.order_id} expired "
                        "and the stock is gone"
                    )
                log.info("order %s: re-reserved %d x %s after expiry", cmd.order_id, qty, sku)
            elif state == RELEASED:
                raise ReservationExpired(f"reservation for order {cmd.order_id} was released")

    # -- expiry ------------------------------------------------------------

    async def sweep(self) -> int:
        """Release every reservation past its time-to-live; returns how many lines."""
        store = self._store()
        async with store.transaction() as tx:
            return await self._expire(tx, store.clock.now())

    async def run_sweeper(self, interval: float = 1.0) -> None:
        """Sweep for ever (run it as a task; cancel it to stop)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except sk.StoreError as exc:  # try again on the next round
                log.warning("stock sweeper: %s", exc)

    async def _expire(self, db: Tx, now: float) -> int:
        rows = await db.fetchall(
            f"SELECT order_id, sku, quantity FROM {self.t('reservations')} "
            "WHERE state = ? AND expires_at <= ?",
            RESERVED,
            now,
        )
        expired = 0
        for order_id, sku, qty in rows:
            if await self._move(db, order_id, sku, RESERVED, EXPIRED, now):
                log.info("order %s: reservation of %d x %s expired", order_id, qty, sku)
                await self._give_back(db, sku, qty)
                expired += 1
        db.on_commit(lambda: self._count_expired(expired))
        return expired

    def _count_expired(self, n: int) -> None:
        self.expired_total += n

    # -- helpers -----------------------------------------------------------

    async def _take(self, db: Tx, sku: str, qty: int) -> bool:
        n = await db.execute(
            f"UPDATE {self.t('products')} SET available = available - ? "
            "WHERE sku = ? AND available >= ?",
            qty,
            sku,
            qty,
        )
        return n == 1

    async def _give_back(self, db: Tx, sku: str, qty: int) -> None:
        await db.execute(
            f"UPDATE {self.t('products')} SET available = available + ? WHERE sku = ?", qty, sku
        )

    async def _move(self, db: Tx, order_id: str, sku: str, old: str, new: str, now: float) -> bool:
        """Move a reservation from ``old`` to ``new``; False if it was no longer ``old``.

        The state check is in the UPDATE itself: the sweeper and a release (or a
        confirm) can both have read a reservation as live, and only the first
        to move it may give its stock back. Reading and then writing blindly
        would hand the same stock back twice.
        """
        n = await db.execute(
            f"UPDATE {self.t('reservations')} SET state = ?, updated_at = ? "
            "WHERE order_id = ? AND sku = ? AND state = ?",
            new,
            now,
            order_id,
            sku,
            old,
        )
        return n == 1

    async def _state(self, db: Tx, order_id: str, sku: str) -> str | None:
        row = await db.fetchone(
            f"SELECT state FROM {self.t('reservations')} WHERE order_id = ? AND sku = ?",
            order_id,
            sku,
        )
        return None if row is None else str(row[0])

    async def _lines(self, db: Tx, order_id: str, state: str) -> list[Any]:
        return await db.fetchall(
            f"SELECT sku, quantity FROM {self.t('reservations')} WHERE order_id = ? AND state = ?",
            order_id,
            state,
        )

    async def _shortage(self, db: Tx, sku: str, qty: int) -> str:
        row = await db.fetchone(f"SELECT available FROM {self.t('products')} WHERE sku = ?", sku)
        if row is None:
            return f"no product {sku!r}"
        return f"{sku}: {qty} wanted, {row[0]} available"

    # -- queries -----------------------------------------------------------

    async def audit(self) -> list[StockAudit]:
        r = self.t("reservations")
        held = (
            f"(SELECT COALESCE(SUM(r.quantity), 0) FROM {r} r WHERE r.sku = p.sku AND r.state = ?)"
        )
        rows = await self.query(
            f"SELECT p.sku, p.received, p.available, {held}, {held} FROM {self.t('products')} p",
            RESERVED,
            CONFIRMED,
        )
        return [StockAudit(x[0], *(int(v) for v in x[1:])) for x in rows]

    async def reservation_states(self, order_id: str) -> dict[str, str]:
        rows = await self.query(
            f"SELECT sku, state FROM {self.t('reservations')} WHERE order_id = ?", order_id
        )
        return {r[0]: r[1] for r in rows}


def _by_sku(lines: list[Line]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for line in lines:
        total[line.sku] += line.quantity
    return dict(sorted(total.items()))  # a fixed order: no deadlocks between orders
