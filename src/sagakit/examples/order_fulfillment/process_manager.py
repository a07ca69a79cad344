"""The order flow as a process manager: ``sagakit demo --style process-manager``.

The same six services, the same plan and the same invariants as the
orchestrated demo; only the driver changes. Instead of the create-order saga,
the ``order-flow`` process manager keeps each order's state and decides, reply
by reply, what to send next::

    creating -> reserving_credit -> reserving_stock -> charging      (before the pivot)
             -> confirming_stock -> shipping -> awarding -> approving -> approved
    a refusal before the pivot:  undoing_stock -> undoing_credit -> rejecting -> rejected
    a failure after the pivot:   the same step again, after the "retry" timer

Where the saga's coordinator follows a definition of steps, this is a state
machine written as handlers: each reply handler is pure and returns the next
command, the compensation to run, or a timer to retry later.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

import sagakit as sk
from sagakit.process import Decision, ProcessManager, Replied, TimerFired, decide, evolve

from .app import OrderFulfillment, build
from .catalog import CATALOG
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
    RejectOrder,
    ReleaseCredit,
    ReleaseStock,
    ReserveCredit,
    ReserveStock,
    ShipOrder,
    StockReserved,
)
from .shipping import FakeCarrier

replace = msgspec.structs.replace


@sk.command("fulfillment.PlaceOrder")
class PlaceOrder(msgspec.Struct, frozen=True):
    """Starts one order's flow."""

    order_id: str
    customer_id: str
    lines: list[Line]
    total: int
    card_token: str
    address: str


class Flow(msgspec.Struct, kw_only=True):
    """One order's process: the order, what each step learned, where it is."""

    order_id: str
    customer_id: str
    lines: list[Line]
    total: int
    card_token: str
    address: str
    status: str = "creating"
    attempt: int = 1
    credit_reservation: str | None = None
    stock_expires_at: float | None = None
    payment_id: str | None = None
    shipment_id: str | None = None
    tracking: str | None = None
    points: int | None = None
    reason_code: str | None = None
    reason: str | None = None
    retries: dict[str, int] = {}
    compensated: list[str] = []


@dataclass(frozen=True)
class Step:
    status: str
    name: str
    to: str
    command: Callable[[Flow], Any]
    fold: Callable[[Flow, Any], Flow] = lambda d, r: d
    reply: type[Any] | None = None  # the success reply's type, when it carries data


FORWARD = [
    Step("creating", "create-order", "orders",
         lambda d: CreateOrder(d.order_id, d.customer_id, d.lines, d.total)),
    Step("reserving_credit", "reserve-credit", "customers",
         lambda d: ReserveCredit(d.customer_id, d.order_id, d.total),
         lambda d, r: replace(d, credit_reservation=r.reservation_id), CreditReserved),
    Step("reserving_stock", "reserve-stock", "inventory",
         lambda d: ReserveStock(d.order_id, d.lines),
         lambda d, r: replace(d, stock_expires_at=r.expires_at), StockReserved),
    Step("charging", "charge-card", "payments",
         lambda d: ChargeCard(d.order_id, d.customer_id, d.total, d.card_token),
         lambda d, r: replace(d, payment_id=r.payment_id), CardCharged),
    Step("confirming_stock", "confirm-stock", "inventory", lambda d: ConfirmStock(d.order_id)),
    Step("shipping", "ship", "shipping",
         lambda d: ShipOrder(d.order_id, d.customer_id, d.lines, d.address),
         lambda d, r: replace(d, shipment_id=r.shipment_id, tracking=r.tracking), OrderShipped),
    Step("awarding", "award-points", "loyalty",
         lambda d: AwardPoints(d.customer_id, d.order_id, d.total),
         lambda d, r: replace(d, points=r.points), PointsAwarded),
    Step("approving", "approve", "orders",
         lambda d: ApproveOrder(d.order_id, d.shipment_id or "", points_for(d.total))),
]  # fmt: skip
PIVOT = 3  # charging: no way back once the card is charged
#: the compensations, run in this order from the one of the last completed step
UNDO = [
    Step("undoing_stock", "reserve-stock", "inventory", lambda d: ReleaseStock(d.order_id)),
    Step("undoing_credit", "reserve-credit", "customers",
         lambda d: ReleaseCredit(d.customer_id, d.order_id)),
    Step("rejecting", "create-order", "orders",
         lambda d: RejectOrder(d.order_id, d.reason_code or "", d.reason or "")),
]  # fmt: skip
STATES = [s.status for s in FORWARD + UNDO] + ["approved", "rejected"]
RETRYING = [s.status for s in FORWARD[PIVOT + 1 :] + UNDO]


def backoff(attempt: int) -> float:
    """Seconds before resending a step after its ``attempt``-th failure (deterministic)."""
    return float(min(0.02 * 2 ** (attempt - 1), 2.0))


order_flow = ProcessManager(
    "order-flow", Flow, key=lambda m: m.order_id, states=STATES, final=["approved", "rejected"]
)


@order_flow.starts(PlaceOrder, to="creating")
def placed(m: PlaceOrder) -> Decision:
    flow = Flow(**msgspec.structs.asdict(m))
    return decide(flow).send("orders", FORWARD[0].command(flow))


def _undo_from(d: Flow, failed_index: int) -> Decision:
    """Compensate the steps before ``failed_index``, last one first."""
    todo = [u for u in UNDO if _index(u.name) < failed_index]
    if not todo:
        return decide(replace(d, status="rejected"))
    first = todo[0]
    return decide(replace(d, status=first.status, attempt=1)).send(first.to, first.command(d))


