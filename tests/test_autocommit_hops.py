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
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import ConcurrencyConflict, SagaIdInUse
from sagakit.store import Store, Tx
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


async def test_a_coordinator_hop_overtaken_by_another_decides_again_once(
    postgres_url: str, prefix: str
) -> None:
    defn = sk.Saga("ac-book", Order).step("book").invoke("ledger", lambda o: Book(o.amount)).build()
    app = sk.App(f"{postgres_url}?max_size=4", settings=sk.Settings(prefix=prefix, max_poll=0.05))
    app.saga(defn)
    booked: list[int] = []

    @app.participant("ledger").command(Book)
    async def book(cmd: Book, ctx: sk.Context) -> None:
        booked.append(cmd.amount)

    overtaken = asyncio.Event()
    peeks = 0
    async with app:
        store = app.store
        real = store.saga_peek

        async def overtake_once(tx: Tx, saga_id: str) -> Any:
            """The reply's hop reads; another hop commits on another connection first."""
            nonlocal peeks
            peeks += 1
            rec = await real(tx, saga_id)
            if not overtaken.is_set():
                async with store.transaction() as other:
                    current = await store.saga_load(other, saga_id)
                    assert current is not None
                    await store.saga_update(other, current)
                overtaken.set()
            return rec  # now stale: its revision has moved on

        store.saga_peek = overtake_once  # type: ignore[method-assign]
        try:
            done = await app.sagas.wait(await app.sagas.start(defn, Order(7)), 20)
            view = await app.sagas.get(done.id)
        finally:
            await drop_tables(store)
    assert overtaken.is_set() and peeks == 2  # lost the race once, decided again
    assert view.state == "completed" and booked == [7]
    entries = [e.entry for e in view.history]
    assert len(entries) == len(set(entries)), entries  # every line once: applied once
