"""One look for due messages across a process's queues, instead of a claim per queue.

On PostgreSQL a consumer is woken when work arrives (a commit in this
process, a NOTIFY from another), so an idle consumer polls only for what
nobody announces: delayed messages and timers coming due, the lease of a
dead consumer running out, a row another process released with a delay.
Rather than every idle consumer (and the relay) claiming on its own every
``max_poll``, one task per store asks every ``max_poll`` which watched
queues hold a due row, in one statement, and wakes only those; an idle
process with ten queues sends one statement per interval instead of ten
claims. A watched consumer still claims on its own every
:data:`SAFETY_POLL_S`, so a poller that fails (the database away), or a
wake-up it does not give, delays work by at most that. (With 5 s, three of
seven chaos runs over RabbitMQ recovered from a kill in 9-10 s where every
run without the poller took at most 6.7 s: some work was found only by a
consumer's own claim, not yet explained; 1 s bounds it, see performance.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from ..errors import SagakitError

if TYPE_CHECKING:
    from .queue import WorkQueue

log = logging.getLogger("sagakit.store.due")

#: how often a watched consumer claims on its own, whatever the poller does
SAFETY_POLL_S = 1.0


class DuePoller:
    """Wakes the watched queues of one store that hold a due row (PostgreSQL)."""

    def __init__(self, work: WorkQueue) -> None:
        self.work = work
        #: queue -> the poll intervals of the consumers watching it
        self._watched: dict[str, list[float]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, queue: str, every: float) -> None:
        """Look at ``queue`` at least every ``every`` seconds from now on."""
        self._watched.setdefault(queue, []).append(every)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sagakit-due-poller")

    async def unwatch(self, queue: str, every: float) -> None:
        """Undo one :meth:`watch`; the last one stops the poller."""
        intervals = self._watched.get(queue, [])
        if every in intervals:
            intervals.remove(every)
        if not intervals:
            self._watched.pop(queue, None)
        if not self._watched and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _every(self) -> float:
        return min((e for intervals in self._watched.values() for e in intervals), default=1.0)

    async def _run(self) -> None:
        while self._watched:
            await asyncio.sleep(self._every() * (0.8 + 0.4 * random.random()))
            await self.poll_once()

    async def poll_once(self) -> list[str]:
        """Wake every watched queue that holds a due row now; the queues woken."""
        try:
            due = await self.work.due(sorted(self._watched))
        except SagakitError as exc:
            log.debug("looking for due messages failed: %s", exc)
            return []
        except Exception:  # never let the poller die: consumers would fall back to SAFETY_POLL_S
            log.exception("looking for due messages failed unexpectedly")
            return []
        for queue in due:
            self.work.waker.wake(queue)
        return due
