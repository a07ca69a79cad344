"""What an idle worker costs: CPU and statements per second with nothing to do.

The benchmark's App (three participants, the coordinator, timers and local
steps: the queues a worker of the demo saga consumes) runs one saga through
the public API, then sits idle; this prints its process CPU as a share of
one core and the statements it sent per second, over ``--seconds``.

    python benchmarks/idle.py [--db postgresql|sqlite] [--transport database|rabbitmq|nats|redis]
        [--seconds 10] [--json]

A broker transport runs in a private namespace of its own (``transports.py``),
removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from typing import Any

import benchlib as bl
import transports as tb
from benchlib import RoundTripCounter
from contenders import Sagakit

PLACES = {
    "database": lambda: tb.plain("database"),
    "rabbitmq": tb.scratch_rabbitmq,
    "nats": tb.scratch_nats,
    "redis": tb.scratch_redis,
}


async def measure(db: str, transport: str, seconds: float) -> dict[str, Any]:
    async with PLACES[transport]() as url:
        return await _measure(db, url, seconds) | {"transport": transport}


async def _measure(db: str, transport: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        store = bl.pg_url() if db == "postgresql" else f"sqlite:///{os.path.join(tmp, 'idle.db')}"
        prefix = f"idle{os.getpid()}_"
        c = Sagakit(store, prefix, transport)
        await c.setup()
        try:
            await c.one(1, False)
            await asyncio.sleep(1.0)  # let the saga's last wake-ups settle
            cpu0, trips0, t0 = time.process_time(), RoundTripCounter.count, time.perf_counter()
            await asyncio.sleep(seconds)
            cpu, trips = time.process_time() - cpu0, RoundTripCounter.count - trips0
            elapsed = time.perf_counter() - t0
        finally:
            await c.teardown()
            if db == "postgresql":
                await bl.drop_prefixed_tables(store, prefix)
    return {
        "db": db,
        "transport": transport,
        "seconds": round(elapsed, 2),
        "cpu_percent": round(100 * cpu / elapsed, 2),
        "statements_per_s": round(trips / elapsed, 1) if db == "postgresql" else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--transport", choices=sorted(PLACES), default="database")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.db == "postgresql":
        RoundTripCounter.install()
    out = asyncio.run(measure(args.db, args.transport, args.seconds))
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"idle {out['db']} over {out['transport']}: {out['cpu_percent']}% of a core, "
        f"{out['statements_per_s']} statements/s over {out['seconds']} s"
    )


if __name__ == "__main__":
    main()
