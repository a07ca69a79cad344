"""The outbox relay: publishes committed outbox rows to a broker transport.

Rows are claimed in batches with a lease (``SKIP LOCKED`` on PostgreSQL), so
several relays share the work without doing it twice in the normal case. A
relay that dies after publishing but before deleting makes the batch be
published again: consumers dedupe by message id, so nothing is lost or applied
twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from .endpoint import OUTBOX_QUEUE
from .errors import SagakitError
from .messages import Kind
from .store.core import Queued
from .transport import Outgoing
from .transport.database import first_poll

if TYPE_CHECKING:
    from .store import Store
    from .transport import Transport

log = logging.getLogger("sagakit.relay")


class Relay:
    """Moves one store's outbox to a transport."""

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        batch: int = 256,
        lease: float = 30.0,
        max_poll: float = 0.25,
    ) -> None:
        self.store, self.transport = store, transport
        self.batch, self.lease, self.max_poll = batch, lease, max_poll
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sagakit-relay")

    async def stop(self) -> None:
        self._stopping = True
        self.store.waker.wake(OUTBOX_QUEUE)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        first = first_poll(self.store, self.max_poll)
        idle = first
        while not self._stopping:
            try:
                moved = await self.relay_once()
            except SagakitError as exc:
                log.warning("relay failed, will retry: %s", exc)
                moved = 0
            if moved == self.batch:
                continue  # a full batch: there may be more
            await self.store.wait(OUTBOX_QUEUE, idle)
            idle = first if moved else min(idle * 2, self.max_poll)

    async def relay_once(self) -> int:
        """Publish one batch; return how many rows moved."""
        items = await self.store.claim(OUTBOX_QUEUE, self.batch, self.lease)
        if not items:
            return 0
        try:
            await self.transport.publish([_outgoing(i) for i in items])
        except Exception:
            for item in items:
                await self.store.release(item, 1.0)
            raise
        async with self.store.transaction() as tx:
            for item in items:
                await self.store.ack(tx, item)
        return len(items)


def _outgoing(item: Queued) -> Outgoing:
    kind, _, dest = (item.destination or "").partition(":")
    return Outgoing(item.id, cast(Kind, kind), dest, item.data)
