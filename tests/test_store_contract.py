"""The store contract on every backend, plus what only PostgreSQL has.

The contract (:class:`sagakit.testing.StoreContract`) runs on ``memory://``, a
SQLite file and the real PostgreSQL server. PostgreSQL-only tests cover
LISTEN/NOTIFY across stores, the listener's reconnection, competing claims
from separate pools, and how server errors are classified.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sagakit.clock import FakeClock
from sagakit.errors import ConfigurationError, StoreError
from sagakit.store import Store, open_store
from sagakit.store.postgres import PostgresDriver, rowcount, to_dollar
from sagakit.store.queue import Queued
from sagakit.store.schema import SCHEMA_VERSION
from sagakit.testing import StoreContract, drop_tables

pytestmark = pytest.mark.timeout(60)


def _url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[Store]:
    st = open_store(_url(request, request.param, tmp_path), prefix=prefix, clock=FakeClock())
    await st.open()
    try:
        yield st
    finally:
        await drop_tables(st)
        await st.close()


class TestStoreContract(StoreContract):
    """Every contract test, once per backend."""


# -- several stores on one database ------------------------------------------


@pytest.fixture
async def pair(postgres_url: str, prefix: str) -> AsyncIterator[tuple[Store, Store]]:
    clock = FakeClock()
    a = open_store(postgres_url, prefix=prefix, clock=clock)
    b = open_store(postgres_url, prefix=prefix, clock=clock)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await drop_tables(a)
        await b.close()
        await a.close()


async def _woken(store: Store, queue: str, action: Callable[[], object]) -> bool:
    ev = store.queue.waker.event(queue)
    ev.clear()
    result = action()
    if asyncio.iscoroutine(result):
        await result
    try:
        await asyncio.wait_for(ev.wait(), 5.0)
    except TimeoutError:
        return False
    return True


async def _enqueue(store: Store, queue: str, message_id: str) -> None:
    async with store.transaction() as tx:
        await store.queue.put(tx, queue, message_id, b"x")


async def test_notify_wakes_another_process_store(pair: tuple[Store, Store]) -> None:
    a, b = pair
    assert await _woken(b, "jobs", lambda: _enqueue(a, "jobs", "m1"))


async def test_other_prefix_is_not_woken(pair: tuple[Store, Store], postgres_url: str) -> None:
    a, _ = pair
    other = open_store(postgres_url, prefix=a.prefix + "x", clock=FakeClock())
    await other.open()
    try:
        ev = other.queue.waker.event("jobs")
        ev.clear()
        assert await _woken(a, "jobs", lambda: _enqueue(a, "jobs", "m1"))
        await asyncio.sleep(0.2)  # a NOTIFY would have arrived by now; nothing to poll for
        assert not ev.is_set()
    finally:
        await drop_tables(other)
        await other.close()


async def test_listener_reconnects_after_being_cut(pair: tuple[Store, Store]) -> None:
    a, b = pair
    driver = b.driver
    assert isinstance(driver, PostgresDriver)
    old = driver.listener_pid
    assert old is not None
    async with a.transaction() as tx:
        await tx.fetchone("SELECT pg_terminate_backend(?)", old)
    for _ in range(200):
        if driver.listener_pid not in (None, old):
            break
        await asyncio.sleep(0.05)
    assert driver.listener_pid not in (None, old), "listener did not reconnect"
    assert await _woken(b, "jobs", lambda: _enqueue(a, "jobs", "m1"))


async def test_competing_stores_never_share_a_row(pair: tuple[Store, Store]) -> None:
    a, b = pair
    ids = [f"m{i:03d}" for i in range(200)]
    async with a.transaction() as tx:
        for i in ids:
            await a.queue.put(tx, "q", i, b"x")

    async def drain(store: Store) -> list[Queued]:
        got: list[Queued] = []
        while batch := await store.queue.claim("q", 5, 60.0):
            got.extend(batch)
        return got

    results = await asyncio.gather(*(drain(s) for s in (a, b, a, b, a, b)))
    assert sorted(i.id for r in results for i in r) == ids


async def test_competing_sqlite_connections(tmp_path: Path, prefix: str) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = open_store(url, prefix=prefix), open_store(url, prefix=prefix)
    await a.open()
    await b.open()
    try:
        ids = [f"m{i:03d}" for i in range(100)]
        async with a.transaction() as tx:
            for i in ids:
                await a.queue.put(tx, "q", i, b"x")

        async def drain(store: Store) -> list[str]:
            got: list[str] = []
            while batch := await store.queue.claim("q", 3, 60.0):
                got.extend(i.id for i in batch)
            return got

        results = await asyncio.gather(drain(a), drain(b))
        assert sorted(results[0] + results[1]) == ids
    finally:
        await b.close()
        await a.close()


async def test_sqlite_ending_a_groups_first_transaction_fails_it_alone(
    tmp_path: Path, prefix: str
) -> None:
    """The first transaction of a group takes no savepoint: if SQLite ends the whole
    transaction under it (``INSERT OR ROLLBACK``) and its caller carries on, it
    fails (what it wrote after ran alone, in autocommit), and the two queued behind it
    commit in a transaction of their own."""
    store = open_store(f"sqlite:///{tmp_path / 'ended.db'}", prefix=prefix)
    await store.open()
    sql = f"INSERT OR ROLLBACK INTO {prefix}subscriptions (topic, queue) VALUES (?, ?)"
    try:
        await store.queue.subscribe("t", "q")

        async def first() -> None:
            async with store.transaction() as tx:
                with pytest.raises(StoreError):
                    await tx.execute(sql, "t", "q")  # a duplicate: SQLite rolls it all back
                await tx.execute(sql, "t", "alone")  # outside any transaction: committed alone
                await asyncio.sleep(0)  # the others queue up behind

        async def later(queue: str) -> None:
            async with store.transaction() as tx:
                await tx.execute(sql, "t", queue)

        results = await asyncio.gather(first(), later("b1"), later("b2"), return_exceptions=True)
        assert isinstance(results[0], StoreError) and results[1:] == [None, None]
        async with store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT queue FROM {prefix}subscriptions ORDER BY 1")
        assert [r[0] for r in rows] == ["alone", "b1", "b2", "q"]
    finally:
        await store.close()


# -- error translation at the driver boundary --------------------------------


@pytest.mark.parametrize(
    ("state", "retry"),
    [("40001", True), ("40P01", True), ("53300", True), ("23505", False), ("42601", False)],
)
async def test_server_errors_are_classified(
    pair: tuple[Store, Store], state: str, retry: bool
) -> None:
    a, _ = pair
    with pytest.raises(StoreError) as caught:
        async with a.transaction() as tx:
            await tx.execute(f"DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '{state}'; END $$")
    assert caught.value.retryable is retry
    assert state in str(caught.value)


async def test_unreachable_server_is_retryable() -> None:
    driver = PostgresDriver("postgresql://postgres@127.0.0.1:1/test", min_size=1, timeout=2)
    with pytest.raises(StoreError) as caught:
        await driver.open()
    assert caught.value.retryable


async def test_closed_store_refuses_transactions(postgres_url: str) -> None:
    driver = PostgresDriver(postgres_url)
    with pytest.raises(StoreError):
        async with driver.transaction():
            pass


def test_bad_channel_and_pool_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        PostgresDriver("postgresql://x", channel="bad channel; --")
    with pytest.raises(ConfigurationError):
        PostgresDriver("postgresql://x", min_size=5, max_size=2)
    with pytest.raises(ConfigurationError):
        open_store("postgresql://x", prefix="Bad-Prefix")


# -- pure helpers -------------------------------------------------------------


def test_placeholders_skip_quoted_text() -> None:
    sql = "SELECT '?', ?, \"a?b\", 'it''s ?', ? FROM t WHERE x = ?"
    assert to_dollar(sql) == "SELECT '?', $1, \"a?b\", 'it''s ?', $2 FROM t WHERE x = $3"
    assert to_dollar("SELECT 1") == "SELECT 1"


def test_rowcount_from_status() -> None:
    assert rowcount("UPDATE 3") == 3
    assert rowcount("INSERT 0 1") == 1
    assert rowcount("DELETE 0") == 0
    assert rowcount("SELECT 5") == 0
    assert rowcount("CREATE TABLE") == 0


async def test_concurrent_migrations_of_a_fresh_postgres_schema(
    postgres_url: str, prefix: str
) -> None:
    """Several processes starting at once on an empty database all succeed."""
    import asyncio

    from sagakit.store import open_store
    from sagakit.testing import drop_tables

    stores = [open_store(postgres_url, prefix=prefix) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert {await s.schema_version() for s in stores} == {SCHEMA_VERSION}
    finally:
        await drop_tables(stores[0])
        for s in stores:
            await s.close()
