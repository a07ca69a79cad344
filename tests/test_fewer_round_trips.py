"""Group commit on SQLite and held writes on PostgreSQL keep every guarantee.

SQLite: transactions queued behind each other share one BEGIN/COMMIT, each in
a savepoint. A caller's block returns only once its writes are durable (seen
by a second connection), a caller that raises rolls back alone, and a caller
that gives up its place in the queue never leaves the group uncommitted.

PostgreSQL: writes given to ``Tx.later`` go out as one statement; a check
that fails (a lost lease, a concurrent saga update) aborts the whole
transaction, held writes and all.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import ConcurrencyConflict, LeaseLost, SagaIdInUse
from sagakit.store import Store, open_store
from sagakit.store.core import LogEntry, SagaRecord
from sagakit.store.sqlite import SqliteDriver

pytestmark = pytest.mark.timeout(60)

ROWS = "CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY)"


def _seen(path: Path) -> list[int]:
    """The rows another connection sees: only what is committed."""
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT n FROM rows ORDER BY n")]
    finally:
        conn.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tuple[Store, Path]]:
    path = tmp_path / "g.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    async with store.transaction() as tx:
        await tx.execute(ROWS)
    try:
        yield store, path
    finally:
        await store.close()


async def test_queued_transactions_share_a_commit_and_a_failure_rolls_back_alone(
    sqlite_store: tuple[Store, Path],
) -> None:
    store, path = sqlite_store
    driver = store.driver
    assert isinstance(driver, SqliteDriver)
    before = driver.commits
    seen_at_exit: dict[int, list[int]] = {}

    async def one(n: int) -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO rows (n) VALUES (?)", n)
            if n == 5:
                raise RuntimeError("refused")
        seen_at_exit[n] = _seen(path)

    results = await asyncio.gather(*(one(n) for n in range(10)), return_exceptions=True)
    assert [type(r).__name__ for r in results].count("RuntimeError") == 1
    assert _seen(path) == [n for n in range(10) if n != 5]
    # every block returned after its own row was durable
    assert all(n in rows for n, rows in seen_at_exit.items())
    # and the ten transactions did not each pay for a COMMIT
    assert driver.commits - before < 9


async def test_a_caller_giving_up_its_place_never_strands_the_group(
    sqlite_store: tuple[Store, Path],
) -> None:
    store, path = sqlite_store
    gate = asyncio.Event()

    async def first() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO rows (n) VALUES (1)")
            await gate.wait()

    async def second() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO rows (n) VALUES (2)")

    a = asyncio.create_task(first())
    await asyncio.sleep(0.01)  # a holds the connection
    b = asyncio.create_task(second())
    await asyncio.sleep(0.01)  # b waits for it, so a will leave the group open for b
    gate.set()
    await asyncio.sleep(0)  # a finishes its block and hands the connection to b ...
    b.cancel()  # ... which gives up before it runs
    await asyncio.wait_for(a, 5.0)
    assert _seen(path) == [1]
    with pytest.raises(asyncio.CancelledError):
        await b


async def test_commit_callbacks_run_in_the_order_the_transactions_ran(
    sqlite_store: tuple[Store, Path],
) -> None:
    store, _ = sqlite_store
    order: list[int] = []

    async def one(n: int) -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO rows (n) VALUES (?)", n)
            tx.on_commit(lambda: order.append(n))

    await asyncio.gather(*(one(n) for n in range(8)))
    assert order == list(range(8))


# -- PostgreSQL: held writes --------------------------------------------------


async def test_held_writes_go_out_with_the_commit_and_a_lost_lease_undoes_them(
    pg: Store,
) -> None:
    q = pg.queue
    async with pg.transaction() as tx:
        await q.put(tx, "held.in", "m1", b"one")
    [item] = await q.claim("held.in", 1, 30.0)
    await q.release(item, 0.0)  # the lease moves on: item's token is stale
    [fresh] = await q.claim("held.in", 1, 30.0)
    with pytest.raises(LeaseLost):
        async with pg.transaction() as tx:
            await q.put(tx, "held.out", "m2", b"two")
            await q.ack_later(tx, item)
    assert await q.depth("held.out") == 0  # the held put went with the rollback
    async with pg.transaction() as tx:
        await q.put(tx, "held.out", "m3", b"three")
        await q.ack_later(tx, fresh)
    assert await q.depth("held.in") == 0 and await q.depth("held.out") == 1


async def test_a_concurrent_saga_update_aborts_the_batch(pg: Store) -> None:
    now = pg.clock.now()
    rec = SagaRecord("s1", "t", 1, "running", b"{}", b"{}", 0, now, now)
    async with pg.transaction() as tx:
        assert await pg.saga_insert(tx, rec)
    stale = SagaRecord("s1", "t", 1, "running", b"{}", b"{}", 0, now, now)
    async with pg.transaction() as tx:
        await pg.saga_update(tx, rec)  # rev 0 -> 1
    with pytest.raises(ConcurrencyConflict):
        async with pg.transaction() as tx:
            await pg.log(tx, [LogEntry("s1", now, "stale", "a")])
            await pg.saga_update(tx, stale)  # still thinks rev 0
    assert [e.entry for e in await pg.history("s1")] == []
    got = await pg.saga_get("s1")
    assert got is not None and got.rev == 1


async def test_a_taken_saga_id_undoes_the_start_batch(pg: Store) -> None:
    now = pg.clock.now()
    rec = SagaRecord("s2", "t", 1, "running", b"{}", b"{}", 0, now, now)
    async with pg.transaction() as tx:
        await pg.saga_insert_later(tx, rec)
        await pg.queue.put(tx, "first.commands", "c1", b"go")
    with pytest.raises(SagaIdInUse):
        async with pg.transaction() as tx:
            await pg.saga_insert_later(tx, rec)
            await pg.log(tx, [LogEntry("s2", now, "started")])
            await pg.queue.put(tx, "first.commands", "c2", b"go again")
    assert await pg.queue.depth("first.commands") == 1
    assert await pg.history("s2") == []


async def test_writes_held_in_a_failed_savepoint_are_dropped(pg: Store) -> None:
    q = pg.queue
    async with pg.transaction() as tx:
        await q.put(tx, "sp.kept", "k1", b"before")
        with pytest.raises(RuntimeError):
            async with tx.savepoint():
                await q.put(tx, "sp.dropped", "d1", b"inside")
                raise RuntimeError("the block fails")
        async with tx.savepoint():
            await q.put(tx, "sp.kept", "k2", b"inside, kept")
    assert await q.depth("sp.dropped") == 0
    assert await q.depth("sp.kept") == 2


# -- wait(): the finishing commit hands the record to local waiters -------------


@sk.command("rt.Book")
class Book(msgspec.Struct):
    amount: int


class Order(msgspec.Struct):
    amount: int


async def test_a_local_waiter_reads_the_saga_once(tmp_path: Path) -> None:
    book = sk.Saga("rt-book", Order).step("book").invoke("ledger", lambda o: Book(o.amount))
    defn = book.build()
    app = sk.App(f"sqlite:///{tmp_path / 'w.db'}")
    app.saga(defn)

    @app.participant("ledger").command(Book)
    async def booked(cmd: Book, ctx: sk.Context) -> None:
        await asyncio.sleep(0.05)  # the waiter is watching before the saga ends

    reads = 0
    async with app:
        real = app.store.saga_get

        async def counted(saga_id: str) -> SagaRecord | None:
            nonlocal reads
            reads += 1
            return await real(saga_id)

        app.store.saga_get = counted  # type: ignore[method-assign]
        view = await app.sagas.wait(await app.sagas.start(defn, Order(5)), 10)
    assert view.state == "completed" and view.data == Order(5)
    assert reads == 1  # the first look; the end came with the commit
