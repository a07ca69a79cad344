"""The create-order business transaction in both styles at once.

The reservations are choreographed: orders publishes OrderPlaced, customers
reserves credit, inventory reserves stock, each by reacting to the previous
event. Once the stock is reserved, the orders service starts the
orchestrated ``fulfil-order`` saga (``ctx.start_saga``), whose coordinator
charges the card (the pivot), confirms the stock and ships, then *waits for
an event*: loyalty awards the points by reacting to the shipping service's
ShipmentBooked event, and the saga's ``await-points`` step continues when
PointsEarned arrives for its order (``wait_for``, with a timeout). The saga
ends by publishing FulfilmentDone or FulfilmentFailed, and the choreography
continues on it: orders approves, or customers and inventory release their
reservations and orders rejects.

One business transaction, one id: the order id is the correlation id of
every message, the id of the saga and the key of the tracked flow, so
``app.flows.history(order_id)`` tells the whole story in one list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

import sagakit as sk
from sagakit.choreography import Choreography

from . import choreography as chor
from .app import OrderFulfillment
from .choreography import (
    CreditRefused,
    CreditReleased,
    CreditWasReserved,
    OrderApproved,
    OrderPlaced,
    OrderRejected,
    PlacedOrder,
    StockRefused,
    StockReleased,
    StockWasReserved,
)
from .loyalty import points_for
from .messages import (
    ApproveOrder,
    AwardPoints,
    CardCharged,
    ChargeCard,
    ConfirmStock,
    OrderShipped,
    ShipOrder,
)
from .saga import FORWARD, STEP_TIMEOUT

replace = msgspec.structs.replace
#: how long the saga waits for the loyalty points before asking again
POINTS_TIMEOUT = 30.0


@sk.event("shipping.events.ShipmentBooked")
class ShipmentBooked(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    total: int


@sk.event("loyalty.events.PointsEarned")
class PointsEarned(msgspec.Struct, frozen=True):
    order_id: str
    points: int


@sk.event("orders.events.FulfilmentDone")
class FulfilmentDone(msgspec.Struct, frozen=True):
    order: PlacedOrder
    shipment_id: str


@sk.event("orders.events.FulfilmentFailed")
class FulfilmentFailed(msgspec.Struct, frozen=True):
    order: PlacedOrder
    code: str
    reason: str


class FulfilData(msgspec.Struct, kw_only=True):
    """The fulfil-order saga's data: the order, then what each step learned."""

    order: PlacedOrder
    payment_id: str | None = None
    shipment_id: str | None = None
    points: int | None = None
    reason_code: str | None = None
    reason: str | None = None
    retries: dict[str, int] = {}


def refused(d: FulfilData, failure: sk.Failure) -> FulfilData:
    """Keep the refusal as the reason the choreography will carry."""
    return replace(d, reason_code=failure.code, reason=failure.message)


def retried(step: str) -> Callable[[FulfilData, sk.Failure], FulfilData]:
    def fold(d: FulfilData, failure: sk.Failure) -> FulfilData:
        return replace(d, retries={**d.retries, step: d.retries.get(step, 0) + 1})

    return fold


def _ship(d: FulfilData) -> ShipOrder:
    o = d.order
    return ShipOrder(o.order_id, o.customer_id, o.lines, o.address)


def _done(d: FulfilData) -> FulfilmentDone:
    return FulfilmentDone(d.order, d.shipment_id or "")


def _failed(d: FulfilData) -> FulfilmentFailed:
    code = d.reason_code or "sagakit.Compensated"
    return FulfilmentFailed(d.order, code, d.reason or "the saga was compensated")


fulfil_order = (
    sk.Saga(
        "fulfil-order",
        FulfilData,
        on_completed=(FulfilmentDone, _done),
        on_compensated=(FulfilmentFailed, _failed),
    )
    .step("charge-card")
    .invoke(
        "payments",
        lambda d: ChargeCard(
            d.order.order_id, d.order.customer_id, d.order.total, d.order.card_token
        ),
    )
    .on_reply(CardCharged, lambda d, r: replace(d, payment_id=r.payment_id))
    .on_failure(refused)
    .timeout(STEP_TIMEOUT)
    .pivot()
    .step("confirm-stock")
    .invoke("inventory", lambda d: ConfirmStock(d.order.order_id))
    .on_failure(retried("confirm-stock"))
    .retry(FORWARD)
    .step("ship")
    .invoke("shipping", _ship)
    .on_reply(OrderShipped, lambda d, r: replace(d, shipment_id=r.shipment_id))
    .on_failure(retried("ship"))
    .retry(FORWARD)
    .step("await-points")
    .wait_for(
        PointsEarned,
        key=lambda d: d.order.order_id,
        fold=lambda d, e: replace(d, points=e.points),
    )
    .timeout(POINTS_TIMEOUT)
    .retry(FORWARD)
    .build()
)

