"""The tracker's shell: events in through the hop, decisions persisted.

A :class:`Tracker` consumes its own queue, ``sagakit.track.<name>``,
subscribed to every event type its contract names. Each event runs through
the same hop as any handler: the inbox admits it (so a duplicate is counted
once), the flow's row is locked, the pure :func:`~.tracker.observe` decides,
and the new state, the timeline rows, the timers and any published event
commit in one transaction with the inbox row.

Timers (the deadline, the hold on early events) are messages on the store's
own queue ``sagakit.track-timers``, like the coordinator's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ..endpoint import Route, Scope
from ..errors import MessageError
from ..inbox import SUCCESS
from ..messages import Envelope, caused_by, command
from ..observe.hooks import Finished
from .contract import ChoreographyDefinition
from .rows import FlowRows
from .tracker import (
    COMPLETED,
    FINAL,
    Arrived,
    Decision,
    FlowState,
    Input,
    TimerDue,
    new_state,
    observe,
    status,
)

if TYPE_CHECKING:
    from ..store import Store

TRACKER = "tracker"  #: the service name that runs trackers (``sagakit worker --service``)
TIMER_QUEUE = "sagakit.track-timers"


@command("sagakit.TrackerTimer")
class TrackerTimer(msgspec.Struct, frozen=True):
    flow: str
    correlation_id: str
    kind: str


def queue_of(name: str) -> str:
    return f"sagakit.track.{name}"


class Tracker:
    """Projects one choreography's events into flows, in one store."""

    def __init__(self, defn: ChoreographyDefinition, store: Store) -> None:
        self.defn = defn
        self.queue = queue_of(defn.name)
        self.rows = FlowRows(store)
        self.store = store
        self._types = frozenset(defn.watched())

    def route(self, env: Envelope) -> Route | None:
        if env.kind == "event" and env.type in self._types:
            return Route(self.on_event)
        return None

    async def on_event(self, scope: Scope) -> None:
        """Route: an event of the contract arrived."""
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        key, problem = self._key(scope)
        now = self.store.clock.now()
        arrived = Arrived(env.type, env.id, now, problem, trace=env.headers.traceparent)
        await self._run(scope, key, arrived, env)
        await scope.inbox.record(scope.tx, env, SUCCESS, None)

    async def on_timer(self, scope: Scope) -> None:
        """Route (timer queue): a deadline or hold came due."""
        timer = scope.codec.payload(scope.env, TrackerTimer)
        due = TimerDue("deadline" if timer.kind == "deadline" else "hold", self.store.clock.now())
        await self._run(scope, timer.correlation_id, due, None)

    def _key(self, scope: Scope) -> tuple[str, str | None]:
        """The correlation key and, if the payload is unusable, why."""
        env, field = scope.env, self.defn.correlate
        try:
            payload: Any = scope.codec.payload(env)
        except MessageError as exc:
            return env.headers.correlation_id or "", f"payload does not match: {exc}"
        if field is None:
            cid = env.headers.correlation_id
            return (cid, None) if cid else ("", "the event has no correlation id")
        value = getattr(payload, field, None)
        if not isinstance(value, str) or not value:
            return env.headers.correlation_id or "", f"the payload has no {field!r} key"
        return value, None

    async def _run(self, scope: Scope, key: str, what: Input, env: Envelope | None) -> None:
        tx, now, name = scope.tx, self.store.clock.now(), self.defn.name
        state = await self.rows.lock(tx, name, key, now) or new_state(self.defn, key)
        before = status(self.defn, state)
        decision = observe(self.defn, state, what)
        held = scope.codec.encode(env) if decision.hold and env is not None else None
        await self._persist(scope, decision, now, held)
        after = decision.state
        if decision.release_held:
            after = await self._release(scope, decision.state, now)
        if before not in FINAL:
            self._ended(scope, after, now)

    def _ended(self, scope: Scope, st: FlowState, now: float) -> None:
        """Tell the hooks if ``st`` is final (it was not before this input)."""
        outcome = status(self.defn, st)
        if outcome in FINAL:
            started = st.started_at if st.started_at is not None else now
            ended = Finished("flow", self.defn.name, st.correlation_id, st.correlation_id,
                             outcome, outcome != COMPLETED, st.trace, started, now)  # fmt: skip
            scope.hooks.finished(scope.tx, ended)

    async def _persist(
        self, scope: Scope, d: Decision, now: float, held: bytes | None = None
    ) -> None:
        st = d.state
        await self.rows.save(scope.tx, st, status(self.defn, st), now)
        await self.rows.write(scope.tx, st.flow, st.correlation_id, now, d.entries, held)
        for kind, seconds in d.timers:
            timer = TrackerTimer(st.flow, st.correlation_id, kind)
            headers = caused_by(scope.env, correlation_id=st.correlation_id)
            scope.out.schedule(scope.codec.make(timer, headers), TIMER_QUEUE, seconds)
        if d.stalled is not None:
            headers = caused_by(scope.env, correlation_id=st.correlation_id)
            scope.out.publish(scope.codec.make(d.stalled, headers))

    async def _release(self, scope: Scope, state: FlowState, now: float) -> FlowState:
        """Apply the events held for this flow, in the order they arrived."""
        for data in await self.rows.take_held(scope.tx, state.flow, state.correlation_id):
            env = scope.codec.decode(data, trusted=True)
            decision = observe(self.defn, state, Arrived(env.type, env.id, now, released=True))
            await self._persist(scope, decision, now)
            state = decision.state
        return state
