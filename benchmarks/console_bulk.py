"""Bulk operator actions: how long a dry run and a bulk retry of N failed sagas take.

One process, public API only: an App over SQLite (or PostgreSQL with
``--store``) whose one-step saga fails (its local step raises and has one
attempt), N sagas started and left ``failed``; then, through the console's
action model, a dry run of a bulk retry (the count and sample), the bulk
retry itself (one transaction: the bulk's audit line and N queued commands),
and the time until the coordinator has executed every command and every saga
is ``completed`` (each command in its own transaction with its audit line)::

    python benchmarks/console_bulk.py --sagas 1000 2000 [--store postgresql://...] [--json]

It prints a markdown table; with ``--json`` the last line is ``{"rows": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from typing import Any

import msgspec

import sagakit as sk
from sagakit.console import ActionRequest, AuditFilter, Operations, SagaQuery


class Job(msgspec.Struct):
    n: int


class Switch:
    """The cause an operator fixes: the step fails while ``broken``."""

    broken = True

    async def run(self, job: Job) -> Job:
        if self.broken:
            raise RuntimeError("dependency down")
        return job


async def until(check: Any, every: float = 0.05) -> None:
    while not await check():
        await asyncio.sleep(every)


async def one_row(n: int, url: str) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    switch = Switch()
    app = sk.App(url, settings=sk.Settings(max_poll=0.02, prefix=prefix, prefetch=64))
    once = sk.RetryPolicy(max_attempts=1, initial=0.01)
    defn = app.saga(sk.Saga("job", Job).step("run").local(switch.run).retry(once).build())
    async with app:
        for i in range(n):
            await app.sagas.start(defn, Job(i))
        await until(lambda: _counts(app, {"failed": n}))
        ops, actor = Operations(app.store), sk.Actor("bench", via="benchmark")
        q, req = (
            SagaQuery(type="job", state="failed", limit=10_000),
            ActionRequest("retry", "fixed"),
        )
        t0 = time.perf_counter()
        dry = await ops.bulk(q, req, actor=actor, dry_run=True)
        t1 = time.perf_counter()
        switch.broken = False
        done = await ops.bulk(q, req, actor=actor)
        t2 = time.perf_counter()
        await until(lambda: _counts(app, {"completed": n}))
        t3 = time.perf_counter()
        lines = await ops.audit.list(AuditFilter(limit=20_000))
        assert dry.count == done.count == n and len(lines) == n + 1
        await _drop(app)
    return {
        "sagas": n,
        "store": url.split(":")[0],
        "dry_run_s": round(t1 - t0, 3),
        "queue_s": round(t2 - t1, 3),
        "execute_s": round(t3 - t2, 3),
        "retries_per_s": round(n / (t3 - t1), 1),
    }


async def _counts(app: sk.App, want: dict[str, int]) -> bool:
    return await app.sagas.counts(type="job") == want


async def _drop(app: sk.App) -> None:
    if app.store.dialect == "postgresql":
        from sagakit.testing import drop_tables

        await drop_tables(app.store)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sagas", type=int, nargs="+", default=[1000])
    p.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for n in args.sagas:
        url = args.store or f"sqlite:///{tempfile.mkdtemp()}/bulk.db"
        rows.append(asyncio.run(one_row(n, url)))
    print("| sagas | store | dry run s | queue s | execute s | retries/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sagas']} | {r['store']} | {r['dry_run_s']} | {r['queue_s']} | "
            f"{r['execute_s']} | {r['retries_per_s']} |"
        )
    print(f"load average: {os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
