"""Orchestrated vs choreographed vs mixed: the demo's create-order in one run (issue #14).

The order-fulfillment demo's plan (200 orders by default, every outcome) runs
through the same six services in each style, on the embedded default (one
SQLite file per service, the database transport), one style after the other,
repeated and interleaved so that the machine's load hits every style alike:

- ``orchestration``: the create-order saga and its coordinator;
- ``choreography``: services react to each other's events, with the tracker;
- ``choreography, no tracker``: the same, without ``app.track`` (the tracker's cost);
- ``mixed``: choreographed reservations, an orchestrated fulfilment saga.

Per style: sagas/s until every service's books are settled, the p50 and p99
of the time from placing an order to its decision in the orders service,
messages delivered per saga (rows put on any queue of the App's store —
commands, replies, events, fan-out copies; timers apart), the tracker's own
deliveries per saga, and the process's CPU per saga.

    python benchmarks/styles.py [--orders 200] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import resource
import shutil
import tempfile
import time
from typing import Any

import benchlib as bl

from sagakit.examples.order_fulfillment import choreography, mixed
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build
from sagakit.examples.order_fulfillment.demo import make_plan, place_planned, seed
from sagakit.examples.order_fulfillment.flows_demo import placed

STYLES = ["orchestration", "choreography", "choreography, no tracker", "mixed"]
COUNT = (
    "CREATE TABLE IF NOT EXISTS bench_deliveries (queue TEXT, kind TEXT)",
    "CREATE TRIGGER IF NOT EXISTS bench_count AFTER INSERT ON sagakit_messages "
    "BEGIN INSERT INTO bench_deliveries VALUES (NEW.queue, NEW.kind); END",
)


def wire(style: str, of: OrderFulfillment) -> None:
    if style == "choreography":
        choreography.install(of)
    elif style == "choreography, no tracker":
        of.app.track = lambda defn: defn  # type: ignore[method-assign]
        choreography.install(of)
    elif style == "mixed":
        mixed.install(of)


async def place(style: str, of: OrderFulfillment, o: Any) -> None:
    if style == "orchestration":
        await place_planned(of, o)
    else:
        await choreography.place(of, placed(o))


async def one_run(style: str, orders: int, seed_: int, folder: str) -> dict[str, Any]:
    plan = make_plan(orders, seed_)
    of = build(f"sqlite:///{folder}/sagakit.db", sweep_interval=0)
    wire(style, of)
    await of.start()
    try:
        await seed(of, plan)
        async with of.app.store.transaction() as tx:
            for sql in COUNT:
                await tx.execute(sql)
        return await measure(style, of, plan)
    finally:
        await of.stop()


async def measure(style: str, of: OrderFulfillment, plan: Any) -> dict[str, Any]:
    gate, placed_at = asyncio.Semaphore(32), {}

    async def go(o: Any) -> None:
        async with gate:
            placed_at[o.order_id] = time.perf_counter()
            await place(style, of, o)

    cpu0, t0 = _cpu(), time.perf_counter()
    placing = asyncio.gather(*(go(o) for o in plan.orders))
    decided = await watch(of, placed_at, len(plan.orders))
    await placing
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    latencies = [(decided[i] - placed_at[i]) * 1000 for i in decided]
    total, tracker = await deliveries(of)
    n = len(plan.orders)
    return {
        "style": style,
        "orders": n,
        "sagas_per_s": n / elapsed,
        "p50_ms": bl.percentile(latencies, 50),
        "p99_ms": bl.percentile(latencies, 99),
        "messages_per_saga": (total - tracker) / n,
        "tracker_messages_per_saga": tracker / n,
        "cpu_ms_per_saga": cpu * 1000 / n,
    }


async def watch(of: OrderFulfillment, placed_at: dict[str, float], n: int) -> dict[str, float]:
    """Poll the orders' books until every order is decided and everything settled."""
    decided: dict[str, float] = {}
    end = time.perf_counter() + 300
    while time.perf_counter() < end:
        now = time.perf_counter()
        for o in await of.orders.all():
            if o.status != "pending" and o.id in placed_at and o.id not in decided:
                decided[o.id] = now
        if len(decided) == n and await settled(of, n):
            return decided
        await asyncio.sleep(0.005)
    raise RuntimeError("the run did not settle in 300 s")


async def settled(of: OrderFulfillment, n: int) -> bool:
    """Every reservation released or used, every approved order awarded its points."""
    approved = sum(o.status == "approved" for o in await of.orders.all())
    stock_held = sum(s.reserved for s in await of.inventory.audit())
    credit = await of.customers.query(
        f"SELECT count(*) FROM {of.customers.t('credit_reservations')} WHERE state = 'reserved'"
    )
    awards = len(await of.loyalty.awards())
    return stock_held == 0 and int(credit[0][0]) == approved == awards


async def deliveries(of: OrderFulfillment) -> tuple[int, int]:
    async with of.app.store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT count(*), sum(CASE WHEN queue LIKE 'sagakit.track.%' THEN 1 ELSE 0 END) "
            "FROM bench_deliveries WHERE kind IS NOT NULL"
        )
    return int(rows[0][0]), int(rows[0][1] or 0)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in STYLES}
    for r in range(args.repeat):
        for style in STYLES if r % 2 == 0 else reversed(STYLES):
            folder = tempfile.mkdtemp(prefix="sagakit-styles-")
            try:
                results[style].append(await one_run(style, args.orders, args.seed, folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return [_median(style, runs) for style, runs in results.items()]


def _median(style: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    return {"style": style, "orders": runs[0]["orders"], "runs": len(runs)} | {
        k: bl.median([r[k] for r in runs]) for k in keys
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(run(args))
    hw = bl.hardware()
    headers = ("style", "sagas/s", "p50 ms", "p99 ms", "msgs/saga", "tracker msgs/saga", "CPU ms")
    keys = ("style", "sagas_per_s", "p50_ms", "p99_ms", "messages_per_saga")
    table = [
        [r[k] for k in keys] + [r["tracker_messages_per_saga"], r["cpu_ms_per_saga"]] for r in rows
    ]
    title = (
        f"create-order, {args.orders} orders, embedded SQLite, median of {args.repeat}; "
        f"{hw['cpus']} CPUs, load {hw['load']}"
    )
    bl.print_table(title, headers, table)
    if args.json:
        print(json.dumps({"rows": rows, "hardware": hw}))


if __name__ == "__main__":
    main()
