"""An in-process transport for tests and as a speed upper bound. Not durable."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.memory")


class MemoryDelivery:
    __slots__ = ("_queue", "_transport", "attempt", "data", "settled")

    def __init__(self, transport: MemoryTransport, queue: str, data: bytes, attempt: int) -> None:
        self._transport, self._queue = transport, queue
        self.data, self.attempt = data, attempt
        self.settled = False

    async def ack(self) -> None:
        self.settled = True

    async def nack(self, delay: float) -> None:
        if not self.settled:
            self.settled = True
            loop = asyncio.get_running_loop()
            loop.call_later(delay, self._transport.put, self._queue, self.data, self.attempt + 1)


class MemorySubscription:
    def __init__(self, transport: MemoryTransport, queue: str, handler: Handler, prefetch: int):
        self._q = transport.queue(queue)
        self._t, self._name, self._handler = transport, queue, handler
        self._sem = asyncio.Semaphore(max(1, prefetch))
        self._inflight: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            data, attempt = await self._q.get()
            await self._sem.acquire()
            task = asyncio.create_task(
                self._handle(MemoryDelivery(self._t, self._name, data, attempt))
            )
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _handle(self, delivery: MemoryDelivery) -> None:
        try:
            await self._handler(delivery)
        except Exception:
            log.exception("handler crashed on %s", self._name)
            await delivery.nack(1.0)
        finally:
            self._sem.release()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


class MemoryTransport:
    """Queues are asyncio queues; events fan out to every bound queue."""

    def __init__(self) -> None:
        self.url = "memory://"
        self.local_store: Store | None = None
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
        return MemorySubscription(self, queue, handler, prefetch)
