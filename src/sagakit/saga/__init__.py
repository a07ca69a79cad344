"""Orchestrated sagas.

- :mod:`.definition`: the builder (``Saga(...).step(...).build()``), validated at build time
- :mod:`.state`: the typed states and the progress record
- :mod:`.machine`: the pure state machine — instance + event -> instance + effects
- :mod:`.coordinator`: the thin shell that loads, applies, persists and sends
- :mod:`.queries`, :mod:`.operator`: reading instances and acting on them

:class:`Sagas` is what an App exposes as ``app.sagas``.
"""

from __future__ import annotations

import builtins
from typing import Any, TypeVar

from ..ops import Actor
from .coordinator import Coordinator
from .definition import Saga, SagaDefinition, StepDef
from .operator import SagaOperator
from .queries import SagaQueries, SagaView
from .registry import SagaRegistry
from .state import SagaState

D = TypeVar("D")


class Sagas:
    """``app.sagas``: start sagas, wait for them, read them, act on them."""

    def __init__(self, registry: SagaRegistry, coordinator: Coordinator) -> None:
        self.registry = registry
        self.coordinator = coordinator
        self.queries = SagaQueries(coordinator.store, registry)
        self.operator = SagaOperator(coordinator)

    @property
    def definitions(self) -> dict[tuple[str, int], SagaDefinition[Any]]:
        return self.registry.definitions

    async def start(
        self,
        definition: SagaDefinition[D],
        data: D,
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Start an instance; idempotent on ``saga_id``. Returns the saga id."""
        return await self.coordinator.start(
            definition, data, saga_id=saga_id, correlation_id=correlation_id
        )

    async def wait(
        self, saga_id: str, timeout: float = 30.0, poll: float = 1.0, *, history: bool = False
    ) -> SagaView:
        """Wait until the instance is final (no busy polling; see :class:`SagaQueries`)."""
        return await self.queries.wait(saga_id, timeout, poll, history=history)

    async def get(self, saga_id: str, *, history: bool = True) -> SagaView:
        return await self.queries.get(saga_id, history=history)

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
        """Instances by type, state, age or (``stuck_for`` seconds) lack of progress.

        Oldest first (longest unchanged first with ``stuck_for``), at most
        ``limit``; the next page starts ``after`` the last id of this one.
        """
        return await self.queries.list(
            type=type,
            state=state,
            older_than=older_than,
            stuck_for=stuck_for,
            limit=limit,
            after=after,
        )

    async def counts(self, *, type: str | None = None) -> dict[str, int]:
        return await self.queries.counts(type=type)

    async def count_stuck(self, stuck_for: float, *, type: str | None = None) -> int:
        """Running or compensating instances unchanged for ``stuck_for`` seconds."""
        return await self.queries.count_stuck(stuck_for, type=type)

    async def retry(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        await self.operator.retry(saga_id, actor=actor, reason=reason)

    async def skip(
        self, saga_id: str, *, actor: Actor, reason: str, step: str | None = None
    ) -> None:
        await self.operator.skip(saga_id, actor=actor, reason=reason, step=step)

    async def compensate(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        await self.operator.compensate(saga_id, actor=actor, reason=reason)

    async def abort(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        await self.operator.abort(saga_id, actor=actor, reason=reason)

    async def resume(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        await self.operator.resume(saga_id, actor=actor, reason=reason)

    async def edit(
        self, saga_id: str, patch: builtins.list[dict[str, Any]], *, actor: Actor, reason: str
    ) -> None:
        await self.operator.edit(saga_id, patch, actor=actor, reason=reason)


__all__ = [
    "Saga",
    "SagaDefinition",
    "SagaState",
    "SagaView",
    "Sagas",
    "StepDef",
]
