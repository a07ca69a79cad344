"""Chaos for the choreographed (and mixed) demo: kills, duplicates, broker cuts.

::

    python benchmarks/chaos.py --style choreography --runs 2 --sagas 200 --json
    python benchmarks/chaos_choreography.py --style mixed \\
        --store 'postgresql://127.0.0.1:5432/test?max_size=2' \\
        --transport amqp://guest:guest@127.0.0.1:5672/ --sagas 200 --json

``benchmarks/chaos.py --style choreography|mixed`` runs this module. Each run
starts the six services and the tracker (and, for ``--style mixed``, a saga
coordinator) as separate ``sagakit worker`` processes of ``chaos_app:<style>``
(the style's application with the chaos harness's instrumentation), places
the demo's plan paced over a few seconds and meanwhile injects, with
:class:`chaos_faults.Monkey`, the faults of ``--faults``:

``kill_participant`` / ``kill_coordinator``
    SIGKILL of a worker (the tracker is one like any other; the coordinator
    exists in the mixed style only), restarted a moment later: a killed
    handler's transaction never commits and its message comes back after the
    lease, so every kill is a crash *and* a redelivery;
``duplicate_delivery``
    ``--dup`` of every process's sends and event publications go out twice
    through the real transport (:func:`chaos_app.duplicate_sends`; the copies
    are counted and reported as ``duplicates_sent``);
``broker_cut``
    RabbitMQ: connections of the run's private virtual host closed with
    ``rabbitmqctl close_connection``; Redis: ``CLIENT KILL``; NATS: a worker
    cuts its own socket;
``db_drop``
    PostgreSQL: ``pg_terminate_backend`` of the workers' backends.

At the end (every flow finished, or ``--timeout``) it checks the demo's
invariants from every service's books and the tracker's verdicts
(:func:`sagakit.examples.order_fulfillment.flows_demo.check`: nothing lost,
balances per order, the tracker agreeing with the books, no dead letters),
and the effect ledger (:func:`chaos_app.record_event_effects`): every event
and command handler's committed effect leaves a row, no unique key, counted
per (correlation id, step, phase). ``double_applied`` counts rows beyond the
first; ``lost`` counts steps the tracker saw done (or compensated) whose
effect is not in the ledger, effects of a compensated flow never undone, and
finished flows whose order was never approved or rejected. Every run gets a
fresh SQLite folder or PostgreSQL database and a private broker namespace
(:func:`chaos.prepare`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import benchlib as bl
import chaos
import chaos_app
from chaos_faults import (
    BROKER_CUT,
    DB_DROP,
    DUPLICATE,
    KILL_COORDINATOR,
    KILL_PARTICIPANT,
    Infra,
    Monkey,
)

import sagakit as sk
from sagakit.choreography.contract import ChoreographyDefinition
from sagakit.choreography.queries import FlowView
from sagakit.examples.order_fulfillment import choreography, demo, flows_demo, mixed
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build
from sagakit.examples.order_fulfillment.cluster import SERVICES, Cluster
from sagakit.transport import redact

#: benchmarks/, on the workers' PYTHONPATH (for chaos_app)
HERE = Path(__file__).resolve().parent

FAULTS = (KILL_PARTICIPANT, KILL_COORDINATOR, DUPLICATE, BROKER_CUT, DB_DROP)
STYLES = {"choreography": choreography, "mixed": mixed}
#: a flow the harness accepts at the end: finished, or reported stuck to operators
SETTLED = ("completed", "compensated", "failed", "stuck")


def layout(style: str) -> dict[str, list[str]]:
    workers = {f"{s}-1": [s] for s in SERVICES} | {"tracker-1": ["tracker"]}
    if style == "mixed":
        workers["coordinator-1"] = ["coordinator"]
    return workers


async def one_run(args: argparse.Namespace, k: int, root: Path) -> dict[str, Any]:
    folder = root / f"run-{k + 1}"
    infra = await chaos.prepare(args.store, args.transport, folder, uuid.uuid4().hex[:8])
    style = STYLES[args.style]
    try:
        plan = demo.make_plan(args.sagas, args.seed + k)
        of = build(infra.store, infra.transport, run=[], settings=sk.Settings(lease=args.lease))
        style.install(of)
        chaos_app.duplicate_sends(of, args.dup, chaos_app.FaultCounter(str(folder), chaos_app.DUP))
        await of.start()
        try:
            await chaos_app.create_effect_tables(of)
            await demo.seed(of, plan)
            cluster = _cluster(args, infra, folder)
            kinds = [f for f in args.faults if _applies(f, infra, args.style)]
            rng = random.Random(args.seed * 1000 + k)
            gaps = (args.min_gap, args.max_gap)
            monkey = Monkey(cluster, infra, rng, kinds, gaps, args.min_kills)
            try:
                out = await _chaos(args, of, plan, cluster, monkey, infra)
            finally:
                codes = cluster.stop()
        finally:
            await of.stop()
    finally:
        if not args.keep:
            await chaos.cleanup(infra)
    result, views, acc, elapsed = out
    faults = Counter(monkey.counts)
    if DUPLICATE in kinds:
        faults[DUPLICATE] = chaos.counted(folder, chaos_app.DUP)
    states = Counter(v.status if v else "not tracked" for v in views.values())
    settled = sum(states[s] for s in SETTLED)
    return {
        "run": k + 1,
        "ok": result.ok and acc["lost"] == 0 and acc["double_applied"] == 0,
        "sagas": len(views),
        "terminal_or_stuck": settled,
        "lost": acc["lost"],
        "double_applied": acc["double_applied"],
        "invariants": result.invariants,
        "violated": {k: result.details[k] for k, v in result.invariants.items() if not v},
        "states": dict(states),
        "faults_injected": {f: faults[f] for f in FAULTS if f in kinds or faults[f]},
        "kills": faults[KILL_PARTICIPANT] + faults[KILL_COORDINATOR],
        "killed": [r.worker for r in monkey.restarts],
        "duplicates_sent": faults[DUPLICATE],
        "ledger_rows": acc["ledger_rows"],
        "lost_detail": acc["lost_detail"],
        "double_detail": acc["double_detail"],
        "fault_errors": monkey.errors[:10],
        "failed_starts": monkey.failed_starts[:10],
        "elapsed_s": round(elapsed, 1),
        "unclean_exits": {n: c for n, c in codes.items() if c not in (0, -9)},
    }


async def _chaos(
    args: argparse.Namespace,
    of: OrderFulfillment,
    plan: demo.Plan,
    cluster: Cluster,
    monkey: Monkey,
    infra: Infra,
) -> tuple[Any, dict[str, FlowView | None], dict[str, Any], float]:
    """Start the workers, place the orders under faults, wait, read the books."""
    await cluster.start(timeout=90.0)
    started = time.perf_counter()
    task = asyncio.create_task(monkey.run())
    await _place(of, plan, args.place_over)
    flow = flows_demo.STYLES[args.style][1]
    ids = [o.order_id for o in plan.orders]
    await flows_demo.wait_flows(of, ids, args.timeout, flow)
    await monkey.stop(task)
    for name in cluster.names:  # anything still down comes back before the books are read
        if not cluster.alive(name):
            await cluster.restart(name, timeout=90.0)
    views = await flows_demo.wait_flows(of, ids, args.timeout, flow)
    elapsed = time.perf_counter() - started
    await chaos.drain(of, infra, args.lease + 1.0)  # late duplicates and redeliveries
    views = await flows_demo.wait_flows(of, ids, 5.0, flow)
    ns = argparse.Namespace(
        store=infra.store, transport=infra.transport, seed=args.seed, style=args.style
    )
    result = await flows_demo.check(of, plan, views, elapsed, ns)
    return result, views, await account(of, views, STYLES[args.style].place_order), elapsed


def _cluster(args: argparse.Namespace, infra: Infra, folder: Path) -> Cluster:
    env = {
        "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        chaos_app.DUP_ENV: str(args.dup),
        chaos_app.DIR_ENV: str(folder),
        chaos_app.FAKE_DOUBLE_ENV: str(args.self_test_double),
    }
    return Cluster(
        infra.worker_store,
        infra.transport,
        layout(args.style),
        app=f"chaos_app:{args.style}",
        lease=args.lease,
        log_dir=folder / "logs",
        env=env,
    )


def _applies(kind: str, infra: Infra, style: str) -> bool:
    if kind == KILL_COORDINATOR and style != "mixed":
        return False  # a choreography has no coordinator
    return chaos._applies(kind, infra)


async def _place(of: OrderFulfillment, plan: demo.Plan, over: float) -> None:
    gap = over / max(1, len(plan.orders))
    for o in plan.orders:
        for attempt in range(20):
            try:
                await choreography.place(of, flows_demo.placed(o))
                break
            except sk.StoreError:  # e.g. SQLite busy under load: try again
                await asyncio.sleep(0.1 * (attempt + 1))
        await asyncio.sleep(gap)


async def account(
    of: OrderFulfillment, views: dict[str, FlowView | None], contract: ChoreographyDefinition
) -> dict[str, Any]:
    """lost and double_applied from the effect ledger, judged against the tracker."""
    ledger = await chaos_app.ledger_counts(of, "order_id, step, phase", "order_id IS NOT NULL")
    doubles = {key: n for key, n in ledger.items() if n > 1}
    lost: list[str] = []
    undone = {u.step for u in contract.undos}
    for oid, v in views.items():
        if v is None:
            lost.append(f"{oid}: never tracked")
            continue
        lost += [
            f"{oid} {s}: done per the tracker, no effect"
            for s in v.done
            if not ledger[(oid, s, "forward")]
        ]
        lost += [
            f"{oid} {s}: compensated per the tracker, no effect"
            for s in v.compensated
            if not ledger[(oid, s, "compensate")]
        ]
        if v.status == "compensated":
            lost += [
                f"{oid} {s}: applied, never compensated"
                for s in sorted(undone)
                if ledger[(oid, s, "forward")] and not ledger[(oid, s, "compensate")]
            ]
        if (
            v.status in ("completed", "compensated")
            and not ledger[(oid, chaos_app.FINISH, "forward")]
        ):
            lost.append(f"{oid}: {v.status} per the tracker, order never approved or rejected")
    return {
        "lost": len(lost),
        "double_applied": sum(n - 1 for n in doubles.values()),
        "lost_detail": lost[:20],
        "double_detail": [f"{key} applied {n} times" for key, n in list(doubles.items())[:20]],
        "ledger_rows": sum(ledger.values()),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="sagakit-chaos-chor-"))
    try:
        runs = [await one_run(args, k, root) for k in range(args.runs)]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    faults: Counter[str] = Counter()
    for r in runs:
        faults.update(r["faults_injected"])
    return {
        "style": args.style,
        "store": redact(args.store),
        "transport": redact(args.transport),
        "runs": runs,
        "ok": all(r["ok"] and r["terminal_or_stuck"] == r["sagas"] for r in runs),
        "sagas": sum(r["sagas"] for r in runs),
        "terminal_or_stuck": sum(r["terminal_or_stuck"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "double_applied": sum(r["double_applied"] for r in runs),
        "kills": sum(r["kills"] for r in runs),
        "duplicates_sent": sum(r["duplicates_sent"] for r in runs),
        "faults_injected": dict(faults),
        "dup_fraction": args.dup,
        "lease_s": args.lease,
        "hardware": bl.hardware(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--style", choices=tuple(STYLES), default="choreography")
    p.add_argument("--store", default="sqlite", help="sqlite (fresh files) or a PostgreSQL URL")
    p.add_argument("--transport", default="database", help="database, amqp://, nats://, redis://")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--sagas", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lease", type=float, default=2.0)
    p.add_argument("--dup", type=float, default=0.1, help="fraction of sends duplicated (0.1)")
    p.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated fault kinds, those that apply ({','.join(FAULTS)})",
    )
    p.add_argument("--min-kills", type=int, default=3, help="prefer kills until this many (3)")
    p.add_argument("--place-over", type=float, default=8.0, help="seconds to place the orders")
    p.add_argument("--min-gap", type=float, default=0.7)
    p.add_argument("--max-gap", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--keep", action="store_true", help="keep databases, queues and logs")
    chaos.self_test_double_option(p)
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if set(args.faults) - set(FAULTS):
        print(
            f"chaos_choreography: unknown faults {set(args.faults) - set(FAULTS)}", file=sys.stderr
        )
        return 2
    if DUPLICATE not in args.faults:
        args.dup = 0.0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("aio_pika", "aiormq", "nats", "redis"):  # cuts are on purpose here
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    summary = asyncio.run(main_async(args))
    for r in summary["runs"]:
        bad = [k for k, v in r["invariants"].items() if not v]
        print(
            f"run {r['run']}: {r['states']} in {r['elapsed_s']} s, faults {r['faults_injected']}, "
            f"lost {r['lost']}, double-applied {r['double_applied']}, "
            f"{'all invariants hold' if not bad else 'VIOLATED: ' + json.dumps(r['violated'])}"
        )
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
