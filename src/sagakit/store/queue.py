"""The store's own work queue: claim, lease, ack in the handler's transaction, delay.

Queues are rows of the ``messages`` table. A consumer *claims* due rows,
which moves their ``available_at`` forward by the lease and bumps
``attempts`` (the lease token: an ack or release only counts if ``attempts``
is still what the claim returned). The row is deleted by the handler's own
transaction, so the acknowledgement commits with the business change.
Delayed messages and durable timers are rows whose ``available_at`` lies in
the future. Events fan out to every queue subscribed to their topic.

One clock: on PostgreSQL every lease and due time is computed from the
server's clock (``clock_timestamp()``), so hosts whose clocks disagree never
steal a leased row early or delay a message; only a :class:`FakeClock` in
tests overrides it. SQLite is one file on one host, so its processes share
that host's clock.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..clock import SystemClock
from ..errors import LeaseLost
from .due import DuePoller

if TYPE_CHECKING:
    from . import Tx
    from .core import Store


@dataclass(frozen=True, slots=True)
class Queued:
    """A claimed queue row; ``attempts`` doubles as the lease token."""

    seq: int
    id: str
    data: bytes
    attempts: int
    destination: str | None = None
    kind: str | None = None
    #: runs of its handler that failed (counted apart from claims, see :meth:`WorkQueue.fail`)
    failures: int = 0


class Taker(Protocol):
    """A consumer in this process that takes messages handed to it at commit (no claim)."""

    lease: float

    def reserve(self) -> bool:
        """Hold a free prefetch slot for a message being written; False if none is free."""

    def unreserve(self) -> None:
        """Give back a held slot (the write rolled back)."""

    def take(self, item: Queued) -> None:
        """Run a committed message written leased to this consumer, in the held slot."""


class Handoff:
    """A message written leased to a local consumer: handed over if its transaction commits."""

    __slots__ = ("data", "destination", "done", "id", "kind", "seq", "taker")

    def __init__(
        self, taker: Taker, message_id: str, data: bytes, dest: str | None, kind: str | None
    ):
        self.taker = taker
        self.id, self.data, self.destination, self.kind = message_id, data, dest, kind
        self.seq: int | None = None
        self.done = False

    def got(self, seq: int) -> None:
        self.seq = seq

    def committed(self) -> None:
        if self.done:
            return
        self.done = True
        if self.seq is None:  # the write never went out (a savepoint undid it)
            self.taker.unreserve()
            return
        self.taker.take(Queued(self.seq, self.id, self.data, 1, self.destination, self.kind))

    def rolled_back(self) -> None:
        if not self.done:
            self.done = True
            self.taker.unreserve()


KEEP_S = 1.0  #: seconds a start's final record is trusted by a waiter (see Waker.starting)
EXPECT_AT_MOST = 4096  #: names a Waker keeps expecting (see :meth:`Waker.expect`)


class Waker:
    """In-process wake-ups for queue consumers and saga waiters.

    Fed by commits in this process and by NOTIFY from other processes. A name
    nobody watches costs nothing when woken.
    """

    def __init__(self, expect_at_most: int = EXPECT_AT_MOST) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, int] = {}
        self._offers: dict[str, object] = {}
        #: expected names (oldest first) -> woken since expected
        self._expected: dict[str, bool] = {}
        #: names whose offer is kept for a waiter still to come (oldest first) -> until when
        self._kept: dict[str, float] = {}
        self._expect_at_most = expect_at_most
        #: every other process's wake-ups reach this waker (PostgreSQL, listening);
        #: without that, :meth:`expect` does nothing
        self.complete = False

    def event(self, name: str) -> asyncio.Event:
        ev = self._events.get(name)
        if ev is None:
            ev = self._events[name] = asyncio.Event()
        return ev

    def watch(self, name: str) -> asyncio.Event:
        """Like :meth:`event`, counted, for short-lived names; pair with :meth:`unwatch`."""
        self._watchers[name] = self._watchers.get(name, 0) + 1
        return self.event(name)

    def unwatch(self, name: str) -> None:
        left = self._watchers.get(name, 1) - 1
        if left > 0:
            self._watchers[name] = left
            return
        self._watchers.pop(name, None)
        self._events.pop(name, None)
        self._offers.pop(name, None)

    def offer(self, name: str, value: object) -> None:
        """Leave ``value`` for whoever watches ``name`` (nothing kept if nobody does).

        A commit in this process hands what it wrote (a saga's final record) to
        its waiters, so they need not read it back from the database.
        """
        if name in self._watchers:
            self._offers[name] = value

    def taken(self, name: str) -> object | None:
        """What was last offered under ``name``, if anything (it stays for other watchers)."""
        kept = self._kept.get(name)
        if kept is not None and time.monotonic() > kept:  # too old to trust: read instead
            self.withdraw(name)
        return self._offers.get(name)

    def wake(self, name: str) -> None:
        ev = self._events.get(name)
        if ev is not None:
            ev.set()
            if name in self._expected:
                self._woken(name)

    def _woken(self, name: str) -> None:
        """An expected name was woken: mark it, or forget it if nobody else waits on it."""
        if self._watchers.get(name, 0) > 1:
            self._expected[name] = True
        else:  # a waiter that comes later reads, so nothing need be kept for it
            self.forget(name)

    def wake_all(self) -> None:
        for ev in self._events.values():
            ev.set()
        for name in self._expected:
            self._expected[name] = True

    def expect(self, name: str) -> None:
        """Watch ``name`` before anything can wake it, so :meth:`unwoken` can tell.

        A saga started in this process is expected before its first commit: until
        its end is woken (by a commit here or another process's NOTIFY), a
        waiter knows it has not ended without reading it. Bounded: the oldest
        expectations are dropped (their waiters then read, as they would anyway).
        """
        if not self.complete or name in self._expected:
            return
        self._expected[name] = False
        self.watch(name)
        if len(self._expected) > self._expect_at_most:
            self.forget(next(iter(self._expected)))

    def forget(self, name: str) -> None:
        """Drop the expectation of ``name`` (its waiter is done, or it may have ended unseen)."""
        if self._expected.pop(name, None) is not None:
            self.unwatch(name)
        self.withdraw(name)

    def withdraw(self, name: str) -> None:
        """Drop what a start kept under ``name``: it is no longer the last word."""
        if name in self._kept:
            del self._kept[name]
            self.unwatch(name)

    @contextmanager
    def starting(self, name: str) -> Iterator[None]:
        """Around a saga's start in this process: what is offered under ``name`` meanwhile
        is kept for a waiter still to come.

        A saga whose steps all ran inside its start has ended when the start
        returns; the ``wait`` that usually follows then takes the final
        record from here instead of reading it back. Kept until that waiter
        is done (:meth:`forget`), for :data:`KEEP_S` at most (another
        process may move the saga on: an operator's retry), bounded like
        expectations, oldest dropped first.
        """
        self.watch(name)
        try:
            yield
        finally:
            if name in self._offers and name not in self._kept:
                self._kept[name] = time.monotonic() + KEEP_S
                if len(self._kept) > self._expect_at_most:
                    self.forget(next(iter(self._kept)))
            else:
                self.unwatch(name)

    def unwoken(self, name: str) -> bool:
        """Expected, and not woken since: nothing has happened to it that this process heard of."""
        return self._expected.get(name) is False


class WorkQueue:
    """The ``messages`` table as queues: one per store (``store.queue``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.waker = Waker()
        p = store.prefix
        pg = store.dialect == "postgresql"
        #: lease and due times from the database server's clock (PostgreSQL, real time)
        self.server_time = pg and isinstance(store.clock, SystemClock)
        now = "COALESCE(?::float8, extract(epoch from clock_timestamp()))" if pg else "?"
        self._now_sql = now
        skip = " FOR UPDATE SKIP LOCKED" if pg else ""
        self._claim_sql = (
            f"UPDATE {p}messages SET available_at = {now} + ?, attempts = attempts + 1 "
            f"WHERE seq IN (SELECT seq FROM {p}messages WHERE queue = ? AND available_at <= {now} "
            f"ORDER BY available_at LIMIT ?{skip}) "
            "RETURNING seq, id, data, attempts, destination, kind, failures"
        )
        self._put_sql = (
            f"INSERT INTO {p}messages (id, queue, destination, kind, data, available_at, "
            f"created_at) VALUES (?, ?, ?, ?, ?, {now} + ?, ?)"
        )
        # already leased to a local consumer, as a claim would have left it
        self._put_leased_sql = (
            f"INSERT INTO {p}messages (id, queue, destination, kind, data, available_at, "
            f"created_at, attempts) VALUES (?, ?, ?, ?, ?, {now} + ?, ?, 1)"
        )
        self._takers: dict[str, list[Taker]] = {}
        self._fan_out_sql = (
            f"INSERT INTO {p}messages (id, queue, destination, kind, data, available_at, "
            f"created_at) SELECT ?, queue, NULL, 'event', ?, {now}, ? FROM {p}subscriptions "
            "WHERE topic = ? RETURNING queue"
        )
        self._lease_sql = (
            f"UPDATE {p}messages SET available_at = {now} + ? WHERE seq = ? AND attempts = ?"
        )
        self._due_sql = (
            f"SELECT q FROM unnest(?::text[]) AS q WHERE EXISTS (SELECT 1 FROM {p}messages m "
            f"WHERE m.queue = q AND m.available_at <= {now})"
            if pg
            else f"SELECT DISTINCT queue FROM {p}messages WHERE queue IN (SELECT value FROM "
            "json_each(?)) AND available_at <= ?"
        )
        #: idle consumers leave polling to one look per store (sagakit.store.due)
        self.poller = DuePoller(self)

    def _now(self) -> float | None:
        """The time to bind: None lets PostgreSQL use its own clock."""
        return None if self.server_time else self.store.clock.now()

    async def put(
        self,
        tx: Tx,
        queue: str,
        message_id: str,
        data: bytes,
        *,
        delay: float = 0.0,
        destination: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Add a message to ``queue`` inside ``tx``; consumers wake on commit.

        A message due now on a queue a consumer in this process consumes, with
        a prefetch slot free, is written already leased to that consumer and
        handed to it after the commit: no wake-up, no claim. If this process
        dies first, the lease runs out and any consumer claims the row.
        """
        if delay <= 0 and not tx.depth and (taker := self._reserve(queue)) is not None:
            await self._hand(tx, taker, message_id, queue, data, destination, kind)
            return
        args = (message_id, queue, destination, kind, data, self._now(), delay)
        await tx.later(self._put_sql, *args, self.store.clock.now())
        tx.notify(queue)

    async def _hand(
        self,
        tx: Tx,
        taker: Taker,
        message_id: str,
        queue: str,
        data: bytes,
        destination: str | None,
        kind: str | None,
    ) -> None:
        handoff = Handoff(taker, message_id, data, destination, kind)
        tx.on_rollback(handoff.rolled_back)
        tx.on_commit(handoff.committed)
        args = (message_id, queue, destination, kind, data, self._now(), taker.lease)
        await tx.later_returning(
            self._put_leased_sql, "seq", *args, self.store.clock.now(), got=handoff.got
        )

    def attach(self, queue: str, taker: Taker) -> None:
        """Hand messages put on ``queue`` in this process to ``taker`` while it has room."""
        self._takers.setdefault(queue, []).append(taker)

    def detach(self, queue: str, taker: Taker) -> None:
        takers = self._takers.get(queue, [])
        if taker in takers:
            takers.remove(taker)
        if not takers:
            self._takers.pop(queue, None)

    def _reserve(self, queue: str) -> Taker | None:
        for taker in self._takers.get(queue, ()):
            if taker.reserve():
                return taker
        return None

    async def fan_out(self, tx: Tx, topic: str, message_id: str, data: bytes) -> None:
        """Put an event on the queue of every group subscribed to ``topic``."""
        now = self.store.clock.now()
        rows = await tx.fetchall(self._fan_out_sql, message_id, data, self._now(), now, topic)
        for row in rows:
            tx.notify(row[0])

    async def subscribe(self, topic: str, queue: str) -> None:
        """Bind ``queue`` to receive every event of type ``topic``."""
        async with self.store.transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.store.prefix}subscriptions (topic, queue) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING",
                topic,
                queue,
            )

    async def claim(self, queue: str, limit: int, lease: float) -> list[Queued]:
        """Lease up to ``limit`` due messages of ``queue`` (skipping locked rows)."""
        now = self._now()
        rows = await self.store.driver.fetch_single(self._claim_sql, now, lease, queue, now, limit)
        return [Queued(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    async def due(self, queues: Sequence[str]) -> list[str]:
        """Which of ``queues`` hold a row due now, in one statement."""
        names: object = list(queues) if self.store.dialect == "postgresql" else json.dumps(queues)
        rows = await self.store.driver.fetch_single(self._due_sql, names, self._now())
        return [str(r[0]) for r in rows]

    async def ack(self, tx: Tx, item: Queued) -> bool:
        """Delete a claimed row inside ``tx``; False if its lease was lost."""
        n = await tx.execute(
            f"DELETE FROM {self.store.prefix}messages WHERE seq = ? AND attempts = ?",
            item.seq,
            item.attempts,
        )
        return n == 1

    async def ack_many(self, items: Sequence[Queued]) -> None:
        """Delete claimed rows whose leases still hold, in one statement (a relay's batch).

        A row whose lease was lost is left to whoever holds it now. On
        PostgreSQL this is one autocommit round trip, whatever the batch size.
        """
        if not items:
            return
        p = self.store.prefix
        if self.store.dialect == "postgresql":
            await self.store.driver.fetch_single(
                f"DELETE FROM {p}messages m USING unnest(?::bigint[], ?::int[]) AS a(seq, n) "
                "WHERE m.seq = a.seq AND m.attempts = a.n",
                [i.seq for i in items],
                [i.attempts for i in items],
            )
            return
        async with self.store.transaction() as tx:
            await tx.executemany(
                f"DELETE FROM {p}messages WHERE seq = ? AND attempts = ?",
                [(i.seq, i.attempts) for i in items],
            )

    async def ack_later(self, tx: Tx, item: Queued) -> None:
        """Delete a claimed row with ``tx``'s held writes; :class:`LeaseLost` if it was lost."""

        def check(n: int) -> None:
            if n != 1:
                raise LeaseLost(f"lease on message {item.id} was lost")

        await tx.later(
            f"DELETE FROM {self.store.prefix}messages WHERE seq = ? AND attempts = ?",
            item.seq,
            item.attempts,
            check=check,
        )

    async def release(self, item: Queued, delay: float) -> None:
        """Make a claimed row due again after ``delay`` seconds."""
        async with self.store.transaction() as tx:
            await tx.execute(self._lease_sql, self._now(), delay, item.seq, item.attempts)

    async def fail(self, item: Queued, delay: float) -> int | None:
        """Release a row that failed on its own; its failure count, None if the lease was lost.

        Failures are counted apart from ``attempts`` (claims), so a caller can
        tell a message that keeps failing from an outage that failed everything
        (the relay), or a handler's failures from the crashes of the workers
        that held it (a consumer's retry policy).
        """
        async with self.store.transaction() as tx:
            row = await tx.fetchone(
                f"UPDATE {self.store.prefix}messages SET available_at = {self._now_sql} + ?, "
                "failures = failures + 1 WHERE seq = ? AND attempts = ? RETURNING failures",
                self._now(),
                delay,
                item.seq,
                item.attempts,
            )
        return int(row[0]) if row is not None else None

    async def extend(self, items: Sequence[Queued], lease: float) -> int:
        """Push the leases of ``items`` forward (a heartbeat); returns how many held."""
        if not items:
            return 0
        now, held = self._now(), 0
        async with self.store.transaction() as tx:
            for item in items:
                held += await tx.execute(self._lease_sql, now, lease, item.seq, item.attempts)
        return held

    async def cancel(self, tx: Tx, message_id: str) -> None:
        """Remove a queued message by id (e.g. a timer that is no longer needed)."""
        await tx.later(f"DELETE FROM {self.store.prefix}messages WHERE id = ?", message_id)

    async def depth(self, queue: str | None = None) -> int:
        """How many messages wait (or are leased) on ``queue``, or on all queues."""
        sql, args = f"SELECT count(*) FROM {self.store.prefix}messages", []
        if queue is not None:
            sql += " WHERE queue = ?"
            args.append(queue)
        async with self.store.transaction() as tx:
            row = await tx.fetchone(sql, *args)
        return int(row[0])

    async def wait(self, queue: str, timeout: float) -> None:
        """Sleep until a commit wakes ``queue`` or ``timeout`` passes (jittered)."""
        ev = self.waker.event(queue)
        if not ev.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout * (0.8 + 0.4 * random.random()))
        ev.clear()
