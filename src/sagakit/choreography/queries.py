"""``app.flows``: where is this business transaction, and what does it still owe?

Every choreography an App tracks is registered here; the reads go straight
to the tracker's tables (no transaction, no locks).
"""

from __future__ import annotations

import asyncio
import builtins
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DuplicateRegistration, FlowNotFound
from .contract import ChoreographyDefinition
from .rows import FlowRow, FlowRows, TimelineRow
from .shell import TIMER_QUEUE, Tracker, TrackerTimer
from .tracker import FINAL, expects, owed

if TYPE_CHECKING:
    from ..endpoint import Route, Scope
    from ..messages import Envelope
    from ..store import Store


@dataclass(frozen=True, slots=True)
class FlowView:
    """One tracked flow: status, what it did, what it still expects and owes."""

    flow: str
    correlation_id: str
    status: str
    started_at: float | None
    updated_at: float
    deadline_at: float | None
    done: list[str]
    failures: list[str]
    compensated: list[str]
    #: steps whose compensation is owed and not yet confirmed
    owed: list[str]
    #: event types the flow still waits for
    expects: list[str]
    events: int
    timeline: list[TimelineRow]

    @property
    def finished(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True, slots=True)
class StoryLine:
    """One line of a business transaction's history, from a flow or a saga."""

    at: float
    source: str  #: ``flow <choreography>`` or ``saga <definition>``
    entry: str  #: the timeline row's kind, or the saga history entry
    subject: str | None  #: the event type, or the saga step
    detail: str | None


class Flows:
    """Tracked choreographies of one App, and the queries on their flows."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.rows = FlowRows(store)
        self.trackers: dict[str, Tracker] = {}

    @property
    def definitions(self) -> dict[str, ChoreographyDefinition]:
        return {name: t.defn for name, t in self.trackers.items()}

    def register(self, defn: ChoreographyDefinition) -> Tracker:
        if defn.name in self.trackers:
            raise DuplicateRegistration(f"choreography {defn.name!r} is already tracked")
        tracker = self.trackers[defn.name] = Tracker(defn, self.store)
        return tracker

    def timer_route(self, env: Envelope) -> Route | None:
        from ..endpoint import Route

        return Route(self._on_timer) if env.type == "sagakit.TrackerTimer" else None

    async def _on_timer(self, scope: Scope) -> None:
        timer = scope.codec.payload(scope.env, TrackerTimer)
        tracker = self.trackers.get(timer.flow)
        if tracker is not None:  # a choreography no longer tracked here: nothing to do
            await tracker.on_timer(scope)

    # -- queries -------------------------------------------------------------

    async def get(
        self, correlation_id: str, *, flow: str | None = None, timeline: bool = True
    ) -> FlowView:
        """The flow with this correlation id (in choreography ``flow`` if several track it)."""
        rows = await self.rows.get(correlation_id, flow)
        if not rows:
            raise FlowNotFound(f"no tracked flow with correlation id {correlation_id!r}")
        return await self._view(rows[0], timeline)

    async def list(
        self,
        *,
        flow: str | None = None,
        status: str | None = None,
        older_than: float | None = None,
        limit: int = 100,
    ) -> list[FlowView]:
        """Flows by choreography and status; ``older_than`` seconds unchanged, oldest first."""
        before = self.store.clock.now() - older_than if older_than is not None else None
        rows = await self.rows.list(flow=flow, status=status, updated_before=before, limit=limit)
        return [await self._view(r, False) for r in rows]

    async def counts(self, *, flow: str | None = None) -> dict[str, int]:
        """Number of flows per status."""
        return await self.rows.counts(flow)

    async def history(self, correlation_id: str) -> builtins.list[StoryLine]:
        """The whole business transaction in one list, oldest first: the
        timelines of its tracked flows and the history of the saga with the
        same id (``ctx.start_saga`` uses the correlation id as the saga id)."""
        lines: builtins.list[StoryLine] = []
        for row in await self.rows.get(correlation_id):
            for t in await self.rows.history(row.flow, correlation_id):
                lines.append(StoryLine(t.at, f"flow {row.flow}", t.kind, t.type, t.reason))
        saga = await self.store.saga_get(correlation_id)
        if saga is not None:
            for e in await self.store.history(correlation_id):
                lines.append(StoryLine(e.at, f"saga {saga.type}", e.entry, e.step, e.detail))
        return sorted(lines, key=lambda line: line.at)

    async def wait(self, correlation_id: str, *, timeout: float = 30.0) -> FlowView:
        """Poll until the flow is finished (completed, compensated or failed)."""
        async with asyncio.timeout(timeout):
            delay = 0.01
            while True:
                rows = await self.rows.get(correlation_id)
                if rows and rows[0].status in FINAL:
                    return await self._view(rows[0], True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    async def _view(self, row: FlowRow, timeline: bool) -> FlowView:
        st = row.state
        tracker = self.trackers.get(row.flow)
        history = await self.rows.history(row.flow, row.correlation_id) if timeline else []
        return FlowView(
            row.flow,
            row.correlation_id,
            row.status,
            row.started_at,
            row.updated_at,
            st.deadline_at,
            list(st.done),
            list(st.failures),
            list(st.undone),
            owed(tracker.defn, st) if tracker else [],
            expects(tracker.defn, st) if tracker else [],
            st.events,
            history,
        )


__all__ = ["TIMER_QUEUE", "FlowView", "Flows", "StoryLine"]
