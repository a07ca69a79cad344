"""Choreographed flows and process managers in one trace per business transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import sagakit as sk
from sagakit.examples.checkout import CheckoutStarted, checkout, install_payments
from tests.choreo_trip import contract, install, request
from tests.test_observe_tracing import attrs, traced, until

pytestmark = pytest.mark.timeout(60)
FAST = sk.Settings(max_poll=0.01, retry=sk.RetryPolicy(max_attempts=3, initial=0.01))


def named(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


@pytest.mark.parametrize("flight_full", [False, True])
async def test_a_choreographed_flow_across_three_services_is_one_trace(
    tmp_path: Path, flight_full: bool
) -> None:
    app, exporter = traced(tmp_path, settings=FAST)
    install(app)  # hotels, airline and trips, each reacting to the previous one's event
    app.track(contract().build())
    async with app:
        await request(app, "t1", flight_full=flight_full)
        view = await app.flows.wait("t1", timeout=10)
        await until(lambda: bool(named(exporter.get_finished_spans(), "flow ")))
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    handlers = {attrs(s)["messaging.consumer.group.name"] for s in named(spans, "process ")}
    assert {"hotels", "airline", "trips", "sagakit.track.book-trip"} <= handlers
    # every event continues its publisher's trace: each process span has a parent
    assert all(s.parent is not None for s in named(spans, "process "))
    root = next(s for s in spans if s.parent is None)
    assert root.name == "send trip.Requested" and root.kind is SpanKind.PRODUCER
    (flow,) = named(spans, "flow ")
    assert flow.name == "flow book-trip"
    assert flow.parent is not None and flow.parent.span_id == root.context.span_id
    a = attrs(flow)
    assert a["sagakit.flow.name"] == "book-trip"
    assert a["sagakit.flow.outcome"] == view.status
    assert a["messaging.message.conversation_id"] == "t1"
    assert view.status == ("compensated" if flight_full else "completed")
    if flight_full:
        assert flow.status.status_code is StatusCode.ERROR
        assert a["error.type"] == "compensated"
    # the flow span runs from the start event's arrival to the last event's
    assert flow.start_time is not None and flow.end_time is not None
    assert flow.start_time < flow.end_time


async def test_an_event_outside_any_flow_still_starts_a_linked_trace(tmp_path: Path) -> None:
    """The join is for events of a tracked choreography: without ``app.track`` the same
    events link to their publisher (the messaging conventions' default)."""
    app, exporter = traced(tmp_path, settings=FAST)
    install(app)
    async with app:
        await request(app, "t2")
        await until(
            lambda: any(s.name == "send trip.Confirmed" for s in exporter.get_finished_spans())
        )
    spans = exporter.get_finished_spans()
    processes = named(spans, "process ")
    assert all(s.parent is None and len(s.links) == 1 for s in processes)
    assert len({s.context.trace_id for s in spans}) > 1


async def test_a_process_manager_instance_is_one_trace_with_its_commands(tmp_path: Path) -> None:
    app, exporter = traced(tmp_path, settings=FAST)
    app.process(checkout)
    install_payments(app)
    async with app:
        await app.processes.send(checkout, CheckoutStarted("o1", 10, ["declined-1", "visa"]))
        view = await app.processes.wait(checkout, "o1", timeout=20)
        await until(lambda: bool(named(exporter.get_finished_spans(), "process-manager")))
    assert view.status == "paid"
    spans = exporter.get_finished_spans()
    trace_ids = {s.context.trace_id for s in spans}
    assert len(trace_ids) == 1
    (instance,) = named(spans, "process-manager ")
    assert instance.name == "process-manager checkout"
    a: dict[str, Any] = attrs(instance)
    assert a["sagakit.process.name"] == "checkout"
    assert a["sagakit.process.key"] == "o1"
    assert a["sagakit.process.outcome"] == "paid"
    assert "messaging.message.conversation_id" in a
    # its commands (two charges: one declined, one accepted) are in that trace
    commands = [
        s for s in named(spans, "process ") if attrs(s)["sagakit.message.type"] == "payments.Charge"
    ]
    assert len(commands) >= 2
    root = next(s for s in spans if s.parent is None)
    assert instance.parent is not None and instance.parent.span_id == root.context.span_id
