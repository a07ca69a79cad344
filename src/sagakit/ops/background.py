"""Housekeeping that runs beside the consumers: a job repeated every few seconds.

The retention pruner and the stuck-saga watcher are jobs like this. A job
that fails is logged and tried again next time: housekeeping must never stop
a worker that is otherwise doing its work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("sagakit.ops")


class Periodic:
    """Runs ``job`` every ``every`` seconds (the first run after one interval)."""

    def __init__(self, name: str, every: float, job: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.every = every
        self.job = job
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self, grace: float = 10.0) -> None:
        """Cancel the job; a run in progress rolls back its open transaction."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.run_once()

    async def run_once(self) -> None:
        try:
            await self.job()
        except Exception:
            log.warning("%s failed; trying again in %gs", self.name, self.every, exc_info=True)
