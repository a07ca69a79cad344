"""Saga throughput and latency (issue #3): a 3-step saga through sagakit.

Participants p1..p3 and the coordinator run in this process on the database
transport; each step inserts one row in its own table (see ``contenders.py``).
Runs on SQLite (a file in WAL mode) and PostgreSQL, 1 saga in flight
(sequential) and 32 in flight, and prints sagas/s and p50/p99 latency of a
whole saga.

    python benchmarks/sagas.py [--duration 3] [--quick] [--variant compensate] [--signing]

PostgreSQL rows use ``SAGAKIT_BENCH_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``) with a unique table prefix,
dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import tempfile

import benchlib as bl
from benchlib import RoundTripCounter
from contenders import Sagakit, drive


async def run(args: argparse.Namespace) -> None:
    rows, notes = [], []
    dbs = ["sqlite"]
    url = bl.pg_url()
    if not bl.reachable(url):
        notes.append(f"PostgreSQL not reachable at {url}")
    elif (why := bl.sagakit_postgres()) is not None:
        notes.append(why)
    else:
        dbs.append("postgresql")
    tmp = tempfile.mkdtemp(prefix="sagakit-sagas-")
    prefix = f"sks{os.getpid()}_"
    try:
        for db in dbs:
            for i, in_flight in enumerate((1, 32)):
                p = f"{prefix}{i}_"
                store = f"sqlite:///{tmp}/s{i}.db" if db == "sqlite" else url
                out = await drive(
                    Sagakit(store, p, signing=args.signing),
                    variant=args.variant,
                    in_flight=in_flight,
                    duration=args.duration,
                    count=None,
                    warmup=args.warmup,
                )
                if out["wrong_state"]:
                    notes.append(f"{db} {in_flight}: unexpected states {out['states']}")
                rows.append(
                    [
                        db,
                        in_flight,
                        out["sagas"],
                        out["sagas_per_s"],
                        out["p50_ms"],
                        out["p99_ms"],
                        out["cpu_ms_per_saga"],
                        out["statements_per_saga"] if db == "postgresql" else None,
                    ]
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if "postgresql" in dbs:
            await bl.drop_prefixed_tables(url, prefix)
    hw = bl.hardware()
    bl.print_table(
        f"sagakit, 3-step saga ({args.variant}{', signed' if args.signing else ''}), "
        "database transport; "
        f"{hw['cpus']} CPUs, load {hw['load']}",
        (
            "database",
            "in flight",
            "sagas",
            "sagas/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/saga",
            "statements/saga",
        ),
        rows,
    )
    for n in notes:
        print("note:", n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per row")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--variant", choices=("happy", "compensate"), default="happy")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--signing", action="store_true", help="sign and verify every message")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 0.8, 0.2
    logging.basicConfig(level=logging.WARNING)
    RoundTripCounter.install()  # PostgreSQL statements, counted client-side
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
