"""``sagakit demo``: run the order-fulfillment application end to end.

1. build the application on the given store and transport (default: embedded
   SQLite under ``./.sagakit/demo-<time>/``, one database file per service);
2. seed customers and stock, and plan N orders from ``--seed`` so that every
   outcome occurs: completed, refused for credit, for stock (several orders
   race for a limited edition), for a declined card, and completed after the
   carrier refused the parcel a few times;
3. place the orders concurrently and wait (bounded) until every saga is final;
4. check invariants across all services, print a summary (or, with
   ``--json``, one JSON object as the last line) and exit 0 only if they hold.

``--serve`` keeps the HTTP API up afterwards (see ``sagakit.examples.order_fulfillment.api``).

``--processes N`` runs the services in worker processes instead: N per
service plus ``--coordinators`` (2) saga coordinators, started with
``sagakit worker`` by :class:`sagakit.examples.order_fulfillment.cluster.Cluster`. This process
then only prepares the databases, places the orders (its App consumes nothing;
it relays its outbox) and checks the books. ``--chaos`` SIGKILLs one
coordinator process once half of the sagas are final and restarts it a moment
later; the run must still end with every invariant true.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import sagakit as sk
from sagakit.app import COORDINATOR
from sagakit.cli import ArgumentParser
from sagakit.transport import redact

from .app import OrderFulfillment, build
from .catalog import CATALOG
from .cluster import Cluster, WorkerFailed
from .demo_namespace import own_namespace, remove_own_namespace
from .loyalty import points_for
from .messages import ReservationExpired
from .orders import APPROVED, REJECTED
from .payments import CARD_DECLINED, CARD_INSUFFICIENT_FUNDS, CARD_OK
from .shipping import FakeCarrier
from .worker import LOCK_TTL_ENV

log = logging.getLogger("sagakit.examples.order_fulfillment.demo")

# -- outcomes ------------------------------------------------------------------

COMPLETED = "completed"
SHIPPING_RETRIED = "completed, shipping retried"
CREDIT = "rejected: credit limit"
STOCK = "rejected: out of stock"
CARD = "rejected: card declined"
OTHER = "rejected: other"
NOT_FINISHED = "not finished"
OUTCOMES = [COMPLETED, SHIPPING_RETRIED, CREDIT, STOCK, CARD, OTHER, NOT_FINISHED]
EXPIRED_CODE = ReservationExpired.code
REASONS = {
    "customers.CreditLimitExceeded": CREDIT,
    "inventory.OutOfStock": STOCK,
    "payments.CardDeclined": CARD,
}
JSON_KEYS = {
    COMPLETED: "completed_first_time",
    SHIPPING_RETRIED: "completed_after_shipping_retries",
    CREDIT: "rejected_credit_limit",
    STOCK: "rejected_out_of_stock",
    CARD: "rejected_card_declined",
    OTHER: "rejected_other",
    NOT_FINISHED: "not_finished",
}

STYLES = ["orchestration", "choreography", "mixed", "process-manager"]

#: the share of each planned outcome; the rest complete first time
MIX = {CREDIT: 0.08, CARD: 0.08, STOCK: 0.08, SHIPPING_RETRIED: 0.12}
PLENTIFUL = ["KB-01", "MS-02", "HD-03", "CB-04", "MN-05"]
LIMITED = "LE-06"
TIGHT_CREDIT = 5_000  # 50.00: less than any order sent to a tight customer


# -- the plan -----------------------------------------------------------------


@dataclass(frozen=True)
class PlannedOrder:
    order_id: str
    customer_id: str
    items: list[tuple[str, int]]
    card_token: str
    address: str
    expect: str
    carrier_outage: int = 0

    @property
    def total(self) -> int:
        return sum(CATALOG[sku].price * qty for sku, qty in self.items)


@dataclass
class Plan:
    orders: list[PlannedOrder]
    customers: dict[str, int]  # id -> credit limit
    stock: dict[str, int]  # sku -> quantity received

    @property
    def expected(self) -> Counter[str]:
        return Counter(o.expect for o in self.orders)

    @property
    def outages(self) -> dict[str, int]:
        return {o.order_id: o.carrier_outage for o in self.orders if o.carrier_outage}


def make_plan(n: int, seed: int) -> Plan:
    """N orders whose outcomes are known in advance, in a shuffled order.

    * credit: the order goes to a customer whose limit is below its total;
    * stock: ``k`` more orders want the limited edition than there are units,
      so exactly ``k`` lose the race (which ones depends on timing);
    * card: a declining test card;
    * shipping: the carrier refuses the first 1-3 bookings.

    Everyone else has the credit, stock and card they need.
    """
    rng = random.Random(seed)
    counts = {kind: round(n * share) for kind, share in MIX.items()}
    if n >= len(MIX) + 1:  # every outcome at least once when there is room
        counts = {kind: max(1, c) for kind, c in counts.items()}
    kinds = [kind for kind, c in counts.items() for _ in range(c)]
    kinds += [COMPLETED] * max(0, n - len(kinds))
    kinds = kinds[:n]
    rng.shuffle(kinds)

    regular = [f"c-{i:03d}" for i in range(max(2, n // 10))]
    tight = [f"c-{len(regular) + i:03d}" for i in range(max(1, n // 50))]
    limited_units = max(1, counts[STOCK]) if n >= len(MIX) + 1 else 1
    winners = limited_units  # orders for the limited edition that will get one

    orders = []
    for i, kind in enumerate(kinds):
        items = [(sku, rng.randint(1, 2)) for sku in rng.sample(PLENTIFUL, rng.randint(1, 3))]
        customer = rng.choice(regular)
        card = CARD_OK
        outage = 0
        if kind == CREDIT:  # more than a tight customer's whole limit
            customer = rng.choice(tight)
            items.append(("MN-05", 1))
        elif kind == CARD:
            card = rng.choice([CARD_DECLINED, CARD_INSUFFICIENT_FUNDS])
        elif kind == SHIPPING_RETRIED:
            outage = rng.randint(1, 3)
        if kind == STOCK or (kind == COMPLETED and winners > 0):
            items.append((LIMITED, 1))
            if kind == COMPLETED:
                winners -= 1
        orders.append(
            PlannedOrder(
                sk.new_id(),
                customer,
                items,
                card,
                f"{i + 1} Demo Street, Sagaville",
                kind,
                outage,
            )
        )

    # Everyone's limit covers all their orders; tight customers get 50.00.
    limits = dict.fromkeys(regular, 0) | dict.fromkeys(tight, TIGHT_CREDIT)
    for o in orders:
        if o.customer_id in regular:
            limits[o.customer_id] += o.total
    limits = {c: (v + 50_000 if c in regular else v) for c, v in limits.items()}
    demand: Counter[str] = Counter()
    for o in orders:
        for sku, qty in o.items:
            demand[sku] += qty
    stock = {sku: demand[sku] + 10 for sku in PLENTIFUL}
    stock[LIMITED] = limited_units if winners == 0 else limited_units - winners
    return Plan(orders, limits, stock)


# -- running ------------------------------------------------------------------


@dataclass
class Result:
    """What happened, and whether the books balance."""

    orders: int
    states: Counter[str]
    outcomes: Counter[str]
    expected: Counter[str]
    compensations: dict[str, str]
    invariants: dict[str, bool]
    details: dict[str, str]
    elapsed_s: float
    shipping_refusals: int
    store: str
    transport: str
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.invariants.values())

    @property
    def as_planned(self) -> bool:
        return self.outcomes == self.expected

    def to_json(self) -> dict[str, Any]:
        terminal = ("completed", "compensated", "failed", "aborted")
        return {
            "orders": self.orders,
            "completed": self.states["completed"],
            "compensated": self.states["compensated"],
            "failed": self.states["failed"] + self.states["aborted"],
            "pending": sum(v for k, v in self.states.items() if k not in terminal),
            "elapsed_s": round(self.elapsed_s, 3),
            "sagas_per_s": round(self.orders / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "invariants": self.invariants,
            "ok": self.ok,
            "outcomes": {JSON_KEYS[k]: self.outcomes[k] for k in OUTCOMES},
            "as_planned": self.as_planned,
            "shipping_refusals": self.shipping_refusals,
            "store": self.store,
            "transport": self.transport,
            "seed": self.seed,
            **self.extra,
        }


async def seed(of: OrderFulfillment, plan: Plan) -> None:
    """Start from empty service tables, then load customers, stock and the
    carrier's planned outages (in the shipping service's table, so that every
    process running the shipping service sees them)."""
    for service in of.services:
        await service.reset()
    for i, (customer_id, limit) in enumerate(sorted(plan.customers.items())):
        await of.customers.add_customer(customer_id, f"Customer {i + 1}", limit)
    for sku, qty in sorted(plan.stock.items()):
        await of.inventory.add_product(sku, CATALOG[sku].name, qty)
    await of.shipping.plan_outages(plan.outages)


async def place_all(of: OrderFulfillment, plan: Plan, concurrency: int = 64) -> list[str]:
    """Start one saga per planned order, ``concurrency`` at a time; saga ids."""
    gate = asyncio.Semaphore(concurrency)

    async def place(o: PlannedOrder) -> str:
        async with gate:
            return await place_planned(of, o)

    return list(await asyncio.gather(*(place(o) for o in plan.orders)))


async def place_planned(of: OrderFulfillment, o: PlannedOrder) -> str:
    """Place one planned order through the demo's API; returns its saga id."""
    _, saga_id = await of.place_order(
        o.customer_id, o.items, card_token=o.card_token, address=o.address, order_id=o.order_id
    )
    return saga_id


