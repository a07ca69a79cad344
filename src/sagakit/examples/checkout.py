"""A checkout process manager: charge the customer's card within a time limit,
try the next payment method when a card is declined, and let the customer cancel.

::

    awaiting_payment --Charge ok-------------------> paid        (final)
    awaiting_payment --Charge declined, next card--> awaiting_payment
    awaiting_payment --Charge declined, no card----> failed      (final)
    awaiting_payment --CancelCheckout--------------> cancelled   (final)
    awaiting_payment --payment-timeout-------------> cancelled   (final)
    cancelled        --Charge ok (too late)--------> cancelled   and refund it

Run it: ``python -m sagakit.examples.checkout``. The state machine is the
definition below; ``docs/process-managers.md`` walks through it and
``docs/checkout-process.svg`` is drawn from it.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec

import sagakit as sk
from sagakit.process import (
    Decision,
    Hold,
    ProcessManager,
    Replied,
    TimerFired,
    decide,
    evolve,
    react,
)

Status = Literal["awaiting_payment", "paid", "failed", "cancelled"]
#: how long the customer's payment may take before the checkout is cancelled
PAYMENT_TIMEOUT = 600.0


@sk.event("checkout.CheckoutStarted")
class CheckoutStarted(msgspec.Struct, frozen=True):
    order_id: str
    total: int
    methods: list[str]  # payment methods in the customer's order of preference
    pay_within: float = PAYMENT_TIMEOUT


@sk.event("checkout.CancelRequested")
class CancelRequested(msgspec.Struct, frozen=True):
    order_id: str


@sk.command("payments.Charge")
class Charge(msgspec.Struct, frozen=True):
    order_id: str
    amount: int
    method: str


@sk.reply("payments.Charged")
class Charged(msgspec.Struct, frozen=True):
    payment_id: str


@sk.command("payments.Refund")
class Refund(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str


@sk.event("checkout.CheckoutPaid")
class CheckoutPaid(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str


@sk.event("checkout.CheckoutEnded")
class CheckoutEnded(msgspec.Struct, frozen=True):
    order_id: str
    outcome: str
    reason: str = ""


class Checkout(msgspec.Struct, frozen=True):
    """The process manager's state (version 1)."""

    order_id: str
    total: int
    methods: list[str]
    tried: int = 1
    status: Status = "awaiting_payment"
    payment_id: str | None = None
    reason: str = ""


checkout = ProcessManager(
    "checkout",
    Checkout,
    key=lambda m: m.order_id,
    final=("paid", "failed", "cancelled"),
    missing=Hold(seconds=30.0),
)


@checkout.starts(CheckoutStarted, to="awaiting_payment")
def started(e: CheckoutStarted) -> Decision:
    s = Checkout(e.order_id, e.total, e.methods)
    return (
        decide(s)
        .send("payments", Charge(e.order_id, e.total, e.methods[0]))
        .after("payment-timeout", e.pay_within)
    )


@checkout.replied(Charge, returns=Charged, when="awaiting_payment", to=("paid", "failed"))
def charged(r: Replied, s: Checkout) -> Decision:
    if r.ok:
        paid = evolve(s, status="paid", payment_id=r.value.payment_id)
        return paid.cancel("payment-timeout").publish(CheckoutPaid(s.order_id, r.value.payment_id))
    if s.tried < len(s.methods):  # declined: try the customer's next method, same deadline
        method = s.methods[s.tried]
        again = evolve(s, tried=s.tried + 1)
        return again.send("payments", Charge(s.order_id, s.total, method)).noted("next method")
    reason = r.failure.message if r.failure else "declined"
    ended = CheckoutEnded(s.order_id, "failed", reason)
    return evolve(s, status="failed", reason=reason).publish(ended)


@checkout.on(CancelRequested, when="awaiting_payment", to="cancelled")
def cancel(e: CancelRequested, s: Checkout) -> Decision:
    ended = CheckoutEnded(s.order_id, "cancelled", "the customer cancelled")
    return evolve(s, status="cancelled", reason="the customer cancelled").publish(ended)


@checkout.timer("payment-timeout", when="awaiting_payment", to="cancelled")
def too_slow(t: TimerFired, s: Checkout) -> Decision:
    reason = f"no payment within {t.due_at - t.started_at:g}s"
    ended = CheckoutEnded(s.order_id, "cancelled", reason)
    return evolve(s, status="cancelled", reason=reason).publish(ended)


@checkout.replied(Charge, returns=Charged, when="cancelled")
def charged_too_late(r: Replied, s: Checkout) -> Decision:
    """A charge that succeeds after the checkout was cancelled is refunded."""
    if not r.ok:
        return react()
    return react().send("payments", Refund(s.order_id, r.value.payment_id)).noted("refund")


# -- a payments service to run it against ------------------------------------------


class CardDeclined(sk.BusinessError):
    code = "payments.CardDeclined"


class GatewayTimeout(Exception):
    """The card gateway did not answer in time: a technical failure, retried."""


def install_payments(app: sk.App) -> dict[str, list[str]]:
    """A payments participant: cards named ``declined-*`` are refused; for ``slow-*``
    the gateway times out twice, so the charge succeeds on the third attempt."""
    books: dict[str, list[str]] = {"charged": [], "refunded": []}
    payments = app.participant("payments")
    timeouts: list[str] = []

    @payments.command(Charge)
    async def charge(cmd: Charge, ctx: sk.Context) -> Charged:
        if cmd.method.startswith("declined"):
            raise CardDeclined(f"card {cmd.method} declined")
        if cmd.method.startswith("slow") and timeouts.count(cmd.order_id) < 2:
            timeouts.append(cmd.order_id)
            raise GatewayTimeout(f"no answer for {cmd.order_id}")
        books["charged"].append(cmd.order_id)
        return Charged(payment_id=f"pay-{cmd.order_id}")

    @payments.command(Refund)
    async def refund(cmd: Refund, ctx: sk.Context) -> None:
        books["refunded"].append(cmd.order_id)

    return books


async def main() -> None:
    # the gateway is retried after 0.4 s, then 0.8 s: the slow card pays after 1.2 s
    retry = sk.RetryPolicy(initial=0.4, jitter=0.0)
    app = sk.App("memory://", settings=sk.Settings(retry=retry))
    app.process(checkout)
    books = install_payments(app)
    plans = {
        "o-1": ["visa-1"],
        "o-2": ["declined-1", "visa-2"],
        "o-3": ["declined-1", "declined-2"],
        "o-4": ["slow-1"],
    }
    async with app:
        for order_id, methods in plans.items():
            # half a second to pay, so the slow card misses it
            await app.processes.send(checkout, CheckoutStarted(order_id, 1000, methods, 0.5))
        for order_id in plans:
            view = await app.processes.wait(checkout, order_id, timeout=10)
            print(f"{order_id}: {view.status:10} {view.state.tried} method(s) {view.state.reason}")
        await asyncio.sleep(1.5)  # the slow charge lands after the timeout: refunded
    print("charged", sorted(books["charged"]), "refunded", books["refunded"])


if __name__ == "__main__":
    asyncio.run(main())
