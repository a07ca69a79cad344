"""Timeout-based locks under contention: 100 sagas racing for 10 units.

Two workloads per backend, through the public API only:

* ``direct``: 100 holders each reserve one unit of a 10-unit pool and confirm
  it, every operation in a transaction of its own, all at once (on
  PostgreSQL over a pool of ``--connections``), as participants' handlers
  would. Each round starts from a fresh pool; we report rounds' median
  elapsed time, the operations per second (reserve attempts + confirms), the
  reserve latency (p50, p99) and the units sold, which must be exactly 10.
* ``saga``: 100 real sagas (reserve in the reserve phase, confirm at the
  pivot) through an App with the database transport: 10 complete, 90 are
  refused and compensated; we report the sagas per second.

::

    python benchmarks/locks.py                    # SQLite and PostgreSQL
    python benchmarks/locks.py --db sqlite --rounds 20 --json

The last line with ``--json`` is one JSON object with a ``rows`` list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib as bl
import msgspec

import sagakit as sk
from sagakit.locks import Holder

SAGAS, UNITS = 100, 10


async def direct_round(store: sk.Store, round_no: int) -> tuple[float, int, list[float]]:
    locks = sk.Reservations(store, f"bench{round_no}", ttl=60.0)
    async with store.transaction() as tx:
        await locks.add(tx, "last", UNITS)
    waits: list[float] = []

    async def racer(i: int) -> int:
        holder = Holder(f"saga-{i}")
        t0 = time.perf_counter()
        try:
            async with store.transaction() as tx:
                await locks.take(tx, holder, {"last": 1}, now=store.clock.now())
        except sk.ResourceUnavailable:
            return 1
        finally:
            waits.append(time.perf_counter() - t0)
        async with store.transaction() as tx:
            await locks.confirm_held(tx, holder, now=store.clock.now())
        return 2

    t0 = time.perf_counter()
    ops = sum(await asyncio.gather(*(racer(i) for i in range(SAGAS))))
    elapsed = time.perf_counter() - t0
    (books,) = await locks.audit()
    assert books.conserved and books.confirmed == UNITS, books
    await locks.clear()
    return elapsed, ops, waits


@sk.command("bench_locks.Reserve")
class Reserve(msgspec.Struct):
    pass


@sk.command("bench_locks.Confirm")
class Confirm(msgspec.Struct):
    pass


@sk.command("bench_locks.Release")
class Release(msgspec.Struct):
    pass


@dataclass
class Buy:
    n: int


BUY = (
    sk.Saga("bench-buy", Buy, deadline=30.0)
    .step("reserve")
    .invoke("stock", lambda d: Reserve())
    .compensate("stock", lambda d: Release())
    .reserves(ttl=60.0)
    .step("confirm")
    .invoke("stock", lambda d: Confirm())
    .confirms("reserve")
    .pivot()
    .build()
)


async def saga_round(url: str, prefix: str) -> tuple[float, dict[str, int]]:
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.05))
    stock = app.participant("stock")
    locks = app.reservations("stock", ttl=60.0)
    app.saga(BUY)

    @stock.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> None:
        await locks.reserve(ctx, "last", 1)

    @stock.command(Confirm)
    async def confirm(cmd: Confirm, ctx: sk.Context) -> None:
        await locks.confirm(ctx)

    @stock.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        await locks.release(ctx)

    async with app:
        async with app.store.transaction() as tx:
            await locks.add(tx, "last", UNITS)
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(app.sagas.start(BUY, Buy(i)) for i in range(SAGAS)))
        views = await asyncio.gather(*(app.sagas.wait(i, timeout=300) for i in ids))
        elapsed = time.perf_counter() - t0
        (books,) = await locks.audit()
        assert books.conserved and books.confirmed == UNITS, books
    states: dict[str, int] = {}
    for v in views:
        states[str(v.state)] = states.get(str(v.state), 0) + 1
    return elapsed, states


async def bench(db: str, url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    store = sk.open_store(url, prefix=f"bl{uuid.uuid4().hex[:8]}_")
    await store.open()
    try:
        runs = [await direct_round(store, r) for r in range(args.rounds)]
    finally:
        await store.close()
    elapsed = bl.median([e for e, _, _ in runs])
    waits = [w for _, _, ws in runs for w in ws]
    ops = bl.median([o / e for e, o, _ in runs])
    rows = [
        {
            "db": db,
            "workload": "direct",
            "rounds": args.rounds,
            "elapsed_ms": round(elapsed * 1000, 1),
            "per_s": round(ops, 1),
            "reserve_p50_ms": round(bl.percentile(waits, 50) * 1000, 2),
            "reserve_p99_ms": round(bl.percentile(waits, 99) * 1000, 2),
            "sold": UNITS,
        }
    ]
    for _ in range(args.saga_rounds):
        took, states = await saga_round(url, f"bs{uuid.uuid4().hex[:8]}_")
        rows.append(
            {
                "db": db,
                "workload": "saga",
                "rounds": 1,
                "elapsed_ms": round(took * 1000, 1),
                "per_s": round(SAGAS / took, 1),
                "completed": states.get("completed", 0),
                "compensated": states.get("compensated", 0),
                "sold": UNITS,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--rounds", type=int, default=10, help="direct rounds per backend")
    p.add_argument("--saga-rounds", type=int, default=3, help="saga rounds per backend")
    p.add_argument("--connections", type=int, default=4, help="PostgreSQL pool size")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.db in ("sqlite", "both"):
            rows += asyncio.run(bench("sqlite", f"sqlite:///{Path(tmp) / 'l.db'}", args))
    if args.db in ("postgresql", "both"):
        why = bl.sagakit_postgres() or (None if bl.reachable(bl.pg_url()) else "unreachable")
        if why:
            print(f"PostgreSQL skipped: {why}", file=sys.stderr)
        else:
            with bl.ScratchDatabase(bl.pg_url()) as scratch:
                url = f"{scratch.url}?max_size={args.connections}"
                rows += asyncio.run(bench("postgresql", url, args))
    headers = ["db", "workload", "elapsed ms", "per s", "p50 ms", "p99 ms", "done", "undone"]
    bl.print_table(
        f"{SAGAS} sagas racing for {UNITS} units (load {bl.hardware()['load']})",
        headers,
        [
            [
                r["db"],
                r["workload"],
                r["elapsed_ms"],
                r["per_s"],
                r.get("reserve_p50_ms"),
                r.get("reserve_p99_ms"),
                r.get("completed", r["sold"]),
                r.get("compensated"),
            ]
            for r in rows
        ],
    )
    if args.json:
        print(json.dumps({"rows": rows, "hardware": bl.hardware()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
