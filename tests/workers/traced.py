"""A worker app whose spans go to a JSON-lines file, for ``sagakit worker``.

``SAGAKIT_TEST_SPANS`` names the file; the OpenTelemetry SDK is configured
here, at import, as an application would, so ``sagakit worker`` finds the
provider and traces. Step ``b`` waits (polling) until the file named by
``SAGAKIT_TEST_GO`` exists, so a test can kill the process while a step is in
flight. Sagas with a key starting ``refuse-`` fail at step ``c``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import sagakit as sk

STEPS = ("a", "b", "c")


class JsonLines(SpanExporter):
    """Appends each finished span to a file at once (it survives a SIGKILL)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for s in spans:
                f.write(json.dumps(as_dict(s)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return SpanExportResult.SUCCESS


def as_dict(s: ReadableSpan) -> dict[str, Any]:
    return {
        "name": s.name,
        "kind": s.kind.name,
        "trace_id": f"{s.context.trace_id:032x}",
        "span_id": f"{s.context.span_id:016x}",
        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
        "start": s.start_time,
        "end": s.end_time,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "links": [f"{link.context.span_id:016x}" for link in s.links],
        "pid": os.getpid(),
    }


if os.environ.get("SAGAKIT_TEST_SPANS"):
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(JsonLines(os.environ["SAGAKIT_TEST_SPANS"])))
    trace.set_tracer_provider(_provider)


@sk.command("traced.Do")
class Do(msgspec.Struct, frozen=True):
    key: str


@sk.command("traced.Undo")
class Undo(msgspec.Struct, frozen=True):
    key: str


@dataclass
class Job:
    key: str


class Refused(sk.BusinessError):
    code = "traced.Refused"


def definition() -> sk.SagaDefinition[Job]:
    saga = sk.Saga("traced", Job)
    for name in STEPS:
        saga.step(name).invoke(name, lambda d: Do(d.key)).compensate(name, lambda d: Undo(d.key))
    return saga.build()


def create(store: str, run: list[str] | None = None) -> sk.App:
    app = sk.App(store, settings=sk.Settings(lease=1.0, max_poll=0.05), run=run)
    for name in STEPS:
        _participant(app.participant(name), name)
    app.saga(definition())
    return app


def _participant(part: sk.Participant, name: str) -> None:
    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        go = os.environ.get("SAGAKIT_TEST_GO")
        while name == "b" and go and not Path(go).exists():
            await asyncio.sleep(0.05)
        if name == "c" and cmd.key.startswith("refuse-"):
            raise Refused(f"{name} refuses {cmd.key}")

    @part.command(Undo)
    async def undo(cmd: Undo, ctx: sk.Context) -> None:
        return None
