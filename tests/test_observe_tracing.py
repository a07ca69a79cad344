"""Traces: one per saga, a span per step attempt, compensations named as such."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import sagakit as sk
from sagakit.observe import Telemetry, TelemetryOptions
from tests.helpers import Data
from tests.saga_harness import Plan, bench, linear

STEPS = ["reserve", "stock", "charge", "ship"]


def traced(
    tmp_path: Path, transport: str = "database", settings: sk.Settings | None = None, **options: Any
) -> tuple[sk.App, InMemorySpanExporter]:
    """An App on SQLite whose spans go to an in-memory exporter (``options``: TelemetryOptions)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = sk.App(f"sqlite:///{tmp_path}/t.db", transport, settings=settings)
    telemetry = Telemetry(
        tracer_provider=provider, metrics=False, options=TelemetryOptions(**options)
    )
    app.instrument(telemetry)
    return app, exporter


def saga_spans(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    steps = [s for s in spans if s.name.startswith(("saga.step", "saga.compensate"))]
    return sorted(steps, key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_compensated_saga_is_one_trace_in_execution_order(tmp_path: Path) -> None:
    app, exporter = traced(tmp_path)
    plan = Plan(refuse={"k1": {"charge"}})
    bench(app, STEPS, plan)
    defn = app.saga(linear("order", STEPS, pivot="ship"))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k1"))
        view = await app.sagas.wait(saga_id, timeout=10)
    assert view.state == sk.SagaState.COMPENSATED
    spans = exporter.get_finished_spans()
    steps = saga_spans(spans)
    assert [s.name for s in steps] == [
        "saga.step order/reserve",
        "saga.step order/stock",
        "saga.step order/charge",
        "saga.compensate order/stock",
        "saga.compensate order/reserve",
    ]
    assert len({s.context.trace_id for s in spans if s.name.startswith("saga")}) == 1
    start = next(s for s in spans if s.name == "saga.start order")
    whole = next(s for s in spans if s.name == "saga order")
    assert all(s.parent is not None and s.parent.span_id == start.context.span_id for s in steps)
    for s in steps:
        a = attrs(s)
        assert a["sagakit.saga.id"] == saga_id
        assert a["sagakit.saga.type"] == "order"
        assert a["sagakit.saga.version"] == 1
        assert a["sagakit.step.attempt"] == 1
        assert a["sagakit.step.kind"] == "compensatable"
        assert a["sagakit.step.name"] == s.name.rsplit("/", 1)[1]
        assert a["sagakit.step.phase"] == ("compensate" if "compensate" in s.name else "forward")
        assert s.start_time is not None and s.end_time is not None
        assert s.start_time <= s.end_time
    failing = attrs(steps[2])
    assert failing["sagakit.step.outcome"] == "failure"
    assert failing["error.type"] == "test.Refused"
    assert steps[2].status.status_code is StatusCode.ERROR
    assert {attrs(s)["sagakit.step.outcome"] for s in steps[:2] + steps[3:]} == {"success"}
    # each span ends before the next begins: the saga ran them one after another
    assert all(a.end_time <= b.start_time for a, b in itertools.pairwise(steps))  # type: ignore[operator]
    assert attrs(whole)["sagakit.saga.outcome"] == "compensated"
    assert whole.start_time <= steps[0].start_time  # type: ignore[operator]
    assert whole.end_time >= steps[-1].end_time  # type: ignore[operator]


async def test_messaging_spans_follow_the_conventions(tmp_path: Path) -> None:
    app, exporter = traced(tmp_path, send_spans=True)
    bench(app, ["reserve"], Plan())
    defn = app.saga(linear("one", ["reserve"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"), correlation_id="order-7")
        await app.sagas.wait(saga_id, timeout=10)
    spans = exporter.get_finished_spans()
    send = next(s for s in spans if s.name == "send reserve")
    process = next(s for s in spans if s.name == "process reserve")
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    a = attrs(process)
    assert a["messaging.system"] == "sqlite"
    assert a["messaging.operation.type"] == "process"
    assert a["messaging.destination.name"] == "reserve"
    assert a["messaging.consumer.group.name"] == "reserve"
    assert a["messaging.message.conversation_id"] == "order-7"
    assert a["messaging.message.id"] == attrs(send)["messaging.message.id"]
    assert attrs(send)["messaging.operation.type"] == "send"
    # a command continues its sender's trace: the consumer span is the producer's child
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    # with send_spans the reply written in the hop has its own PRODUCER span too
    reply_send = next(s for s in spans if s.name == "send sagakit.coordinator")
    assert reply_send.parent is not None and reply_send.parent.span_id == process.context.span_id
    reply = next(s for s in spans if s.name == "process sagakit.coordinator")
    assert reply.parent is not None and reply.parent.span_id == reply_send.context.span_id


@pytest.mark.parametrize("db_only", [False, True])
async def test_a_hop_is_the_creation_context_of_the_messages_it_writes(
    tmp_path: Path, db_only: bool
) -> None:
    """By default a command or reply written during a hop gets no span of its own:
    it carries the ``process`` span's context, and the start's command ``saga.start``'s.
    A ``db_only`` step's reply, decided on in the step's own hop, keeps the same shape."""
    app, exporter = traced(tmp_path)
    bench(app, ["reserve", "stock"], Plan(db_only=db_only))
    defn = app.saga(linear("two", ["reserve", "stock"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"))
        await app.sagas.wait(saga_id, timeout=10)
    spans = exporter.get_finished_spans()
    assert not [s for s in spans if s.kind is SpanKind.PRODUCER]
    by_id = {s.context.span_id: s for s in spans}
    chain = [s for s in spans if s.kind is SpanKind.CONSUMER]
    parents = sorted((by_id[s.parent.span_id].name, s.name) for s in chain if s.parent is not None)
    assert parents == [
        ("process reserve", "process sagakit.coordinator"),
        ("process sagakit.coordinator", "process stock"),
        ("process stock", "process sagakit.coordinator"),
        ("saga.start two", "process reserve"),
    ]
    assert len({s.context.trace_id for s in spans}) == 1
    # start, two hops per step, a span per step attempt, the whole saga
    assert len(spans) == 1 + 4 + 2 + 1


@pytest.mark.parametrize("parent", [False, True])
async def test_events_link_to_their_publisher_by_default(tmp_path: Path, parent: bool) -> None:
    from tests.helpers import DidIt, Do, Happened

    app, exporter = traced(tmp_path, events_parent=parent)
    source, listener = app.participant("source"), app.participant("listener")
    seen: list[str] = []

    @source.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> DidIt:
        ctx.publish(Happened(cmd.key))
        return DidIt(1)

    @listener.event(Happened)
    async def on_happened(e: Happened, ctx: sk.Context) -> None:
        seen.append(e.key)

    defn = app.saga(linear("pub", ["source"]))
    async with app:
        await app.sagas.start(defn, Data("x"))
        await until(lambda: bool(seen))
    spans = exporter.get_finished_spans()
    send = next(s for s in spans if s.name == "send test.Happened")
    process = next(s for s in spans if s.name == "process listener")
    if parent:
        assert process.context.trace_id == send.context.trace_id
    else:
        assert process.context.trace_id != send.context.trace_id
        assert [link.context.span_id for link in process.links] == [send.context.span_id]


async def until(check: Any, timeout: float = 10.0) -> None:
    import asyncio

    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_the_trace_crosses_a_broker_through_the_relay(tmp_path: Path, redis_url: str) -> None:
    """Over Redis Streams the outbox is relayed; the traceparent rides in the envelope."""
    import uuid

    import redis.asyncio as aioredis

    ns = f"sktrace-{uuid.uuid4().hex[:10]}"
    app, exporter = traced(tmp_path, f"{redis_url}?namespace={ns}&lease=2")
    bench(app, ["reserve", "stock"], Plan())
    defn = app.saga(linear("relayed", ["reserve", "stock"]))
    try:
        async with app:
            saga_id = await app.sagas.start(defn, Data("k"))
            view = await app.sagas.wait(saga_id, timeout=20)
    finally:
        raw = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in raw.scan_iter(match=f"{ns}:*", count=500)]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
    assert view.state == sk.SagaState.COMPLETED
    spans = exporter.get_finished_spans()
    process = next(s for s in spans if s.name == "process stock")
    assert attrs(process)["messaging.system"] == "redis"
    # the command was written by the coordinator's hop, relayed, and consumed
    assert process.parent is not None
    sender = next(s for s in spans if s.context.span_id == process.parent.span_id)
    assert sender.name == "process sagakit.coordinator"
    saga_traces = {s.context.trace_id for s in spans if s.name.startswith("saga")}
    assert saga_traces == {process.context.trace_id}


async def test_an_unsampled_saga_makes_no_span_and_its_hops_keep_its_context(
    tmp_path: Path,
) -> None:
    """With a parent-based sampler that says no, every hop runs in the saga's
    unsampled context (a user's span in a handler joins it) and nothing is exported."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    from tests.helpers import DidIt, Do

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = sk.App(f"sqlite:///{tmp_path}/t.db")
    app.instrument(Telemetry(tracer_provider=provider, metrics=False))
    seen: list[Any] = []
    for name in ("first", "second"):

        @app.participant(name).command(Do)
        async def do(cmd: Do, ctx: sk.Context) -> DidIt:
            with provider.get_tracer("user").start_as_current_span("user work"):
                seen.append(trace.get_current_span().get_span_context())
            return DidIt(1)

    defn = app.saga(linear("quiet", ["first", "second"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"))
        view = await app.sagas.wait(saga_id, timeout=10)
        rec = await app.store.saga_get(saga_id)
    assert view.state == sk.SagaState.COMPLETED and rec is not None
    stored = json.loads(rec.progress)["trace"]
    assert not int(stored[-2:], 16) & 1  # the start's "not sampled", kept with the saga
    assert [f"{sc.trace_id:032x}" for sc in seen] == [stored.split("-")[1]] * 2
    assert not any(sc.trace_flags.sampled for sc in seen)
    assert exporter.get_finished_spans() == ()
