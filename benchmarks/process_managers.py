"""Throughput of process-manager messages on SQLite and PostgreSQL.

Two workloads, each over ``--instances`` instances at once, public API only:

* ``events``: each instance publishes ``--steps`` events to itself, one after
  the other (``Tick n`` -> decision -> ``Tick n+1``); every message is one
  process-manager hop: inbox, row-locked load, pure decision, state + outgoing
  event + history row + ack in one transaction.
* ``commands``: each instance sends ``--steps`` commands to a participant, one
  after the other's reply; every step is two hops (the participant's and the
  process manager's).

Time runs from the first start to the last instance done; ``msgs/s`` counts
every message handled by a process manager or a participant.

    python benchmarks/process_managers.py [--instances 200] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

import sagakit as sk
from sagakit.process import Replied

sys.path.insert(0, str(Path(__file__).parent))
from benchlib import (
    ScratchDatabase,
    drop_prefixed_tables,
    pg_url,
    print_table,
    reachable,
)


@sk.command("bench.Begin")
class Begin(msgspec.Struct, frozen=True):
    key: str
    steps: int


@sk.event("bench.Tick")
class Tick(msgspec.Struct, frozen=True):
    key: str
    n: int


@sk.command("bench.Work")
class Work(msgspec.Struct, frozen=True):
    key: str
    n: int


class Count(msgspec.Struct, frozen=True):
    key: str
    steps: int
    n: int = 0
    status: str = "running"


def ticking() -> sk.ProcessManager[Count]:
    pm = sk.ProcessManager("ticker", Count, key=lambda m: m.key, states=["running", "done"],
                           final=["done"])  # fmt: skip

    @pm.starts(Begin, to="running")
    def begin(m: Begin) -> sk.Decision:
        return sk.decide(Count(m.key, m.steps)).publish(Tick(m.key, 1))

    @pm.on(Tick, when="running", to="done")
    def tick(e: Tick, s: Count) -> sk.Decision:
        if e.n >= s.steps:
            return sk.evolve(s, n=e.n, status="done")
        return sk.evolve(s, n=e.n).publish(Tick(s.key, e.n + 1))

    return pm


def working() -> sk.ProcessManager[Count]:
    pm = sk.ProcessManager("worker", Count, key=lambda m: m.key, states=["running", "done"],
                           final=["done"])  # fmt: skip

    @pm.starts(Begin, to="running")
    def begin(m: Begin) -> sk.Decision:
        return sk.decide(Count(m.key, m.steps)).send("work", Work(m.key, 1))

    @pm.replied(Work, when="running", to="done")
    def done(r: Replied, s: Count) -> sk.Decision:
        if s.n + 1 >= s.steps:
            return sk.evolve(s, n=s.n + 1, status="done")
        return sk.evolve(s, n=s.n + 1).send("work", Work(s.key, s.n + 2))

    return pm


async def run(url: str, workload: str, instances: int, steps: int, prefix: str) -> dict[str, Any]:
    pm = ticking() if workload == "events" else working()
    app = sk.App(url, settings=sk.Settings(prefix=prefix))
    app.process(pm)
    if workload == "commands":
        work = app.participant("work")

        @work.command(Work)
        async def handle(cmd: Work, ctx: sk.Context) -> None:
            pass

    async with app:
        started = time.perf_counter()
        await asyncio.gather(
            *(app.processes.send(pm, Begin(f"k{i}", steps)) for i in range(instances))
        )
        while (await app.processes.counts(pm)).get("done", 0) < instances:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    messages = instances * (steps + 1) if workload == "events" else instances * (2 * steps + 1)
    return {
        "store": url.split(":", 1)[0],
        "workload": workload,
        "instances": instances,
        "steps": steps,
        "messages": messages,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(messages / elapsed, 1),
    }


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each workload on a fresh SQLite file, then in a scratch PostgreSQL database."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("events", "commands"):
            url = f"sqlite:///{Path(tmp) / (workload + '.db')}"
            rows.append(asyncio.run(run(url, workload, args.instances, args.steps, "sagakit_")))
    base = pg_url()
    if not args.no_postgres and reachable(base):
        with ScratchDatabase(base) as db:
            for workload in ("events", "commands"):
                prefix = f"pm{os.getpid()}_{workload[0]}_"
                try:
                    rows.append(
                        asyncio.run(run(db.url, workload, args.instances, args.steps, prefix))
                    )
                finally:
                    if not db.private:
                        asyncio.run(drop_prefixed_tables(db.url, prefix))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args()
    result = main(a)
    headers = ["store", "workload", "instances", "steps", "messages", "seconds", "msgs/s"]
    print_table("process-manager throughput", headers, [list(r.values()) for r in result])
    if a.json:
        print(json.dumps({"rows": result, "load_average": os.getloadavg()}))
