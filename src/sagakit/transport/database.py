"""The database transport: a thin adapter over the store's work queue.

Queues are rows of the store's ``messages`` table (:mod:`sagakit.store.queue`),
consumed by :class:`~sagakit.store.consumer.QueueConsumer`. An endpoint on the
same store writes outgoing messages straight onto the queues and deletes the
delivered row inside its handler's transaction (:meth:`direct_writer` and
``Delivery.ack_in``), so the outbox *is* the queue and there is no relay hop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import StoreError, TransportError
from ..store.consumer import MAX_POLL_S, QueueConsumer
from ._url import require_own

if TYPE_CHECKING:
    from ..store import Store, Tx
    from ..store.queue import WorkQueue
    from . import Handler, Outgoing


class QueueWriter:
    """Writes outgoing messages onto a work queue inside the caller's transaction."""

    def __init__(self, queue: WorkQueue) -> None:
        self.queue = queue

    async def write(self, tx: Tx, messages: Sequence[Outgoing]) -> None:
        for m in messages:
            if m.kind == "event":
                await self.queue.fan_out(tx, m.destination, m.id, m.data)
            else:
                await self.queue.put(tx, m.destination, m.id, m.data, kind=m.kind)


class DatabaseTransport:
    """Queues in the store's database; the outbox is the queue."""

    def __init__(self, store: Store, *, lease: float = 30.0, max_poll: float = MAX_POLL_S) -> None:
        self.url = "database"
        self.store = store
        #: the store's table prefix: the queues are its ``messages`` and ``subscriptions``
        self.namespace = store.prefix
        self.lease = lease
        self.max_poll = max_poll
        self._writer = QueueWriter(store.queue)
        self._subs: set[QueueConsumer] = set()

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        pass

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        for topic in topics:
            await self.store.queue.subscribe(topic, queue)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        async with self.store.transaction() as tx:
            await self._writer.write(tx, messages)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> QueueConsumer:
        sub = QueueConsumer(
            self.store, queue, handler, prefetch=prefetch, lease=self.lease, max_poll=self.max_poll
        )
        self._subs.add(sub)
        return sub

    async def ping(self) -> None:
        """The queues are the store's tables: the store answering is the broker answering."""
        try:
            await self.store.driver.read("SELECT 1")
        except Exception as exc:
            raise TransportError(f"the database queues are unreachable: {exc!r}") from exc

    async def remove_namespace(self, namespace: str) -> None:
        """Stop this transport's consumers; delete every queued message and binding.

        The tables stay: they are the store's (``drop_tables`` drops them).
        """
        require_own(self.namespace, namespace)
        for sub in list(self._subs):
            await sub.stop()
        self._subs.clear()
        p = self.store.prefix
        try:
            async with self.store.transaction() as tx:
                await tx.execute(f"DELETE FROM {p}messages")
                await tx.execute(f"DELETE FROM {p}subscriptions")
        except StoreError as exc:
            raise TransportError(f"cannot empty the database queues: {exc!r}") from exc

    def direct_writer(self, store: Store) -> QueueWriter | None:
        return self._writer if store is self.store else None
