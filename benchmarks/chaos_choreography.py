"""Chaos for the choreographed (and mixed) demo: SIGKILLed workers, redeliveries.

::

    python benchmarks/chaos_choreography.py --runs 2 --sagas 200 --json
    python benchmarks/chaos_choreography.py --style mixed \\
        --store postgresql://127.0.0.1:5432/test --transport amqp://guest:guest@127.0.0.1:5672/

Kept apart from ``benchmarks/chaos.py`` (whose faults and accounting are
built around the orchestrated saga). Each run starts the six services and the
tracker (and, for ``--style mixed``, a saga coordinator) as separate
``sagakit worker`` processes of
``sagakit.examples.order_fulfillment.<style>:application``, places the demo's
plan paced over a few seconds, and meanwhile SIGKILLs a random worker every
``--min-gap``..``--max-gap`` seconds and restarts it half a second later. A
killed handler's transaction never commits and its message comes back after
the lease: every kill is a crash *and* a redelivery. The tracker is killed
like any other worker.

At the end (every flow finished, or ``--timeout``) it checks the demo's
invariants from every service's books and the tracker's verdicts
(:func:`sagakit.examples.order_fulfillment.flows_demo.check`): nothing lost
(``no_flow_pending``, ``orders_match_flows``), nothing applied twice (credit,
stock, payments, shipments and points balance per order), the tracker agreeing
with the books, no dead letters. PostgreSQL runs use a fresh database; the
broker a namespace of the run's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib as bl

from sagakit.examples.order_fulfillment import choreography, demo, flows_demo, mixed
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build
from sagakit.examples.order_fulfillment.cluster import SERVICES, Cluster
from sagakit.transport._url import fresh_namespace, with_option


def layout(style: str) -> dict[str, list[str]]:
    workers = {f"{s}-1": [s] for s in SERVICES} | {"tracker-1": ["tracker"]}
    if style == "mixed":
        workers["coordinator-1"] = ["coordinator"]
    return workers


async def one_run(args: argparse.Namespace, k: int, root: Path) -> dict[str, Any]:
    store, cleanup = await _store(args, k, root)
    transport = _transport(args.transport)
    app = f"sagakit.examples.order_fulfillment.{args.style}:application"
    plan = demo.make_plan(args.sagas, args.seed + k)
    of = build(store, transport, run=[])
    (mixed if args.style == "mixed" else choreography).install(of)
    await of.start()
    cluster = Cluster(store, transport, layout(args.style), app=app, lease=args.lease)
    kills: list[str] = []
    try:
        await demo.seed(of, plan)
        await cluster.start(timeout=60.0)
        started = time.perf_counter()
        monkey = asyncio.create_task(_monkey(cluster, args, kills, random.Random(args.seed + k)))
        await _place(of, plan, args.place_over)
        flow = flows_demo.STYLES[args.style][1]
        ids = [o.order_id for o in plan.orders]
        views = await flows_demo.wait_flows(of, ids, args.timeout, flow)
        monkey.cancel()
        elapsed = time.perf_counter() - started
        result = await flows_demo.check(
            of, plan, views, elapsed, _demo_args(args, store, transport)
        )
    finally:
        codes = cluster.stop()
        await of.stop()
        await cleanup()
    return {
        "run": k,
        "ok": result.ok,
        "invariants": result.invariants,
        "violated": {k: result.details[k] for k, v in result.invariants.items() if not v},
        "states": dict(result.states),
        "kills": len(kills),
        "killed": kills,
        "elapsed_s": round(result.elapsed_s, 1),
        "unclean_exits": {n: c for n, c in codes.items() if c not in (0, -9)},
    }


async def _place(of: OrderFulfillment, plan: demo.Plan, over: float) -> None:
    gap = over / max(1, len(plan.orders))
    for o in plan.orders:
        await choreography.place(of, flows_demo.placed(o))
        await asyncio.sleep(gap)


async def _monkey(
    cluster: Cluster, args: argparse.Namespace, kills: list[str], rng: random.Random
) -> None:
    while True:
        await asyncio.sleep(rng.uniform(args.min_gap, args.max_gap))
        victim = rng.choice(cluster.names)
        cluster.kill(victim)
        kills.append(victim)
        await asyncio.sleep(0.5)
        await cluster.restart(victim, timeout=60.0)


async def _store(args: argparse.Namespace, k: int, root: Path) -> tuple[str, Any]:
    if args.store == "sqlite":
        folder = root / f"run-{k}"
        folder.mkdir(parents=True)

        async def nothing() -> None:
            return None

        return f"sqlite:///{folder}/sagakit.db", nothing
    name = f"chaos_chor_{int(time.time())}_{k}"
    admin = bl.with_database(args.store, "postgres").split("?", 1)[0]
    await asyncio.to_thread(bl.admin, admin, f"CREATE DATABASE {name}")
    url = bl.with_database(args.store, name)

    async def drop() -> None:
        await asyncio.to_thread(bl.admin, admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    return url, drop


def _transport(transport: str) -> str:
    if transport == "database":
        return transport
    return with_option(transport, "namespace", fresh_namespace("chaoschor"))


def _demo_args(args: argparse.Namespace, store: str, transport: str) -> argparse.Namespace:
    return argparse.Namespace(store=store, transport=transport, seed=args.seed, style=args.style)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sagakit-chaos-chor-"))
    try:
        runs = [await one_run(args, k, root) for k in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "style": args.style,
        "store": "sqlite" if args.store == "sqlite" else "postgresql",
        "transport": args.transport.split(":", 1)[0],
        "runs": runs,
        "ok": all(r["ok"] for r in runs),
        "kills": sum(r["kills"] for r in runs),
        "hardware": bl.hardware(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", choices=("choreography", "mixed"), default="choreography")
    p.add_argument("--store", default="sqlite", help="sqlite (fresh files) or a PostgreSQL URL")
    p.add_argument("--transport", default="database")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--sagas", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--place-over", type=float, default=8.0, help="seconds to place the orders")
    p.add_argument("--min-gap", type=float, default=0.7)
    p.add_argument("--max-gap", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--json", action="store_true")
    return p


def main() -> int:
    args = parser().parse_args()
    summary = asyncio.run(main_async(args))
    for r in summary["runs"]:
        bad = [k for k, v in r["invariants"].items() if not v]
        print(
            f"run {r['run']}: {r['states']} in {r['elapsed_s']} s, {r['kills']} kills, "
            f"{'all invariants hold' if not bad else 'VIOLATED: ' + json.dumps(r['violated'])}"
        )
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
