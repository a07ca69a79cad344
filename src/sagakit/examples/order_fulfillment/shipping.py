"""Shipping: book a parcel with a carrier for a paid order.

The carrier is a fake (:class:`FakeCarrier`) with outages: for some orders it
refuses the first few bookings. The service answers those with
``shipping.CarrierUnavailable`` and the saga, past its pivot, retries the step
with backoff until the carrier takes the parcel (forward recovery). A
shipment is recorded once per order.

Planned outages (the demo's "the carrier refuses this order's first k
bookings") live in the service's own table ``carrier_outages``, written by
:meth:`Shipping.plan_outages` before the orders are placed. Keeping them in
the database rather than in the carrier object is what lets the demo run the
shipping service in another process (or several): every process sees the
same plan, and the booking attempt number comes from the saga, so which
process handles an attempt makes no difference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sagakit as sk

from .messages import CarrierUnavailable, OrderShipped, ShipOrder
from .service import Service


@dataclass
class FakeCarrier:
    """Refuses the first ``outages[order_id]`` booking attempts of an order.

    ``flaky_percent`` adds outages of one or two attempts to that share of all
    other orders, chosen by a hash of the order id (used when serving the API).
    """

    outages: dict[str, int] = field(default_factory=dict)
    flaky_percent: int = 0
    refused: int = 0

    def failures_for(self, order_id: str, planned: int | None = None) -> int:
        """How many first bookings of the order fail: in-memory, planned, or flaky."""
        if order_id in self.outages:
            return self.outages[order_id]
        if planned is not None:
            return planned
        h = int.from_bytes(hashlib.sha256(order_id.encode()).digest()[:4], "big")
        return 1 + h % 2 if h % 100 < self.flaky_percent else 0

    def book(self, order_id: str, attempt: int, planned: int | None = None) -> str:
        """A tracking number, or CarrierUnavailable."""
        if attempt <= self.failures_for(order_id, planned):
            self.refused += 1
            raise CarrierUnavailable(f"carrier API unavailable (attempt {attempt})")
        return "TRK" + hashlib.sha256(order_id.encode()).hexdigest()[:10].upper()


class Shipping(Service):
    name = "shipping"
    tables = {
        "shipments": (
            "id TEXT PRIMARY KEY, order_id TEXT NOT NULL UNIQUE, customer_id TEXT NOT NULL, "
            "address TEXT NOT NULL, parcels BIGINT NOT NULL, tracking TEXT NOT NULL, "
            "booking_attempts BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL"
        ),
        # the fake carrier's planned outages: refuse the first `failures` bookings
        "carrier_outages": "order_id TEXT PRIMARY KEY, failures BIGINT NOT NULL",
    }

    def __init__(self, carrier: FakeCarrier | None = None) -> None:
        super().__init__()
        self.carrier = carrier or FakeCarrier()

    def register(self, p: sk.Participant) -> None:
        # not db_only: the carrier is outside the database, so a copy must not call it
        p.command(ShipOrder)(self.ship)

    async def ship(self, cmd: ShipOrder, ctx: sk.Context) -> OrderShipped:
        existing = await ctx.db.fetchone(
            f"SELECT id, tracking FROM {self.t('shipments')} WHERE order_id = ?", cmd.order_id
        )
        if existing is not None:
            return OrderShipped(existing[0], existing[1])
        planned = await ctx.db.fetchone(
            f"SELECT failures FROM {self.t('carrier_outages')} WHERE order_id = ?", cmd.order_id
        )
        # ctx.attempt is the saga's attempt number for this step.
        tracking = self.carrier.book(
            cmd.order_id, ctx.attempt, int(planned[0]) if planned is not None else None
        )
        shipment_id = sk.new_id()
        await ctx.db.execute(
            f"INSERT INTO {self.t('shipments')} (id, order_id, customer_id, address, parcels, "
            "tracking, booking_attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            shipment_id,
            cmd.order_id,
            cmd.customer_id,
            cmd.address,
            sum(line.quantity for line in cmd.lines),
            tracking,
            ctx.attempt,
            ctx.now,
        )
        return OrderShipped(shipment_id, tracking)

    async def plan_outages(self, outages: dict[str, int]) -> None:
        """Make the carrier refuse the first ``outages[order_id]`` bookings of each order."""
        async with self._store().transaction() as tx:
            for order_id, failures in sorted(outages.items()):
                await tx.execute(
                    f"INSERT INTO {self.t('carrier_outages')} (order_id, failures) VALUES (?, ?)",
                    order_id,
                    failures,
                )

    async def shipped_orders(self) -> dict[str, int]:
        """order id -> booking attempts it took."""
        rows = await self.query(f"SELECT order_id, booking_attempts FROM {self.t('shipments')}")
        return {r[0]: int(r[1]) for r in rows}
