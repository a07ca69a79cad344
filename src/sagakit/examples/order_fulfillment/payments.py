"""Payments: charge a card for an order, refund a payment.

The card network is a fake (:class:`FakeCardGateway`) that behaves like a
payment provider's test mode: special card tokens are declined. A charge is
recorded once per order, so a redelivered command never charges twice.

A refund compensates the charge when the saga's pivot (confirming the stock)
is refused, e.g. because the stock reservation expired; refunds also serve
returns and operators, and they count in the books:
``charged - refunded == total of approved orders``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sagakit as sk

from .messages import (
    CardCharged,
    CardDeclined,
    ChargeCard,
    NothingToRefund,
    PaymentRefunded,
    RefundPayment,
)
from .service import Service

#: test tokens in the style of card providers' test modes
CARD_OK = "tok_visa"
CARD_DECLINED = "tok_chargeDeclined"
CARD_INSUFFICIENT_FUNDS = "tok_chargeDeclinedInsufficientFunds"


@dataclass
class FakeCardGateway:
    """Approves every token except the declining test tokens."""

    declined: dict[str, str] = field(
        default_factory=lambda: {
            CARD_DECLINED: "card declined by issuer",
            CARD_INSUFFICIENT_FUNDS: "insufficient funds",
        }
    )
    charges: int = 0

    def charge(self, token: str, amount: int) -> str:
        """An authorisation code, or CardDeclined."""
        if token in self.declined:
            raise CardDeclined(f"{self.declined[token]} ({amount / 100:,.2f})")
        self.charges += 1
        return f"auth_{sk.new_id()[-12:]}"


@dataclass(frozen=True)
class Books:
    charged: int
    refunded: int
    payments: int


class Payments(Service):
    name = "payments"
    tables = {
        "payments": (
            "id TEXT PRIMARY KEY, order_id TEXT NOT NULL UNIQUE, customer_id TEXT NOT NULL, "
            "amount BIGINT NOT NULL, authorization_code TEXT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL"
        ),
        "refunds": (
            "id TEXT PRIMARY KEY, payment_id TEXT NOT NULL, amount BIGINT NOT NULL, "
            "reason TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL"
        ),
    }
    indexes = [("refunds", "payment_id")]

    def __init__(self, gateway: FakeCardGateway | None = None) -> None:
        super().__init__()
        self.gateway = gateway or FakeCardGateway()

    def register(self, p: sk.Participant) -> None:
        # not db_only: the card gateway is outside the database, so a copy must not call it
        p.command(ChargeCard)(self.charge)
        p.command(RefundPayment)(self.refund)

    async def charge(self, cmd: ChargeCard, ctx: sk.Context) -> CardCharged:
        existing = await ctx.db.fetchone(
            f"SELECT id FROM {self.t('payments')} WHERE order_id = ?", cmd.order_id
        )
        if existing is not None:
            return CardCharged(existing[0])
        auth = self.gateway.charge(cmd.card_token, cmd.amount)
        payment_id = sk.new_id()
        await ctx.db.execute(
            f"INSERT INTO {self.t('payments')} (id, order_id, customer_id, amount, "
            "authorization_code, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            payment_id,
            cmd.order_id,
            cmd.customer_id,
            cmd.amount,
            auth,
            ctx.now,
        )
        return CardCharged(payment_id)

    async def refund(self, cmd: RefundPayment, ctx: sk.Context) -> PaymentRefunded:
        p, r = self.t("payments"), self.t("refunds")
        row = await ctx.db.fetchone(
            f"SELECT p.id, p.amount, (SELECT COALESCE(SUM(r.amount), 0) FROM {r} r "
            f"WHERE r.payment_id = p.id) FROM {p} p WHERE p.order_id = ?",
            cmd.order_id,
        )
        if row is None:
            raise NothingToRefund(f"order {cmd.order_id} was never charged")
        payment_id, amount, refunded = row[0], int(row[1]), int(row[2])
        if cmd.amount <= 0 or refunded + cmd.amount > amount:
            raise NothingToRefund(
                f"cannot refund {cmd.amount / 100:,.2f}: {(amount - refunded) / 100:,.2f} left"
            )
        refund_id = sk.new_id()
        await ctx.db.execute(
            f"INSERT INTO {r} (id, payment_id, amount, reason, created_at) VALUES (?, ?, ?, ?, ?)",
            refund_id,
            payment_id,
            cmd.amount,
            cmd.reason,
            ctx.now,
        )
        return PaymentRefunded(refund_id)

    async def books(self) -> Books:
        rows = await self.query(
            f"SELECT COALESCE(SUM(amount), 0), count(*) FROM {self.t('payments')}"
        )
        refunded = await self.query(f"SELECT COALESCE(SUM(amount), 0) FROM {self.t('refunds')}")
        return Books(int(rows[0][0]), int(refunded[0][0]), int(rows[0][1]))

    async def net_by_order(self) -> dict[str, int]:
        p, r = self.t("payments"), self.t("refunds")
        rows = await self.query(
            f"SELECT p.order_id, p.amount - (SELECT COALESCE(SUM(r.amount), 0) FROM {r} r "
            f"WHERE r.payment_id = p.id) FROM {p} p"
        )
        return {x[0]: int(x[1]) for x in rows}
