"""The create-order business transaction as a choreography: no coordinator.

The same six services and the same business code as the orchestrated saga;
only the wiring differs. Each service reacts to another's event and
publishes its own, in one local transaction with its inbox row::

    orders     --OrderPlaced-->        customers  reserves credit
    customers  --CreditWasReserved-->  inventory  reserves stock
    inventory  --StockWasReserved-->   payments   charges the card (the pivot)
    payments   --PaymentCaptured-->    inventory  confirms the stock
    inventory  --StockConfirmed-->     shipping   books the carrier (retrying it)
    shipping   --OrderWasShipped-->    loyalty    awards points
    loyalty    --PointsWereAwarded-->  orders     approves the order

A refusal is a failure event, and the failure events trigger the
compensations: a declined payment makes customers release the credit and
inventory release the stock, and orders reject the order with the reason.
Events carry the order (event-carried state), so no service asks another.

The contract :data:`place_order` declares all of this for the tracker,
``sagakit check`` and the diagram; it adds no coupling at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

import sagakit as sk
from sagakit.choreography import Choreography
from sagakit.participant import OnRefusal

from .app import OrderFulfillment
from .loyalty import points_for
from .messages import (
    ApproveOrder,
    AwardPoints,
    CarrierUnavailable,
    ChargeCard,
    ConfirmStock,
    CreateOrder,
    Line,
    RejectOrder,
    ReleaseCredit,
    ReleaseStock,
    ReserveCredit,
    ReserveStock,
)

#: the carrier is asked this many times within one delivery before the
#: event goes back to the queue (a technical retry, with backoff)
CARRIER_TRIES = 8


class PlacedOrder(msgspec.Struct, frozen=True):
    """The order as placed, carried by every forward event."""

    order_id: str
    customer_id: str
    lines: list[Line]
    total: int
    card_token: str
    address: str


@sk.event("orders.events.OrderPlaced")
class OrderPlaced(msgspec.Struct, frozen=True):
    order: PlacedOrder


@sk.event("customers.events.CreditWasReserved")
class CreditWasReserved(msgspec.Struct, frozen=True):
    order: PlacedOrder


@sk.event("customers.events.CreditRefused")
class CreditRefused(msgspec.Struct, frozen=True):
    order_id: str
    code: str
    reason: str


@sk.event("inventory.events.StockWasReserved")
class StockWasReserved(msgspec.Struct, frozen=True):
    order: PlacedOrder


@sk.event("inventory.events.StockRefused")
class StockRefused(msgspec.Struct, frozen=True):
    order: PlacedOrder
    code: str
    reason: str


@sk.event("payments.events.PaymentCaptured")
class PaymentCaptured(msgspec.Struct, frozen=True):
    order: PlacedOrder
    payment_id: str


@sk.event("payments.events.PaymentDeclined")
class PaymentDeclined(msgspec.Struct, frozen=True):
    order: PlacedOrder
    code: str
    reason: str


@sk.event("inventory.events.StockConfirmed")
class StockConfirmed(msgspec.Struct, frozen=True):
    order: PlacedOrder


@sk.event("shipping.events.OrderWasShipped")
class OrderWasShipped(msgspec.Struct, frozen=True):
    order: PlacedOrder
    shipment_id: str
    attempts: int


@sk.event("loyalty.events.PointsWereAwarded")
class PointsWereAwarded(msgspec.Struct, frozen=True):
    order: PlacedOrder
    shipment_id: str
    points: int


@sk.event("customers.events.CreditReleased")
class CreditReleased(msgspec.Struct, frozen=True):
    order_id: str


@sk.event("inventory.events.StockReleased")
class StockReleased(msgspec.Struct, frozen=True):
    order_id: str


@sk.event("orders.events.OrderApproved")
class OrderApproved(msgspec.Struct, frozen=True):
    order_id: str


@sk.event("orders.events.OrderRejected")
class OrderRejected(msgspec.Struct, frozen=True):
    order_id: str
    code: str


place_order = (
    Choreography("place-order")
    .starts_on(OrderPlaced)
    .step("reserve-credit", done=CreditWasReserved, failed=CreditRefused)
    .step("reserve-stock", done=StockWasReserved, failed=StockRefused)
    .step("charge-card", done=PaymentCaptured, failed=PaymentDeclined)
    .pivot()
    .step("confirm-stock", done=StockConfirmed)
    .step("ship", done=OrderWasShipped)
    .step("award-points", done=PointsWereAwarded)
    .undo("reserve-credit", on=(StockRefused, PaymentDeclined), done=CreditReleased)
    .undo("reserve-stock", on=(PaymentDeclined,), done=StockReleased)
    .completes_on(OrderApproved, OrderRejected)
    .deadline(minutes=5)
    .build()
)


def refusal(cls: type[StockRefused] | type[PaymentDeclined]) -> OnRefusal:
    """The failure event ``cls`` for a refused forward event carrying an order."""
    return lambda exc, e: cls(e.order, exc.code, str(exc))


def install(of: OrderFulfillment) -> None:
    """Subscribe the six services to each other's events and track the flow."""
    reserve_credit(of)
    release_credit(of, (StockRefused, PaymentDeclined))
    reserve_stock(of)
    release_stock(of, (PaymentDeclined,))
    _confirm_stock(of)
    _payments(of)
    _shipping(of)
    _loyalty(of)
    _approve(of)
    reject_orders(of, (StockRefused, PaymentDeclined))
    of.app.track(place_order)