def _index(step_name: str) -> int:
    return next(i for i, s in enumerate(FORWARD) if s.name == step_name)


def _forward(i: int) -> Callable[[Replied, Flow], Decision]:
    step = FORWARD[i]

    def on_reply(r: Replied, d: Flow) -> Decision:
        if r.ok:
            d = replace(step.fold(d, r.value), attempt=1)
            if i + 1 == len(FORWARD):
                return decide(replace(d, status="approved"))
            nxt = FORWARD[i + 1]
            return decide(replace(d, status=nxt.status)).send(nxt.to, nxt.command(d))
        f = r.failure
        if i <= PIVOT:  # refused before the pivot: keep the first reason, compensate
            d = replace(d, reason_code=f.code if f else "", reason=f.message if f else "")
            return _undo_from(d, i)
        retries = {**d.retries, step.name: d.retries.get(step.name, 0) + 1}
        d = replace(d, retries=retries, attempt=d.attempt + 1)
        return decide(d).after("retry", backoff(d.attempt - 1))

    return on_reply


def _undo(k: int) -> Callable[[Replied, Flow], Decision]:
    undo = UNDO[k]

    def on_reply(r: Replied, d: Flow) -> Decision:
        if not r.ok:  # compensations are retried until they succeed
            return decide(replace(d, attempt=d.attempt + 1)).after("retry", backoff(d.attempt))
        d = replace(d, compensated=[*d.compensated, undo.name], attempt=1)
        if k + 1 == len(UNDO):
            return decide(replace(d, status="rejected"))
        nxt = UNDO[k + 1]
        return decide(replace(d, status=nxt.status)).send(nxt.to, nxt.command(d))

    return on_reply


def _register() -> None:
    for i, step in enumerate(FORWARD):
        after = FORWARD[i + 1].status if i + 1 < len(FORWARD) else "approved"
        undo = [u.status for u in UNDO if _index(u.name) < i] or ["rejected"]
        to = [after, *(undo[:1] if i <= PIVOT else [])]
        command = type(step.command(_BLANK))
        order_flow.replied(command, returns=step.reply, when=step.status, to=to)(_forward(i))
    for k, undo_step in enumerate(UNDO):
        after = UNDO[k + 1].status if k + 1 < len(UNDO) else "rejected"
        order_flow.replied(type(undo_step.command(_BLANK)), when=undo_step.status, to=after)(
            _undo(k)
        )


@order_flow.timer("retry", when=RETRYING)
def retry(t: TimerFired, d: Flow) -> Decision:
    """Send the current step's command again, as its next attempt."""
    step = next(s for s in FORWARD + UNDO if s.status == d.status)
    return evolve(d).send(step.to, step.command(d), attempt=d.attempt)


_BLANK = Flow(order_id="", customer_id="", lines=[], total=0, card_token="", address="")
_register()


# -- running the demo with it ----------------------------------------------------------


@dataclass
class _View:
    """A process instance shown to the demo's book-keeping as a saga view."""

    state: str
    data: Flow
    compensated: list[str]


class _Sagas:
    def __init__(self, views: dict[str, _View]) -> None:
        self.views = views

    async def get(self, key: str, *, history: bool = False) -> _View:
        return self.views[key]


class _Books:
    """The application with its process instances in place of saga views, for ``check``."""

    def __init__(self, of: OrderFulfillment, views: dict[str, _View]) -> None:
        self._of = of
        self.app = _AppView(of.app, _Sagas(views))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._of, name)


class _AppView:
    def __init__(self, app: sk.App, sagas: _Sagas) -> None:
        self._app, self.sagas = app, sagas

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


async def place(of: OrderFulfillment, o: Any) -> str:
    """Start one planned order's flow; its key is the order id."""
    lines = [Line(sku, qty, CATALOG[sku].price) for sku, qty in o.items]
    total = sum(line.amount for line in lines)
    msg = PlaceOrder(o.order_id, o.customer_id, lines, total, o.card_token, o.address)
    await of.app.processes.send(order_flow, msg, correlation_id=o.order_id)
    return str(o.order_id)


async def wait_done(of: OrderFulfillment, n: int, timeout: float) -> None:
    """Poll until ``n`` instances are final or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        counts = await of.app.processes.counts(order_flow)
        if counts.get("approved", 0) + counts.get("rejected", 0) >= n:
            return
        await asyncio.sleep(0.05)


async def views(of: OrderFulfillment, keys: list[str]) -> dict[str, _View]:
    out = {}
    for key in keys:
        v = await of.app.processes.get(order_flow, key, history=False)
        state = {"approved": "completed", "rejected": "compensated"}.get(v.status or "", "running")
        out[key] = _View(state, v.state, list(v.state.compensated))
    return out


async def run(args: argparse.Namespace) -> Any:
    """The demo's run, with the process manager as the driver; the demo's Result."""
    from .demo import _settings, check, make_plan, seed

    plan = make_plan(args.orders, args.seed)
    of = build(args.store, args.transport, carrier=FakeCarrier(), settings=_settings(args))
    of.app.process(order_flow)
    await of.start()
    try:
        await seed(of, plan)
        started = time.perf_counter()
        gate = asyncio.Semaphore(64)

        async def one(o: Any) -> str:
            async with gate:
                return await place(of, o)

        keys = list(await asyncio.gather(*(one(o) for o in plan.orders)))
        await wait_done(of, len(keys), args.timeout)
        elapsed = time.perf_counter() - started
        books: Any = _Books(of, await views(of, keys))  # the demo's check reads it as the app
        result = await check(books, plan, keys, elapsed, args)
        result.extra["style"] = "process-manager"
        return result
    finally:
        await of.stop()
