"""Logs carry the ids of the message being handled; a failed saga is logged once;
compensation failures, retries and duplicates are counted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

import sagakit as sk
from sagakit.messages import Headers
from sagakit.observe import ContextFilter, JsonFormatter, Telemetry, TextFormatter
from sagakit.observe.attempts import sent_at
from sagakit.observe.metrics import Metrics
from sagakit.store import open_store
from sagakit.testing import drop_tables
from tests.helpers import Data, DidIt, Do, Refused, Undo, eventually
from tests.saga_harness import Plan, bench, linear


@pytest.fixture
def records() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(old)


def lines(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_a_handlers_log_records_carry_the_saga_step_and_message(
    tmp_path: Path, records: io.StringIO
) -> None:
    app = sk.App(f"sqlite:///{tmp_path}/t.db")
    part = app.participant("reserve")
    mine = logging.getLogger("user.handler")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> DidIt:
        mine.info("reserving for %s", cmd.key)
        return DidIt(1)

    defn = app.saga(linear("logged", ["reserve"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"), correlation_id="order-9")
        await app.sagas.wait(saga_id, timeout=10)
    mine_lines = [r for r in lines(records) if r["logger"] == "user.handler"]
    assert len(mine_lines) == 1
    r = mine_lines[0]
    assert r["message"] == "reserving for k"
    assert r["saga_id"] == saga_id and r["step"] == "reserve"
    assert r["correlation_id"] == "order-9"
    assert sent_at(r["message_id"]) is not None  # the command's own id
    assert r["time"].endswith("Z") and r["level"] == "INFO"


def test_text_lines_have_a_timestamp_and_the_ids() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.saga_id, record.step = "s-1", "ship"
    text = TextFormatter().format(record)
    assert text.endswith("WARNING x: hello you [saga=s-1 step=ship]")
    assert text[4] == "-" and text[10] == "T"


async def test_a_failed_saga_is_logged_once_and_compensation_failures_counted(
    tmp_path: Path, records: io.StringIO
) -> None:
    telemetry = Telemetry(tracing=False, metrics=True)
    app = sk.App(f"sqlite:///{tmp_path}/t.db")
    app.instrument(telemetry)
    plan = Plan(refuse={"k": {"b"}}, crash_undo_times={("k", "a"): 5})
    bench(app, ["a", "b"], plan)
    policy = sk.RetryPolicy(max_attempts=2, initial=0.01, max_delay=0.01)
    defn = app.saga(linear("fragile", ["a", "b"], compensation_retry=policy))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"))
        view = await app.sagas.wait(saga_id, timeout=10)
    assert view.state == sk.SagaState.FAILED
    warnings = [r for r in lines(records) if "failed:" in r["message"]]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "WARNING" and warnings[0]["saga_id"] == saga_id
    assert "gave up after 2 attempts" in warnings[0]["message"]
    assert telemetry.metrics is not None
    text = generate_latest(telemetry.metrics.registry).decode()
    assert (
        "sagakit_compensation_failures_total"
        '{error_type="test.Refused",saga_type="fragile",step="a"} 2.0' in text
    )
    assert 'sagakit_sagas_finished_total{outcome="failed",saga_type="fragile"} 1.0' in text
    assert (
        "sagakit_step_attempts_total"
        '{outcome="failure",phase="forward",saga_type="fragile",step="b"} 1.0' in text
    )


async def test_a_duplicate_delivery_is_counted(tmp_path: Path) -> None:
    telemetry = Telemetry(tracing=False, metrics=True)
    app = sk.App(f"sqlite:///{tmp_path}/t.db")
    app.instrument(telemetry)
    bench(app, ["a"], Plan())
    defn = app.saga(linear("dup", ["a"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"))
        await app.sagas.wait(saga_id, timeout=10)
        sent = [e for e in await app.store.history(saga_id) if e.entry == "command-sent"]
        # the command arrives again, as after a broker redelivery: same saga, step, phase
        headers = Headers(
            saga_id=saga_id, step="a", phase="forward", reply_to="sagakit.coordinator"
        )
        copy = app.codec.make(Do("k"), headers, id=sent[0].message_id)
        async with app.store.transaction() as tx:
            await app.store.queue.put(tx, "a", copy.id, app.codec.encode(copy))
        assert telemetry.metrics is not None
        registry = telemetry.metrics.registry
        await eventually(lambda: _has(registry, 'sagakit_inbox_duplicates_total{consumer="a"} 1.0'))


async def _has_async(registry: object, line: str) -> bool:
    return line in generate_latest(registry).decode()  # type: ignore[arg-type]


def _has(registry: object, line: str) -> Awaitable[bool]:
    return _has_async(registry, line)


def test_a_gauge_name_is_registered_once() -> None:
    m = Metrics()

    async def read() -> dict[tuple[str, ...], float]:
        return {("x",): 1.0}

    m.gauge("tracker_unmatched_events", "Events no flow instance matched", ["flow"], read)
    with pytest.raises(sk.DuplicateRegistration):
        m.gauge("tracker_unmatched_events", "again", ["flow"], read)


@pytest.mark.parametrize("recorded", [True, False])
async def test_step_latencies_carry_the_trace_id_as_an_exemplar(
    tmp_path: Path, recorded: bool
) -> None:
    """Step and saga durations point at the saga's trace, unless it was not sampled."""
    import httpx
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    from sagakit.observe.health import HealthServer

    sampler = ALWAYS_ON if recorded else ALWAYS_OFF
    telemetry = Telemetry(tracer_provider=TracerProvider(sampler=sampler), metrics=True)
    app = sk.App(f"sqlite:///{tmp_path}/t.db")
    app.instrument(telemetry)
    bench(app, ["a"], Plan())
    defn = app.saga(linear("ex", ["a"]))
    async with app:
        saga_id = await app.sagas.start(defn, Data("k"))
        await app.sagas.wait(saga_id, timeout=10)
        rec = await app.store.saga_get(saga_id)
        server = HealthServer(app, telemetry.metrics, host="127.0.0.1", port=0)
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                url = f"http://127.0.0.1:{server.port}/metrics"
                om = await client.get(url, headers={"Accept": "application/openmetrics-text"})
                plain = await client.get(url)
        finally:
            await server.stop()
    assert rec is not None
    trace = json.loads(rec.progress)["trace"]
    trace_id = trace.split("-")[1]
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    for histogram in ("step_duration_seconds_bucket", "saga_duration_seconds_bucket"):
        bucket = [line for line in om.text.splitlines() if histogram in line]
        assert bucket
        marked = any(f'# {{trace_id="{trace_id}"}}' in line for line in bucket)
        assert marked is recorded
    if not recorded:  # an unsampled trace id would point at nothing
        assert "trace_id" not in om.text
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text