@dataclass
class Watch:
    """How far the run is, for whoever waits on it (the chaos monkey)."""

    finished: int = 0
    total: int = 0
    halfway: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, finished: int, total: int) -> None:
        self.finished, self.total = finished, total
        if 2 * finished >= total:
            self.halfway.set()


async def wait_all(
    of: OrderFulfillment,
    saga_ids: list[str],
    timeout: float,
    progress: Progress | None,
    watch: Watch | None = None,
) -> None:
    """Poll until every saga is final or ``timeout`` passes, keeping ``watch``
    up to date."""
    task = progress.add_task("sagas finished", total=len(saga_ids)) if progress else None
    waiting = set(saga_ids)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    poll = 0.02
    while waiting and loop.time() < end:
        for saga_id in list(waiting):
            rec = await of.app.store.saga_get(saga_id)
            if rec is not None and rec.state in ("completed", "compensated", "failed", "aborted"):
                waiting.discard(saga_id)
        if progress is not None and task is not None:
            progress.update(task, completed=len(saga_ids) - len(waiting))
        if watch is not None:
            watch.update(len(saga_ids) - len(waiting), len(saga_ids))
        if waiting:
            await asyncio.sleep(poll)
            poll = min(poll * 1.5, 0.25)


async def never_recorded(of: OrderFulfillment, views: list[sk.SagaView]) -> set[str]:
    """Orders the orders service never recorded, rightly: their saga compensated
    after ``create-order`` got no reply in time, and the compensation overtook the
    CreateOrder, which the barrier then refused (nothing done, nothing to undo)."""
    out = set()
    for v in views:
        if v.state != "compensated":
            continue
        history = (await of.app.sagas.get(v.id)).history
        if any(h.entry == "timeout" and h.step == "create-order" for h in history):
            out.add(v.data.order_id)
    return out


