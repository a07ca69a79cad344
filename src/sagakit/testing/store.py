"""The store contract: the behaviour every :class:`~sagakit.store.Store` backend must show."""

from __future__ import annotations

import asyncio
from typing import Any

from ..clock import FakeClock
from ..errors import ConcurrencyConflict, ConfigurationError, OutcomeExists, StoreError
from ..store import Store
from ..store.core import DEAD_LETTER_KEEP, DeadLetterAction, InboxRow, LogEntry, SagaRecord
from ..store.queue import Queued
from ..store.schema import SCHEMA_VERSION
from ._support import raises as _raises


def _fake_clock(store: Store) -> FakeClock:
    clock = store.clock
    assert isinstance(clock, FakeClock), "the store fixture must use a FakeClock"
    return clock


async def _put(store: Store, queue: str, *ids: str, delay: float = 0.0) -> None:
    async with store.transaction() as tx:
        for message_id in ids:
            await store.queue.put(tx, queue, message_id, message_id.encode(), delay=delay)


async def _ack(store: Store, item: Queued) -> bool:
    async with store.transaction() as tx:
        return await store.queue.ack(tx, item)


def _saga(
    saga_id: str, *, type: str = "order", state: str = "running", at: float = 1.0
) -> SagaRecord:
    return SagaRecord(saga_id, type, 1, state, b'{"n":1}', b"[]", 0, at, at)


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
        first = await store.queue.claim("q", 2, 30.0)
        assert [i.id for i in first] == ["m1", "m2"]
        assert [i.data for i in first] == [b"m1", b"m2"]
        assert [i.attempts for i in first] == [1, 1]
        rest = await store.queue.claim("q", 10, 30.0)
        assert [i.id for i in rest] == ["m3"]
        assert await store.queue.claim("q", 10, 30.0) == []
        assert all([await _ack(store, i) for i in first + rest])
        assert await store.queue.depth("q") == 0

    async def test_queues_are_separate(self, store: Store) -> None:
        await _put(store, "a", "m1")
        async with store.transaction() as tx:
            await store.queue.put(tx, "b", "m2", b"x", destination="event:topic")
        assert await store.queue.depth() == 2
        assert await store.queue.depth("a") == 1
        [b] = await store.queue.claim("b", 10, 30.0)
        assert (b.id, b.destination) == ("m2", "event:topic")
        assert [i.id for i in await store.queue.claim("a", 10, 30.0)] == ["m1"]

    async def test_expired_lease_is_claimable_again(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "m1")
        [old] = await store.queue.claim("q", 10, 10.0)
        assert await store.queue.claim("q", 10, 10.0) == []
        clock.advance(10.5)
        [new] = await store.queue.claim("q", 10, 10.0)
        assert (new.seq, new.id, new.attempts) == (old.seq, "m1", 2)
        assert await _ack(store, old) is False, "a stale lease token must not ack"
        assert await _ack(store, new) is True
        assert await _ack(store, new) is False
        assert await store.queue.depth("q") == 0

    async def test_release_makes_due_after_delay(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "m1")
        [item] = await store.queue.claim("q", 1, 30.0)
        await store.queue.release(item, 5.0)
        assert await store.queue.claim("q", 1, 30.0) == []
        clock.advance(5.0)
        [again] = await store.queue.claim("q", 1, 30.0)
        assert again.attempts == 2
        await store.queue.release(item, 0.0)  # stale token: no effect
        assert await store.queue.claim("q", 1, 30.0) == []

    async def test_delayed_message_waits(self, store: Store) -> None:
        clock = _fake_clock(store)
        await _put(store, "q", "later", delay=30.0)
        await _put(store, "q", "now")
        [now] = await store.queue.claim("q", 10, 5.0)
        assert now.id == "now" and await _ack(store, now)
        clock.advance(29.0)
        assert await store.queue.claim("q", 10, 5.0) == []
        clock.advance(1.0)
        assert [i.id for i in await store.queue.claim("q", 10, 5.0)] == ["later"]

    async def test_delete_message(self, store: Store) -> None:
        await _put(store, "q", "m1", "m2")
        async with store.transaction() as tx:
            await store.queue.cancel(tx, "m1")
        assert [i.id for i in await store.queue.claim("q", 10, 5.0)] == ["m2"]

    async def test_concurrent_claims_never_share_a_row(self, store: Store) -> None:
        ids = [f"m{i:03d}" for i in range(120)]
        await _put(store, "q", *ids)

        async def drain() -> list[Queued]:
            got: list[Queued] = []
            while batch := await store.queue.claim("q", 7, 60.0):
                got.extend(batch)
            return got

        results = await asyncio.gather(*(drain() for _ in range(6)))
        claimed = [i.id for r in results for i in r]
        assert sorted(claimed) == ids, "every row claimed exactly once"

    async def test_rollback_enqueues_nothing(self, store: Store) -> None:
        with _raises(RuntimeError):
            async with store.transaction() as tx:
                await store.queue.put(tx, "q", "m1", b"x")
                raise RuntimeError("boom")
        assert await store.queue.depth("q") == 0

    async def test_commit_wakes_local_consumers(self, store: Store) -> None:
        queue = f"wake-{store.prefix}"
        ev = store.queue.waker.event(queue)
        ev.clear()
        async with store.transaction() as tx:
            await store.queue.put(tx, queue, "m1", b"x")
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
        await store.queue.subscribe("order.Placed", "billing")
        await store.queue.subscribe("order.Placed", "shipping")
        await store.queue.subscribe("order.Placed", "shipping")  # idempotent
        await store.queue.subscribe("order.Cancelled", "billing")
        async with store.transaction() as tx:
            await store.queue.fan_out(tx, "order.Placed", "e1", b"{}")
            await store.queue.fan_out(tx, "nobody.Listens", "e2", b"{}")
        assert [i.id for i in await store.queue.claim("billing", 10, 5.0)] == ["e1"]
        assert [i.id for i in await store.queue.claim("shipping", 10, 5.0)] == ["e1"]
        assert await store.queue.depth() == 2

    # -- inbox -----------------------------------------------------------

    async def test_inbox_admits_a_key_once_then_answers_with_its_outcome(
        self, store: Store
    ) -> None:
        ok = InboxRow("success", b"reply", "coordinator", 1)
        async with store.transaction() as tx:
            assert (await store.inbox_admit(tx, "svc", "k1", 1)).outcome == "running"
            await store.inbox_record(tx, "svc", "k1", ok)
        async with store.transaction() as tx:
            assert await store.inbox_admit(tx, "svc", "k1", 2) == ok
            other = await store.inbox_admit(tx, "other", "k1", 1)
            assert other.outcome == "running", "keyed per consumer"

    async def test_inbox_admission_rolls_back_with_its_transaction(self, store: Store) -> None:
        with _raises(RuntimeError):
            async with store.transaction() as tx:
                await store.inbox_admit(tx, "svc", "k", 1)
                raise RuntimeError("handler crashed")
        async with store.transaction() as tx:
            assert (await store.inbox_admit(tx, "svc", "k", 2)).outcome == "running"

    async def test_inbox_bar_keeps_a_success_and_cancels_the_rest(self, store: Store) -> None:
        async with store.transaction() as tx:
            assert await store.inbox_bar(tx, "svc", "never-ran", 1) == "cancelled"
            assert (await store.inbox_admit(tx, "svc", "never-ran", 1)).outcome == "cancelled"
            for key, outcome in (("ok", "success"), ("failed", "failure")):
                await store.inbox_admit(tx, "svc", key, 1)
                await store.inbox_record(tx, "svc", key, InboxRow(outcome, b"r", None, 1))
            assert await store.inbox_bar(tx, "svc", "ok", 1) == "success"
            assert await store.inbox_bar(tx, "svc", "failed", 1) == "cancelled"

    async def test_inbox_admit_barring_admits_one_key_and_bars_the_other(
        self, store: Store
    ) -> None:
        done = InboxRow("success", b"undone", None, 1)
        async with store.transaction() as tx:
            row, fwd = await store.inbox_admit_barring(tx, "svc", "c1", "f1", 1, "s1")
            assert (row.outcome, fwd) == ("running", "cancelled")  # the forward never ran
            await store.inbox_record(tx, "svc", "c1", done)
            await store.inbox_admit(tx, "svc", "f2", 1)
            await store.inbox_record(tx, "svc", "f2", InboxRow("success", b"r", None, 1))
        async with store.transaction() as tx:
            assert await store.inbox_admit_barring(tx, "svc", "c1", "f1", 2, "s1") == (
                done,
                "cancelled",
            )  # a copy: the stored outcome, the bar unchanged
            row, fwd = await store.inbox_admit_barring(tx, "svc", "c2", "f2", 1, "s1")
            assert (row.outcome, fwd) == ("running", "success")  # the forward took effect
            assert (await store.inbox_admit(tx, "svc", "f1", 1)).outcome == "cancelled"

    async def test_a_second_copy_waits_for_the_first_and_sees_its_outcome(
        self, store: Store
    ) -> None:
        first_in = asyncio.Event()
        ok = InboxRow("success", b"first", None, 1)

        async def first() -> None:
            async with store.transaction() as tx:
                await store.inbox_admit(tx, "svc", "k", 1)
                first_in.set()
                await asyncio.sleep(0.2)  # the handler is still running
                await store.inbox_record(tx, "svc", "k", ok)

        async def second() -> InboxRow:
            await first_in.wait()
            async with store.transaction() as tx:
                return await store.inbox_admit(tx, "svc", "k", 2)

        _, seen = await asyncio.gather(first(), second())
        assert seen == ok

    async def test_inbox_require_success_fails_the_transaction_unless_a_success_is_stored(
        self, store: Store
    ) -> None:
        async with store.transaction() as tx:
            await store.inbox_admit(tx, "svc", "ok", 1)
            await store.inbox_record(tx, "svc", "ok", InboxRow("success", b"r", None, 1))
            await store.inbox_admit(tx, "svc", "failed", 1)
            await store.inbox_record(tx, "svc", "failed", InboxRow("failure", b"r", None, 1))
        async with store.transaction() as tx:
            await store.inbox_require_success(tx, "svc", "ok")
            await store.queue.put(tx, "q", "kept", b"x")
        for key in ("failed", "never-ran"):
            with _raises(OutcomeExists):
                async with store.transaction() as tx:
                    await store.queue.put(tx, "q", f"not-{key}", b"x")
                    await store.inbox_require_success(tx, "svc", key)
        assert await store.queue.depth("q") == 1  # only the guarded write that passed

    # -- transactions ----------------------------------------------------

    async def test_on_begin_runs_its_step_first_and_only_if_the_transaction_begins(
        self, store: Store
    ) -> None:
        """A kept step runs once, before the first statement; never for a held-only body."""
        steps: list[int] = []

        async def step() -> None:
            steps.append(len(steps))

        async with store.transaction() as tx:
            kept = tx.on_begin(step)
            await store.queue.put(tx, "q", "held", b"x")  # nothing that begins it
        assert steps == []
        async with store.transaction() as tx:
            if tx.on_begin(step):
                await tx.fetchone(f"SELECT count(*) FROM {store.prefix}messages")
                await tx.fetchone(f"SELECT count(*) FROM {store.prefix}messages")
                assert steps == [0]
                assert not tx.on_begin(step), "begun: too late to keep a step"
        async with store.transaction() as tx:
            if tx.on_begin(step):
                tx.on_begin(None)  # taken back
                await tx.fetchone(f"SELECT count(*) FROM {store.prefix}messages")
        assert steps == ([0] if kept else [])

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

    async def test_dead_letters_filter_delete_and_log(self, store: Store) -> None:
        """What the operator API needs: filters, a delete that can lose, a log."""
        async with store.transaction() as tx:
            await store.dead_letter(tx, "a", b"1", "r", "X", saga_id="s1", kind="event")
            await store.dead_letter(tx, "b", b"2", "r", "Y", destination="d", kind="command")
        assert [d.queue for d in await store.dead_letters(queue="b")] == ["b"]
        [x] = await store.dead_letters(error_type="X", saga_id="s1")
        assert (x.kind, x.size, x.truncated) == ("event", 1, False)
        assert await store.dead_letters(created_before=store.clock.now()) == []
        async with store.transaction() as tx:
            assert await store.dead_letter_delete(tx, x.seq) is True
            assert await store.dead_letter_delete(tx, x.seq) is False
            action = DeadLetterAction(1.0, "purge", x.seq, None, "a", "alice", "admin", "cli", "r")
            await store.dead_letter_log(tx, action)
        assert await store.dead_letter_get(x.seq) is None
        assert await store.dead_letter_actions() == [action]

    async def test_dead_letters_keep_a_bounded_prefix(self, store: Store) -> None:
        async with store.transaction() as tx:
            await store.dead_letter(tx, "a", b"x" * (DEAD_LETTER_KEEP + 1), "big", "Oversize")
        [d] = await store.dead_letters()
        assert len(d.data) == DEAD_LETTER_KEEP and d.size == DEAD_LETTER_KEEP + 1 and d.truncated

    async def test_failures_are_counted_apart_from_claims(self, store: Store) -> None:
        async with store.transaction() as tx:
            await store.queue.put(tx, "q", "m", b"x")
        [item] = await store.queue.claim("q", 10, 30.0)
        assert await store.queue.fail(item, 0.0) == 1
        [again] = await store.queue.claim("q", 10, 30.0)
        assert (again.attempts, await store.queue.fail(again, 0.0)) == (2, 2)
        assert await store.queue.fail(item, 0.0) is None, "a stale lease counts nothing"

    async def test_a_broker_messages_failures_are_counted_per_consumer_and_cleared(
        self, store: Store
    ) -> None:
        assert [await store.count_failure("a", "m1") for _ in range(3)] == [1, 2, 3]
        assert await store.count_failure("b", "m1") == 1, "another consumer counts apart"
        assert await store.count_failure("a", "m2") == 1, "and another message"
        async with store.transaction() as tx:
            await store.clear_failures(tx, "a", "m1")
        assert await store.count_failure("a", "m1") == 1
        assert await store.count_failure("b", "m1") == 2

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

    async def test_saga_list_pages_after_an_id(self, store: Store) -> None:
        """Pages follow each other without a gap or a repeat, ties broken by id."""
        at = {"p1": 1.0, "p3": 2.0, "p2": 2.0, "p4": 2.0, "p5": 3.0}
        async with store.transaction() as tx:
            for sid, t in at.items():
                await store.saga_insert(tx, _saga(sid, state="running", at=t))
        pages, after = [], None
        while page := await store.saga_list(limit=2, after=after):
            pages.append([r.id for r in page])
            after = page[-1].id
        assert pages == [["p1", "p2"], ["p3", "p4"], ["p5"]]
        assert [r.id for r in await store.saga_list(state="running", after="p4")] == ["p5"]

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

    async def test_failing_transactions_among_concurrent_ones_take_only_their_writes(
        self, store: Store
    ) -> None:
        """Six at once (on SQLite they share write transactions: group commit); the
        first and a later one fail, and each loses its own writes only."""

        async def one(i: int) -> None:
            async with store.transaction() as tx:
                await store.saga_insert(tx, _saga(f"s{i}"))
                if i in (0, 3):
                    raise RuntimeError(f"undo s{i}")

        results = await asyncio.gather(*(one(i) for i in range(6)), return_exceptions=True)
        assert [isinstance(r, RuntimeError) for r in results] == [i in (0, 3) for i in range(6)]
        assert [r.id for r in await store.saga_list()] == ["s1", "s2", "s4", "s5"]

    async def test_failed_statement_in_savepoint_keeps_transaction(self, store: Store) -> None:
        await store.queue.subscribe("t", "q")
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