async def _did(cmd: Do, ctx: sk.Context) -> DidIt:
    return DidIt(1)


async def _refuse(cmd: Do, ctx: sk.Context) -> DidIt:
    raise Refused("not now")


async def _nothing(cmd: Undo, ctx: sk.Context) -> None:
    return None


Gauges = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def read_gauges(m: Metrics) -> Gauges:
    from prometheus_client.parser import text_string_to_metric_families

    await m.refresh()
    text = generate_latest(m.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def gauge(g: Gauges, name: str, **labels: str) -> float | None:
    return g.get((f"sagakit_{name}", frozenset(labels.items())))


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
async def test_store_wide_gauges_describe_what_waits(
    tmp_path: Path, db: str, prefix: str, request: pytest.FixtureRequest
) -> None:
    from sagakit.observe import TelemetryOptions

    url = f"sqlite:///{tmp_path}/t.db"
    if db == "postgresql":
        url = str(request.getfixturevalue("postgres_url"))
    options = TelemetryOptions(stuck_after=0.2, long_retry=3)
    telemetry = Telemetry(tracing=False, metrics=True, options=options)
    # nothing runs participant "a" here: its commands wait, and their sagas get stuck
    app = sk.App(
        url, settings=sk.Settings(max_poll=0.02, prefix=prefix), run=["b", "c", "coordinator"]
    )
    app.instrument(telemetry)
    for name in ("a", "b", "c"):  # "c" always refuses: its saga retries it for ever
        part = app.participant(name)
        part.command(Undo)(_nothing)
        part.command(Do)(_refuse if name == "c" else _did)
    hold = app.saga(linear("hold", ["a"]))
    forever = sk.RetryPolicy.forever(initial=0.01, max_delay=0.02)
    retry = app.saga(linear("retry", ["b", "c"], retriable={"c": forever}))
    m = telemetry.metrics
    assert m is not None

    async def settled() -> bool:
        g = await read_gauges(m)
        return (
            gauge(g, "sagas_stuck", saga_type="hold") == 1
            and gauge(g, "dead_letters", store="app", queue="b") == 1
            and gauge(g, "steps_long_retrying", saga_type="retry", step="c", phase="forward") == 1
        )

    try:
        async with app:
            await app.sagas.start(hold, Data("h"))
            await app.sagas.start(retry, Data("r"))
            async with app.store.transaction() as tx:  # bytes no codec can read, for b
                await app.store.queue.put(tx, "b", "junk-1", b"not json")
            await eventually(settled, timeout=15)
            g = await read_gauges(m)
    finally:
        async with open_store(url, prefix=prefix) as store:
            await drop_tables(store)
    assert gauge(g, "sagas_active", saga_type="hold", state="running") == 1
    assert (gauge(g, "saga_oldest_active_age_seconds", saga_type="hold") or 0) > 0.2
    assert gauge(g, "sagas_failed", saga_type="hold") is None  # none failed
    assert (gauge(g, "timers_pending") or 0) >= 0
    assert gauge(g, "outbox_pending", store="app") == 0  # the database transport: no relay
