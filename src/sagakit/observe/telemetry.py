"""Telemetry: the hooks that turn what the engine does into spans and metrics.

::

    from sagakit.observe import Telemetry

    telemetry = Telemetry(tracing=True, metrics=True)
    app = App("postgresql://…", "amqp://…")
    app.instrument(telemetry)          # before start()
    await telemetry.serve(app, port=9464)   # /metrics, /healthz, /readyz

Spans and metrics about a saga's steps are made when the coordinator's
transaction commits, from the stored instance (see
:mod:`sagakit.observe.attempts`), so a rolled-back or repeated decision is
not counted twice and a restarted coordinator picks up where the other
stopped.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..saga.machine import Started
from .attempts import Attempt, decided_at, ended
from .hooks import Finished, Hooks
from .logging import MessageContext
from .traceparent import sampled, trace_id

if TYPE_CHECKING:
    from ..app import App
    from ..messages import Envelope
    from ..outbox import Outbox
    from ..saga.definition import SagaDefinition
    from ..saga.machine import Decision, Event, Instance
    from ..saga.state import Progress
    from ..store import Tx
    from ..store.core import SagaRecord
    from .health import HealthServer
    from .metrics import Metrics
    from .tracing import Tracing


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    """What to observe and how.

    ``events_parent``: a handled event's span is a child of the publisher's
    (default: a new trace linked to it). ``send_spans``: a ``send`` span for
    every message, also for the commands and replies written while a message
    is processed (default: those carry the ``process`` span's context, one
    span less per hop). ``stuck_after``: the age without
    progress at which ``sagakit_sagas_stuck`` counts a saga (None: the App's
    ``Settings.stuck_after``, else 300 s). ``long_retry``: the attempt from
    which ``sagakit_steps_long_retrying`` counts a step.
    """

    events_parent: bool = False
    send_spans: bool = False
    stuck_after: float | None = None
    long_retry: int = 5


class Telemetry(Hooks):
    """OpenTelemetry tracing and/or Prometheus metrics for one App."""

    def __init__(
        self,
        *,
        tracing: bool = True,
        metrics: bool = True,
        tracer_provider: Any = None,
        registry: Any = None,
        options: TelemetryOptions | None = None,
    ) -> None:
        self.options = options or TelemetryOptions()
        self.tracing: Tracing | None = None
        self.metrics: Metrics | None = None
        self._provider = tracer_provider
        if tracing:
            from .tracing import Tracing

            self.tracing = Tracing(
                tracer_provider,
                events_parent=self.options.events_parent,
                send_spans=self.options.send_spans,
            )
        if metrics:
            from .metrics import Metrics

            self.metrics = Metrics(registry)
        self.app: App | None = None
        self._joined: frozenset[str] | None = None

    # -- wiring -------------------------------------------------------------------

    def bind(self, app: App) -> None:
        """Called by :meth:`App.instrument`: learn the transport and the stores."""
        self.app = app
        if self.tracing is not None:
            self.tracing.system = messaging_system(app)
        if self.metrics is not None and "sagas_active" not in self.metrics:
            from .gauges import StoreGauges

            stuck = self.options.stuck_after or app.settings.stuck_after or 300.0
            gauges = StoreGauges(
                app.store,
                lambda: _stores(app),
                stuck_after=stuck,
                long_retry=self.options.long_retry,
            )
            gauges.register(self.metrics)
            if app.twophase.resources:
                register_twophase(self.metrics, app)

    async def serve(self, app: App, port: int, host: str = "0.0.0.0") -> HealthServer:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` for ``app`` on ``port``."""
        from .health import HealthServer

        server = HealthServer(app, self.metrics, host=host, port=port)
        await server.start()
        return server

    # -- hooks ----------------------------------------------------------------------

    def processing(self, env: Envelope, endpoint: str) -> AbstractContextManager[Any]:
        if self.tracing is None:
            return MessageContext(env)
        if self._joined is None and self.app is not None:  # every registration is done
            self._joined = self.tracing.joined = joined_types(self.app)
        return _Both(MessageContext(env), self.tracing.process(env, endpoint, endpoint))

    def sending(self, out: Outbox) -> None:
        if self.tracing is not None:
            for env, destination in out.messages:
                self.tracing.send(env, destination)
            for env, _, _ in out.scheduled:  # timers: fired later, in the same trace
                self.tracing.carry(env)

    def saga_starting(
        self, defn: SagaDefinition[Any], saga_id: str, progress: Progress
    ) -> AbstractContextManager[Any]:
        if self.tracing is None:
            return super().saga_starting(defn, saga_id, progress)
        return self.tracing.saga_start(defn, saga_id, progress)

    def decided(
        self,
        tx: Tx,
        rec: SagaRecord,
        defn: SagaDefinition[Any],
        before: Instance,
        decision: Decision,
        event: Event,
    ) -> None:
        super().decided(tx, rec, defn, before, decision, event)
        if self.metrics is None and not sampled(before.progress.trace):
            return  # an unsampled saga and no metrics: nothing to record
        now = decided_at(before, decision, time.time())
        attempts = ended(defn, before, decision, event, now)
        after = decision.instance
        finished = after.state.terminal and (
            before.state != after.state or isinstance(event, Started)
        )
        if attempts or finished or isinstance(event, Started):
            created = rec.created_at
            tx.on_commit(lambda: self._committed(after, event, attempts, finished, created, now))

    def _committed(
        self,
        inst: Instance,
        event: Event,
        attempts: list[Attempt],
        finished: bool,
        created: float,
        now: float,
    ) -> None:
        tracing = self.tracing if sampled(inst.progress.trace) else None
        for a in attempts:
            if tracing is not None:
                tracing.attempt(inst, a, now)
            if self.metrics is not None:
                _count_attempt(self.metrics, inst, a, now)
        if finished and tracing is not None:
            tracing.saga_end(inst, created, now)
        if self.metrics is not None:
            if isinstance(event, Started):
                self.metrics.child(self.metrics.started, inst.type).inc()
            if finished:
                _count_finished(self.metrics, inst, now - created)

    def finished(self, tx: Tx, what: Finished) -> None:
        tracing = self.tracing
        if tracing is not None and sampled(what.trace):
            tx.on_commit(lambda: tracing.finished(what))

    def duplicate(self, consumer: str) -> None:
        if self.metrics is not None:
            self.metrics.duplicates.labels(consumer).inc()

    def outage(self, endpoint: str) -> None:
        if self.metrics is not None:
            self.metrics.outage_waits.labels(endpoint).inc()

    def relayed(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.relay_published.inc(count)


class _Both:
    """Two context managers entered in order and left in reverse (an ExitStack, for less)."""

    __slots__ = ("inner", "outer")

    def __init__(self, outer: MessageContext, inner: AbstractContextManager[Any]) -> None:
        self.outer, self.inner = outer, inner

    def __enter__(self) -> Any:
        self.outer.__enter__()
        try:
            return self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)