async def check(
    of: OrderFulfillment, plan: Plan, saga_ids: list[str], elapsed: float, args: Any
) -> Result:
    """Read every service's books and check they agree with each other."""
    views = [await of.app.sagas.get(s, history=False) for s in saga_ids]
    orders = {o.id: o for o in await of.orders.all()}
    mine = {o.order_id for o in plan.orders}
    states: Counter[str] = Counter(str(v.state) for v in views)
    outcomes: Counter[str] = Counter()
    compensations: dict[str, Counter[str]] = {}
    for v in views:
        order = orders.get(v.data.order_id)
        if v.state == "completed":
            kind = SHIPPING_RETRIED if v.data.retries.get("ship") else COMPLETED
        elif v.state == "compensated":
            code = order.reason_code if order else None
            kind = REASONS.get(code or "", OTHER)
        else:
            kind = NOT_FINISHED
        outcomes[kind] += 1
        if v.compensated:
            compensations.setdefault(kind, Counter())[", ".join(v.compensated)] += 1

    approved = {i: o for i, o in orders.items() if i in mine and o.status == APPROVED}
    credit = await of.customers.audit()
    stock = await of.inventory.audit()
    books = await of.payments.books()
    net = {i: v for i, v in (await of.payments.net_by_order()).items() if v}  # refunds net 0
    shipped = await of.shipping.shipped_orders()
    awards = await of.loyalty.awards()
    held = [s.sku for s in stock if s.reserved]
    dead = []
    for store in {id(s): s for s in [of.app.store, *(x.store for x in of.services)]}.values():
        if store is not None:
            dead += [d for d in await store.dead_letters(1000) if d.saga_id in set(saga_ids)]
    saga_by_order = {v.data.order_id: v.state for v in views}
    unrecorded = await never_recorded(of, [v for v in views if v.data.order_id not in orders])
    approved_total = sum(o.total for o in approved.values())

    invariants = {
        "credit_balanced": all(c.balanced for c in credit),
        "stock_conserved": all(s.conserved for s in stock),
        "stock_reservations_settled": not held,
        "payments_match_approved_orders": books.charged - books.refunded == approved_total
        and set(net) == set(approved)
        and all(net[i] == o.total for i, o in approved.items()),
        "approved_orders_shipped": set(shipped) == set(approved),
        "points_only_for_shipped_orders": awards
        == {i: points_for(o.total) for i, o in approved.items()},
        "orders_match_sagas": all(
            (saga_by_order.get(i) == "completed") == (o.status == APPROVED)
            and (saga_by_order.get(i) == "compensated") == (o.status == REJECTED and bool(o.reason))
            for i, o in orders.items()
            if i in mine
        )
        and len([i for i in orders if i in mine]) + len(unrecorded) == len(plan.orders),
        "no_saga_pending": states["completed"] + states["compensated"] == len(saga_ids),
        "no_dead_letters": not dead,
    }
    details = {
        "credit_balanced": f"{len(credit)} customers: available + reserved = credit limit",
        "stock_conserved": f"{len(stock)} products: available + reserved + confirmed = received",
        "stock_reservations_settled": "no stock still held" if not held else f"held: {held}",
        "payments_match_approved_orders": (
            f"charged {books.charged / 100:,.2f} - refunded {books.refunded / 100:,.2f} = "
            f"approved {approved_total / 100:,.2f}"
        ),
        "approved_orders_shipped": f"{len(shipped)} shipments for {len(approved)} approved",
        "points_only_for_shipped_orders": f"{sum(awards.values()):,} points, {len(awards)} awards",
        "orders_match_sagas": "approved ⇔ completed, rejected with a reason ⇔ compensated"
        + (f" ({len(unrecorded)} never recorded: create-order timed out)" if unrecorded else ""),
        "no_saga_pending": f"{len(saga_ids)} sagas final",
        "no_dead_letters": f"{len(dead)} dead letters",
    }
    return Result(
        orders=len(saga_ids),
        states=states,
        outcomes=outcomes,
        expected=plan.expected,
        compensations={k: c.most_common(1)[0][0] for k, c in compensations.items()},
        invariants=invariants,
        details=details,
        elapsed_s=elapsed,
        shipping_refusals=sum(v.data.retries.get("ship", 0) for v in views),
        store=redact(args.store),
        transport=redact(args.transport),
        seed=args.seed,
        extra={"expired": expired_orders(orders.values(), mine)},
    )


