"""asyncpg or psycopg 3 for the PostgreSQL store? Measure the store's hot path.

Two workloads, each a loop of small transactions like the ones sagakit runs
per message:

* ``txn``: BEGIN; INSERT a queue row RETURNING seq; SELECT it; DELETE it; COMMIT
* ``claim``: BEGIN; UPDATE ... WHERE seq IN (SELECT ... FOR UPDATE SKIP LOCKED
  LIMIT 1) RETURNING (the store's claim); DELETE the row (the ack); COMMIT

Each runs sequentially on one connection (latency) and from 8 tasks over 8
connections (throughput), with asyncpg, psycopg 3 (async, binary protocol,
prepared statements) and sagakit's own ``PostgresDriver`` (asyncpg plus
placeholder rewriting and error translation). Prints a table of transactions
per second and median latency (median of interleaved rounds). Run::

    .venv/bin/python benchmarks/pg_driver_choice.py [--url URL] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg

from sagakit.store.postgres import PostgresDriver

DEFAULT_URL = os.environ.get(
    "SAGAKIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TABLE = f"bench_{uuid.uuid4().hex[:8]}"
CONCURRENCY = 8

# (insert, select, delete, claim) per placeholder style
DOLLAR = (
    f"INSERT INTO {TABLE} (queue, data, available_at) VALUES ($1, $2, $3) RETURNING seq",
    f"SELECT data FROM {TABLE} WHERE seq = $1",
    f"DELETE FROM {TABLE} WHERE seq = $1",
    f"UPDATE {TABLE} SET available_at = $1, attempts = attempts + 1 WHERE seq IN "
    f"(SELECT seq FROM {TABLE} WHERE queue = $2 AND available_at <= $3 ORDER BY available_at "
    "LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING seq, data",
)
PYFORMAT = tuple(s.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s") for s in DOLLAR)
QMARK = tuple(s.replace("$1", "?").replace("$2", "?").replace("$3", "?") for s in DOLLAR)
PAYLOAD = b'{"type":"customers.ReserveCredit","payload":{"customer":"c-1","amount":42}}' * 3

Step = Callable[[Any], Awaitable[None]]


# -- one transaction per driver ----------------------------------------------


async def asyncpg_txn(conn: Any) -> None:
    ins, sel, dele, _ = DOLLAR
    async with conn.transaction():
        seq = await conn.fetchval(ins, "q", PAYLOAD, time.time())
        await conn.fetchrow(sel, seq)
        await conn.execute(dele, seq)


async def asyncpg_claim(conn: Any) -> None:
    now = time.time()
    async with conn.transaction():
        row = await conn.fetchrow(DOLLAR[3], now + 30, "claim", now)
        await conn.execute(DOLLAR[2], row[0])


async def psycopg_txn(conn: psycopg.AsyncConnection[Any]) -> None:
    ins, sel, dele, _ = PYFORMAT
    async with conn.transaction():
        cur = await conn.execute(ins, ("q", PAYLOAD, time.time()), prepare=True)
        (seq,) = await cur.fetchone() or (0,)
        await (await conn.execute(sel, (seq,), prepare=True)).fetchone()
        await conn.execute(dele, (seq,), prepare=True)


async def psycopg_claim(conn: psycopg.AsyncConnection[Any]) -> None:
    now = time.time()
    async with conn.transaction():
        cur = await conn.execute(PYFORMAT[3], (now + 30, "claim", now), prepare=True)
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(PYFORMAT[2], (row[0],), prepare=True)


async def sagakit_txn(driver: PostgresDriver) -> None:
    ins, sel, dele, _ = QMARK
    async with driver.transaction() as tx:
        row = await tx.fetchone(ins, "q", PAYLOAD, time.time())
        await tx.fetchone(sel, row[0])
        await tx.execute(dele, row[0])


async def sagakit_claim(driver: PostgresDriver) -> None:
    now = time.time()
    async with driver.transaction() as tx:
        row = await tx.fetchone(QMARK[3], now + 30, "claim", now)
        await tx.execute(QMARK[2], row[0])


# -- connections ---------------------------------------------------------------


@asynccontextmanager
async def asyncpg_conns(url: str, n: int) -> AsyncIterator[list[Any]]:
    conns = [await asyncpg.connect(url) for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.close()


@asynccontextmanager
async def psycopg_conns(url: str, n: int) -> AsyncIterator[list[Any]]:
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(n)]
    try:
        yield conns
    finally:
        for c in conns:
            await c.close()


@asynccontextmanager
async def sagakit_conns(url: str, n: int) -> AsyncIterator[list[Any]]:
    driver = PostgresDriver(url, min_size=n, max_size=n)
    await driver.open()
    try:
        yield [driver] * n  # the pool hands each transaction its own connection
    finally:
        await driver.close()


DRIVERS: dict[
    str, tuple[Callable[[str, int], AbstractAsyncContextManager[list[Any]]], Step, Step]
] = {
    "asyncpg": (asyncpg_conns, asyncpg_txn, asyncpg_claim),
    "psycopg3": (psycopg_conns, psycopg_txn, psycopg_claim),
    "sagakit PostgresDriver (asyncpg)": (sagakit_conns, sagakit_txn, sagakit_claim),
}


# -- measuring -----------------------------------------------------------------


async def _loop(step: Step, conn: Any, until: float, lat: list[float]) -> int:
    n = 0
    while (t0 := time.perf_counter()) < until:
        await step(conn)
        lat.append(time.perf_counter() - t0)
        n += 1
    return n


async def measure(conns: list[Any], step: Step, seconds: float) -> tuple[float, float]:
    """Transactions per second and median latency (ms) with one task per connection."""
    for c in conns:  # warm up: prepare statements, fill caches
        for _ in range(50):
            await step(c)
    lat: list[float] = []
    start = time.perf_counter()
    counts = await asyncio.gather(*(_loop(step, c, start + seconds, lat) for c in conns))
    elapsed = time.perf_counter() - start
    return sum(counts) / elapsed, statistics.median(lat) * 1000


async def setup(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"CREATE TABLE {TABLE} (seq BIGSERIAL PRIMARY KEY, queue TEXT NOT NULL, "
            "data BYTEA NOT NULL, available_at DOUBLE PRECISION NOT NULL, "
            "attempts INTEGER NOT NULL DEFAULT 0)"
        )
        await conn.execute(f"CREATE INDEX {TABLE}_due ON {TABLE} (queue, available_at)")
        await refill(conn, rows)
    finally:
        await conn.close()


async def refill(conn: Any, rows: int) -> None:
    """A fresh claim queue (TRUNCATE, so no dead rows from the last run skew it)."""
    await conn.execute(f"TRUNCATE {TABLE}")
    await conn.copy_records_to_table(
        TABLE,
        records=[("claim", PAYLOAD, i * 1e-3) for i in range(rows)],
        columns=["queue", "data", "available_at"],
    )
    await conn.execute(f"ANALYZE {TABLE}")


async def main(url: str, seconds: float, rounds: int) -> None:
    rows = 100_000
    await setup(url, rows)
    admin = await asyncpg.connect(url)
    runs: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    try:
        for r in range(rounds):  # interleaved rounds, so background load hits every driver
            for name, (connect, txn, claim) in DRIVERS.items():
                for workload, step in (("txn", txn), ("claim", claim)):
                    for n in (1, CONCURRENCY):
                        await refill(admin, rows)
                        async with connect(url, n) as conns:
                            tps, p50 = await measure(conns, step, seconds)
                        runs.setdefault((name, workload, n), []).append((tps, p50))
                        print(f"  round {r + 1} {name:34} {workload:6} x{n}: {tps:6.0f} tx/s")
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await admin.close()
    results = [
        (name, workload, n, statistics.median(t for t, _ in v), statistics.median(p for _, p in v))
        for (name, workload, n), v in runs.items()
    ]
    print_table(sorted(results, key=lambda r: (r[1], r[2], r[0])))


def print_table(results: list[tuple[str, str, int, float, float]]) -> None:
    print()
    print(f"| {'driver':34} | workload | tasks | tx/s   | p50 ms |")
    print(f"|{'-' * 36}|----------|-------|--------|--------|")
    for name, workload, n, tps, p50 in results:
        print(f"| {name:34} | {workload:8} | {n:5} | {tps:6.0f} | {p50:6.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="the table shows the median round")
    args = ap.parse_args()
    asyncio.run(main(args.url, args.seconds, args.rounds))
