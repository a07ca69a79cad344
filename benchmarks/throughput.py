"""Messages per second through the database transport (issue #2).

N commands are enqueued first; then one participant consumes them. Each
message is handled end to end: claimed from the queue, then one local
transaction that checks and writes the inbox row, inserts one business row,
writes the reply to the outbox (the reply's queue), and deletes the queue row
(the ack), committed together. The clock runs from starting the consumer to
the moment the store shows every reply committed (polled every 20 ms).

    python benchmarks/throughput.py [--messages 5000] [--quick]

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
import time
from typing import Any

import benchlib as bl
import msgspec

import sagakit as sk
from sagakit.messages import Headers


@sk.command("bench.Work")
class Work(msgspec.Struct):
    n: int


async def all_replied(store: sk.Store, messages: int) -> None:
    """Wait until every message's reply is committed (each handler run commits its
    reply to ``bench.sink`` with its effect): what the store shows, no hook."""
    while await store.queue.depth("bench.sink") < messages:
        await asyncio.sleep(0.02)


async def measure(store_url: str, prefix: str, messages: int, prefetch: int) -> dict[str, Any]:
    settings = sk.Settings(prefix=prefix, prefetch=prefetch)
    app = sk.App(store_url, "database", settings=settings)
    worker = app.participant("worker")
    insert = f"INSERT INTO {prefix}work (n) VALUES (?)"

    @worker.command(Work)
    async def work(cmd: Work, ctx: sk.Context) -> None:
        await ctx.db.execute(insert, cmd.n)

    store = app.store
    await store.open()
    key = "INTEGER PRIMARY KEY" if store.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE IF NOT EXISTS {prefix}work (id {key}, n INTEGER)")
    app.registry.add(Work)
    for start in range(0, messages, 500):
        async with store.transaction() as tx:
            for i in range(start, min(messages, start + 500)):
                env = app.codec.make(Work(i), Headers(reply_to="bench.sink"))
                await store.queue.put(tx, "worker", env.id, app.codec.encode(env))
    cpu0, t0 = time.process_time(), time.perf_counter()
    await app.start()
    await asyncio.wait_for(all_replied(store, messages), 600)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    left = await store.queue.depth("worker")
    await app.stop()
    return {
        "elapsed": elapsed,
        "per_s": messages / elapsed,
        "cpu_us": cpu * 1e6 / messages,
        "left": left,
    }


async def run(args: argparse.Namespace) -> None:
    dbs, notes = ["sqlite"], []
    url = bl.pg_url()
    if not bl.reachable(url):
        notes.append(f"PostgreSQL not reachable at {url}")
    elif (why := bl.sagakit_postgres()) is not None:
        notes.append(why)
    else:
        dbs.append("postgresql")
    tmp = tempfile.mkdtemp(prefix="sagakit-tput-")
    prefix = f"skt{os.getpid()}_"
    rows = []
    try:
        for db in dbs:
            for i, prefetch in enumerate((1, 32)):
                n = args.messages if db == "sqlite" else max(1, args.messages // 2)
                p = f"{prefix}{i}_"
                store = f"sqlite:///{tmp}/t{i}.db" if db == "sqlite" else url
                out = await measure(store, p, n, prefetch)
                if out["left"]:
                    notes.append(f"{db}: {out['left']} messages left in the queue")
                rows.append([db, prefetch, n, out["elapsed"], out["per_s"], out["cpu_us"]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if "postgresql" in dbs:
            await bl.drop_prefixed_tables(url, prefix)
    hw = bl.hardware()
    bl.print_table(
        f"database transport, messages handled end to end; {hw['cpus']} CPUs, load {hw['load']}",
        ("database", "prefetch", "messages", "seconds", "messages/s", "CPU us/message"),
        rows,
    )
    for n in notes:
        print("note:", n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.messages = 1000
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