def expired_orders(orders: Any, mine: set[str]) -> int:
    """Orders compensated because their stock reservation expired before the pivot."""
    return sum(1 for o in orders if o.id in mine and o.reason_code == EXPIRED_CODE)


async def run(args: argparse.Namespace) -> Result:
    if args.style == "process-manager":
        from .process_manager import run as run_process_manager

        return await run_process_manager(args)  # type: ignore[no-any-return]
    if args.style != "orchestration":
        return await run_style(args)
    if args.processes:
        return await run_cluster(args)
    plan = make_plan(args.orders, args.seed)
    # Planned outages are in the shipping table (see seed); orders placed
    # later over HTTP (--serve) meet a carrier that refuses 10% of first bookings.
    carrier = FakeCarrier()
    of = build(
        args.store,
        args.transport,
        carrier=carrier,
        settings=_settings(args),
        lock_ttl=args.lock_ttl,
    )
    await of.start()
    try:
        await seed(of, plan)
        progress = None if args.json else _progress()
        started = time.perf_counter()
        if progress is not None:
            progress.start()
        try:
            saga_ids = await place_all(of, plan)
            await wait_all(of, saga_ids, args.timeout, progress)
        finally:
            if progress is not None:
                progress.stop()
        elapsed = time.perf_counter() - started
        result = await check(of, plan, saga_ids, elapsed, args)
        if args.serve:
            report(result, args)
            carrier.flaky_percent = 10
            await serve(of, args.host, args.port)
        return result
    finally:
        await of.stop()


