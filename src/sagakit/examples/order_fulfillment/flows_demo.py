"""``sagakit demo --style choreography``: the same plan, no coordinator.

The same 200-order plan (:func:`~.demo.make_plan`), the same six services
with the same seeded books, the same invariants read from each service's own
tables and the same JSON line as the orchestrated demo. The business outcome
of each order comes from the tracker (``app.flows``), which must agree with
the books: approved orders are exactly the completed flows, rejected orders
(with their reason) exactly the compensated ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

from sagakit.choreography import FlowView
from sagakit.errors import FlowNotFound
from sagakit.messages import peek
from sagakit.transport import redact

from . import choreography, mixed
from .app import OrderFulfillment, build
from .catalog import CATALOG
from .choreography import PlacedOrder
from .demo import (
    COMPLETED,
    NOT_FINISHED,
    OTHER,
    REASONS,
    SHIPPING_RETRIED,
    Plan,
    PlannedOrder,
    Result,
    make_plan,
    seed,
)
from .loyalty import points_for
from .messages import Line
from .orders import APPROVED, REJECTED

FINAL = ("completed", "compensated", "failed")


def placed(o: PlannedOrder) -> PlacedOrder:
    lines = [Line(sku, qty, CATALOG[sku].price) for sku, qty in o.items]
    return PlacedOrder(o.order_id, o.customer_id, lines, o.total, o.card_token, o.address)


#: style -> (wiring, tracked choreography)
STYLES = {
    "choreography": (choreography.install, choreography.place_order.name),
    "mixed": (mixed.install, mixed.place_order.name),
}


async def run(args: argparse.Namespace, settings: Any = None) -> Result:
    """Run the plan in ``args.style`` and check the books."""
    install, flow = STYLES[args.style]
    plan = make_plan(args.orders, args.seed)
    of = build(args.store, args.transport, settings=settings)
    install(of)
    await of.start()
    try:
        await seed(of, plan)
        started = time.perf_counter()
        await place_all(of, plan)
        views = await wait_flows(of, [o.order_id for o in plan.orders], args.timeout, flow)
        elapsed = time.perf_counter() - started
        result = await check(of, plan, views, elapsed, args)
        if args.style == "mixed":
            await sagas_agree(of, views, result)
        return result
    finally:
        await of.stop()


async def sagas_agree(of: OrderFulfillment, views: dict[str, FlowView | None], r: Result) -> None:
    """Mixed style: each order's fulfil-order saga (same id) ended as its flow says."""
    wrong = []
    for oid, view in views.items():
        rec = await of.app.store.saga_get(oid)
        reached = view is not None and ("reserve-stock" in view.done)
        expected = None if not reached else view.status if view else None
        if (rec.state if rec else None) != expected:
            wrong.append(oid)
    r.invariants["sagas_match_flows"] = not wrong
    r.details["sagas_match_flows"] = (
        "each fulfil-order saga ended as its flow did" if not wrong else f"disagree: {wrong[:5]}"
    )


async def place_all(of: OrderFulfillment, plan: Plan, concurrency: int = 64) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(o: PlannedOrder) -> None:
        async with gate:
            await choreography.place(of, placed(o))

    await asyncio.gather(*(one(o) for o in plan.orders))


async def wait_flows(
    of: OrderFulfillment, order_ids: list[str], timeout: float, flow: str = "place-order"
) -> dict[str, FlowView | None]:
    """Poll the tracker until every flow is finished or ``timeout`` passes."""
    views: dict[str, FlowView | None] = dict.fromkeys(order_ids)
    loop = asyncio.get_running_loop()
    end, poll = loop.time() + timeout, 0.02
    while loop.time() < end:
        for oid in [i for i, v in views.items() if v is None or v.status not in FINAL]:
            with contextlib.suppress(FlowNotFound):
                views[oid] = await of.app.flows.get(oid, flow=flow, timeline=False)
        if all(v is not None and v.status in FINAL for v in views.values()):
            break
        await asyncio.sleep(poll)
        poll = min(poll * 1.5, 0.25)
    return views


