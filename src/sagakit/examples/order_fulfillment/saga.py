"""The create-order saga, orchestrated by sagakit's coordinator.

::

    create-order     orders.CreateOrder        undo: orders.RejectOrder (with the reason)
    reserve-credit   customers.ReserveCredit   undo: customers.ReleaseCredit
    reserve-stock    inventory.ReserveStock    undo: inventory.ReleaseStock   (reserve phase)
    charge-card      payments.ChargeCard       undo: payments.RefundPayment
    confirm-stock    inventory.ConfirmStock    pivot: the stock is spent, no way back
    ship             shipping.ShipOrder        retried until the carrier takes it
    award-points     loyalty.AwardPoints       retried; never compensated
    approve          orders.ApproveOrder       retried

The acquire-first shape: the stock is locked for ``STOCK_TTL`` seconds
(a timeout-based lock, :class:`sagakit.Reservations`), the card is charged,
and the lock is confirmed at the pivot. A confirm that comes too late is
refused (``inventory.ReservationExpired``) and, being the pivot, compensates
the order: the card is refunded. The saga's ``DEADLINE`` is shorter than the
lock, so a saga that cannot reach its pivot in time is compensated rather
than left holding stock.

A business refusal before the pivot (credit limit, stock, card, an expired
reservation) is recorded in the saga data by ``on_failure`` and the completed
steps are compensated in reverse order; the last compensation rejects the
order with that reason. After the pivot every step is retried forward: the
order will be approved.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

import sagakit as sk

from .inventory import DEFAULT_TTL
from .loyalty import points_for
from .messages import (
    ApproveOrder,
    AwardPoints,
    CardCharged,
    ChargeCard,
    ConfirmStock,
    CreateOrder,
    CreditReserved,
    Line,
    OrderShipped,
    PointsAwarded,
    RefundPayment,
    RejectOrder,
    ReleaseCredit,
    ReleaseStock,
    ReserveCredit,
    ReserveStock,
    ShipOrder,
    StockReserved,
)

replace = msgspec.structs.replace


class OrderData(msgspec.Struct, kw_only=True):
    """The saga's data: the order as placed, then what each step learned."""

    order_id: str
    customer_id: str
    lines: list[Line]
    total: int
    card_token: str
    address: str
    credit_reservation: str | None = None
    stock_expires_at: float | None = None
    payment_id: str | None = None
    shipment_id: str | None = None
    tracking: str | None = None
    points: int | None = None
    #: why the order was refused: the failed step's failure code and message
    reason_code: str | None = None
    reason: str | None = None
    #: failed attempts of retried steps, by step name
    retries: dict[str, int] = {}


def refused(d: OrderData, failure: sk.Failure) -> OrderData:
    """Keep the first refusal as the reason (compensation carries it)."""
    if d.reason_code is not None:
        return d
    return replace(d, reason_code=failure.code, reason=failure.message)


def retried(step: str) -> Callable[[OrderData, sk.Failure], OrderData]:
    """Count the failed attempts of a retried step in the data."""

    def fold(d: OrderData, failure: sk.Failure) -> OrderData:
        return replace(d, retries={**d.retries, step: d.retries.get(step, 0) + 1})

    return fold


def reject(d: OrderData) -> RejectOrder:
    return RejectOrder(
        d.order_id,
        d.reason_code or "sagakit.Compensated",
        d.reason or "the saga was compensated",
        d.customer_id,
        d.total,
        d.lines,
    )


def refund(d: OrderData) -> RefundPayment:
    return RefundPayment(d.order_id, d.total, d.reason or "the order was compensated")


#: a reply must come within this long, or the step counts as failed
STEP_TIMEOUT = 30.0
#: a saga that has not reached its pivot by then is compensated (shorter than the lock)
DEADLINE = 60.0
#: the stock lock's time-to-live the inventory service promises
STOCK_TTL = DEFAULT_TTL
#: forward recovery after the pivot: quick at first, then patient
FORWARD = sk.RetryPolicy(max_attempts=20, initial=0.02, multiplier=2.0, max_delay=2.0)


def define(version: int = 1) -> sk.SagaDefinition[OrderData]:
    """The create-order saga; every version so far has the same steps.

    A rolling upgrade registers version 2 beside version 1 in the new
    processes (see ``benchmarks/chaos.py``): instances keep the version they
    started with, so old processes must hand version-2 messages back.
    """
    return (
        sk.Saga("create-order", OrderData, version=version, deadline=DEADLINE)
        .step("create-order")
        .invoke("orders", lambda d: CreateOrder(d.order_id, d.customer_id, d.lines, d.total))
        .compensate("orders", reject)
        .timeout(STEP_TIMEOUT)
        .step("reserve-credit")
        .invoke("customers", lambda d: ReserveCredit(d.customer_id, d.order_id, d.total))
        .on_reply(CreditReserved, lambda d, r: replace(d, credit_reservation=r.reservation_id))
        .on_failure(refused)
        .compensate("customers", lambda d: ReleaseCredit(d.customer_id, d.order_id))
        .timeout(STEP_TIMEOUT)
        .step("reserve-stock")
        .invoke("inventory", lambda d: ReserveStock(d.order_id, d.lines))
        .on_reply(StockReserved, lambda d, r: replace(d, stock_expires_at=r.expires_at))
        .on_failure(refused)
        .compensate("inventory", lambda d: ReleaseStock(d.order_id))
        .reserves(ttl=STOCK_TTL)
        .timeout(STEP_TIMEOUT)
        .step("charge-card")
        .invoke("payments", lambda d: ChargeCard(d.order_id, d.customer_id, d.total, d.card_token))
        .on_reply(CardCharged, lambda d, r: replace(d, payment_id=r.payment_id))
        .on_failure(refused)
        .compensate("payments", refund)
        .step("confirm-stock")
        .invoke("inventory", lambda d: ConfirmStock(d.order_id))
        .on_failure(refused)
        .confirms("reserve-stock")
        .pivot()
        .step("ship")
        .invoke("shipping", lambda d: ShipOrder(d.order_id, d.customer_id, d.lines, d.address))
        .on_reply(
            OrderShipped, lambda d, r: replace(d, shipment_id=r.shipment_id, tracking=r.tracking)
        )
        .on_failure(retried("ship"))
        .retry(FORWARD)
        .step("award-points")
        .invoke("loyalty", lambda d: AwardPoints(d.customer_id, d.order_id, d.total))
        .on_reply(PointsAwarded, lambda d, r: replace(d, points=r.points))
        .on_failure(retried("award-points"))
        .retry(FORWARD)
        .step("approve")
        .invoke(
            "orders",
            lambda d: ApproveOrder(d.order_id, d.shipment_id or "", points_for(d.total)),
        )
        .on_failure(retried("approve"))
        .retry(FORWARD)
        .build()
    )


create_order = define(1)
