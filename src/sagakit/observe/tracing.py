"""OpenTelemetry spans: messaging spans per hop, saga spans per step attempt.

Only ``opentelemetry-api`` is imported; which SDK, sampler and exporter run is
the application's choice (``pip install 'sagakit[otel]'`` for the SDK and the
OTLP exporter, configured by the standard ``OTEL_*`` variables). With no SDK
installed every span is a no-op.

Messaging spans follow the OpenTelemetry messaging conventions:
``process <queue>`` (CONSUMER) around the hop; ``send <destination>``
(PRODUCER) when a message is written to the outbox outside a hop (a saga's
first command is created in ``saga.start``, so it has none either) and for
every event, its context injected as the envelope's ``traceparent``. A command
or reply written while a message is processed carries the ``process`` span's
context instead: that span covers the transaction that creates the message,
and the conventions make "create" spans optional (``send_spans`` makes a
``send`` span for every message). A command or reply continues the sender's
trace; an event starts a trace of its own linked to the sender
(``events_parent`` makes it a child instead).

Saga spans have saga meaning. ``saga.start TYPE`` is a short span whose
context is stored in the instance's progress record; every step attempt is
one span, ``saga.step TYPE/STEP`` or ``saga.compensate TYPE/STEP``, child of
that stored context, emitted when the attempt has ended with the start and
end times the store holds; ``saga TYPE`` covers the instance from creation to
its final state and is emitted when it gets there. No span stays open while a
saga waits, and a coordinator that restarts loses none.
"""

from __future__ import annotations

import math
import re
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .attempts import Attempt
from .hooks import Finished
from .traceparent import sampled

try:
    from opentelemetry import context, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import (
        INVALID_SPAN,
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "tracing needs OpenTelemetry: install sagakit[otel]", retryable=False
    ) from exc

if TYPE_CHECKING:
    from ..messages import Envelope
    from ..saga.definition import SagaDefinition
    from ..saga.machine import Instance
    from ..saga.state import Progress

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
NS = 1_000_000_000

#: the recording span sagakit made current in this task (a hop's, a saga start's)
_OWN: ContextVar[Any] = ContextVar("sagakit_span", default=None)


def parse(traceparent: str | None) -> SpanContext | None:
    """A remote span context from a W3C ``traceparent`` (None if absent or invalid)."""
    m = _TRACEPARENT.match(traceparent or "")
    if m is None:
        return None
    sc = SpanContext(int(m[1], 16), int(m[2], 16), True, TraceFlags(int(m[3], 16)))
    return sc if sc.is_valid else None