def exemplar(inst: Instance) -> dict[str, str] | None:
    """The saga's trace id for a histogram's exemplar, if its trace was recorded."""
    tp = inst.progress.trace
    tid = trace_id(tp) if sampled(tp) else None
    return {"trace_id": tid} if tid is not None else None


def _count_attempt(m: Metrics, inst: Instance, a: Attempt, now: float) -> None:
    ex = exemplar(inst)
    m.child(m.step_duration, inst.type, a.step, a.phase).observe(now - a.started, ex)
    m.child(m.attempts, inst.type, a.step, a.phase, a.outcome).inc()
    if a.failed and a.outcome != "cancelled":
        error = a.error_type or a.outcome
        m.child(m.failures, inst.type, a.step, a.phase, error).inc()
        if a.phase == "compensate":
            m.child(m.compensation_failures, inst.type, a.step, error).inc()


def _count_finished(m: Metrics, inst: Instance, duration: float) -> None:
    outcome = inst.state.value
    m.child(m.finished, inst.type, outcome).inc()
    m.child(m.saga_duration, inst.type, outcome).observe(max(0.0, duration), exemplar(inst))


def register_twophase(m: Metrics, app: App) -> None:
    """Gauges of atomic groups in doubt (:mod:`sagakit.twophase`), read at scrape time."""

    async def in_doubt() -> dict[tuple[str, ...], float]:
        return {(): float((await app.twophase.gauges()).in_doubt)}

    async def oldest() -> dict[tuple[str, ...], float]:
        return {(): (await app.twophase.gauges()).oldest_age}

    m.gauge("twophase_in_doubt", "Prepared branches of this node in doubt", [], in_doubt)
    m.gauge("twophase_oldest_prepared_age_seconds", "Age of the oldest branch in doubt", [], oldest)


def joined_types(app: App) -> frozenset[str]:
    """The event types that continue their publisher's trace: those of a tracked
    choreography and those a process manager handles (one business transaction)."""
    types = {t for d in app.flows.definitions.values() for t in d.watched()}
    for pm in app.processes.managers.values():
        types |= {trigger for kind, trigger in pm.handlers if kind in ("start", "message")}
    return frozenset(types)


def messaging_system(app: App) -> str:
    """``messaging.system``: the broker's name, or the database's for the database transport."""
    module = type(app.transport).__module__.rsplit(".", 1)[-1]
    if module == "database":
        return app.store.dialect
    return module


def _stores(app: App) -> dict[str, Any]:
    """The stores whose outbox and dead letters this process reports, by name."""
    stores: dict[str, Any] = {"app": app.store}
    for name in app.participants:
        own = app.store_of(name)
        if own is not app.store and app.runs(name):
            stores[name] = own
    return stores
