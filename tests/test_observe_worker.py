"""Telemetry across real processes: a coordinator killed with SIGKILL mid-saga
still yields the saga's whole trace; ``sagakit worker --metrics-port`` serves
``/metrics``, ``/healthz`` and ``/readyz``; the demo's counters match its outcomes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

import sagakit as sk
from sagakit.observe import Telemetry
from sagakit.observe.health import HealthServer
from tests.helpers import die_with_parent
from tests.workers import traced

pytestmark = pytest.mark.timeout(90)

APP = "tests.workers.traced:create"
ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(store: str, ready: Path, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sagakit.cli",
            "worker",
            "--app",
            APP,
            "--store",
            store,
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        preexec_fn=die_with_parent,
    )


def wait_for(check: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out:\n{proc.communicate()[0]}")
        time.sleep(0.05)


def spans_in(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starter(store: str, spans: Path) -> tuple[sk.App, TracerProvider]:
    """An App in this process that starts sagas (consumes nothing), tracing to ``spans``."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(traced.JsonLines(str(spans))))
    app = traced.create(store, run=[])
    app.instrument(Telemetry(tracer_provider=provider, metrics=False))
    return app, provider


def test_a_coordinator_killed_mid_saga_still_yields_the_whole_trace(tmp_path: Path) -> None:
    store, spans, go = f"sqlite:///{tmp_path}/s.db", tmp_path / "spans.jsonl", tmp_path / "go"
    env = {"SAGAKIT_TEST_SPANS": str(spans), "SAGAKIT_TEST_GO": str(go)}
    first = worker(store, tmp_path / "ready1", env=env)

    async def start() -> str:
        app, _ = starter(store, spans)
        async with app:
            return await app.sagas.start(traced.definition(), traced.Job("k"))

    try:
        wait_for((tmp_path / "ready1").exists, first)
        saga_id = asyncio.run(start())
        step_a = "saga.step traced/a"
        wait_for(lambda: any(s["name"] == step_a for s in spans_in(spans)), first)
        time.sleep(0.3)  # step b's command is in flight, its handler waiting for `go`
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=20)
    killed_ns = time.time_ns()
    go.touch()
    second = worker(store, tmp_path / "ready2", env=env)
    try:
        wait_for(lambda: any(s["name"] == "saga traced" for s in spans_in(spans)), second)
    finally:
        second.terminate()
        second.communicate(timeout=20)
    saga = [s for s in spans_in(spans) if s["name"].startswith("saga")]
    by_name = {s["name"]: s for s in saga}
    assert sorted(by_name) == sorted(
        ["saga.start traced", "saga traced"] + [f"saga.step traced/{n}" for n in "abc"]
    )
    assert len(saga) == 5, "each span once"
    assert {s["trace_id"] for s in saga} == {by_name["saga.start traced"]["trace_id"]}
    assert {s["attributes"]["sagakit.saga.id"] for s in saga} == {saga_id}
    start_id = by_name["saga.start traced"]["span_id"]
    steps = [by_name[f"saga.step traced/{n}"] for n in "abc"]
    assert all(s["parent_id"] == start_id for s in steps)
    b = steps[1]
    assert b["pid"] == second.pid, "emitted by the process that saw the reply"
    assert steps[0]["pid"] == first.pid
    assert b["start"] < killed_ns < b["end"], "b's span spans the kill: times come from the store"
    assert steps[0]["end"] <= b["start"] and b["end"] <= steps[2]["start"]
    assert by_name["saga traced"]["attributes"]["sagakit.saga.outcome"] == "completed"