place_order = (
    Choreography("place-order-mixed")
    .starts_on(OrderPlaced)
    .step("reserve-credit", done=CreditWasReserved, failed=CreditRefused)
    .step("reserve-stock", done=StockWasReserved, failed=StockRefused)
    .step("fulfil", done=FulfilmentDone, failed=FulfilmentFailed)
    .pivot()
    .undo("reserve-credit", on=(StockRefused, FulfilmentFailed), done=CreditReleased)
    .undo("reserve-stock", on=(FulfilmentFailed,), done=StockReleased)
    .completes_on(OrderApproved, OrderRejected)
    .also_records(ShipmentBooked, PointsEarned)  # the saga's side, shown in the timeline
    .deadline(minutes=5)
    .build()
)


def install(of: OrderFulfillment) -> None:
    """Choreograph the reservations, orchestrate the fulfilment, track the whole."""
    app = of.app
    app.saga(fulfil_order)
    chor.reserve_credit(of)
    chor.release_credit(of, (StockRefused, FulfilmentFailed))
    chor.reserve_stock(of)
    chor.release_stock(of, (FulfilmentFailed,))
    chor.reject_orders(of, (StockRefused, FulfilmentFailed))
    _fulfil(of)
    _shipping_announces(of)
    _loyalty(of)
    app.track(place_order)


def _fulfil(of: OrderFulfillment) -> None:
    p, svc = chor.participant_of(of.orders), of.orders

    @p.event(StockWasReserved, publishes=(), starts=(fulfil_order,))
    async def fulfil(e: StockWasReserved, ctx: sk.Context) -> None:
        ctx.start_saga(fulfil_order, FulfilData(order=e.order))

    @p.event(FulfilmentDone, publishes=(OrderApproved,))
    async def approve(e: FulfilmentDone, ctx: sk.Context) -> None:
        oid = e.order.order_id
        await svc.approve(ApproveOrder(oid, e.shipment_id, points_for(e.order.total)), ctx)
        ctx.publish(OrderApproved(oid))


Handler = Callable[[Any, sk.Context], Awaitable[Any]]


def _shipping_announces(of: OrderFulfillment) -> None:
    """The shipping service also tells whoever listens that a parcel was booked."""
    p = chor.participant_of(of.shipping)

    def wrap(name: str, handler: Handler) -> Handler:
        if name != "shipping.ShipOrder":
            return handler

        async def ship(cmd: ShipOrder, ctx: sk.Context) -> Any:
            shipped = await handler(cmd, ctx)
            total = sum(line.amount for line in cmd.lines)
            ctx.publish(ShipmentBooked(cmd.order_id, cmd.customer_id, total))
            return shipped

        return ship

    p.wrap(wrap)


def _loyalty(of: OrderFulfillment) -> None:
    p, svc = chor.participant_of(of.loyalty), of.loyalty

    @p.event(ShipmentBooked, publishes=(PointsEarned,))
    async def award(e: ShipmentBooked, ctx: sk.Context) -> None:
        awarded = await svc.award(AwardPoints(e.customer_id, e.order_id, e.total), ctx)
        ctx.publish(PointsEarned(e.order_id, awarded.points))


def application(
    store: str = "memory://",
    transport: str = "database",
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """The application in this style, for ``sagakit check`` and ``sagakit worker``::

    sagakit check sagakit.examples.order_fulfillment.mixed:application
    sagakit worker --app sagakit.examples.order_fulfillment.mixed:application \\
        --store URL --service customers        # or tracker, coordinator...
    """
    from .app import build

    of = build(store, transport, settings=settings, run=run)
    install(of)
    return of
