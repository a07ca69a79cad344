"""Consuming the store's work queue: claim batches, run handlers, keep leases alive.

A :class:`QueueConsumer` claims due rows of one queue (at most ``prefetch`` in
flight) and runs a handler per row. While handlers run, a heartbeat pushes
their leases forward every third of the lease, so a handler slower than its
lease is never handed to a second consumer while it still runs; the handler
timeout and the delivery cap (both in the endpoint) bound how long that can
go on. At shutdown, handlers still running after the grace period are
cancelled and their rows released at once, so a restarted worker takes them
without waiting out a lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from ..errors import SagakitError
from .due import SAFETY_POLL_S

if TYPE_CHECKING:
    from . import Tx
    from .core import Store
    from .queue import Queued, WorkQueue

log = logging.getLogger("sagakit.store.consumer")

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


class QueueDelivery:
    """A leased queue row, acknowledged inside the handler's transaction when it can be."""

    __slots__ = ("attempt", "data", "failures", "item", "queue", "settled", "started", "warned")

    def __init__(self, queue: WorkQueue, item: Queued) -> None:
        self.queue = queue
        self.item = item
        self.data = item.data
        self.attempt = item.attempts
        self.failures: int | None = item.failures
        self.settled = False
        self.warned = False
        self.started = asyncio.get_running_loop().time()

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            async with self.queue.store.transaction() as tx:
                await self.queue.ack(tx, self.item)

    async def nack(self, delay: float, *, failed: bool = False) -> None:
        if not self.settled:
            self.settled = True
            if failed:
                await self.queue.fail(self.item, delay)
            else:
                await self.queue.release(self.item, delay)

    async def ack_in(self, store: Store, tx: Tx) -> bool:
        """Delete the row inside ``tx`` (settled once ``tx`` commits)."""
        if store is not self.queue.store:
            return False
        await self.queue.ack_later(tx, self.item)
        tx.on_commit(self._committed)
        return True

    def _committed(self) -> None:
        self.settled = True


Handler = Callable[[QueueDelivery], Awaitable[None]]


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
        self.work = store.queue
        self.prefetch, self.lease, self.max_poll = max(1, prefetch), lease, max_poll
        self._inflight: dict[asyncio.Task[None], QueueDelivery] = {}
        #: prefetch slots held for messages handed over at their commit (see :meth:`take`)
        self._reserved = 0
        self._slot = asyncio.Event()  # set when a slot frees
        self._releases: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"sagakit-consume-{queue}")
        self._beat = asyncio.create_task(self._heartbeat(), name=f"sagakit-lease-{queue}")
        self.work.attach(queue, self)
        self.work.poller.watch(queue, self.max_poll)

    def reserve(self) -> bool:
        """Hold a prefetch slot for a message a transaction here writes leased to us."""
        if self._stopping or len(self._inflight) + self._reserved >= self.prefetch:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1
        self._slot.set()

    def take(self, item: Queued) -> None:
        """Run a message handed over at its commit; after stop, release it at once."""
        self._reserved -= 1
        delivery = QueueDelivery(self.work, item)
        if not self._stopping:
            self._spawn(delivery)
            return
        self._slot.set()
        task = asyncio.create_task(_quiet(delivery.nack(0.0)))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _run(self) -> None:
        first = first_poll(self.store, self.max_poll)
        idle = first
        while not self._stopping:
            free = self.prefetch - len(self._inflight) - self._reserved
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            batch = await self._claim(free)
            for item in batch:
                self._spawn(QueueDelivery(self.work, item))
            if len(batch) == free or self._stopping:
                idle = first
                continue  # there may be more right away, or a stop to notice
            # Drained: sleep until a commit wakes the queue (a wake-up that came
            # while claiming is kept by the event) or the next poll is due.
            # Backed off fully: the store's one look for due rows wakes us (sagakit.store.due).
            await self.work.wait(self.queue, idle if idle < self.max_poll else SAFETY_POLL_S)
            await asyncio.sleep(0)  # commits ready in the same turn join this claim
            idle = first if batch else min(idle * 2, self.max_poll)

    async def _claim(self, free: int) -> list[Queued]:
        try:
            return await self.work.claim(self.queue, free, self.lease)
        except SagakitError as exc:
            log.warning("claim on %s failed: %s", self.queue, exc)
            return []

    def _spawn(self, delivery: QueueDelivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self._inflight[task] = delivery
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._slot.set()

    async def _handle(self, delivery: QueueDelivery) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.exception("handler crashed on %s; releasing", self.queue)
            await _quiet(delivery.nack(1.0))

    async def _heartbeat(self) -> None:
        """Keep the leases of running handlers alive, and say when one runs long.

        An extension still waiting for the database (a SQLite file held by a
        running handler) is not stacked up; the warning never waits for it.
        """
        pending: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.lease / 3)
                running = [d for d in self._inflight.values() if not d.settled]
                self._warn_slow(running)
                if running and (pending is None or pending.done()):
                    pending = asyncio.create_task(self._extend([d.item for d in running]))
        finally:  # never leave an extension running into a closing store
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def _extend(self, items: list[Queued]) -> None:
        try:
            await self.work.extend(items, self.lease)
        except SagakitError as exc:
            log.warning("could not extend leases on %s: %s", self.queue, exc)

    def _warn_slow(self, running: list[QueueDelivery]) -> None:
        """WARNING once per delivery whose handler has outlived a whole lease."""
        now = asyncio.get_running_loop().time()
        for d in running:
            if not d.warned and now - d.started > self.lease:
                d.warned = True
                log.warning(
                    "handler of message %s on %s has run %.1fs, longer than its %.1fs lease; "
                    "lease extended (see Settings.handler_timeout)",
                    d.item.id,
                    self.queue,
                    now - d.started,
                    self.lease,
                )

    async def stop(self, grace: float = 10.0) -> None:
        """Take no new rows; give in-flight handlers ``grace`` seconds, then cancel them.

        A cancelled handler's transaction rolls back and its row is released at
        once, so the message is delivered again promptly: nothing is lost.
        """
        self._stopping = True
        self.work.detach(self.queue, self)
        await self.work.poller.unwatch(self.queue, self.max_poll)
        self.work.waker.wake(self.queue)
        self._slot.set()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._inflight:
            _, late = await asyncio.wait(list(self._inflight), timeout=grace)
            left = [self._inflight[t] for t in late if t in self._inflight]
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            for delivery in left:
                await _quiet(delivery.nack(0.0))
        await self._settle_handoffs(grace)
        self._beat.cancel()
        await asyncio.gather(self._beat, return_exceptions=True)

    async def _settle_handoffs(self, grace: float) -> None:
        """Wait (within ``grace``) for transactions still handing us messages; release them."""
        with suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self._reserved:
                    self._slot.clear()
                    await self._slot.wait()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)


async def _quiet(aw: Awaitable[None]) -> None:
    try:
        await aw
    except Exception:
        log.exception("could not release a delivery")
