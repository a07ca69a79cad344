"""PostgreSQL hops without BEGIN/COMMIT keep every guarantee.

A transaction whose only work is held writes (a saga start, an
acknowledgement) goes out as one autocommit statement: its checks are
enforced by the server, so a failed one leaves nothing behind. A coordinator
decides on an instance read without a lock: a hop overtaken by another one
writes nothing and decides again on the new state, so the saga still moves
exactly once per event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import ConcurrencyConflict, SagaIdInUse
from sagakit.saga.coordinator import finished
from sagakit.saga.known import KnownSagas
from sagakit.store import Store, Tx, Waker, open_store
from sagakit.store.core import LogEntry, SagaRecord
from sagakit.testing import drop_tables

pytestmark = pytest.mark.timeout(60)


def _record(saga_id: str, store: Store) -> SagaRecord:
    now = store.clock.now()
    return SagaRecord(saga_id, "t", 1, "running", b"{}", b"{}", 0, now, now)


async def test_a_write_only_transaction_never_begins_and_a_taken_id_leaves_nothing(
    pg: Store,
) -> None:
    rec = _record("a1", pg)
    async with pg.transaction() as tx:
        await pg.saga_insert_later(tx, rec)
        await pg.queue.put(tx, "first.commands", "c1", b"go")
    assert not getattr(tx, "begun", True)  # one autocommit statement, no BEGIN/COMMIT
    with pytest.raises(SagaIdInUse) as caught:
        async with pg.transaction() as tx:
            await pg.log(tx, [LogEntry("a1", 1.0, "started again")])
            await pg.saga_insert_later(tx, rec)
            await pg.queue.put(tx, "first.commands", "c2", b"go again")
    assert not getattr(tx, "begun", True) and caught.value.saga_id == "a1"
    assert await pg.queue.depth("first.commands") == 1
    assert await pg.history("a1") == []


async def test_a_stale_decision_that_changes_nothing_writes_nothing(pg: Store) -> None:
    rec = _record("a2", pg)
    async with pg.transaction() as tx:
        assert await pg.saga_insert(tx, rec)
    async with pg.transaction() as tx:
        stale = await pg.saga_peek(tx, "a2")
    assert stale is not None
    async with pg.transaction() as tx:
        await pg.saga_update(tx, rec)  # another hop moves the instance on
    with pytest.raises(ConcurrencyConflict):
        async with pg.transaction() as tx:
            await pg.queue.put(tx, "after.stale", "m1", b"must not leave")
            await pg.saga_unchanged(tx, stale)
    assert await pg.queue.depth("after.stale") == 0
    async with pg.transaction() as tx:  # on the current revision it passes
        await pg.queue.put(tx, "after.stale", "m2", b"leaves")
        await pg.saga_unchanged(tx, rec)
    assert await pg.queue.depth("after.stale") == 1


async def test_a_read_inside_a_begun_transaction_still_sees_its_held_writes(pg: Store) -> None:
    rec = _record("a3", pg)
    async with pg.transaction() as tx:
        await pg.saga_insert_later(tx, rec)
        seen = await pg.saga_peek(tx, "a3")  # held writes go first, inside the transaction
        assert getattr(tx, "begun", False)
    assert seen is not None and seen.id == "a3"


@sk.command("ac.Book")
class Book(msgspec.Struct):
    amount: int


class Order(msgspec.Struct):
    amount: int


BOOK = sk.Saga("ac-book", Order).step("book").invoke("ledger", lambda o: Book(o.amount)).build()


def _app(postgres_url: str, prefix: str, booked: list[int], during: Any = None) -> sk.App:
    """The one-step saga; ``during(saga_id)`` runs inside the participant's handler."""
    app = sk.App(f"{postgres_url}?max_size=4", settings=sk.Settings(prefix=prefix, max_poll=0.05))
    app.saga(BOOK)

    @app.participant("ledger").command(Book)
    async def book(cmd: Book, ctx: sk.Context) -> None:
        booked.append(cmd.amount)
        if during is not None:
            await during(ctx.saga_id)

    return app


async def _bump(store: Store, saga_id: str) -> None:
    """Another hop moves the instance on (its revision), on another connection."""
    async with store.transaction() as other:
        current = await store.saga_load(other, saga_id)
        assert current is not None
        await store.saga_update(other, current)


def _counted_peeks(store: Store, after: Any = None) -> list[str]:
    """Count the coordinator's reads of the instance (``after`` runs after each read)."""
    peeks: list[str] = []
    real = store.saga_peek

    async def peek(tx: Tx, saga_id: str) -> Any:
        peeks.append(saga_id)
        rec = await real(tx, saga_id)
        if after is not None:
            await after(saga_id)
        return rec

    store.saga_peek = peek  # type: ignore[method-assign]
    return peeks


async def _run_once(app: sk.App) -> sk.SagaView:
    try:
        done = await app.sagas.wait(await app.sagas.start(BOOK, Order(7)), 20)
        return await app.sagas.get(done.id)
    finally:
        await drop_tables(app.store)


