"""Reading saga instances: one, many, counts, and waiting for one to finish.

:meth:`SagaQueries.wait` does not poll the database in a loop: it watches the
wake-up that the commit finishing the saga sends — directly in this process,
through LISTEN/NOTIFY from other processes on PostgreSQL — and re-reads the
instance only then. A slow poll (``poll`` seconds) remains as the fallback
for what no notification reaches (SQLite shared by several processes).
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import SagaNotFound, WaitTimeout
from ..store.core import SagaRecord
from .coordinator import finished
from .state import TERMINAL, SagaState, progress_decoder

if TYPE_CHECKING:
    from ..store import LogEntry, Store
    from .registry import SagaRegistry


@dataclass
class SagaView:
    """A saga instance as the query API returns it.

    ``state``: ``running``, ``compensating``, ``completed``, ``compensated``,
    ``failed`` or ``aborted``. ``data``: the saga's data, as its steps left it.
    ``done``, ``compensated``, ``pending``: step names. ``history``: the log
    of every command, reply, timer and operator action (empty when asked
    for without history). ``created_at``, ``updated_at``: Unix times.

    ``error`` is None for a saga that went well, else one line saying why it
    did not:

    - ``step 'NAME' failed: CODE: MESSAGE``: a step's failure started the
      compensation. CODE is the ``BusinessError.code``, or for a technical
      failure that exhausted its retries the exception's class name
      (``step 'charge' failed: RuntimeError: boom``); a missing reply reads
      ``step 'NAME' failed: timeout after Ns``;
    - ``step 'NAME' (forward|compensate) gave up after N attempts: REASON``:
      a step after the pivot or a compensation ran out of retries, and the
      saga stopped in ``failed``;
    - ``step 'NAME' succeeded but its reply could not be applied: REASON``
      (``failed``);
    - ``deadline passed``, ``forced by operator``, ``aborted by operator``.

    A compensation that gives up replaces the reason that started the
    compensation with its own ``gave up`` line.
    """

    id: str
    type: str
    version: int
    state: SagaState
    data: Any
    error: str | None
    created_at: float
    updated_at: float
    done: list[str]
    compensated: list[str]
    pending: list[str]
    history: list[LogEntry] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class SagaQueries:
    """Read-only views of one store's saga instances."""

    def __init__(self, store: Store, registry: SagaRegistry) -> None:
        self.store = store
        self.registry = registry

    async def get(self, saga_id: str, *, history: bool = True) -> SagaView:
        rec = await self.store.saga_get(saga_id)
        if rec is None:
            raise SagaNotFound(f"no saga {saga_id!r}", saga_id=saga_id)
        return await self.view(rec, history)

    async def list(
        self,
        *,
        type: str | None = None,
        state: str | None = None,
        older_than: float | None = None,
        stuck_for: float | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SagaView]:
        """Instances by type, state and age (seconds since creation), oldest first.

        ``stuck_for``: only running or compensating instances that have not
        changed for that many seconds, longest unchanged first. At most
        ``limit`` come back; for the next page pass the last one's id as
        ``after``.
        """
        now = self.store.clock.now()
        recs = await self.store.saga_list(
            type=type,
            state=state,
            created_before=_ago(now, older_than),
            stuck_before=_ago(now, stuck_for),
            limit=limit,
            after=after,
        )
        return [await self.view(r, history=False) for r in recs]

    async def count_stuck(self, stuck_for: float, *, type: str | None = None) -> int:
        """How many running or compensating instances have not changed for ``stuck_for`` s."""
        return await self.store.saga_count_stuck(self.store.clock.now() - stuck_for, type=type)

    async def counts(self, *, type: str | None = None) -> dict[str, int]:
        """Number of instances per state."""
        return await self.store.saga_counts(type=type)

    async def wait(
        self, saga_id: str, timeout: float = 30.0, poll: float = 1.0, *, history: bool = False
    ) -> SagaView:
        """Wait until the instance reaches a final state; :class:`WaitTimeout` if not.

        The view comes without its history unless ``history=True`` (one query
        more; :meth:`get` has it too).
        """
        waker, name = self.store.queue.waker, finished(saga_id)
        woken = waker.watch(name)
        try:
            async with asyncio.timeout(timeout):
                return await self._until_final(saga_id, woken, poll, history)
        except TimeoutError:
            raise WaitTimeout(
                f"saga {saga_id} not final after {timeout}s", saga_id=saga_id
            ) from None
        finally:
            waker.unwatch(name)
            waker.forget(name)

    async def _until_final(
        self, saga_id: str, woken: asyncio.Event, poll: float, history: bool
    ) -> SagaView:
        waker, name = self.store.queue.waker, finished(saga_id)
        look = not waker.unwoken(name)  # unwoken: started here and not ended yet
        while True:
            woken.clear()  # a commit after this read sets it again
            offered = waker.taken(name)  # the final record a commit in this process left
            rec = offered if isinstance(offered, SagaRecord) else None
            if rec is None and look:
                rec = await self.store.saga_get(saga_id)
            look = True  # after a wake-up or a poll: read
            if rec is not None and rec.state in TERMINAL:
                return await self.view(rec, history)
            with suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), poll)

    async def view(self, rec: SagaRecord, history: bool) -> SagaView:
        progress = progress_decoder.decode(rec.progress)
        defn = self.registry.definitions.get((rec.type, rec.version))
        if defn is not None:
            data = self.registry.machine(rec.type, rec.version).decode(defn.data_type, rec.data)
        else:
            data = msgspec.json.decode(rec.data)
        return SagaView(
            rec.id,
            rec.type,
            rec.version,
            SagaState(rec.state),
            data,
            rec.error,
            rec.created_at,
            rec.updated_at,
            list(progress.done),
            list(progress.compensated),
            sorted(progress.pending),
            await self.store.history(rec.id) if history else [],
        )


def _ago(now: float, seconds: float | None) -> float | None:
    return None if seconds is None else now - seconds