def participant_of(service: object) -> sk.Participant:
    p = getattr(service, "participant", None)
    assert isinstance(p, sk.Participant)
    return p


#: a failure event that carries the order (and a code and reason)
Failed = type[StockRefused] | type[PaymentDeclined] | type[Any]


def reserve_credit(of: OrderFulfillment) -> None:
    """customers: OrderPlaced -> CreditWasReserved | CreditRefused."""
    p, svc = participant_of(of.customers), of.customers

    @p.event(
        OrderPlaced,
        publishes=(CreditWasReserved, CreditRefused),
        on_refusal=lambda exc, e: CreditRefused(e.order.order_id, exc.code, str(exc)),
    )
    async def reserve(e: OrderPlaced, ctx: sk.Context) -> None:
        o = e.order
        await svc.reserve_credit(ReserveCredit(o.customer_id, o.order_id, o.total), ctx)
        ctx.publish(CreditWasReserved(o))


def release_credit(of: OrderFulfillment, failures: tuple[Failed, ...]) -> None:
    """customers: each failure event after the credit was reserved -> CreditReleased."""
    p, svc = participant_of(of.customers), of.customers

    async def release(e: Any, ctx: sk.Context) -> None:
        order = e.order
        await svc.release_credit(ReleaseCredit(order.customer_id, order.order_id), ctx)
        ctx.publish(CreditReleased(order.order_id))

    for failure in failures:
        p.event(failure, publishes=(CreditReleased,))(release)


def reserve_stock(of: OrderFulfillment) -> None:
    """inventory: CreditWasReserved -> StockWasReserved | StockRefused."""
    p, svc = participant_of(of.inventory), of.inventory

    @p.event(
        CreditWasReserved,
        publishes=(StockWasReserved, StockRefused),
        on_refusal=refusal(StockRefused),
    )
    async def reserve(e: CreditWasReserved, ctx: sk.Context) -> None:
        await svc.reserve(ReserveStock(e.order.order_id, e.order.lines), ctx)
        ctx.publish(StockWasReserved(e.order))


def release_stock(of: OrderFulfillment, failures: tuple[Failed, ...]) -> None:
    """inventory: each failure event after the stock was reserved -> StockReleased."""
    p, svc = participant_of(of.inventory), of.inventory

    async def release(e: Any, ctx: sk.Context) -> None:
        await svc.release(ReleaseStock(e.order.order_id), ctx)
        ctx.publish(StockReleased(e.order.order_id))

    for failure in failures:
        p.event(failure, publishes=(StockReleased,))(release)


def _confirm_stock(of: OrderFulfillment) -> None:
    p, svc = participant_of(of.inventory), of.inventory

    @p.event(PaymentCaptured, publishes=(StockConfirmed,))
    async def confirm(e: PaymentCaptured, ctx: sk.Context) -> None:
        await svc.confirm(ConfirmStock(e.order.order_id), ctx)
        ctx.publish(StockConfirmed(e.order))


def _payments(of: OrderFulfillment) -> None:
    p, svc = participant_of(of.payments), of.payments

    @p.event(
        StockWasReserved,
        publishes=(PaymentCaptured, PaymentDeclined),
        on_refusal=refusal(PaymentDeclined),
    )
    async def charge(e: StockWasReserved, ctx: sk.Context) -> None:
        o = e.order
        cmd = ChargeCard(o.order_id, o.customer_id, o.total, o.card_token)
        charged = await svc.charge(cmd, ctx)
        ctx.publish(PaymentCaptured(o, charged.payment_id))


