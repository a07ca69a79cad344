"""Retention under load: N sagas with pruning on; do table sizes and throughput stay flat?

Runs the 3-step saga of ``contenders.py`` (participants and coordinator in one
process, database transport) through the public API, a closed loop of
``--in-flight`` clients, with ``Settings.retention`` set to short horizons
(the redelivery window is shrunk to match: a 1 s lease and handler timeout,
2 deliveries, 0.5 s retry delays). After every tenth of the sagas it prints
the throughput of that slice, the row count of each sagakit table, and the
disk used: the database file plus its WAL (SQLite) or the sum of
``pg_total_relation_size`` over sagakit's tables (PostgreSQL). The workload's
own rows (``t1``..``t3``) are deleted at each report: they are the
application's data, not sagakit's, and would otherwise hide what retention
does to the file. On PostgreSQL, ``--vacuum`` runs a plain ``VACUUM`` of
sagakit's tables after each report, standing in for autovacuum on a server
where it is off (as on the shared benchmark machine), since deleted rows
only become reusable space once vacuumed::

    python benchmarks/retention.py --db sqlite --sagas 100000
    python benchmarks/retention.py --db postgresql --sagas 20000 --vacuum
    python benchmarks/retention.py --db sqlite --sagas 100000 --no-retention   # the baseline

It prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
from typing import Any

import benchlib as bl
from contenders import Sagakit

import sagakit as sk
from sagakit.ops.retention import Pruned, Retention

TABLES = ("sagas", "saga_log", "inbox", "messages", "dead_letters")


class PruneTally(logging.Handler):
    """Adds up what the App's background pruner reports (at INFO on ``sagakit.app``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.total = Pruned()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("retention pruned") and isinstance(record.args, tuple):
            self.total.add(Pruned(**record.args[0]))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """A short redelivery window, so horizons of a few seconds pass the rule."""
    quick = sk.RetryPolicy(max_delay=0.5, jitter=0.0)
    tuning: dict[str, Any] = dict(
        lease=1.0, handler_timeout=1.0, max_deliveries=2, retry=quick, version_grace=1.0
    )
    if not args.no_retention:
        h = args.horizon
        tuning["retention"] = Retention(h, h, h, batch=args.batch, every=args.every)
    return tuning


async def sizes(bench: Sagakit, path: str | None) -> dict[str, int]:
    """Row counts per sagakit table, and bytes on disk."""
    store, p = bench.app.store, bench.prefix
    out: dict[str, int] = {}
    async with store.transaction() as tx:
        for t in ("t1", "t2", "t3"):
            await tx.execute(f"DELETE FROM {p}{t}")
        for t in TABLES:
            out[t] = int((await tx.fetchone(f"SELECT count(*) FROM {p}{t}"))[0])
        if path is None:
            names = ", ".join(f"'{p}{t}'" for t in TABLES)
            sql = f"SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY[{names}]) c"
            out["bytes"] = int((await tx.fetchone(sql))[0])
    if path is not None:
        out["bytes"] = sum(os.path.getsize(f) for f in (path, path + "-wal") if os.path.exists(f))
    return out


async def vacuum(url: str, prefix: str) -> None:
    """A plain VACUUM of sagakit's tables (it cannot run inside a transaction)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for t in TABLES:
            await conn.execute(f"VACUUM {prefix}{t}")
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> list[list[Any]]:
    path = None
    if args.db == "sqlite":
        path = os.path.join(args.workdir, "retention.db")
        url = f"sqlite:///{path}"
    else:
        url = args.url or bl.pg_url()
    prefix = f"r{uuid.uuid4().hex[:8]}_"
    bench = Sagakit(url, prefix, **settings(args))
    tally = PruneTally()
    logging.getLogger("sagakit.app").addHandler(tally)
    logging.getLogger("sagakit.app").setLevel(logging.INFO)
    await bench.setup()
    try:
        return await drive(bench, args, path, tally)
    finally:
        await bench.teardown()
        if path is None:
            await bl.drop_prefixed_tables(url, prefix)


async def drive(
    bench: Sagakit, args: argparse.Namespace, path: str | None, tally: PruneTally
) -> list[list[Any]]:
    slice_size = args.sagas // 10
    issued = 0
    rows: list[list[Any]] = []

    async def client() -> None:
        nonlocal issued
        while issued < goal:
            i = issued
            issued += 1
            state = await bench.one(i, fail=i % 10 == 9)  # one saga in ten compensates
            assert state in ("completed", "compensated"), state

    for n in range(1, 11):
        goal, started = n * slice_size, time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.in_flight)))
        rate = slice_size / (time.perf_counter() - started)
        rows.append(report(n, goal, rate, await sizes(bench, path), tally.total))
        if args.vacuum and path is None:
            await vacuum(bench.url, bench.prefix)
    return rows


def report(n: int, done: int, rate: float, s: dict[str, int], pruned: Pruned) -> list[Any]:
    row = [f"{n * 10}%", done, round(rate), *(s[t] for t in TABLES)]
    row += [round(s["bytes"] / 2**20, 1), pruned.sagas]
    print(" | ".join(str(v) for v in row), flush=True)
    return row


HEADERS = ["slice", "sagas done", "sagas/s", *TABLES, "MiB on disk", "sagas pruned"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--url", help="PostgreSQL URL (default: benchlib.pg_url())")
    ap.add_argument("--sagas", type=int, default=100_000)
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--horizon", type=float, default=5.0, help="seconds, for every table")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between prune runs")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--no-retention", action="store_true", help="the baseline: keep everything")
    ap.add_argument("--vacuum", action="store_true", help="PostgreSQL: VACUUM after each report")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        print(" | ".join(HEADERS), flush=True)
        rows = asyncio.run(run(args))
    print(bl.markdown_table(HEADERS, rows))
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
