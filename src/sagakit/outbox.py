"""Outgoing messages: the buffer a handler fills, the writer, and the relay.

A handler's messages are collected in an :class:`Outbox` and written in the
handler's own transaction by one :class:`OutboxWriter`, chosen once when the
App is wired:

- the transport's *direct* writer when its queues live in the same store (the
  database transport): messages land on their queues at commit, no relay;
- otherwise the store's outbox queue, ``sagakit.outbox``, whose rows keep
  each message's kind and destination; a :class:`Relay` publishes them to the
  broker after the commit and deletes them once the broker holds them.

Durable timers and local steps go on the store's own queues whatever the
transport (:meth:`Outbox.schedule`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from .errors import SagakitError, TransportError
from .messages import Codec, Envelope, Kind, peek
from .observe.hooks import BASE, Hooks
from .store.consumer import first_poll
from .store.due import SAFETY_POLL_S
from .transport import Outgoing

if TYPE_CHECKING:
    from .store import Store, Tx
    from .store.queue import Queued
    from .transport import Transport, Writer

log = logging.getLogger("sagakit.outbox")

OUTBOX_QUEUE = "sagakit.outbox"


@dataclass(slots=True)
class Outbox:
    """Messages a transaction will send; written to the store on flush."""

    messages: list[tuple[Envelope, str]] = field(default_factory=list)
    scheduled: list[tuple[Envelope, str, float]] = field(default_factory=list)

    def send(self, envelope: Envelope, destination: str) -> None:
        """Send a command or reply to the queue ``destination``."""
        self.messages.append((envelope, destination))

    def publish(self, envelope: Envelope) -> None:
        """Publish an event to every group subscribed to its type."""
        self.messages.append((envelope, envelope.type))

    def schedule(self, envelope: Envelope, queue: str, delay: float) -> None:
        """Put a message on one of the store's own queues (timers, local steps)."""
        self.scheduled.append((envelope, queue, delay))


class OutboxTable:
    """Writes outgoing messages to the store's outbox queue, for the relay."""

    def __init__(self, store: Store) -> None:
        self.queue = store.queue

    async def write(self, tx: Tx, messages: Sequence[Outgoing]) -> None:
        for m in messages:
            await self.queue.put(
                tx, OUTBOX_QUEUE, m.id, m.data, destination=m.destination, kind=m.kind
            )


class OutboxWriter:
    """Flushes an :class:`Outbox` into one store's transaction."""

    hooks: Hooks = BASE  #: set by the App (sagakit.observe)

    def __init__(self, store: Store, transport: Transport, codec: Codec) -> None:
        self.store = store
        self.codec = codec
        direct = transport.direct_writer(store)
        self.relayed = direct is None
        self.writer: Writer = direct if direct is not None else OutboxTable(store)

    async def flush(self, tx: Tx, out: Outbox) -> None:
        self.hooks.sending(out)
        if out.messages:
            encode = self.codec.encode
            batch = [Outgoing(e.id, e.kind, dest, encode(e)) for e, dest in out.messages]
            await self.writer.write(tx, batch)
        for env, queue, delay in out.scheduled:
            await self.store.queue.put(tx, queue, env.id, self.codec.encode(env), delay=delay)


