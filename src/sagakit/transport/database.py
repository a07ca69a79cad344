"""The database transport: queues are rows of the store's ``messages`` table.

Consumers lease rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), and an endpoint
on the same store deletes the row inside its handler's transaction, so the
acknowledgement commits with the business change. Wake-ups come from commits in
this process, LISTEN/NOTIFY on PostgreSQL, and short adaptive polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import SagakitError
from ..store.core import Queued

if TYPE_CHECKING:
    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.database")

MIN_POLL_S = 0.005
MAX_POLL_S = 0.25


def first_poll(store: Store, max_poll: float) -> float:
    """How soon to look again after an empty claim.

    PostgreSQL pushes wake-ups (LISTEN/NOTIFY) and every commit in this process
    wakes its consumers directly, so polling only catches delayed messages
    coming due. SQLite shared between processes has no push: poll briefly,
    backing off.
    """
    return max_poll if store.dialect == "postgresql" else MIN_POLL_S


class DbDelivery:
    """A leased queue row."""

    __slots__ = ("attempt", "data", "item", "settled", "store")

    def __init__(self, store: Store, item: Queued) -> None:
        self.store = store
        self.item = item
        self.data = item.data
        self.attempt = item.attempts
        self.settled = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            async with self.store.transaction() as tx:
                await self.store.ack(tx, self.item)

    async def nack(self, delay: float) -> None:
        if not self.settled:
            self.settled = True
            await self.store.release(self.item, delay)


class QueueConsumer:
    """Claims batches from one store queue and runs a handler per row."""

    def __init__(
        self,
        store: Store,
        queue: str,
        handler: Handler,
        *,
        prefetch: int,
        lease: float,
        max_poll: float = MAX_POLL_S,
    ) -> None:
        self.store, self.queue, self.handler = store, queue, handler
        self.prefetch, self.lease, self.max_poll = max(1, prefetch), lease, max_poll
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"sagakit-consume-{queue}")

    async def _run(self) -> None:
        first = first_poll(self.store, self.max_poll)
        idle = first
        while not self._stopping:
            free = self.prefetch - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                batch = await self.store.claim(self.queue, free, self.lease)
            except SagakitError as exc:
                log.warning("claim on %s failed: %s", self.queue, exc)
                batch = []
            for item in batch:
                self._spawn(DbDelivery(self.store, item))
            if len(batch) == free:
                idle = first
                continue  # there may be more right away
            # Drained: sleep until a commit wakes the queue (a wake-up that came
            # while claiming is kept by the event) or the next poll is due.
            await self.store.wait(self.queue, idle)
            idle = first if batch else min(idle * 2, self.max_poll)

    def _spawn(self, delivery: DbDelivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle(self, delivery: DbDelivery) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("handler crashed on %s; releasing", self.queue)
            await _quiet(delivery.nack(1.0))

    async def stop(self, grace: float = 10.0) -> None:
        """Take no new rows; give in-flight handlers ``grace`` seconds, then cancel them.

        A cancelled handler's transaction rolls back and its lease expires, so
        the message is delivered again: nothing is lost.
        """
        self._stopping = True
        self.store.waker.wake(self.queue)
        await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            _, late = await asyncio.wait(self._inflight, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def _quiet(aw: object) -> None:
    try:
        await aw  # type: ignore[misc]
    except Exception:
        log.exception("could not release a delivery")


class DatabaseTransport:
    """Queues in the store's database; the outbox is the queue."""

    def __init__(self, store: Store, *, lease: float = 30.0, max_poll: float = MAX_POLL_S) -> None:
        self.url = "database"
        self.local_store: Store | None = store
        self.store = store
        self.lease = lease
        self.max_poll = max_poll

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        pass

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        for topic in topics:
            await self.store.subscribe(topic, queue)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        async with self.store.transaction() as tx:
            for m in messages:
                if m.kind == "event":
                    await self.store.enqueue_event(tx, m.destination, m.id, m.data)
                else:
                    await self.store.enqueue(tx, m.destination, m.id, m.data)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> QueueConsumer:
        return QueueConsumer(
            self.store, queue, handler, prefetch=prefetch, lease=self.lease, max_poll=self.max_poll
        )
