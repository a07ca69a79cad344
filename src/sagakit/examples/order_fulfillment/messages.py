"""Every message the order-fulfillment services exchange, under stable names.

Commands are named ``<service>.<Verb...>``; success replies
``<service>.<Something>ed``. Business refusals are not messages of their own:
a handler raises one of the :class:`~sagakit.BusinessError` subclasses below
and the saga receives a failure reply carrying its ``code`` and message.

Amounts are integers in cents; times are seconds since the epoch.
"""

from __future__ import annotations

import msgspec

import sagakit as sk


class Line(msgspec.Struct, frozen=True):
    """One order line: ``quantity`` units of ``sku`` at ``unit_price`` cents."""

    sku: str
    quantity: int
    unit_price: int

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_price


# -- orders -------------------------------------------------------------------


@sk.command("orders.CreateOrder")
class CreateOrder(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    lines: list[Line]
    total: int


@sk.command("orders.RejectOrder")
class RejectOrder(msgspec.Struct, frozen=True):
    order_id: str
    reason_code: str
    reason: str
    # what the order would have been: a rejection that overtakes its
    # CreateOrder (a timed-out create) still leaves the order, rejected
    customer_id: str = ""
    total: int = 0
    lines: list[Line] = []


@sk.command("orders.ApproveOrder")
class ApproveOrder(msgspec.Struct, frozen=True):
    order_id: str
    shipment_id: str
    points: int


# -- customers ----------------------------------------------------------------


@sk.command("customers.ReserveCredit")
class ReserveCredit(msgspec.Struct, frozen=True):
    customer_id: str
    order_id: str
    amount: int


@sk.reply("customers.CreditReserved")
class CreditReserved(msgspec.Struct, frozen=True):
    reservation_id: str
    available_after: int


@sk.command("customers.ReleaseCredit")
class ReleaseCredit(msgspec.Struct, frozen=True):
    customer_id: str
    order_id: str


class UnknownCustomer(sk.BusinessError):
    code = "customers.UnknownCustomer"


class CreditLimitExceeded(sk.BusinessError):
    code = "customers.CreditLimitExceeded"


# -- inventory ----------------------------------------------------------------


@sk.command("inventory.ReserveStock")
class ReserveStock(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[Line]


@sk.reply("inventory.StockReserved")
class StockReserved(msgspec.Struct, frozen=True):
    reservation_id: str
    expires_at: float


@sk.command("inventory.ReleaseStock")
class ReleaseStock(msgspec.Struct, frozen=True):
    order_id: str


@sk.command("inventory.ConfirmStock")
class ConfirmStock(msgspec.Struct, frozen=True):
    order_id: str


class OutOfStock(sk.BusinessError):
    code = "inventory.OutOfStock"


class ReservationExpired(sk.BusinessError):
    """The reservation lapsed and the stock has gone to someone else meanwhile."""

    code = "inventory.ReservationExpired"


# -- payments -----------------------------------------------------------------


@sk.command("payments.ChargeCard")
class ChargeCard(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    amount: int
    card_token: str


@sk.reply("payments.CardCharged")
class CardCharged(msgspec.Struct, frozen=True):
    payment_id: str


@sk.command("payments.RefundPayment")
class RefundPayment(msgspec.Struct, frozen=True):
    order_id: str
    amount: int
    reason: str


@sk.reply("payments.PaymentRefunded")
class PaymentRefunded(msgspec.Struct, frozen=True):
    refund_id: str


class CardDeclined(sk.BusinessError):
    code = "payments.CardDeclined"


class NothingToRefund(sk.BusinessError):
    code = "payments.NothingToRefund"


# -- shipping -----------------------------------------------------------------


@sk.command("shipping.ShipOrder")
class ShipOrder(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    lines: list[Line]
    address: str


@sk.reply("shipping.OrderShipped")
class OrderShipped(msgspec.Struct, frozen=True):
    shipment_id: str
    tracking: str


class CarrierUnavailable(sk.BusinessError):
    """The carrier could not take the parcel right now; the saga retries."""

    code = "shipping.CarrierUnavailable"


# -- loyalty ------------------------------------------------------------------


@sk.command("loyalty.AwardPoints")
class AwardPoints(msgspec.Struct, frozen=True):
    customer_id: str
    order_id: str
    amount: int


@sk.reply("loyalty.PointsAwarded")
class PointsAwarded(msgspec.Struct, frozen=True):
    points: int
    balance: int