def format_traceparent(sc: SpanContext) -> str | None:
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) in a ``traceparent``."""
    sc = parse(traceparent)
    return f"{sc.trace_id:032x}" if sc is not None else None


class Tracing:
    """Makes sagakit's spans with one OpenTelemetry tracer."""

    def __init__(
        self,
        provider: Any = None,
        *,
        system: str = "sagakit",
        events_parent: bool = False,
        send_spans: bool = False,
    ) -> None:
        from .. import __version__

        self.tracer = trace.get_tracer("sagakit", __version__, tracer_provider=provider)
        self.system = system
        self.events_parent = events_parent
        self.send_spans = send_spans
        #: event types that continue their publisher's trace (a flow's, a process manager's)
        self.joined: frozenset[str] = frozenset()
        self._fixed: dict[tuple[str, str], dict[str, Any]] = {}
        self._remote: dict[str, Any] = {}
        self._stored: dict[str | None, Context | None] = {}

    # -- messaging --------------------------------------------------------------

    def process(self, env: Envelope, queue: str, group: str) -> AbstractContextManager[Any]:
        """The CONSUMER span around one message's hop, made current."""
        tp = env.headers.traceparent
        linked = env.kind == "event" and not self._parents(env.type)
        if tp is not None and not linked and not sampled(tp):
            return Current(self._unsampled(tp))  # an unsampled trace stays so, at no cost
        sender = parse(tp)
        links: list[Link] = []
        parent: Context | None = None
        if sender is not None and linked:
            links, parent = [Link(sender)], Context()
        elif sender is not None:
            parent = trace.set_span_in_context(NonRecordingSpan(sender), Context())
        attrs = self._messaging(env, queue, "process")
        attrs["messaging.consumer.group.name"] = group
        span = self.tracer.start_span(f"process {queue}", parent, SpanKind.CONSUMER, attrs, links)
        return Current(span, end=True)

    def _unsampled(self, traceparent: str) -> Any:
        """The current span of a hop in an unsampled trace (one per trace, reused)."""
        span = self._remote.get(traceparent)
        if span is None:
            if len(self._remote) >= 1024:
                self._remote.clear()
            sc = parse(traceparent)
            span = self._remote[traceparent] = Remote(sc, traceparent) if sc else INVALID_SPAN
        return span

    def _parents(self, event_type: str) -> bool:
        return self.events_parent or event_type in self.joined

    def send(self, env: Envelope, destination: str) -> None:
        """The outgoing message's trace context: the hop's, or a PRODUCER span's."""
        span = trace.get_current_span()
        if type(span) is Remote:  # an unsampled hop: its context, as it came
            env.headers.traceparent = span.traceparent
            return
        current = span.get_span_context()
        if current.is_valid and (
            not current.trace_flags.sampled
            or (span is _OWN.get() and env.kind != "event" and not self.send_spans)
        ):
            env.headers.traceparent = format_traceparent(current)
            return
        span = self.tracer.start_span(
            f"send {destination}",
            kind=SpanKind.PRODUCER,
            attributes=self._messaging(env, destination, "send"),
        )
        tp = format_traceparent(span.get_span_context())
        if tp is not None:
            env.headers.traceparent = tp
        span.end()

    def carry(self, env: Envelope) -> None:
        """Give a message with no trace context the current one (no span of its own)."""
        if env.headers.traceparent is None:
            current = trace.get_current_span().get_span_context()
            env.headers.traceparent = format_traceparent(current)

    def _messaging(self, env: Envelope, destination: str, op: str) -> dict[str, Any]:
        fixed = self._fixed.get((destination, op))
        if fixed is None:
            fixed = self._fixed[destination, op] = {
                "messaging.system": self.system,
                "messaging.operation.name": op,
                "messaging.operation.type": op,
                "messaging.destination.name": destination,
            }
        h = env.headers
        attrs = {
            **fixed,
            "messaging.message.id": env.id,
            "sagakit.message.type": env.type,
        }
        if h.correlation_id:
            attrs["messaging.message.conversation_id"] = h.correlation_id
        if h.saga_id:
            attrs["sagakit.saga.id"] = h.saga_id
        return attrs  # the kind is in the type, the causation in the span's parent

    # -- sagas ------------------------------------------------------------------

    def saga_start(
        self, defn: SagaDefinition[Any], saga_id: str, progress: Progress
    ) -> AbstractContextManager[Any]:
        """The short span of a saga's start; its context is stored in ``progress``."""
        span = self.tracer.start_span(
            f"saga.start {defn.name}",
            kind=SpanKind.INTERNAL,
            attributes=_saga_attrs(saga_id, defn.name, defn.version, progress.correlation_id),
        )
        progress.trace = format_traceparent(span.get_span_context())
        return Current(span, end=True)

    def attempt(self, inst: Instance, a: Attempt, end: float) -> None:
        """Emit the span of one finished step attempt, under the saga's start span."""
        verb = "saga.compensate" if a.phase == "compensate" else "saga.step"
        attrs = _saga_attrs(inst.id, inst.type, inst.version, inst.progress.correlation_id)
        attrs.update(
            {
                "sagakit.step.name": a.step,
                "sagakit.step.phase": a.phase,
                "sagakit.step.kind": a.kind,
                "sagakit.step.attempt": a.attempt,
                "sagakit.step.outcome": a.outcome,
                "messaging.message.id": a.message_id,
            }
        )
        if a.error_type:
            attrs["error.type"] = a.error_type
        status = (
            Status(StatusCode.ERROR, a.error) if a.failed and a.outcome != "cancelled" else None
        )
        name = f"{verb} {inst.type}/{a.step}"
        self._emit(name, inst.progress.trace, attrs, a.started, end, status)

    def saga_end(self, inst: Instance, created: float, end: float) -> None:
        """Emit the span of a whole saga, from its creation to its final state."""
        attrs = _saga_attrs(inst.id, inst.type, inst.version, inst.progress.correlation_id)
        attrs["sagakit.saga.outcome"] = inst.state.value
        status = None
        if inst.state.value in ("failed", "compensated", "aborted"):
            attrs["error.type"] = inst.state.value
            status = Status(StatusCode.ERROR, inst.error or inst.state.value)
        start = math.floor(created * 1000) / 1000  # the resolution of the steps' times
        self._emit(f"saga {inst.type}", inst.progress.trace, attrs, start, end, status)

    def finished(self, f: Finished) -> None:
        """Emit the span of a flow or a process-manager instance, under its stored context."""
        prefix = f"sagakit.{f.kind}."
        attrs: dict[str, Any] = {prefix + "name": f.name, prefix + "outcome": f.outcome or ""}
        if f.kind == "process":
            attrs[prefix + "key"] = f.key
        if f.correlation_id:
            attrs["messaging.message.conversation_id"] = f.correlation_id
        status = None
        if f.error:
            attrs["error.type"] = f.outcome or "error"
            status = Status(StatusCode.ERROR, f.outcome)
        name = f"flow {f.name}" if f.kind == "flow" else f"process-manager {f.name}"
        self._emit(name, f.trace, attrs, f.started, f.ended, status)

    def _emit(
        self,
        name: str,
        traceparent: str | None,
        attrs: dict[str, Any],
        start: float,
        end: float,
        status: Status | None,
    ) -> None:
        parent = self._parent(traceparent)
        if parent is None:
            return  # the saga's trace was not sampled: neither are its steps
        span = self.tracer.start_span(
            name, parent, SpanKind.INTERNAL, attrs, start_time=int(start * NS)
        )
        if status is not None:
            span.set_status(status)
        span.end(end_time=int(max(end, start) * NS))

    def _parent(self, traceparent: str | None) -> Context | None:
        """The parent of spans under a stored context (None: not sampled), parsed once
        per saga (its steps and its end share it)."""
        try:
            return self._stored[traceparent]
        except KeyError:
            pass
        if len(self._stored) >= 1024:
            self._stored.clear()
        stored = parse(traceparent)
        parent: Context | None = Context()
        if stored is not None:
            kept = stored.trace_flags.sampled
            parent = trace.set_span_in_context(NonRecordingSpan(stored)) if kept else None
        self._stored[traceparent] = parent
        return parent


