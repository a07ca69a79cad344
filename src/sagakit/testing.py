"""Test support shipped with sagakit: contract suites and a fake clock.

Each backend protocol has one abstract contract suite here; a backend's tests
subclass it and provide the fixture that builds the backend. The same suite
runs against the in-memory backend and every real service.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, NoReturn

import msgspec

from .clock import FakeClock
from .errors import ConcurrencyConflict, ConfigurationError, StoreError, TransportError
from .messages import Headers, Kind, command, new_id
from .store import Store, open_store
from .store.core import DeadLetter, InboxRow, LogEntry, SagaRecord
from .store.queue import Queued
from .store.schema import SCHEMA_VERSION
from .transport import Delivery, Outgoing, Subscription, Transport

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
            await store.queue.put(tx, queue, message_id, message_id.encode(), delay=delay)


async def _ack(store: Store, item: Queued) -> bool:
    async with store.transaction() as tx:
        return await store.queue.ack(tx, item)


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


# ---------------------------------------------------------------------------
# Transport contract


@command("sagakit.testing.Ping")
class ContractPing(msgspec.Struct):
    """The command the transport contract's app-level test sends."""

    n: int


class _Deliveries:
    """Collects deliveries for the contract tests and settles them."""

    def __init__(self, *, settle: bool = True, hold: float = 0.0) -> None:
        self.got: list[tuple[bytes, int]] = []
        self.settle, self.hold = settle, hold
        self.running = 0
        self.max_running = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            self.got.append((delivery.data, delivery.attempt))
            if self.settle:
                await delivery.ack()
        finally:
            self.running -= 1

    def data(self) -> list[bytes]:
        return [d for d, _ in self.got]


