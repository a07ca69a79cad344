"""An in-process transport for tests and as a speed upper bound. Not durable."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._consumer import BrokerDelivery, Consumer
from ._url import DEFAULT_NAMESPACE, require_own

if TYPE_CHECKING:
    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.memory")


class MemoryDelivery(BrokerDelivery):
    """A message taken from an in-process queue; a nack puts it back later."""

    __slots__ = ("_queue", "_transport")

    def __init__(self, transport: MemoryTransport, queue: str, data: bytes, attempt: int) -> None:
        super().__init__(data, attempt)
        self._transport, self._queue = transport, queue

    async def _ack(self) -> None:
        pass

    async def _nack(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._transport.put, self._queue, self.data, self.attempt + 1)


class MemorySubscription(Consumer[MemoryDelivery]):
    """Takes from one asyncio queue only when a handler slot is free."""

    def __init__(self, transport: MemoryTransport, queue: str, handler: Handler, prefetch: int):
        super().__init__(queue, handler, prefetch, log)
        self._q = transport.queue(queue)
        self._t = transport
        self._task = asyncio.create_task(self._take(), name=f"sagakit-memory-{queue}")

    async def _take(self) -> None:
        # Wait for a slot *before* taking: a message taken is never dropped on stop.
        while not self.stopping:
            await self.wait_free()
            data, attempt = await self._q.get()
            self.spawn(MemoryDelivery(self._t, self.queue, data, attempt))

    async def _halt(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _unsettled(self, delivery: MemoryDelivery) -> None:
        log.warning("a handler of %s left a delivery unsettled; it is lost", self.queue)


class MemoryTransport:
    """Queues are asyncio queues; events fan out to every bound queue."""

    def __init__(self, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.url = "memory://"
        self.namespace = namespace
        self._subs: set[MemorySubscription] = set()
        self._queues: dict[str, asyncio.Queue[tuple[bytes, int]]] = {}
        self._bindings: dict[str, set[str]] = defaultdict(set)

    def queue(self, name: str) -> asyncio.Queue[tuple[bytes, int]]:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = asyncio.Queue()
        return q

    def put(self, queue: str, data: bytes, attempt: int = 1) -> None:
        self.queue(queue).put_nowait((data, attempt))

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        self.queue(queue)
        for topic in topics:
            self._bindings[topic].add(queue)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        for m in messages:
            targets = (
                self._bindings.get(m.destination, ()) if m.kind == "event" else (m.destination,)
            )
            for queue in targets:
                self.put(queue, m.data)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> MemorySubscription:
        sub = MemorySubscription(self, queue, handler, prefetch)
        self._subs.add(sub)
        return sub

    async def remove_namespace(self, namespace: str) -> None:
        """Stop the subscriptions and forget every queue, message and binding."""
        require_own(self.namespace, namespace)
        for sub in list(self._subs):
            await sub.stop()
        self._subs.clear()
        self._queues.clear()
        self._bindings.clear()

    async def ping(self) -> None:
        """In-process: always reachable."""

    def direct_writer(self, store: Store) -> None:
        """None: messages go through the store's outbox and a relay."""
        return None