def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_worker_serves_metrics_health_and_readiness(tmp_path: Path) -> None:
    store, port = f"sqlite:///{tmp_path}/s.db", free_port()
    proc = worker(store, tmp_path / "ready", "--metrics-port", str(port), env={})

    async def run_sagas() -> list[str]:
        async with traced.create(store, run=[]) as app:
            ids = [await app.sagas.start(traced.definition(), traced.Job(k)) for k in ("x", "y")]
            ids.append(await app.sagas.start(traced.definition(), traced.Job("refuse-z")))
            return [str((await app.sagas.wait(i, timeout=20)).state) for i in ids]

    try:
        wait_for((tmp_path / "ready").exists, proc)
        assert scrape(port, "/healthz").status_code == 200
        ready = scrape(port, "/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True, "problems": []}
        assert asyncio.run(run_sagas()) == ["completed", "completed", "compensated"]
        found = samples(scrape(port).text)
        assert scrape(port, "/nothing").status_code == 404
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    done = "sagakit_sagas_finished_total"
    assert value(found, done, saga_type="traced", outcome="completed") == 2
    assert value(found, done, saga_type="traced", outcome="compensated") == 1
    failures = "sagakit_step_failures_total"
    assert (
        value(
            found,
            failures,
            saga_type="traced",
            step="c",
            phase="forward",
            error_type="traced.Refused",
        )
        == 1
    )
    attempts = "sagakit_step_attempts_total"
    assert (
        value(found, attempts, saga_type="traced", step="a", phase="compensate", outcome="success")
        == 1
    )
    assert value(found, "sagakit_sagas_active", saga_type="traced", state="running") == 0
    assert value(found, "sagakit_timers_pending") == 0
    assert (
        value(
            found,
            "sagakit_step_duration_seconds_count",
            saga_type="traced",
            step="a",
            phase="forward",
        )
        == 3
    )


def test_readyz_says_503_while_the_store_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    store = "postgresql://nobody@127.0.0.1:1/none"  # nothing listens on port 1
    proc = worker(
        store, tmp_path / "ready", "--metrics-port", str(port), "--log-format", "json", env={}
    )
    try:
        wait_for(lambda: _answers(port), proc)
        assert scrape(port, "/healthz").status_code == 200
        ready = scrape(port, "/readyz")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and ready.json()["problems"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out  # waiting for a store is not a configuration error
    first = json.loads(out.splitlines()[0])  # --log-format json: one object per line
    assert first["level"] == "WARNING" and first["logger"] == "sagakit.worker"
    assert "cannot start yet" in first["message"] and first["time"].endswith("Z")


def _answers(port: int) -> bool:
    try:
        return scrape(port, "/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = worker(
            f"sqlite:///{tmp_path}/s.db", tmp_path / "r", "--metrics-port", str(port), env={}
        )
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert "--metrics-port" in out


async def test_demo_counters_equal_the_demos_own_outcomes(tmp_path: Path) -> None:
    from sagakit.examples.order_fulfillment import demo

    of = demo.build(f"sqlite:///{tmp_path}/demo.db", carrier=demo.FakeCarrier())
    telemetry = Telemetry(tracing=False, metrics=True)
    of.app.instrument(telemetry)
    plan = demo.make_plan(60, seed=3)
    await of.start()
    try:
        await demo.seed(of, plan)
        started = time.perf_counter()
        saga_ids = await demo.place_all(of, plan)
        await demo.wait_all(of, saga_ids, 60.0, None)
        args = argparse.Namespace(store="sqlite://", transport="database", seed=3)
        result = (
            await demo.check(of, plan, saga_ids, time.perf_counter() - started, args)
        ).to_json()
        server = HealthServer(of.app, telemetry.metrics, host="127.0.0.1", port=0)
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
        finally:
            await server.stop()
    finally:
        await of.stop()
    found = samples(text)
    done = "sagakit_sagas_finished_total"
    started_total = value(found, "sagakit_sagas_started_total", saga_type="create-order")
    assert result["pending"] == 0 and started_total == result["orders"] == 60
    for outcome in ("completed", "compensated"):
        assert value(found, done, saga_type="create-order", outcome=outcome) == result[outcome]
    failed = sum(
        value(found, done, saga_type="create-order", outcome=o) for o in ("failed", "aborted")
    )
    assert failed == result["failed"]
    assert result["compensated"] > 0 and result["completed"] > 0
    assert value(found, "sagakit_sagas_active", saga_type="create-order", state="running") == 0


def test_the_worker_exports_spans_over_otlp_when_an_endpoint_is_set(tmp_path: Path) -> None:
    """sagakit[otel] and OTEL_EXPORTER_OTLP_ENDPOINT: no code, spans reach the collector."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = f"sqlite:///{tmp_path}/s.db"
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_SERVICE_NAME": "shop-worker",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    proc = worker(store, tmp_path / "ready", env=env)

    async def one_saga() -> str:
        async with traced.create(store, run=[]) as app:
            saga_id = await app.sagas.start(traced.definition(), traced.Job("k"))
            return str((await app.sagas.wait(saga_id, timeout=20)).state)

    try:
        wait_for((tmp_path / "ready").exists, proc)
        assert asyncio.run(one_saga()) == "completed"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        server.shutdown()
    assert proc.returncode == 0, out
    names, services = set(), set()
    for path, body in received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            services |= {
                a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
            }
            names |= {s.name for ss in rs.scope_spans for s in ss.spans}
    assert services == {"shop-worker"}
    expected = {"process a", "process sagakit.coordinator", "saga.step traced/a", "saga traced"}
    assert expected <= names
