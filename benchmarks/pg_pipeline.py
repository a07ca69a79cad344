"""What pipelining would save a hop on PostgreSQL, measured before choosing.

sagakit's participant hop on PostgreSQL is five round trips with asyncpg:
BEGIN; the inbox admit (its result decides); the handler's statement; one
batch of held writes (inbox outcome, reply, ack); COMMIT. asyncpg waits for
each reply before it sends the next statement. psycopg 3's pipeline mode
sends statements without waiting, so BEGIN can travel with the admit and the
batch with the COMMIT: three round trips. This script runs the same hop
(same tables, same statements) both ways on one connection, one hop after
another, and prints hops/s, median latency and client CPU per hop; a
coordinator-shaped hop (BEGIN; SELECT ... FOR UPDATE; batch; COMMIT, four
round trips, or two pipelined) as well. A server-side function is not among
the shapes: the handler's statements (participant) and the saga machine's
decision (coordinator) run in Python between the read and the writes, so a
function could not take a whole hop.

    python benchmarks/pg_pipeline.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import benchlib as bl
import psycopg

P = f"pipe_{uuid.uuid4().hex[:8]}_"
DDL = [
    f"CREATE TABLE {P}inbox (k TEXT PRIMARY KEY, outcome TEXT NOT NULL, reply BYTEA)",
    f"CREATE TABLE {P}messages (seq BIGSERIAL PRIMARY KEY, id TEXT, data BYTEA)",
    f"CREATE TABLE {P}effects (id BIGSERIAL PRIMARY KEY, k TEXT, amount INT)",
    f"CREATE TABLE {P}sagas (id TEXT PRIMARY KEY, state TEXT, rev INT NOT NULL)",
]
ADMIT = (
    f"INSERT INTO {P}inbox (k, outcome) VALUES ($1, 'running') ON CONFLICT (k) "
    f"DO UPDATE SET k = excluded.k RETURNING outcome"
)
EFFECT = f"INSERT INTO {P}effects (k, amount) VALUES ($1, $2)"
BATCH = (
    f"WITH w0 AS (UPDATE {P}inbox SET outcome = 'success', reply = $1 WHERE k = $2 RETURNING 1), "
    f"w1 AS (INSERT INTO {P}messages (id, data) VALUES ($3, $4) RETURNING 1), "
    f"w2 AS (DELETE FROM {P}messages WHERE seq = $5 RETURNING 1) "
    "SELECT (SELECT count(*) FROM w0)::int, (SELECT count(*) FROM w1)::int, "
    "(SELECT count(*) FROM w2)::int"
)
LOAD = f"SELECT state, rev FROM {P}sagas WHERE id = $1 FOR UPDATE"
SAVE = (
    f"WITH w0 AS (UPDATE {P}sagas SET rev = rev + 1 WHERE id = $1 AND rev = $2 RETURNING 1), "
    f"w1 AS (INSERT INTO {P}messages (id, data) VALUES ($3, $4) RETURNING 1) "
    "SELECT (SELECT count(*) FROM w0)::int, (SELECT count(*) FROM w1)::int"
)


def _ps(sql: str) -> str:
    """asyncpg's $n placeholders as psycopg's %s (each used once, in order)."""
    out, i = sql, 1
    while f"${i}" in out:
        out = out.replace(f"${i}", "%s")
        i += 1
    return out


class Asyncpg:
    name = "asyncpg, one statement at a time"

    async def open(self, url: str) -> None:
        self.c = await asyncpg.connect(url)

    async def participant(self, n: int) -> None:
        c, key = self.c, f"k{n}"
        await c.execute("BEGIN")
        await c.fetchrow(ADMIT, key)
        await c.execute(EFFECT, key, n)
        await c.fetchrow(BATCH, b"reply", key, key, b"reply", -1)
        await c.execute("COMMIT")

    async def coordinator(self, n: int) -> None:
        c = self.c
        await c.execute("BEGIN")
        row = await c.fetchrow(LOAD, "s")
        await c.fetchrow(SAVE, "s", row["rev"], "s", b"cmd")
        await c.execute("COMMIT")

    async def close(self) -> None:
        await self.c.close()


class Pipelined:
    name = "psycopg 3, pipeline mode"

    async def open(self, url: str) -> None:
        self.c = await psycopg.AsyncConnection.connect(url, autocommit=True)
        self.admit, self.effect, self.batch = _ps(ADMIT), _ps(EFFECT), _ps(BATCH)
        self.load, self.save = _ps(LOAD), _ps(SAVE)
        # one pipeline for the connection's life: leaving one costs a round trip
        self.pipeline = self.c.pipeline()
        self.p = await self.pipeline.__aenter__()

    async def participant(self, n: int) -> None:
        c, p, key = self.c, self.p, f"k{n}"
        await c.execute("BEGIN")
        cur = await c.execute(self.admit, (key,), prepare=True)
        await p.sync()
        await cur.fetchone()  # round trip 1: BEGIN + admit
        cur = await c.execute(self.effect, (key, n), prepare=True)
        await p.sync()
        _ = cur.rowcount  # round trip 2: the handler's statement (its result is awaited)
        cur = await c.execute(self.batch, (b"reply", key, key, b"reply", -1), prepare=True)
        await c.execute("COMMIT")
        await p.sync()
        await cur.fetchone()  # round trip 3: batch + COMMIT

    async def coordinator(self, n: int) -> None:
        c, p = self.c, self.p
        await c.execute("BEGIN")
        cur = await c.execute(self.load, ("s",), prepare=True)
        await p.sync()
        row = await cur.fetchone()  # round trip 1: BEGIN + load
        assert row is not None
        cur = await c.execute(self.save, ("s", row[1], "s", b"cmd"), prepare=True)
        await c.execute("COMMIT")
        await p.sync()
        await cur.fetchone()  # round trip 2: batch + COMMIT

    async def close(self) -> None:
        await self.pipeline.__aexit__(None, None, None)
        await self.c.close()


async def measure(
    hop: Callable[[int], Awaitable[None]], seconds: float, start: int
) -> tuple[float, float, float]:
    """Hops per second, median latency in ms and client CPU ms per hop."""
    lat: list[float] = []
    cpu0, end = time.process_time(), time.perf_counter() + seconds
    n = start
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await hop(n)
        lat.append(time.perf_counter() - t0)
        n += 1
    cpu = time.process_time() - cpu0
    return len(lat) / sum(lat), statistics.median(lat) * 1000, cpu * 1000 / len(lat)


async def run(args: argparse.Namespace) -> list[list[Any]]:
    url = bl.pg_url()
    setup = await asyncpg.connect(url)
    for stmt in DDL:
        await setup.execute(stmt)
    await setup.execute(f"INSERT INTO {P}sagas VALUES ('s', 'running', 0)")
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    shapes = [Asyncpg(), Pipelined()]
    try:
        for s in shapes:
            await s.open(url)
        n = 0
        for r in range(args.rounds):
            for s in shapes if r % 2 == 0 else list(reversed(shapes)):
                for kind in ("participant", "coordinator"):
                    out = await measure(getattr(s, kind), args.seconds, n)
                    n += 1_000_000
                    results.setdefault((s.name, kind), []).append(out)
    finally:
        for s in shapes:
            await s.close()
        await setup.execute(f"DROP TABLE IF EXISTS {', '.join(_tables())}")
        await setup.close()
    rows = []
    trips = {
        ("asyncpg, one statement at a time", "participant"): 5,
        ("asyncpg, one statement at a time", "coordinator"): 4,
        ("psycopg 3, pipeline mode", "participant"): 3,
        ("psycopg 3, pipeline mode", "coordinator"): 2,
    }
    for (name, kind), outs in results.items():
        med = [statistics.median(x[i] for x in outs) for i in range(3)]
        rows.append([name, kind, trips[(name, kind)], *med])
    return rows


def _tables() -> list[str]:
    return [f"{P}{t}" for t in ("inbox", "messages", "effects", "sagas")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 2
    rows = asyncio.run(run(args))
    hw = bl.hardware()
    bl.print_table(
        f"one hop after another on one connection, medians of {args.rounds} interleaved rounds; "
        f"{hw['cpus']} CPUs, load {hw['load']}",
        ("driver", "hop", "round trips", "hops/s", "p50 ms", "client CPU ms/hop"),
        rows,
    )


if __name__ == "__main__":
    main()