class Relay:
    """Moves one store's outbox to a transport.

    Rows are claimed in batches with a lease (``SKIP LOCKED`` on PostgreSQL),
    so several relays share the work. A relay that dies after publishing but
    before deleting makes the batch be published again: consumers dedupe, so
    nothing is lost or applied twice.

    Rows this process writes to the outbox while the relay runs (and has
    room) are written already leased to it and handed over at their commit
    (:meth:`~sagakit.store.queue.WorkQueue.put`): no NOTIFY, no claim, so a
    hop's messages cost the relay one statement (the delete after the
    publish). If the process dies first, the lease runs out and any relay
    claims them.

    A batch the transport refuses is published again row by row, so one
    message the broker will never take (poison) does not hold back the rest.
    A row that fails on its own with a non-retryable error ``max_failures``
    times is dead-lettered (queue ``sagakit.outbox``). An outage — a retryable
    :class:`~sagakit.errors.TransportError`, or every row of a batch failing —
    is never poison: the rows wait with backoff and are not counted.
    """

    hooks: Hooks = BASE  #: set by the App (sagakit.observe)

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        batch: int = 256,
        lease: float = 30.0,
        max_poll: float = 0.25,
        max_failures: int = 10,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.store, self.transport = store, transport
        self.batch, self.lease, self.max_poll = batch, lease, max_poll
        self.max_failures = max_failures
        self.backoff, self.max_backoff = backoff, max_backoff
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: rows handed over at their commit, not yet published
        self._handed: list[Queued] = []
        #: rows being written leased to this relay by transactions still open
        self._reserved = 0
        #: no handoffs before this (time.monotonic()): the transport just failed
        self._shy_until = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sagakit-relay")
        self.store.queue.attach(OUTBOX_QUEUE, self)
        self.store.queue.poller.watch(OUTBOX_QUEUE, self.max_poll)

    async def stop(self) -> None:
        """Stop after publishing what was handed over (what fails waits in the outbox)."""
        self._stopping = True
        self.store.queue.detach(OUTBOX_QUEUE, self)
        if self._task is not None:
            await self.store.queue.poller.unwatch(OUTBOX_QUEUE, self.max_poll)
        self.store.queue.waker.wake(OUTBOX_QUEUE)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._drain()

    # -- the handoff (sagakit.store.queue.Taker) --------------------------------------

    def reserve(self) -> bool:
        """Room for one more row written leased to this relay (at most a batch waiting)."""
        if self._stopping or self._reserved + len(self._handed) >= self.batch:
            return False
        if self._shy_until and time.monotonic() < self._shy_until:
            return False  # the broker is failing: rows wait in the outbox, with backoff
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def take(self, item: Queued) -> None:
        """A row written leased to this relay has committed: publish it next."""
        self._reserved -= 1
        self._handed.append(item)
        self.store.queue.waker.wake(OUTBOX_QUEUE)

    async def _drain(self) -> None:
        """Publish rows handed over before the stop; on failure they wait out their lease."""
        while self._handed:
            try:
                await self.relay_once()
            except SagakitError as exc:
                log.warning("relay stopping with %d rows unsent: %s", len(self._handed), exc)
                left, self._handed = self._handed, []
                with contextlib.suppress(SagakitError):  # else due when their lease ends
                    await self._back_off(left)
                return

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        first = first_poll(self.store, self.max_poll)
        idle = first
        while not self._stopping:
            try:
                moved = await self.relay_once()
                self._shy_until = 0.0
            except SagakitError as exc:
                log.warning("relay failed, will retry: %s", exc)
                moved = -1
                self._shy_until = time.monotonic() + self.backoff
            if moved == self.batch or (moved >= 0 and self._handed) or self._stopping:
                continue  # a full batch, rows handed over meanwhile, or a stop to notice
            # Backed off fully: the store's one look for due rows wakes us (sagakit.store.due).
            wait = idle if idle < self.max_poll else SAFETY_POLL_S
            await self.store.queue.wait(OUTBOX_QUEUE, wait)
            idle = first if moved > 0 else min(idle * 2, self.max_poll)

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows left the outbox (sent or dead-lettered).

        Rows handed over at their commit go first, without a claim. Raises the
        transport's error on an outage, after putting the rows back.
        """
        items, self._handed = self._handed[: self.batch], self._handed[self.batch :]
        if not items:
            items = await self.store.queue.claim(OUTBOX_QUEUE, self.batch, self.lease)
        if not items:
            return 0
        try:
            await self.transport.publish([_outgoing(i) for i in items])
        except Exception as exc:
            return await self._isolate(items, exc)
        await self._ack(items)
        self.hooks.relayed(len(items))
        return len(items)

    async def _isolate(self, items: list[Queued], exc: Exception) -> int:
        """A batch failed: wait out an outage, else find the rows that fail alone."""
        if _outage(exc):
            await self._back_off(items)
            raise exc
        sent, failed = await self._one_by_one(items) if len(items) > 1 else ([], [(items[0], exc)])
        await self._ack(sent)
        self.hooks.relayed(len(sent))
        if not sent and len(items) > 1:  # nothing gets through: the broker, not the rows
            await self._back_off(items)
            raise TransportError(f"no message of a batch of {len(items)} published: {exc!r}")
        dead = [await self._failed_alone(item, e) for item, e in failed]
        return len(sent) + sum(dead)

    async def _one_by_one(
        self, items: list[Queued]
    ) -> tuple[list[Queued], list[tuple[Queued, Exception]]]:
        """Publish each row on its own; an outage midway puts every unsent row back."""
        sent: list[Queued] = []
        failed: list[tuple[Queued, Exception]] = []
        for n, item in enumerate(items):
            try:
                await self.transport.publish([_outgoing(item)])
            except Exception as exc:
                if _outage(exc):
                    await self._ack(sent)
                    await self._back_off([i for i, _ in failed] + items[n:])
                    raise
                failed.append((item, exc))
            else:
                sent.append(item)
        return sent, failed

    async def _failed_alone(self, item: Queued, exc: Exception) -> int:
        """Count a row's own failure; dead-letter it at the limit. Returns 1 if it was."""
        failures = await self.store.queue.fail(item, self._delay(item.attempts))
        if failures is None:
            return 0  # another relay has it now
        if failures < self.max_failures:
            log.warning("outbox message %s failed to publish (%d): %r", item.id, failures, exc)
            return 0
        log.warning(
            "dead-lettering outbox message %s after %d failures: %r", item.id, failures, exc
        )
        return await self._dead_letter(item, exc, failures)

    async def _dead_letter(self, item: Queued, exc: Exception, failures: int) -> int:
        env = peek(item.data)
        reason = f"{type(exc).__name__}: {exc} (failed to publish {failures} times)"
        async with self.store.transaction() as tx:
            if not await self.store.queue.ack(tx, item):
                return 0
            await self.store.dead_letter(
                tx,
                OUTBOX_QUEUE,
                item.data,
                reason,
                type(exc).__name__,
                message_id=item.id,
                saga_id=env.headers.saga_id if env else None,
                destination=item.destination,
                kind=item.kind,
            )
        return 1

    async def _back_off(self, items: list[Queued]) -> None:
        for item in items:
            await self.store.queue.release(item, self._delay(item.attempts))

    async def _ack(self, items: list[Queued]) -> None:
        await self.store.queue.ack_many(items)

    def _delay(self, attempts: int) -> float:
        """Exponential in the row's claims, capped: an outage is retried ever more slowly."""
        return float(min(self.backoff * 2 ** min(max(attempts - 1, 0), 20), self.max_backoff))


def _outage(exc: Exception) -> bool:
    """A retryable transport or store error: the broker is away, not the message bad."""
    return isinstance(exc, SagakitError) and exc.retryable


def _outgoing(item: Queued) -> Outgoing:
    return Outgoing(item.id, cast(Kind, item.kind or "command"), item.destination or "", item.data)