async def run_style(args: argparse.Namespace) -> Result:
    """The same plan in another style (its own module)."""
    from . import flows_demo

    return await flows_demo.run(args, _settings(args))


async def run_cluster(args: argparse.Namespace) -> Result:
    """The demo with every service and the coordinator in worker processes.

    This process migrates and seeds the databases, then starts the workers,
    places the orders, waits, and checks the books; its own App runs no
    handlers (``run=[]``) but relays what it writes to the outbox.
    """
    plan = make_plan(args.orders, args.seed)
    of = build(args.store, args.transport, run=[], settings=_settings(args), lock_ttl=args.lock_ttl)
    await of.start()
    layout = Cluster.layout(per_service=args.processes, coordinators=args.coordinators)
    cluster = Cluster(
        args.store,
        args.transport,
        layout,
        lease=args.lease,
        log_dir=args.log_dir,
        env=_ttl_env(args),
    )
    chaos: dict[str, Any] = {}
    try:
        await seed(of, plan)
        await cluster.start(timeout=60.0)
        progress = None if args.json else _progress()
        watch = Watch()
        monkey = asyncio.create_task(_chaos(cluster, watch, chaos)) if args.chaos else None
        started = time.perf_counter()
        if progress is not None:
            progress.start()
        try:
            saga_ids = await place_all(of, plan)
            await wait_all(of, saga_ids, args.timeout, progress, watch)
        finally:
            if progress is not None:
                progress.stop()
            if monkey is not None:
                # Let a kill already done finish its restart; never start one now.
                if not watch.halfway.is_set():
                    monkey.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monkey
        elapsed = time.perf_counter() - started
        result = await check(of, plan, saga_ids, elapsed, args)
        pids = cluster.pids()
    finally:
        codes = cluster.stop()
        await of.stop()
    unclean = {n: c for n, c in codes.items() if c != 0}
    result.extra |= {
        "processes": pids,
        "worker_exit_codes": codes,
        "workers_stopped_cleanly": not unclean,
        "log_dir": str(cluster.log_dir),
    }
    if args.chaos:
        result.extra["chaos"] = chaos
        result.invariants["chaos_kill_happened"] = bool(chaos.get("killed"))
        result.details["chaos_kill_happened"] = (
            f"SIGKILLed {chaos['killed']} (pid {chaos['killed_pid']}) with "
            f"{chaos['finished_at_kill']} sagas final; "
            f"restarted as pid {chaos.get('restarted_pid')}"
            if chaos.get("killed")
            else "no coordinator was killed"
        )
    return result


