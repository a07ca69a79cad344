"""The 3-step saga over the brokers, each service group in a worker process of its own.

For RabbitMQ, NATS JetStream and Redis Streams (and the database transport
for reference), on PostgreSQL: participants ``p1``..``p3`` run in one worker
process, the coordinator in another, and this process is a pure client that
only calls ``start`` and ``wait`` (32 sagas in flight by default). Each row
gets a scratch database and a private broker namespace (see
``transports.py``), removed afterwards.

    python benchmarks/brokers.py [--duration 3] [--quick] [--only rabbitmq,nats] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import benchlib as bl
import transports as tb
from contenders import Sagakit, drive

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "contenders.py")
GROUPS = ("p1,p2,p3", "coordinator")
PREFIX = "bk_"
ROWS = {
    "database": lambda: tb.plain("database"),
    "rabbitmq": tb.scratch_rabbitmq,
    "nats": tb.scratch_nats,
    "redis": tb.scratch_redis,
}


@contextlib.asynccontextmanager
async def workers(store: str, transport: str) -> AsyncIterator[None]:
    """Start each service group in its own process, one after the other; stop them after."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for group in GROUPS:
            cmd = [sys.executable, WORKER, "--contender=sagakit", "--db=postgresql"]
            cmd += [f"--url={store}", f"--transport={transport}", f"--prefix={PREFIX}"]
            cmd += ["--workdir=/tmp", f"--serve={group}"]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE)
            procs.append(p)
            line = await asyncio.to_thread(p.stdout.readline) if p.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError(f"worker {group} did not start")
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


async def row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    async with tb.scratch_pg() as store, ROWS[name]() as transport, workers(store, transport):
        client = Sagakit(store, PREFIX, transport, services=set())
        out = await drive(
            client,
            variant="happy",
            in_flight=args.in_flight,
            duration=args.duration,
            count=None,
            warmup=args.warmup,
        )
    return {"transport": name, "in_flight": args.in_flight, **out}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in args.only:
        if name != "database" and not bl.reachable(tb.broker_url(name)):
            print(f"note: {name} not reachable at {tb.broker_url(name)}; row skipped")
            continue
        print(f"{name}: {args.in_flight} in flight ...", file=sys.stderr, flush=True)
        rows.append(await row(name, args))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--only", default="database,rabbitmq,nats,redis")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help='last line: {"rows": [...]}')
    args = ap.parse_args()
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if args.quick:
        args.duration, args.warmup = 1.5, 0.3
    logging.basicConfig(level=logging.WARNING)
    if not bl.reachable(bl.pg_url()):
        raise SystemExit(f"PostgreSQL not reachable at {bl.pg_url()}")
    rows = asyncio.run(run(args))
    hw = bl.hardware()
    bl.print_table(
        "3-step saga on PostgreSQL; participants and coordinator in two worker processes, "
        f"client in a third; {hw['cpus']} CPUs, load {hw['load']}",
        ("transport", "in flight", "sagas", "sagas/s", "p50 ms", "p99 ms", "client CPU ms/saga"),
        [
            [
                r["transport"],
                r["in_flight"],
                r["sagas"],
                r["sagas_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["cpu_ms_per_saga"],
            ]
            for r in rows
        ],
    )
    for r in rows:
        if r["wrong_state"]:
            print(f"note: {r['transport']}: unexpected states {r['states']}")
    if args.json:
        keys = ("transport", "in_flight", "sagas", "sagas_per_s", "p50_ms", "p99_ms")
        print(json.dumps({"rows": [{k: r[k] for k in keys} for r in rows]}))


if __name__ == "__main__":
    main()
