"""Two-phase commit against the saga, on the onboarding transaction (issue #16).

One run, one private PostgreSQL cluster (prepared transactions on, commit
timestamps tracked, fsync on), two databases: customers and enrollments. The
same change — customer VERIFIED, pending enrollment removed — runs as a 2PC
atomic group and as an orchestrated saga (compensation: restore the status),
at 1, 8 and 32 in flight. Meanwhile four "touchers" keep updating the rows of
customers being onboarded (an unrelated transaction on the same rows: a
last-seen stamp), and their throughput and p99 show what the locks cost
everyone else.

Lock hold is measured in the database: a trigger stamps the customer row with
``clock_timestamp()`` when the onboarding updates it, and the commit time of
the transaction that did (``pg_xact_commit_timestamp``, which for 2PC is the
``COMMIT PREPARED``) ends the hold.

The failure case kills a coordinator with SIGKILL between prepare and commit
(before and after the commit record) and measures how long a toucher of that
row waits — until recovery — and does the same to a saga's coordinator after
its first step.

    python benchmarks/twophase.py            # full run (about 2 minutes)
    python benchmarks/twophase.py --quick    # smoke run (about 30 s)
    python benchmarks/twophase.py --json     # last line: {"rows": [...]}
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import benchlib as bl

import sagakit as sk
from sagakit.examples import onboarding as ob
from sagakit.testing.pgcluster import PgCluster

IN_FLIGHT = (1, 8, 32)
TOUCHERS = 4
HOLD_SQL = [
    f"ALTER TABLE {ob.CUSTOMERS} ADD COLUMN locked_at timestamptz, ADD COLUMN locker xid, "
    "ADD COLUMN touched integer NOT NULL DEFAULT 0",
    "CREATE FUNCTION stamp() RETURNS trigger AS $$ BEGIN "
    "IF NEW.status IS DISTINCT FROM OLD.status THEN NEW.locked_at := clock_timestamp(); "
    "NEW.locker := (txid_current() % 4294967296)::text::xid; END IF; "
    "RETURN NEW; END $$ LANGUAGE plpgsql",
    f"CREATE TRIGGER stamp BEFORE UPDATE ON {ob.CUSTOMERS} FOR EACH ROW EXECUTE FUNCTION stamp()",
]


class Workload:
    """Customers to onboard, the ones in flight (for the touchers), and the figures."""

    def __init__(self, customers: str, ids: list[str]) -> None:
        self.customers_url = customers
        self.ids = iter(ids)
        self.in_flight: set[str] = set()
        self.done: list[str] = []
        self.latencies: list[float] = []
        self.touches: list[float] = []

    async def drive(self, k: int, n: int, one: Callable[[str], Awaitable[None]]) -> float:
        """Run ``n`` onboardings ``k`` at a time (with touchers); the elapsed seconds."""
        stop = asyncio.Event()
        touchers = [asyncio.create_task(self._touch(stop)) for _ in range(TOUCHERS)]
        per_worker = [n // k + (1 if i < n % k else 0) for i in range(k)]
        t0 = time.perf_counter()
        await asyncio.gather(*(self._worker(m, one) for m in per_worker))
        elapsed = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*touchers)
        return elapsed

    async def _worker(self, m: int, one: Callable[[str], Awaitable[None]]) -> None:
        for _ in range(m):
            cid = next(self.ids)
            self.in_flight.add(cid)
            t = time.perf_counter()
            await one(cid)
            self.latencies.append(time.perf_counter() - t)
            self.in_flight.discard(cid)
            self.done.append(cid)

    async def _touch(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.customers_url)
        try:
            while not stop.is_set():
                targets = list(self.in_flight) or self.done[-8:]
                if not targets:
                    await asyncio.sleep(0.001)
                    continue
                t = time.perf_counter()
                await conn.execute(
                    f"UPDATE {ob.CUSTOMERS} SET touched = touched + 1 WHERE id = $1",
                    random.choice(targets),
                )
                self.touches.append(time.perf_counter() - t)
        finally:
            await conn.close()


async def holds(customers: str, ids: list[str]) -> list[float]:
    """Seconds each onboarded customer row stayed locked: trigger stamp to commit time."""
    conn = await asyncpg.connect(customers)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM pg_xact_commit_timestamp(locker) - locked_at)::float8 "
            f"FROM {ob.CUSTOMERS} WHERE id = ANY($1)",
            ids,
        )
    finally:
        await conn.close()
    return [r[0] for r in rows if r[0] is not None]


async def measure(app: sk.App, urls: tuple[str, str], mode: str, k: int, n: int) -> dict[str, Any]:
    ids = [f"{mode[0]}{k}x{i}" for i in range(n)]
    await ob.add_customers(app, ids)

    async def atomic(cid: str) -> None:
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, cid)

    async def saga(cid: str) -> None:
        view = await app.sagas.wait(await app.sagas.start(ob.onboard_saga, ob.Onboard(cid)))
        assert view.state == "completed", view

    w = Workload(urls[0], ids)
    elapsed = await w.drive(k, n, atomic if mode == "2pc" else saga)
    held = await holds(urls[0], ids)
    return {
        "mode": mode,
        "in_flight": k,
        "n": n,
        "per_s": n / elapsed,
        "p50_ms": 1000 * bl.percentile(w.latencies, 50),
        "p99_ms": 1000 * bl.percentile(w.latencies, 99),
        "hold_p50_ms": 1000 * bl.percentile(held, 50),
        "hold_p99_ms": 1000 * bl.percentile(held, 99),
        "touch_per_s": len(w.touches) / elapsed,
        "touch_p99_ms": 1000 * bl.percentile(w.touches, 99),
    }


# -- the failure case -----------------------------------------------------------


def child(args: list[str]) -> None:
    """A coordinator that dies by SIGKILL: ``2pc POINT`` or ``saga`` (after its first step)."""
    store, customers, enrollments, what, point, cid = args

    async def run() -> None:
        app = ob.build_app(store, customers, enrollments, node="bench", recover_every=None)
        if what == "saga":
            app.only(["coordinator", "customers"])  # nobody takes the second step here
        async with app:
            if what == "2pc":

                async def die(at: str) -> None:
                    if at == point:
                        os.kill(os.getpid(), signal.SIGKILL)

                app.twophase.probe = die
                async with app.atomic("customers", "enrollments") as tx:
                    await ob.verify(tx, cid)
            else:
                await app.sagas.start(ob.onboard_saga, ob.Onboard(cid), saga_id=cid)
                while (await ob.state(app, cid))[0] != "VERIFIED":
                    await asyncio.sleep(0.005)
                os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(run())


async def failure(
    store: str, urls: tuple[str, str], what: str, point: str, opts: argparse.Namespace
) -> dict[str, Any]:
    """Kill a coordinator mid-transaction; how long the row stays locked, and the outcome."""
    cid = f"f{what}{point.replace(':', '')}"
    setup = ob.build_app(store, *urls, node="bench", recover_every=None)
    async with setup:
        await ob.add_customers(setup, [cid])
    cmd = [sys.executable, __file__, "--child", store, *urls, what, point, cid]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    killed = time.perf_counter()
    app = ob.build_app(
        store, *urls, node="bench", recover_every=opts.recover_every, safe_age=opts.safe_age
    )
    async with app:  # the restarted coordinator: recovery (2PC) or the saga resumes
        conn = await asyncpg.connect(urls[0])
        try:
            await conn.execute(
                f"UPDATE {ob.CUSTOMERS} SET touched = touched + 1 WHERE id = $1", cid
            )
        finally:
            await conn.close()
        locked = time.perf_counter() - killed
        if what == "saga":
            await app.sagas.wait(cid, timeout=60)
        while await app.twophase.in_doubt():  # recovery commits one branch after the other
            await asyncio.sleep(0.01)
        final = await ob.state(app, cid)
    settled = time.perf_counter() - killed
    label = {"prepared": "before the record", "recorded": "after the record"}.get(
        point, "after its first step"
    )
    return {
        "mode": what,
        "case": f"coordinator SIGKILLed {label}",
        "locked_s": locked,
        "settled_s": settled,
        "outcome": "/".join(str(x) for x in final),
    }


# -- the run ------------------------------------------------------------------------


async def main_async(opts: argparse.Namespace, cluster: PgCluster) -> list[dict[str, Any]]:
    size = max(IN_FLIGHT) + 2
    c = cluster.create_database("customers") + f"?max_size={size}"
    e = cluster.create_database("enrollments") + f"?max_size={size}"
    store = cluster.create_database("coordinator") + "?max_size=8"
    urls = (c.split("?")[0], e.split("?")[0])
    await ob.create_tables(*urls)
    conn = await asyncpg.connect(urls[0])
    for stmt in HOLD_SQL:
        await conn.execute(stmt)
    await conn.close()
    app = ob.build_app(store, c, e, node="bench", concurrency=size, recover_every=None)
    rows = []
    async with app:
        for k, mode in itertools.product(opts.in_flight, ("2pc", "saga")):
            n = max(opts.n, 4 * k)
            rows.append(await measure(app, urls, mode, k, n))
            log(opts, f"{mode} x{k}: {rows[-1]['per_s']:.0f}/s")
    for what, point in (("2pc", "prepared"), ("2pc", "recorded"), ("saga", "-")):
        rows.append(await failure(store, urls, what, point, opts))
        log(opts, f"failure {what} {point}: locked {rows[-1]['locked_s']:.2f}s")
    return rows


def log(opts: argparse.Namespace, msg: str) -> None:
    if not opts.json:
        print(msg, file=sys.stderr, flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer transactions (smoke run)")
    ap.add_argument("--json", action="store_true", help="last line: the rows as JSON")
    ap.add_argument("--n", type=int, default=None, help="transactions per row")
    ap.add_argument("--safe-age", type=float, default=5.0, help="recovery's safe age (s)")
    ap.add_argument("--recover-every", type=float, default=1.0, help="recovery period (s)")
    ap.add_argument("--no-fsync", action="store_true", help="run the cluster with fsync off")
    opts = ap.parse_args()
    opts.n = opts.n or (100 if opts.quick else 600)
    opts.in_flight = IN_FLIGHT
    settings = {"track_commit_timestamp": "on"}
    with PgCluster(max_connections=200, fsync=not opts.no_fsync, settings=settings) as cluster:
        rows = asyncio.run(main_async(opts, cluster))
    report(rows, opts)
    return 0


def report(rows: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    steady = [r for r in rows if "case" not in r]
    bl.print_table(
        f"onboarding: 2PC atomic group vs saga (load {load:.2f})",
        ["mode", "in flight", "per s", "p50 ms", "p99 ms", "hold p50 ms", "hold p99 ms",
         "touch/s", "touch p99 ms"],
        [[r["mode"], r["in_flight"], r["per_s"], r["p50_ms"], r["p99_ms"], r["hold_p50_ms"],
          r["hold_p99_ms"], r["touch_per_s"], r["touch_p99_ms"]] for r in steady],
    )  # fmt: skip
    fails = [r for r in rows if "case" in r]
    bl.print_table(
        f"failure: the coordinator killed (safe age {opts.safe_age}s, "
        f"recovery every {opts.recover_every}s)",
        ["mode", "case", "row locked s", "settled s", "outcome"],
        [[r["mode"], r["case"], r["locked_s"], r["settled_s"], r["outcome"]] for r in fails],
    )
    if opts.json:
        print(json.dumps({"rows": rows, "load_avg": load, "quick": opts.quick}))


if __name__ == "__main__":
    sys.exit(main())
