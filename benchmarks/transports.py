"""End-to-end sagas per second of the demo's create-order saga over each transport.

The same workload on every row: ``sagakit demo``'s plan of ``--orders``
orders (seed 7: eight steps for a completed order, compensations for the
refused ones, carrier refusals retried), placed 64 at a time, timed from the
first order placed until every saga is final, in one process with all six
services and the coordinator. The store is PostgreSQL (a scratch database per
row) except for the database transport's SQLite row. Every row must end with
the demo's invariants true, or the figure is not printed as a success.

    python benchmarks/transports.py [--orders 500] [--repeat 1] [--only nats,redis]
                                    [--markdown]

Brokers are reached at the loopback defaults (or ``SAGAKIT_TEST_RABBITMQ_URL``,
``SAGAKIT_TEST_NATS_URL``, ``SAGAKIT_TEST_REDIS_URL``); each row uses a
private RabbitMQ virtual host (via ``rabbitmqctl``, when available), JetStream
stream and subject prefix, or Redis key prefix, removed afterwards. Rows whose
broker is unreachable are reported as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import benchlib as bl

URLS = {
    "rabbitmq": ("SAGAKIT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": ("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "redis": ("SAGAKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


def broker_url(name: str) -> str:
    env, default = URLS[name]
    return os.environ.get(env, default)


@dataclass
class Row:
    transport: str
    store: str
    orders: int
    elapsed_s: float | None = None
    ok: bool | None = None
    note: str = ""

    @property
    def sagas_per_s(self) -> float | None:
        return self.orders / self.elapsed_s if self.elapsed_s else None


# -- private places on each backend ---------------------------------------------


@contextlib.asynccontextmanager
async def scratch_pg() -> AsyncIterator[str]:
    base = bl.pg_url()
    name = f"sagakit_tbench_{uuid.uuid4().hex[:8]}"
    await bl._admin(base, f"CREATE DATABASE {name}")
    try:
        yield bl.with_database(base, name)
    finally:
        await bl._admin(base, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.asynccontextmanager
async def scratch_sqlite() -> AsyncIterator[str]:
    folder = tempfile.mkdtemp(prefix="sagakit-tbench-")
    try:
        yield f"sqlite:///{folder}/sagakit.db"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, check=True, timeout=30)


@contextlib.asynccontextmanager
async def scratch_rabbitmq() -> AsyncIterator[str]:
    url = broker_url("rabbitmq")
    vhost = f"sagakit-tbench-{uuid.uuid4().hex[:8]}"
    if shutil.which("rabbitmqctl") is None:
        yield url  # the default virtual host; the queues have the demo's names
        return
    _ctl("add_vhost", vhost)
    _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{url.rstrip('/')}/{quote(vhost, safe='')}"
    finally:
        _ctl("delete_vhost", vhost)


@contextlib.asynccontextmanager
async def scratch_nats() -> AsyncIterator[str]:
    import nats

    url = broker_url("nats")
    tag = uuid.uuid4().hex[:8]
    stream = f"SAGAKIT_TB{tag.upper()}"
    try:
        yield f"{url}?stream={stream}&prefix=sagakit-tb{tag}"
    finally:
        nc = await nats.connect(url)
        with contextlib.suppress(Exception):
            await nc.jsm().delete_stream(stream)
        await nc.close()


@contextlib.asynccontextmanager
async def scratch_redis() -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    url = broker_url("redis")
    prefix = f"sagakit-tb{uuid.uuid4().hex[:8]}"
    try:
        yield f"{url}?prefix={prefix}"
    finally:
        r = aioredis.from_url(url)
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


@contextlib.asynccontextmanager
async def plain(url: str) -> AsyncIterator[str]:
    yield url


# -- one row --------------------------------------------------------------------

Scratch = Callable[[], contextlib.AbstractAsyncContextManager[str]]

ROWS: list[tuple[str, str, Scratch, Scratch]] = [
    # (transport label, store label, store scratch, transport scratch)
    ("database", "SQLite", scratch_sqlite, lambda: plain("database")),
    ("database", "PostgreSQL", scratch_pg, lambda: plain("database")),
    ("RabbitMQ", "PostgreSQL", scratch_pg, scratch_rabbitmq),
    ("NATS JetStream", "PostgreSQL", scratch_pg, scratch_nats),
    ("Redis Streams", "PostgreSQL", scratch_pg, scratch_redis),
]
KEYS = {"database": "database", "RabbitMQ": "rabbitmq", "NATS JetStream": "nats"}
KEYS["Redis Streams"] = "redis"


async def one_run(store_cm: Scratch, transport_cm: Scratch, orders: int) -> tuple[float, bool]:
    from sagakit.examples.order_fulfillment import demo

    async with store_cm() as store, transport_cm() as transport:
        args = demo.parser().parse_args(
            ["--orders", str(orders), "--json", "--store", store, "--transport", transport]
        )
        result = await demo.run(args)
        return result.elapsed_s, result.ok


async def measure(orders: int, repeat: int, only: set[str] | None) -> list[Row]:
    rows = []
    for label, store_label, store_cm, transport_cm in ROWS:
        key = KEYS[label]
        row = Row(label, store_label, orders)
        rows.append(row)
        if only and key not in only and f"{key}-{store_label.lower()}" not in only:
            row.note = "not selected"
            continue
        if store_label == "PostgreSQL" and not bl.reachable(bl.pg_url()):
            row.note = f"PostgreSQL not reachable at {bl.pg_url()}"
            continue
        if key in URLS and not bl.reachable(broker_url(key)):
            row.note = f"{label} not reachable at {broker_url(key)}"
            continue
        best: float | None = None
        ok = True
        for _ in range(repeat):
            elapsed, good = await one_run(store_cm, transport_cm, orders)
            ok = ok and good
            best = elapsed if best is None else min(best, elapsed)
        row.elapsed_s, row.ok = best, ok
        print(f"  {label} / {store_label}: {orders / best:.1f} sagas/s, invariants ok: {ok}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--orders", type=int, default=500)
    p.add_argument("--repeat", type=int, default=1, help="runs per row; the best is kept")
    p.add_argument("--only", default="", help="comma-separated: database,rabbitmq,nats,redis")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    hw = bl.hardware()
    print(f"load before: {hw['load']} ({hw['cpus']} CPUs, {hw['cpu']})")
    rows = asyncio.run(measure(args.orders, args.repeat, only))
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load after: {load_after}")
    headers = ["transport", "store", "orders", "elapsed s", "sagas/s", "invariants"]
    table: list[list[Any]] = [
        [
            r.transport,
            r.store,
            r.orders,
            r.elapsed_s,
            r.sagas_per_s,
            r.note or ("all true" if r.ok else "VIOLATED"),
        ]
        for r in rows
    ]
    bl.print_table(
        f"create-order saga end to end, one process, {args.orders} orders", headers, table
    )
    if args.markdown:
        print(bl.markdown_table(headers, table))


if __name__ == "__main__":
    main()