async def _chaos(cluster: Cluster, watch: Watch, out: dict[str, Any]) -> None:
    """Once half of the sagas are final: SIGKILL the first coordinator, restart it
    a second later (the other coordinators carry on meanwhile)."""
    await watch.halfway.wait()
    victim = cluster.running(COORDINATOR)[0]
    out["killed"] = victim
    out["killed_pid"] = cluster.kill(victim)
    out["finished_at_kill"] = watch.finished
    await asyncio.sleep(1.0)
    out["restarted_pid"] = await cluster.restart(victim)


def _ttl_env(args: argparse.Namespace) -> dict[str, str]:
    """``--lock-ttl`` for the worker processes (read by ``worker.create``)."""
    return {} if args.lock_ttl is None else {LOCK_TTL_ENV: str(args.lock_ttl)}


def _settings(args: argparse.Namespace) -> sk.Settings | None:
    return sk.Settings(lease=args.lease) if args.lease is not None else None


async def serve(of: OrderFulfillment, host: str, port: int) -> None:
    import uvicorn

    from .api import create_api

    server = uvicorn.Server(uvicorn.Config(create_api(of), host=host, port=port, log_level="info"))
    Console(stderr=True).print(
        f"[bold]serving the API on http://{host}:{port}[/] (POST /orders, GET /orders/{{id}}, "
        "GET /sagas/{id}); Ctrl-C to stop"
    )
    await server.serve()


# -- output -------------------------------------------------------------------


