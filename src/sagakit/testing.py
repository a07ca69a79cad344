"""Test support shipped with sagakit: contract suites and a fake clock.

Each backend protocol has one abstract contract suite here; a backend's tests
subclass it and provide the fixture that builds the backend. The same suite
runs against the in-memory backend and every real service.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from .clock import FakeClock
from .errors import ConcurrencyConflict, ConfigurationError, StoreError
from .store import Store
from .store.core import InboxRow, LogEntry, Queued, SagaRecord
from .store.schema import SCHEMA_VERSION

# -- store contract ----------------------------------------------------------


class _Raised:
    """What :func:`_raises` caught, for further assertions."""

    value: BaseException | None = None


@contextlib.contextmanager
def _raises(kind: type[BaseException]) -> Iterator[_Raised]:
    """Like ``pytest.raises``, so this module does not need pytest to import."""
    caught = _Raised()
    try:
        yield caught
    except kind as exc:
        caught.value = exc
        return
    raise AssertionError(f"{kind.__name__} was not raised")


def _fake_clock(store: Store) -> FakeClock:
    clock = store.clock
    assert isinstance(clock, FakeClock), "the store fixture must use a FakeClock"
    return clock


async def _put(store: Store, queue: str, *ids: str, delay: float = 0.0) -> None:
    async with store.transaction() as tx:
        for message_id in ids:
            await store.enqueue(tx, queue, message_id, message_id.encode(), delay=delay)


async def _ack(store: Store, item: Queued) -> bool:
    async with store.transaction() as tx:
        return await store.ack(tx, item)


def _saga(
    saga_id: str, *, type: str = "order", state: str = "running", at: float = 1.0
) -> SagaRecord:
    return SagaRecord(saga_id, type, 1, state, b'{"n":1}', b"[]", 0, at, at)


_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def drop_tables(store: Store) -> None:
    """Drop the PostgreSQL tables under ``store``'s prefix (teardown of a test).

    Names come from the catalog and are checked against the identifier rule
    before they are spliced into ``DROP TABLE``. A SQLite store is left alone:
    its file belongs to the test's temporary directory.
    """
    if store.dialect != "postgresql":
        return
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND starts_with(tablename, ?)",
            store.prefix,
        )
        for row in rows:
            name = row[0]
            if not _TABLE.match(name):
                raise ConfigurationError(f"unexpected table name {name!r}")
            await tx.execute(f"DROP TABLE IF EXISTS {name} CASCADE")


class StoreContract:
    """The behaviour every :class:`~sagakit.store.Store` backend must show.

    Subclass it in a test module and provide an async fixture named ``store``
    that yields an opened store with a unique table prefix and a
    :class:`FakeClock` (leases and delays are tested by moving the clock, not
    by sleeping).
    """

    # -- schema ----------------------------------------------------------

    async def test_migrate_is_idempotent_and_versioned(self, store: Store) -> None:
        assert await store.migrate() == SCHEMA_VERSION
        assert await store.migrate() == SCHEMA_VERSION
        assert await store.schema_version() == SCHEMA_VERSION
        async with store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT version FROM {store.prefix}schema ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))

    async def test_bad_prefix_is_refused(self, store: Store) -> None:
        for bad in ("x; DROP TABLE t", "Upper_", "1abc", "a-b", "", "a" * 41):
            with _raises(ConfigurationError):
                Store(store.driver, prefix=bad, clock=store.clock)

    # -- queue -----------------------------------------------------------

    async def test_claim_in_order_and_ack(self, store: Store) -> None:
        await _put(store, "q", "m1", "m2", "m3")
        first = await store.claim("q", 2, 30.0)
        assert [i.id for i in first] == ["m1", "m2"]
        assert [i.data for i in first] == [b"m1", b"m2"]
        assert [i.attempts for i in first] == [1, 1]
        rest = await store.claim("q", 10, 30.0)
        assert [i.id for i in rest] == ["m3"]
        assert await store.claim("q", 10, 30.0) == []
        assert all([await _ack(store, i) for i in first + rest])
        assert await store.queue_depth("q") == 0

    async def test_queues_are_separate(self, store: Store) -> None:
        await _put(store, "a", "m1")
        async with store.transaction() as tx:
            await store.enqueue(tx, "b", "m2", b"x", destination="event:topic")
        assert await store.queue_depth() == 2
        assert await store.queue_depth("a") == 1
        [b] = await store.claim("b", 10, 30.0)
        assert (b.id, b.destination) == ("m2", "event:topic")
        assert [i.id for i in await store.claim("a", 10, 30.0)] == ["m1"]

    async def test_expired_lease_is_claimable_again(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "m1")
        [old] = await store.claim("q", 10, 10.0)
        assert await store.claim("q", 10, 10.0) == []
        clock.advance(10.5)
        [new] = await store.claim("q", 10, 10.0)
        assert (new.seq, new.id, new.attempts) == (old.seq, "m1", 2)
        assert await _ack(store, old) is False, "a stale lease token must not ack"
        assert await _ack(store, new) is True
        assert await _ack(store, new) is False
        assert await store.queue_depth("q") == 0

    async def test_release_makes_due_after_delay(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "m1")
        [item] = await store.claim("q", 1, 30.0)
        await store.release(item, 5.0)
        assert await store.claim("q", 1, 30.0) == []
        clock.advance(5.0)
        [again] = await store.claim("q", 1, 30.0)
        assert again.attempts == 2
        await store.release(item, 0.0)  # stale token: no effect
        assert await store.claim("q", 1, 30.0) == []

    async def test_delayed_message_waits(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "later", delay=30.0)
        await _put(store, "q", "now")
        [now] = await store.claim("q", 10, 5.0)
        assert now.id == "now" and await _ack(store, now)
        clock.advance(29.0)
        assert await store.claim("q", 10, 5.0) == []
        clock.advance(1.0)
        assert [i.id for i in await store.claim("q", 10, 5.0)] == ["later"]

    async def test_delete_message(self, store: Store) -> None:
        await _put(store, "q", "m1", "m2")
        async with store.transaction() as tx:
            await store.delete_message(tx, "m1")
        assert [i.id for i in await store.claim("q", 10, 5.0)] == ["m2"]

    async def test_concurrent_claims_never_share_a_row(self, store: Store) -> None:
        ids = [f"m{i:03d}" for i in range(120)]
        await _put(store, "q", *ids)

        async def drain() -> list[Queued]:
            got: list[Queued] = []
            while batch := await store.claim("q", 7, 60.0):
                got.extend(batch)
            return got

        results = await asyncio.gather(*(drain() for _ in range(6)))
        claimed = [i.id for r in results for i in r]
        assert sorted(claimed) == ids, "every row claimed exactly once"

    async def test_rollback_enqueues_nothing(self, store: Store) -> None:
        with _raises(RuntimeError):
            async with store.transaction() as tx:
                await store.enqueue(tx, "q", "m1", b"x")
                raise RuntimeError("boom")
        assert await store.queue_depth("q") == 0

    async def test_commit_wakes_local_consumers(self, store: Store) -> None:
        queue = f"wake-{store.prefix}"
        ev = store.waker.event(queue)
        ev.clear()
        async with store.transaction() as tx:
            await store.enqueue(tx, queue, "m1", b"x")
            assert not ev.is_set(), "woken before commit"
        assert ev.is_set()

    async def test_on_commit_runs_only_after_commit(self, store: Store) -> None:
        ran: list[str] = []
        async with store.transaction() as tx:
            tx.on_commit(lambda: ran.append("a"))
            assert ran == []
        with _raises(RuntimeError):
            async with store.transaction() as tx:
                tx.on_commit(lambda: ran.append("b"))
                raise RuntimeError("boom")
        assert ran == ["a"]

    # -- events ----------------------------------------------------------

    async def test_event_fans_out_to_subscribed_queues(self, store: Store) -> None:
        await store.subscribe("order.Placed", "billing")
        await store.subscribe("order.Placed", "shipping")
        await store.subscribe("order.Placed", "shipping")  # idempotent
        await store.subscribe("order.Cancelled", "billing")
        async with store.transaction() as tx:
            await store.enqueue_event(tx, "order.Placed", "e1", b"{}")
            await store.enqueue_event(tx, "nobody.Listens", "e2", b"{}")
        assert [i.id for i in await store.claim("billing", 10, 5.0)] == ["e1"]
        assert [i.id for i in await store.claim("shipping", 10, 5.0)] == ["e1"]
        assert await store.queue_depth() == 2

    # -- inbox -----------------------------------------------------------

    async def test_inbox_dedupes_and_replaces_failures(self, store: Store) -> None:
        ok = InboxRow("success", b"reply", "coordinator", 1)
        failed = InboxRow("failure", b"no", "coordinator", 1)
        async with store.transaction() as tx:
            assert await store.inbox_get(tx, "svc", "k1") is None
            assert await store.inbox_put(tx, "svc", "k1", failed) is True
            assert await store.inbox_put(tx, "svc", "k1", ok) is False
            assert await store.inbox_get(tx, "svc", "k1") == failed
            assert await store.inbox_put(tx, "svc", "k1", ok, replace=True) is True
            assert await store.inbox_get(tx, "svc", "k1") == ok
            assert await store.inbox_put(tx, "other", "k1", ok) is True, "keyed per consumer"
        async with store.transaction() as tx:
            assert await store.inbox_get(tx, "svc", "k1") == ok
            assert await store.inbox_get(tx, "svc", "k2") is None

    async def test_inbox_never_replaces_a_success(self, store: Store) -> None:
        ok = InboxRow("success", None, None, 1)
        async with store.transaction() as tx:
            await store.inbox_put(tx, "svc", "k", ok)
            again = InboxRow("failure", b"late", None, 2)
            assert await store.inbox_put(tx, "svc", "k", again, replace=True) is False
            assert await store.inbox_get(tx, "svc", "k") == ok

    # -- dead letters ----------------------------------------------------

    async def test_dead_letters_keep_reason(self, store: Store) -> None:
        async with store.transaction() as tx:
            await store.dead_letter(tx, "svc", b"\x00raw", "MalformedMessage: bad", "Malformed")
            await store.dead_letter(
                tx, "svc", b"{}", "why", "NoHandler", message_id="m2", saga_id="s1"
            )
        first, second = await store.dead_letters()
        assert (first.id, first.queue, first.data, first.reason) == (
            None,
            "svc",
            b"\x00raw",
            "MalformedMessage: bad",
        )
        assert (second.id, second.error_type, second.saga_id) == ("m2", "NoHandler", "s1")
        assert first.created_at == store.clock.now()
        assert len(await store.dead_letters(limit=1)) == 1

    # -- sagas -----------------------------------------------------------

    async def test_saga_insert_is_idempotent_and_loads(self, store: Store) -> None:
        rec = _saga("s1")
        async with store.transaction() as tx:
            assert await store.saga_insert(tx, rec) is True
            assert await store.saga_insert(tx, _saga("s1", state="other")) is False
        loaded = await store.saga_get("s1")
        assert loaded == rec
        assert await store.saga_get("missing") is None

    async def test_saga_update_checks_revision(self, store: Store) -> None:
        async with store.transaction() as tx:
            await store.saga_insert(tx, _saga("s1"))
        async with store.transaction() as tx:
            mine = await store.saga_load(tx, "s1")
            assert mine is not None
        async with store.transaction() as tx:
            theirs = await store.saga_load(tx, "s1")
            assert theirs is not None
            theirs.state = "compensating"
            await store.saga_update(tx, theirs)
            assert theirs.rev == 1
        with _raises(ConcurrencyConflict) as caught:
            async with store.transaction() as tx:
                mine.state = "completed"
                await store.saga_update(tx, mine)
        assert isinstance(caught.value, ConcurrencyConflict) and caught.value.saga_id == "s1"
        stored = await store.saga_get("s1")
        assert stored is not None and (stored.state, stored.rev) == ("compensating", 1)

    async def test_saga_log_is_history_in_order(self, store: Store) -> None:
        entries = [
            LogEntry("s1", 1.0, "started"),
            LogEntry("s1", 2.0, "sent", step="reserve", message_id="m1", detail='{"a":1}'),
            LogEntry("s2", 2.5, "started"),
            LogEntry("s1", 3.0, "replied", step="reserve"),
        ]
        async with store.transaction() as tx:
            await store.log(tx, entries)
        assert await store.history("s1") == [e for e in entries if e.saga_id == "s1"]
        assert await store.history("none") == []

    async def test_saga_list_and_counts(self, store: Store) -> None:
        recs = [
            _saga("a", type="order", state="running", at=1.0),
            _saga("b", type="order", state="completed", at=2.0),
            _saga("c", type="refund", state="running", at=3.0),
            _saga("d", type="order", state="running", at=4.0),
        ]
        async with store.transaction() as tx:
            for rec in recs:
                await store.saga_insert(tx, rec)

        async def ids(**filters: Any) -> list[str]:
            return [r.id for r in await store.saga_list(**filters)]

        assert await ids() == ["a", "b", "c", "d"]
        assert await ids(type="order") == ["a", "b", "d"]
        assert await ids(state="running", type="order") == ["a", "d"]
        assert await ids(created_before=3.0) == ["a", "b"]
        assert await ids(limit=2) == ["a", "b"]
        assert await store.saga_counts() == {"running": 3, "completed": 1}
        assert await store.saga_counts(type="refund") == {"running": 1}

    # -- transactions ----------------------------------------------------

    async def test_savepoint_rolls_back_alone(self, store: Store) -> None:
        async with store.transaction() as tx:
            await store.saga_insert(tx, _saga("kept"))
            with _raises(RuntimeError):
                async with tx.savepoint():
                    await store.saga_insert(tx, _saga("dropped"))
                    raise RuntimeError("undo the nested part only")
            async with tx.savepoint():
                await store.saga_insert(tx, _saga("nested-ok"))
        assert [r.id for r in await store.saga_list()] == ["kept", "nested-ok"]

    async def test_failed_statement_in_savepoint_keeps_transaction(self, store: Store) -> None:
        await store.subscribe("t", "q")
        sql = f"INSERT INTO {store.prefix}subscriptions (topic, queue) VALUES (?, ?)"
        async with store.transaction() as tx:
            with _raises(StoreError) as caught:
                async with tx.savepoint():
                    await tx.execute(sql, "t", "q")
            assert isinstance(caught.value, StoreError) and not caught.value.retryable
            await tx.execute(sql, "t", "q2")
        async with store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT queue FROM {store.prefix}subscriptions ORDER BY 1")
        assert [r[0] for r in rows] == ["q", "q2"]

    async def test_bad_sql_is_a_store_error(self, store: Store) -> None:
        with _raises(StoreError) as caught:
            async with store.transaction() as tx:
                await tx.execute("SELEC nothing")
        assert isinstance(caught.value, StoreError) and not caught.value.retryable

    async def test_rows_and_counts(self, store: Store) -> None:
        await _put(store, "q", "m1", "m2", "m3")
        p = store.prefix
        async with store.transaction() as tx:
            n = await tx.execute(f"UPDATE {p}messages SET attempts = 5 WHERE queue = ?", "q")
            row = await tx.fetchone(f"SELECT id, attempts FROM {p}messages ORDER BY seq")
            none = await tx.fetchone(f"SELECT id FROM {p}messages WHERE id = ?", "absent")
        assert n == 3
        assert (row[0], row["id"], row["attempts"]) == ("m1", "m1", 5)
        assert none is None

    async def test_values_are_bound_not_spliced(self, store: Store) -> None:
        nasty = "it's a '?' \"quoted\" ?; DROP TABLE x; -- $1 %s"
        async with store.transaction() as tx:
            await store.saga_insert(tx, _saga(nasty))
            await store.dead_letter(tx, "q'?", nasty.encode(), nasty, "E?", message_id=nasty)
            row = await tx.fetchone(
                f"SELECT id, '?' AS mark FROM {store.prefix}sagas WHERE id = ? AND '?' = '?'",
                nasty,
            )
        assert (row[0], row["mark"]) == (nasty, "?")
        saga = await store.saga_get(nasty)
        assert saga is not None and saga.id == nasty
        [dl] = await store.dead_letters()
        assert (dl.id, dl.queue, dl.data, dl.reason) == (nasty, "q'?", nasty.encode(), nasty)


__all__ = ["FakeClock", "StoreContract", "drop_tables"]
