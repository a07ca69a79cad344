"""``app.processes``: register process managers, send them messages, read them.

::

    app.process(checkout)                        # register (each name once)
    await app.processes.send(checkout, CheckoutStarted("o-1", 4200))
    view = await app.processes.wait(checkout, "o-1")
    for line in await app.processes.tree("o-1"):  # process, sagas it started, one tree
        print(line)
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DuplicateRegistration, SagaNotFound, WaitTimeout
from ..messages import Headers, spec_of
from ..outbox import Outbox
from .definition import ProcessManager
from .machine import Armed
from .records import HistoryEntry, ProcessTable
from .runtime import ProcessRuntime, done_name

if TYPE_CHECKING:
    from ..outbox import OutboxWriter
    from ..saga.coordinator import Coordinator


@dataclass(frozen=True, slots=True)
class ProcessView:
    """An instance as read from the store."""

    process: str
    key: str
    status: str | None
    state: Any
    done: bool
    timers: dict[str, Armed]
    correlation_id: str | None
    history: list[HistoryEntry]


class Processes:
    """The process managers of an App and their instances."""

    def __init__(self, writer: OutboxWriter, coordinator: Coordinator) -> None:
        self.writer = writer
        self.store = writer.store
        self.coordinator = coordinator
        self.table = ProcessTable(self.store)
        self.runtimes: dict[str, ProcessRuntime] = {}

    @property
    def managers(self) -> dict[str, ProcessManager[Any]]:
        return {name: rt.pm for name, rt in self.runtimes.items()}

    def register(self, pm: ProcessManager[Any]) -> ProcessRuntime:
        if pm.name in self.runtimes:
            raise DuplicateRegistration(f"process manager {pm.name!r} is already registered")
        rt = self.runtimes[pm.name] = ProcessRuntime(pm, self.table, self.coordinator)
        return rt

    async def send(
        self, pm: ProcessManager[Any], message: Any, *, correlation_id: str | None = None
    ) -> str:
        """Deliver a message to ``pm`` (an event is published to every subscriber).

        Returns the message id; sending is one transaction of the App's store.
        """
        env = self.writer.codec.make(message, Headers(correlation_id=correlation_id))
        out = Outbox()
        if spec_of(type(message)).kind == "event":
            out.publish(env)
        else:
            out.send(env, pm.queue)
        async with self.store.transaction() as tx:
            await self.writer.flush(tx, out)
        return env.id

    async def get(
        self, pm: ProcessManager[Any] | str, key: str, *, history: bool = True
    ) -> ProcessView:
        """An instance; :class:`~sagakit.SagaNotFound` if there is none under ``key``."""
        name = pm if isinstance(pm, str) else pm.name
        rec = await self.table.get(name, key)
        if rec is None:
            raise SagaNotFound(f"no {name} instance {key!r}")
        inst = self.runtimes[name].instance(rec)
        lines = await self.table.history(name, key) if history else []
        return ProcessView(
            name, key, inst.status, inst.state, inst.done, dict(inst.timers),
            inst.correlation_id, lines,
        )  # fmt: skip

    async def wait(
        self, pm: ProcessManager[Any], key: str, timeout: float = 30.0, poll: float = 0.5
    ) -> ProcessView:
        """Wait until the instance completes; :class:`~sagakit.WaitTimeout` if it does not."""
        waker, name = self.store.queue.waker, done_name(pm.name, key)
        woken = waker.watch(name)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    woken.clear()
                    rec = await self.table.get(pm.name, key)
                    if rec is not None and rec.done:
                        return await self.get(pm, key)
                    with suppress(TimeoutError):
                        await asyncio.wait_for(woken.wait(), poll)
        except TimeoutError:
            raise WaitTimeout(f"{pm.name} instance {key!r} not done after {timeout}s") from None
        finally:
            waker.unwatch(name)

    async def history(
        self,
        pm: ProcessManager[Any] | str | None = None,
        key: str | None = None,
        *,
        correlation_id: str | None = None,
    ) -> list[HistoryEntry]:
        """The decision history of one instance, one process manager or one correlation id."""
        name = pm.name if isinstance(pm, ProcessManager) else pm
        return await self.table.history(name, key, correlation_id=correlation_id)

    async def counts(self, pm: ProcessManager[Any]) -> dict[str, int]:
        """Instances by status."""
        return await self.table.counts(pm.name)

    async def tree(self, correlation_id: str) -> list[str]:
        """One business transaction as an indented tree: the process managers'
        decisions, and under each decision that started a saga, that saga's history."""
        lines = []
        for e in await self.table.history(correlation_id=correlation_id):
            lines.append(_line(e))
            for saga_type, saga_id in e.detail.get("sagas", []):
                lines.append(f"    saga {saga_type} {saga_id}")
                for entry in await self.store.history(saga_id):
                    lines.append(f"        {entry.entry} {entry.step or ''}".rstrip())
        return lines


def _line(e: HistoryEntry) -> str:
    move = f"{e.status_before} -> {e.status_after}" if e.status_before != e.status_after else ""
    out = " ".join(f"{c[1]}>{c[0]}" for c in e.detail.get("sent", []))
    pub = " ".join(f"+{t}" for t in e.detail.get("published", []))
    parts = [f"{e.process}[{e.key}]", e.message_type, e.verdict, move, out, pub]
    return " ".join(p for p in parts if p)