async def check(
    of: OrderFulfillment,
    plan: Plan,
    views: dict[str, FlowView | None],
    elapsed: float,
    args: argparse.Namespace,
) -> Result:
    """The orchestrated demo's invariants, from the books and the tracker."""
    orders = {o.id: o for o in await of.orders.all() if o.id in views}
    shipped = await of.shipping.shipped_orders()
    status = {oid: (v.status if v else "not tracked") for oid, v in views.items()}
    outcomes: Counter[str] = Counter()
    for oid, st in status.items():
        order = orders.get(oid)
        if st == "completed":
            outcomes[SHIPPING_RETRIED if shipped.get(oid, 1) > 1 else COMPLETED] += 1
        elif st == "compensated":
            outcomes[REASONS.get((order.reason_code if order else "") or "", OTHER)] += 1
        else:
            outcomes[NOT_FINISHED] += 1
    invariants, details = await books(of, plan, orders, status, shipped)
    states = Counter(status.values())
    mine = [v for v in views.values() if v is not None]
    return Result(
        orders=len(views),
        states=states,
        outcomes=outcomes,
        expected=plan.expected,
        compensations=_compensations(mine, orders),
        invariants=invariants,
        details=details,
        elapsed_s=elapsed,
        shipping_refusals=sum(a - 1 for oid, a in shipped.items() if oid in views),
        store=redact(args.store),
        transport=redact(args.transport),
        seed=args.seed,
        extra={
            "style": args.style,
            "events_per_saga": round(sum(v.events for v in mine) / max(1, len(mine)), 2),
        },
    )


def _compensations(views: list[FlowView], orders: dict[str, Any]) -> dict[str, str]:
    seen: dict[str, Counter[str]] = {}
    for v in views:
        if v.compensated:
            order = orders.get(v.correlation_id)
            kind = REASONS.get((order.reason_code if order else "") or "", OTHER)
            seen.setdefault(kind, Counter())[", ".join(sorted(v.compensated))] += 1
    return {k: c.most_common(1)[0][0] for k, c in seen.items()}


async def books(
    of: OrderFulfillment,
    plan: Plan,
    orders: dict[str, Any],
    status: dict[str, str],
    shipped: dict[str, int],
) -> tuple[dict[str, bool], dict[str, str]]:
    """Every service's books, and whether they agree with the tracker."""
    approved = {i: o for i, o in orders.items() if o.status == APPROVED}
    credit, stock = await of.customers.audit(), await of.inventory.audit()
    pay, net = await of.payments.books(), await of.payments.net_by_order()
    awards = await of.loyalty.awards()
    held = [s.sku for s in stock if s.reserved]
    dead = await _dead_letters(of, set(status))
    total = sum(o.total for o in approved.values())
    matches = all(
        (status[i] == "completed") == (o.status == APPROVED)
        and (status[i] == "compensated") == (o.status == REJECTED and bool(o.reason))
        for i, o in orders.items()
    )
    invariants = {
        "credit_balanced": all(c.balanced for c in credit),
        "stock_conserved": all(s.conserved for s in stock),
        "stock_reservations_settled": not held,
        "payments_match_approved_orders": pay.charged - pay.refunded == total
        and set(net) == set(approved)
        and all(net[i] == o.total for i, o in approved.items()),
        "approved_orders_shipped": set(shipped) == set(approved),
        "points_only_for_shipped_orders": awards
        == {i: points_for(o.total) for i, o in approved.items()},
        "orders_match_flows": matches and len(orders) == len(plan.orders),
        "no_flow_pending": all(s in ("completed", "compensated") for s in status.values()),
        "no_dead_letters": not dead,
    }
    details = {
        "credit_balanced": f"{len(credit)} customers: available + reserved = credit limit",
        "stock_conserved": f"{len(stock)} products: available + reserved + confirmed = received",
        "stock_reservations_settled": "no stock still held" if not held else f"held: {held}",
        "payments_match_approved_orders": f"charged - refunded = approved {total / 100:,.2f}",
        "approved_orders_shipped": f"{len(shipped)} shipments for {len(approved)} approved",
        "points_only_for_shipped_orders": f"{sum(awards.values()):,} points, {len(awards)} awards",
        "orders_match_flows": "approved ⇔ flow completed, rejected with a reason ⇔ compensated",
        "no_flow_pending": f"{len(status)} flows final (tracker)",
        "no_dead_letters": f"{len(dead)} dead letters"
        + "".join(f"; {d.queue}: {d.reason[:300]}" for d in dead[:3]),
    }
    return invariants, details


async def _dead_letters(of: OrderFulfillment, order_ids: set[str]) -> list[Any]:
    """Dead letters of this run's flows, in every store the services use."""
    dead = []
    stores = {id(s): s for s in [of.app.store, *(x.store for x in of.services)] if s is not None}
    for store in stores.values():
        for d in await store.dead_letters(1000):
            env = peek(d.data)
            if env is not None and env.headers.correlation_id in order_ids:
                dead.append(d)
    return dead
