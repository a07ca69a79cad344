"""Growing past one database: saga ids partitioned over several PostgreSQL databases.

A deployment that outgrows one PostgreSQL server runs several *partitions*:
each is a complete sagakit deployment (store, queues, coordinator and
participants) on a database of its own, and a saga lives wholly in the
partition its id maps to (:func:`partition_of`). Nothing crosses partitions,
so their throughputs add up until the shared hardware runs out.

This benchmark runs the 3-step saga of ``contenders.py`` (database transport,
``start`` + ``wait``) in one worker process per partition, each on its own
scratch database, all at once, and prints each partition's sagas/s and the
sum. Rows: 1 partition with 32 in flight, then 2 partitions with 16 each
(the same offered load) and 2 with 32 each (each as loaded as the single
one). On this machine both databases live on the one shared server, so the
sum shows how far the *client* side scales; separate servers would add the
server side as well (see docs/scaling.md).

    python benchmarks/partitions.py [--duration 3] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib
from typing import Any

import benchlib as bl

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "contenders.py")


def partition_of(saga_id: str, partitions: int) -> int:
    """The partition a saga lives in: a stable hash of its id (what a router computes)."""
    return zlib.crc32(saga_id.encode()) % partitions


def run_row(urls: list[str], in_flight: int, args: argparse.Namespace) -> dict[str, Any]:
    """One worker process per partition, started together; their figures side by side."""
    procs = []
    for i, url in enumerate(urls):
        workdir = tempfile.mkdtemp(prefix=f"sagakit-part{i}-")
        cmd = [
            sys.executable,
            WORKER,
            "--contender=sagakit",
            "--db=postgresql",
            f"--in-flight={in_flight}",
            f"--duration={args.duration}",
            f"--warmup={args.warmup}",
            f"--url={url}",
            f"--workdir={workdir}",
            f"--prefix=part{i}_",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE))
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"a partition's worker failed ({p.returncode})")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return {
        "partitions": len(urls),
        "in_flight_each": in_flight,
        "sagas_per_s_each": [round(o["sagas_per_s"], 1) for o in outs],
        "sagas_per_s": sum(o["sagas_per_s"] for o in outs),
        "p50_ms": bl.median([o["p50_ms"] for o in outs]),
        "cpu_ms_per_saga": bl.median([o["cpu_ms_per_saga"] for o in outs]),
        "statements_per_saga": bl.median([o["statements_per_saga"] for o in outs]),
        "wrong_state": sum(o["wrong_state"] for o in outs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help='last line: {"rows": [...]}')
    args = ap.parse_args()
    if args.quick:
        args.duration, args.warmup = 1.5, 0.3
    base = bl.pg_url()
    if not bl.reachable(base):
        raise SystemExit(f"PostgreSQL not reachable at {base}")
    rows = []
    with bl.ScratchDatabase(base, "_a") as a, bl.ScratchDatabase(base, "_b") as b:
        for urls, in_flight in (([a.url], 32), ([a.url, b.url], 16), ([a.url, b.url], 32)):
            rows.append(run_row(urls, in_flight, args))
    hw = bl.hardware()
    bl.print_table(
        f"3-step saga, saga ids partitioned over PostgreSQL databases, one worker process "
        f"per partition; {hw['cpus']} CPUs, load {hw['load']}",
        (
            "partitions",
            "in flight each",
            "sagas/s each",
            "sagas/s total",
            "p50 ms",
            "CPU ms/saga",
            "statements/saga",
        ),
        [
            [
                r["partitions"],
                r["in_flight_each"],
                " + ".join(str(x) for x in r["sagas_per_s_each"]),
                r["sagas_per_s"],
                r["p50_ms"],
                r["cpu_ms_per_saga"],
                r["statements_per_saga"],
            ]
            for r in rows
        ],
    )
    if any(r["wrong_state"] for r in rows):
        print("note: some sagas ended in an unexpected state")
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