def report(result: Result, args: argparse.Namespace) -> None:
    if args.json:
        return
    console = Console() if sys.stdout.isatty() else Console(width=110)
    out = result.to_json()
    table = Table(title=f"create-order sagas: {result.orders} orders, seed {result.seed}")
    table.add_column("outcome")
    table.add_column("orders", justify="right")
    table.add_column("planned", justify="right")
    table.add_column("steps compensated, in order")
    for kind in OUTCOMES:
        if result.outcomes[kind] or result.expected[kind]:
            table.add_row(
                kind,
                str(result.outcomes[kind]),
                str(result.expected[kind]),
                result.compensations.get(kind, "-"),
            )
    console.print(table)
    console.print(
        f"sagas: [green]{out['completed']} completed[/], {out['compensated']} compensated, "
        f"{out['failed']} failed, {out['pending']} pending in [bold]{out['elapsed_s']:.2f} s "
        f"({out['sagas_per_s']:.0f} sagas/s)[/]"
    )
    console.print(
        f"the carrier refused {result.shipping_refusals} bookings; "
        "each was retried until the parcel shipped"
    )
    if out.get("expired"):
        console.print(f"{out['expired']} orders lost their stock lock before the pivot: refunded")
    inv = Table(title="invariants across the six services")
    inv.add_column("invariant")
    inv.add_column("", justify="center")
    inv.add_column("checked")
    for name, ok in result.invariants.items():
        inv.add_row(name, "[green]✓[/]" if ok else "[red]✗[/]", result.details[name])
    console.print(inv)
    if "processes" in out:
        console.print(
            f"{len(out['processes'])} worker processes "
            f"({'stopped cleanly' if out['workers_stopped_cleanly'] else 'NOT stopped cleanly'})"
            f", logs in {out['log_dir']}"
        )
    console.print(f"store {result.store} · transport {result.transport}")
    if result.ok:
        console.print("[bold green]all invariants hold[/]")
    else:
        console.print("[bold red]INVARIANTS VIOLATED[/]")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def default_store(root: Path = Path(".sagakit"), keep: int = 5) -> str:
    """A fresh embedded store ``.sagakit/demo-<time>/sagakit.db``; old runs pruned."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"demo-{stamp}-{random.randrange(16**4):04x}"
    folder.mkdir()
    for old in sorted(root.glob("demo-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return f"sqlite:///{folder / 'sagakit.db'}"


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="sagakit demo",
        description="Run the order-fulfillment saga demo and check its invariants.",
    )
    p.add_argument("--orders", type=int, default=200, help="orders to place (default 200)")
    p.add_argument(
        "--store",
        default=None,
        help="store URL (default: a fresh sqlite:///.sagakit/demo-*/sagakit.db)",
    )
    p.add_argument("--transport", default="database", help="transport URL (default database)")
    p.add_argument("--seed", type=int, default=7, help="seed of the order mix (default 7)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--serve", action="store_true", help="keep the HTTP API up after the run")
    p.add_argument("--host", default="127.0.0.1", help="--serve address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="--serve port (default 8000)")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the sagas (default 120)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="run the services in worker processes, N per service (default 0: all in this one)",
    )
    p.add_argument(
        "--coordinators",
        type=int,
        default=2,
        help="coordinator processes with --processes (default 2)",
    )
    p.add_argument(
        "--chaos",
        action="store_true",
        help="with --processes: SIGKILL a coordinator halfway, then restart it",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=None,
        help="Settings.lease in seconds: how soon a dead consumer's messages come back "
        "(default 30; 2 with --chaos)",
    )
    p.add_argument(
        "--lock-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time-to-live of the stock locks (default 120); a short one makes some orders "
        "lose their reservations before the pivot, and they are compensated",
    )
    p.add_argument("--log-dir", default=None, help="worker logs (default: a temporary directory)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the broker namespace the demo made for itself (default: removed at the end)",
    )
    p.add_argument(
        "--style",
        choices=STYLES,
        default="orchestration",
        help="how the services cooperate: a saga (default), events, both, or a process manager",
    )
    return p


def misuse(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options argparse accepted one by one."""
    if args.orders < 1:
        return "--orders must be at least 1"
    if args.processes < 0 or (args.processes and args.coordinators < 1):
        return "--processes >= 0 and --coordinators >= 1"
    if args.processes and args.serve:
        return "--serve runs in one process; drop --processes"
    if args.lock_ttl is not None and not args.lock_ttl > 0:
        return "--lock-ttl must be positive"
    if args.style == "process-manager" and (args.processes or args.serve):
        return "--style process-manager runs in one process, without --serve"
    if args.chaos and (not args.processes or args.coordinators < 2):
        return "--chaos needs --processes and two coordinators"
    if args.style != "orchestration" and (args.processes or args.serve):
        return f"--style {args.style} runs in one process, without --processes or --serve"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    wrong = misuse(args)
    if wrong:
        print(f"sagakit: error: demo: {wrong}", file=sys.stderr)
        return 2
    if args.chaos and args.lease is None:
        args.lease = 2.0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args.store = args.store or default_store()
    chosen = own_namespace(args.transport)
    args.transport, made = chosen, chosen != args.transport
    try:
        result = asyncio.run(run(args))
    except (
        sk.ConfigurationError,
        sk.StoreError,
        sk.TransportError,
        OSError,
        WorkerFailed,
    ) as exc:
        log.info("the demo failed", exc_info=True)  # the traceback, with sagakit -v
        print(f"sagakit: error: demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if made and not args.keep:
            remove_own_namespace(args.transport)
    if args.json:
        print(json.dumps(result.to_json()))
    elif not args.serve:
        report(result, args)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