def _shipping(of: OrderFulfillment) -> None:
    p, svc = participant_of(of.shipping), of.shipping

    @p.event(StockConfirmed, publishes=(OrderWasShipped,))
    async def ship(e: StockConfirmed, ctx: sk.Context) -> None:
        shipment_id, attempts = await book(svc, e.order, ctx)
        ctx.publish(OrderWasShipped(e.order, shipment_id, attempts))


async def book(svc: object, o: PlacedOrder, ctx: sk.Context) -> tuple[str, int]:
    """Book the carrier for the order, asking again while it refuses (forward recovery)."""
    from .shipping import Shipping

    assert isinstance(svc, Shipping)
    shipments, outages = svc.t("shipments"), svc.t("carrier_outages")
    row = await ctx.db.fetchone(
        f"SELECT id, booking_attempts FROM {shipments} WHERE order_id = ?", o.order_id
    )
    if row is not None:
        return str(row[0]), int(row[1])
    planned = await ctx.db.fetchone(
        f"SELECT failures FROM {outages} WHERE order_id = ?", o.order_id
    )
    failures = int(planned[0]) if planned is not None else None
    for attempt in range(1, CARRIER_TRIES + 1):
        try:
            tracking = svc.carrier.book(o.order_id, attempt, failures)
        except CarrierUnavailable:
            continue
        shipment_id = sk.new_id()
        await ctx.db.execute(
            f"INSERT INTO {shipments} (id, order_id, customer_id, address, parcels, tracking, "
            "booking_attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            shipment_id,
            o.order_id,
            o.customer_id,
            o.address,
            sum(line.quantity for line in o.lines),
            tracking,
            attempt,
            ctx.now,
        )
        return shipment_id, attempt
    raise CarrierUnavailable(f"carrier refused {CARRIER_TRIES} bookings in a row", retryable=True)


def _loyalty(of: OrderFulfillment) -> None:
    p, svc = participant_of(of.loyalty), of.loyalty

    @p.event(OrderWasShipped, publishes=(PointsWereAwarded,))
    async def award(e: OrderWasShipped, ctx: sk.Context) -> None:
        o = e.order
        awarded = await svc.award(AwardPoints(o.customer_id, o.order_id, o.total), ctx)
        ctx.publish(PointsWereAwarded(o, e.shipment_id, awarded.points))


def _approve(of: OrderFulfillment) -> None:
    p, svc = participant_of(of.orders), of.orders

    @p.event(PointsWereAwarded, publishes=(OrderApproved,))
    async def approve(e: PointsWereAwarded, ctx: sk.Context) -> None:
        oid = e.order.order_id
        await svc.approve(ApproveOrder(oid, e.shipment_id, points_for(e.order.total)), ctx)
        ctx.publish(OrderApproved(oid))


def reject_orders(of: OrderFulfillment, failures: tuple[Failed, ...]) -> None:
    """orders: a refused credit, and each later failure event -> OrderRejected (with the reason)."""
    p, svc = participant_of(of.orders), of.orders

    async def reject(order_id: str, code: str, reason: str, ctx: sk.Context) -> None:
        await svc.reject(RejectOrder(order_id, code, reason), ctx)
        ctx.publish(OrderRejected(order_id, code))

    @p.event(CreditRefused, publishes=(OrderRejected,))
    async def no_credit(e: CreditRefused, ctx: sk.Context) -> None:
        await reject(e.order_id, e.code, e.reason, ctx)

    async def failed(e: Any, ctx: sk.Context) -> None:
        await reject(e.order.order_id, e.code, e.reason, ctx)

    for failure in failures:
        p.event(failure, publishes=(OrderRejected,))(failed)


async def place(of: OrderFulfillment, order: PlacedOrder) -> None:
    """The orders service records the order and publishes OrderPlaced, in one
    transaction; the order id is the conversation's correlation id."""
    create = CreateOrder(order.order_id, order.customer_id, order.lines, order.total)
    async with of.app.begin("orders", correlation_id=order.order_id) as ctx:
        await of.orders.create(create, ctx)
        ctx.publish(OrderPlaced(order))


def application(
    store: str = "memory://",
    transport: str = "database",
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """The application in this style, for ``sagakit check`` and ``sagakit worker``::

    sagakit check sagakit.examples.order_fulfillment.choreography:application
    sagakit worker --app sagakit.examples.order_fulfillment.choreography:application \\
        --store URL --service customers        # or tracker, coordinator...
    """
    from .app import build

    of = build(store, transport, settings=settings, run=run)
    install(of)
    return of