async def _eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str = "condition",
    every: float = 0.01,
) -> None:
    """Poll ``check`` (sync or async) until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > end:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(every)


def _at_least(inbox: _Deliveries, n: int) -> Callable[[], bool]:
    return lambda: len(inbox.data()) >= n


def _out(kind: Kind, destination: str, data: bytes) -> Outgoing:
    return Outgoing(new_id(), kind, destination, data)


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


class TransportContract:
    """The contract every :class:`~sagakit.transport.Transport` keeps.

    Subclass it in a test module and provide the fixture ``transport``: an
    opened transport, closed (and its queues removed) at teardown. Override
    as needed:

    - :meth:`open_peer`: a *second* opened transport on the same broker or
      database (another process, in effect); by default the same object. The
      tests close the peers they open;
    - :meth:`crash`: abandon a subscription like a process that died, without
      settling its deliveries (default: skip the test);
    - :meth:`cut_connection`: cut the transport's connection to its broker or
      restart the broker (default: skip the test);
    - :meth:`app_store`: the store of the app-level tests (default: a new
      in-memory SQLite store; the database transport gives its own store);
    - :meth:`new_queue`: a unique queue name (the fixture can clean up after
      the names it hands out).

    Hooks are methods rather than fixtures so this module imports without
    pytest; ``pytest.skip`` is only imported by the default hooks that skip.
    """

    #: seconds to wait for something that must happen
    timeout: ClassVar[float] = 15.0
    #: seconds of quiet after which "nothing more arrived" is believed
    quiet: ClassVar[float] = 0.5

    # -- hooks -------------------------------------------------------------

    def new_queue(self) -> str:
        """A queue (or topic) name no other test uses."""
        return f"contract-{uuid.uuid4().hex[:12]}"

    async def open_peer(self, transport: Transport) -> Transport:
        """Another opened transport on the same broker; the test closes it."""
        return transport

    def app_store(self, transport: Transport) -> Store:
        """The store of the app in the app-level test."""
        return open_store("memory://")

    async def crash(self, transport: Transport, subscription: Subscription) -> None:
        """Make ``subscription`` vanish with its deliveries unsettled."""
        _skip(f"{type(transport).__name__}: a consumer cannot die apart from its broker")

    async def cut_connection(self, transport: Transport) -> None:
        """Cut the connection under ``transport`` (or restart its broker)."""
        _skip(f"{type(transport).__name__} has no connection to cut")

    async def close_peer(self, transport: Transport, peer: Transport) -> None:
        if peer is not transport:
            await peer.close()

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        await _eventually(check, self.timeout, what)

    async def settle_down(self) -> None:
        """Give stray (wrong) deliveries time to show up."""
        await asyncio.sleep(self.quiet)

    # -- at-least-once -----------------------------------------------------

    async def test_delivers_each_message(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=8)
        try:
            sent = [f"m{i}".encode() for i in range(20)]
            await transport.publish([_out("command", q, d) for d in sent])
            await self.wait(lambda: len(inbox.got) >= len(sent), "all delivered")
            await self.settle_down()
            assert sorted(inbox.data()) == sorted(sent)  # acked: no redelivery
            assert {a for _, a in inbox.got} == {1}
        finally:
            await sub.stop()

    async def test_holds_messages_until_a_consumer_comes(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        await transport.publish([_out("command", q, b"early"), _out("reply", q, b"r")])
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await self.wait(lambda: len(inbox.got) == 2, "held messages delivered")
            assert sorted(inbox.data()) == [b"early", b"r"]
        finally:
            await sub.stop()

    async def test_handler_that_raises_gets_the_message_again(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        attempts: list[int] = []

        async def flaky(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if len(attempts) == 1:
                raise RuntimeError("boom: not acknowledged")
            await delivery.ack()

        sub = await transport.consume(q, flaky, prefetch=1)
        try:
            await transport.publish([_out("command", q, b"x")])
            await self.wait(lambda: len(attempts) >= 2, "redelivered after a crash")
            await self.settle_down()
            assert attempts == [1, 2]
        finally:
            await sub.stop()

    async def test_nack_redelivers_after_the_delay_with_growing_attempt(
        self, transport: Transport
    ) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        loop = asyncio.get_running_loop()
        seen: list[tuple[float, int]] = []
        delay = 0.3

        async def retry_twice(delivery: Delivery) -> None:
            seen.append((loop.time(), delivery.attempt))
            if delivery.attempt < 3:
                await delivery.nack(delay)
            else:
                await delivery.ack()

        sub = await transport.consume(q, retry_twice, prefetch=2)
        try:
            await transport.publish([_out("command", q, b"retry me")])
            await self.wait(lambda: len(seen) >= 3, "three attempts")
            await self.settle_down()
            assert [a for _, a in seen] == [1, 2, 3]
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
            assert all(g >= delay * 0.8 for g in gaps), gaps
        finally:
            await sub.stop()

    async def test_message_of_a_dead_consumer_is_delivered_again(
        self, transport: Transport
    ) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        peer = await self.open_peer(transport)
        taken: list[int] = []
        never = asyncio.Event()

        async def dies(delivery: Delivery) -> None:
            taken.append(delivery.attempt)
            await never.wait()

        doomed = await peer.consume(q, dies, prefetch=1)
        await transport.publish([_out("command", q, b"orphan")])
        try:
            await self.wait(lambda: bool(taken), "taken by the doomed consumer")
            await self.crash(peer, doomed)
        finally:
            never.set()
            await self.close_peer(transport, peer)
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=1)
        try:
            await self.wait(lambda: bool(inbox.got), "redelivered to a live consumer")
            assert inbox.got[0][0] == b"orphan"
            assert inbox.got[0][1] >= 2, "a redelivery counts as a new attempt"
        finally:
            await sub.stop()

    # -- consumers and fan-out ---------------------------------------------

    async def test_competing_consumers_share_a_queue(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        peer = await self.open_peer(transport)
        a, b = _Deliveries(hold=0.02), _Deliveries(hold=0.02)
        sub_a = await transport.consume(q, a, prefetch=1)
        sub_b = await peer.consume(q, b, prefetch=1)
        try:
            sent = [f"w{i}".encode() for i in range(30)]
            await transport.publish([_out("command", q, d) for d in sent])
            await self.wait(lambda: len(a.got) + len(b.got) >= len(sent), "all handled")
            await self.settle_down()
            handled = a.data() + b.data()
            assert sorted(handled) == sorted(sent), "each message to exactly one consumer"
            assert a.got and b.got, "both consumers took work"
        finally:
            await sub_a.stop()
            await sub_b.stop()
            await self.close_peer(transport, peer)

    async def test_events_fan_out_to_every_bound_queue(self, transport: Transport) -> None:
        topic, other = f"{self.new_queue()}.Happened", f"{self.new_queue()}.Other"
        q1, q2, q3 = self.new_queue(), self.new_queue(), self.new_queue()
        await transport.declare(q1, [topic])
        await transport.declare(q2, [topic, other])
        await transport.declare(q3, [other])
        boxes = {q: _Deliveries() for q in (q1, q2, q3)}
        subs = [await transport.consume(q, box, prefetch=4) for q, box in boxes.items()]
        try:
            await transport.publish([_out("event", topic, b"e1"), _out("event", topic, b"e2")])
            await transport.publish([_out("event", other, b"o1")])
            await transport.publish([_out("event", f"{topic}.nobody", b"lost")])
            await self.wait(
                lambda: len(boxes[q1].got) >= 2 and len(boxes[q2].got) >= 3 and bool(boxes[q3].got),
                "events fanned out",
            )
            await self.settle_down()
            assert sorted(boxes[q1].data()) == [b"e1", b"e2"]
            assert sorted(boxes[q2].data()) == [b"e1", b"e2", b"o1"]
            assert boxes[q3].data() == [b"o1"]
        finally:
            for sub in subs:
                await sub.stop()

    async def test_competing_consumers_share_events_of_one_queue(
        self, transport: Transport
    ) -> None:
        topic, q = f"{self.new_queue()}.Happened", self.new_queue()
        await transport.declare(q, [topic])
        peer = await self.open_peer(transport)
        a, b = _Deliveries(hold=0.01), _Deliveries(hold=0.01)
        subs = [await transport.consume(q, a, prefetch=1), await peer.consume(q, b, prefetch=1)]
        try:
            sent = [f"e{i}".encode() for i in range(10)]
            await transport.publish([_out("event", topic, d) for d in sent])
            await self.wait(lambda: len(a.got) + len(b.got) >= len(sent), "events handled")
            await self.settle_down()
            assert sorted(a.data() + b.data()) == sorted(sent)
        finally:
            for sub in subs:
                await sub.stop()
            await self.close_peer(transport, peer)

    # -- flow control and lifecycle ----------------------------------------

    async def test_in_flight_handlers_never_exceed_prefetch(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries(hold=0.03)
        sub = await transport.consume(q, inbox, prefetch=3)
        try:
            await transport.publish([_out("command", q, f"{i}".encode()) for i in range(24)])
            await self.wait(lambda: len(inbox.got) >= 24, "all handled")
            assert 1 <= inbox.max_running <= 3
        finally:
            await sub.stop()

    async def test_stop_waits_for_handlers_in_flight(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries(hold=0.3)
        sub = await transport.consume(q, inbox, prefetch=2)
        await transport.publish([_out("command", q, b"slow")])
        await self.wait(lambda: inbox.running > 0, "handler started")
        await sub.stop()
        assert inbox.got == [(b"slow", 1)] and inbox.running == 0

    async def test_reconnects_after_the_connection_is_cut(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await transport.publish([_out("command", q, b"before")])
            await self.wait(lambda: len(inbox.got) == 1, "delivered before the cut")
            await self.cut_connection(transport)
            loop = asyncio.get_running_loop()
            end = loop.time() + self.timeout
            while True:  # callers retry a failed publish (the relay does)
                try:
                    await transport.publish([_out("command", q, b"after")])
                    break
                except TransportError:
                    if loop.time() > end:
                        raise
                    await asyncio.sleep(0.1)
            await self.wait(lambda: b"after" in inbox.data(), "delivered after the cut")
        finally:
            await sub.stop()

    # -- poison messages, one layer up ---------------------------------------

    async def test_poison_message_is_dead_lettered_and_the_queue_moves_on(
        self, transport: Transport
    ) -> None:
        from .app import App

        name = self.new_queue()
        app_store = self.app_store(transport)
        app = App(store=app_store, transport=transport)
        handled: list[int] = []
        part = app.participant(name)

        @part.command(ContractPing)
        async def ping(cmd: ContractPing, ctx: Any) -> None:
            handled.append(cmd.n)

        await app.start()
        try:
            garbage = b"\xff\x00 this is not an envelope"
            good = app.codec.encode(app.codec.make(ContractPing(7), Headers()))
            await transport.publish([_out("command", name, garbage)])
            await transport.publish([_out("command", name, good)])
            dead: list[DeadLetter] = []

            async def dead_lettered() -> bool:
                dead[:] = [d for d in await app_store.dead_letters(1000) if d.queue == name]
                return bool(dead)

            await self.wait(lambda: handled == [7], "the valid message was handled")
            await _eventually(dead_lettered, self.timeout, "the garbage was dead-lettered")
            await self.settle_down()
            assert handled == [7]
            assert await dead_lettered() and len(dead) == 1
            assert dead[0].data == garbage
            assert dead[0].error_type == "MalformedMessage"
            assert dead[0].reason
        finally:
            await app.stop()

    async def test_a_duplicate_command_gets_the_stored_reply_and_it_arrives(
        self, transport: Transport
    ) -> None:
        """A step retried after its timeout runs once, and *both* replies arrive.

        The second reply is the first one re-sent from the inbox: a broker that
        dedupes by message id (NATS JetStream) must not drop it.
        """
        from .app import App

        name, replies = self.new_queue(), self.new_queue()
        app = App(store=self.app_store(transport), transport=transport)
        runs: list[int] = []
        part = app.participant(name)

        @part.command(ContractPing)
        async def ping(cmd: ContractPing, ctx: Any) -> None:
            runs.append(cmd.n)

        await app.start()
        inbox = _Deliveries()
        await transport.declare(replies, [])
        sub = await transport.consume(replies, inbox, prefetch=4)
        try:
            saga_id = new_id()
            for attempt in (1, 2):  # the retry is a new message for the same step
                headers = Headers(
                    saga_id=saga_id, step="ping", phase="forward", reply_to=replies, attempt=attempt
                )
                env = app.codec.make(ContractPing(attempt), headers)
                await transport.publish([_out("command", name, app.codec.encode(env))])
                await self.wait(_at_least(inbox, attempt), f"reply {attempt} arrived")
            await self.settle_down()
            got = [app.codec.decode(d) for d in inbox.data()]
            assert runs == [1], "the handler ran once"
            assert [e.headers.outcome for e in got] == ["success", "success"]
            assert [e.headers.attempt for e in got] == [1, 2]
            assert len({e.id for e in got}) == 2, "the re-sent reply has an id of its own"
        finally:
            await sub.stop()
            await app.stop()


__all__ = ["FakeClock", "StoreContract", "TransportContract", "drop_tables"]