def _applied_once(view: sk.SagaView, booked: list[int], caplog: pytest.LogCaptureFixture) -> None:
    assert "deciding again" in caplog.text  # the hop lost the race, wrote nothing
    assert view.state == "completed" and booked == [7]
    entries = [e.entry for e in view.history]
    assert len(entries) == len(set(entries)), entries  # every line once: applied once


async def test_a_hop_overtaken_between_its_read_and_its_commit_decides_again(
    postgres_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "sagakit.endpoint")
    booked: list[int] = []
    app = _app(postgres_url, prefix, booked)
    overtaken = asyncio.Event()
    async with app:
        app.sagas.coordinator.known = None  # every hop reads the row

        async def overtake_once(saga_id: str) -> None:
            if not overtaken.is_set():
                await _bump(app.store, saga_id)
                overtaken.set()

        peeks = _counted_peeks(app.store, overtake_once)
        view = await _run_once(app)
    assert overtaken.is_set() and len(peeks) == 2  # read, overtaken, read again
    _applied_once(view, booked, caplog)


async def test_a_hop_deciding_on_a_kept_record_gone_stale_reads_the_row(
    postgres_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "sagakit.endpoint")
    booked: list[int] = []
    app = _app(postgres_url, prefix, booked, during=lambda saga_id: _bump(app.store, saga_id))
    async with app:
        assert app.sagas.coordinator.known is not None  # the start keeps what it wrote
        peeks = _counted_peeks(app.store)
        view = await _run_once(app)
    assert len(peeks) == 1  # the kept record, stale: conflict, then one read
    _applied_once(view, booked, caplog)


def test_kept_records_are_taken_once_and_bounded() -> None:
    known = KnownSagas(capacity=2)
    for i in range(3):
        known.keep(SagaRecord(f"s{i}", "t", 1, "running", b"{}", b"{}", i, 0.0, 0.0))
    assert len(known) == 2 and known.take("s0") is None  # the oldest was forgotten
    kept = known.take("s2")
    assert kept is not None and kept.rev == 2 and known.take("s2") is None


def _counted_gets(store: Store) -> list[str]:
    reads: list[str] = []
    real = store.saga_get

    async def get(saga_id: str) -> SagaRecord | None:
        reads.append(saga_id)
        return await real(saga_id)

    store.saga_get = get  # type: ignore[method-assign]
    return reads


async def test_a_waiter_for_a_saga_started_here_reads_nothing(
    postgres_url: str, prefix: str
) -> None:
    booked: list[int] = []
    app = _app(postgres_url, prefix, booked)
    async with app:
        reads = _counted_gets(app.store)
        view = await _run_once(app)
    assert view.state == "completed" and booked == [7]
    assert reads == [view.id]  # only get() read it: wait() knew it had not ended yet


async def test_a_saga_started_here_that_ended_elsewhere_before_the_wait_is_read(
    postgres_url: str, prefix: str
) -> None:
    """The end came from another process (NOTIFY) before wait(): the waiter must read it."""
    booked: list[int] = []
    worker = _app(postgres_url, prefix, booked)
    client = sk.App(f"{postgres_url}?max_size=2", settings=sk.Settings(prefix=prefix), run=[])
    client.saga(BOOK)
    async with worker, client:
        try:
            saga_id = await client.sagas.start(BOOK, Order(7))
            ended = client.store.queue.waker
            async with asyncio.timeout(20):
                while ended.unwoken(finished(saga_id)):
                    await asyncio.sleep(0.01)  # the worker's NOTIFY arrives
            reads = _counted_gets(client.store)
            async with asyncio.timeout(10):  # the fallback poll is out of reach
                view = await client.sagas.wait(saga_id, timeout=10, poll=60.0)
        finally:
            await drop_tables(worker.store)
    assert view.state == "completed" and reads == [saga_id]


def test_expectations_are_bounded_and_only_where_every_wake_up_arrives() -> None:
    waker = Waker(expect_at_most=2)
    waker.expect("a")
    assert not waker.unwoken("a")  # not complete (no LISTEN): nothing is expected
    waker.complete = True
    for name in ("a", "b", "c"):
        waker.expect(name)
    assert not waker.unwoken("a") and waker.unwoken("b") and waker.unwoken("c")
    waker.wake("b")
    assert not waker.unwoken("b") and waker.unwoken("c")
    waker.forget("c")
    assert not waker.unwoken("c")
    waker.expect("d")
    waker.watch("d")  # a waiter
    waker.offer("d", "final")
    waker.wake("d")
    assert not waker.unwoken("d") and waker.taken("d") == "final"  # kept for the waiter
    waker.expect("e")  # nobody waits: once woken, nothing is kept
    waker.offer("e", "final")
    waker.wake("e")
    assert waker.taken("e") is None and not waker.unwoken("e")


async def test_a_transaction_that_only_notifies_wakes_another_process(
    pg: Store, postgres_url: str
) -> None:
    other = open_store(f"{postgres_url}?max_size=1", prefix=pg.prefix)
    await other.open()
    try:
        woken = other.queue.waker.event("only.woken")
        async with pg.transaction() as tx:
            tx.notify("only.woken")  # no write at all: the NOTIFY alone
        assert not getattr(tx, "begun", True)
        async with asyncio.timeout(10):
            await woken.wait()
    finally:
        await other.close()