class Remote(NonRecordingSpan):
    """A sender's unsampled context, with the ``traceparent`` it came in."""

    def __init__(self, context: SpanContext, traceparent: str) -> None:
        super().__init__(context)
        self.traceparent = traceparent


class Current:
    """Makes a span current for a ``with`` block, and ends it if ``end``
    (what ``use_span`` does, for less)."""

    __slots__ = ("end", "own", "span", "token")

    def __init__(self, span: Any, *, end: bool = False) -> None:
        self.span, self.end = span, end
        self.token: object = None
        self.own: Token[Any] | None = None

    def __enter__(self) -> Any:
        self.token = context.attach(trace.set_span_in_context(self.span))
        if self.end:
            self.own = _OWN.set(self.span)
        return self.span

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        context.detach(self.token)  # type: ignore[arg-type]
        if self.own is None:
            return
        _OWN.reset(self.own)
        if exc is not None and isinstance(exc, Exception):
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {exc}"))
        self.span.end()


def _saga_attrs(saga_id: str, type_: str, version: int, correlation_id: str) -> dict[str, Any]:
    return {
        "sagakit.saga.id": saga_id,
        "sagakit.saga.type": type_,
        "sagakit.saga.version": version,
        "messaging.message.conversation_id": correlation_id,
    }
