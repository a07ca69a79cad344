"""The cost of telemetry (issue #18): the 3-step saga with tracing and metrics off and on.

The saga of ``sagas.py`` (three participants and the coordinator in this
process, database transport on SQLite), 32 sagas in flight, in four modes:
no telemetry; Prometheus metrics only; OpenTelemetry tracing only (the SDK
recording every span, batched to an exporter that counts and drops them, so
the cost is sagakit's and the SDK's, not a network's); both; tracing with no
trace sampled, and tracing and both with one trace in ten
(``parentbased_traceidratio`` 0 and 0.1); and "hooks": a ``Telemetry`` with
neither, which makes no span and no metric (what instrumenting alone costs). The
modes run interleaved, ``--rounds`` times each (after one dropped warm-up
run; each round starts one mode later than the previous), and the table gives
the median. Spans per saga count the warm-up's sagas too (their spans are
exported with the rest).

    python benchmarks/observe.py [--duration 3] [--rounds 3] [--quick] [--json]
    python benchmarks/observe.py --span-cost   # the SDK alone: CPU per span

``--span-cost`` times the OpenTelemetry SDK by itself (no sagakit): start and
end spans with 0, 5 and 10 attributes through the same batch processor and
counting exporter, and prints the CPU time per span (the export thread's
included), which bounds what any number of spans per saga can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import benchlib as bl
from contenders import Sagakit, drive
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

import sagakit as sk

MODES = ("off", "hooks", "metrics", "tracing", "both", "tracing 0%", "tracing 10%", "both 10%")


class Counting(SpanExporter):
    """Counts the spans it is given and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def one(mode: str, store: str, prefix: str, args: argparse.Namespace) -> dict[str, Any]:
    c = Sagakit(store, prefix)
    exporter, provider = Counting(), None
    if mode != "off":
        if mode not in ("metrics", "hooks"):
            ratio = {"0%": 0.0, "10%": 0.1}.get(mode.rsplit(" ", 1)[-1], 1.0)
            provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
            provider.add_span_processor(BatchSpanProcessor(exporter))
        telemetry = sk.Telemetry(
            tracing=provider is not None,
            metrics=not mode.startswith(("tracing", "hooks")),
            tracer_provider=provider,
        )
        c.app.instrument(telemetry)
    out = await drive(
        c,
        variant=args.variant,
        in_flight=args.in_flight,
        duration=args.duration,
        count=None,
        warmup=args.warmup,
    )
    if provider is not None:
        provider.shutdown()
    out["spans"] = exporter.spans
    return out


async def run(args: argparse.Namespace) -> list[list[Any]]:
    tmp = tempfile.mkdtemp(prefix="sagakit-observe-")
    modes = tuple(args.modes)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    prefix = f"sko{os.getpid()}_"
    try:
        await one("off", f"sqlite:///{tmp}/warm.db", prefix, args)  # warms the process; dropped
        for r in range(args.rounds):
            for k in range(len(modes)):  # each round starts one mode later: no mode always first
                i = (r + k) % len(modes)
                store = f"sqlite:///{tmp}/r{r}m{i}.db"
                results[modes[i]].append(await one(modes[i], store, prefix, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(o["sagas_per_s"] for o in results["off"])
    rows = []
    for mode in modes:
        outs = results[mode]
        rate = statistics.median(o["sagas_per_s"] for o in outs)
        rows.append(
            [
                mode,
                args.in_flight,
                rate,
                round(100.0 * (base - rate) / base, 1) if base else 0.0,
                statistics.median(o["p50_ms"] for o in outs),
                statistics.median(o["p99_ms"] for o in outs),
                statistics.median(o["cpu_ms_per_saga"] for o in outs),
                round(statistics.median(o["spans"] / max(o["total_sagas"], 1) for o in outs), 1),
            ]
        )
    return rows


def span_cost(n: int = 20000) -> list[list[Any]]:
    """CPU microseconds per SDK span with 0, 5 and 10 attributes (no sagakit)."""
    rows = []
    for count in (0, 5, 10):
        exporter = Counting()
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracer = provider.get_tracer("span-cost")
        attrs = {f"messaging.attribute_{i}": f"value-{i}" for i in range(count)}
        t0 = time.process_time()
        for _ in range(n):
            tracer.start_span("process queue", attributes=attrs).end()
        provider.shutdown()  # the export thread's work is counted too
        rows.append([count, n, round((time.process_time() - t0) / n * 1e6, 1), exporter.spans])
    return rows


HEADERS = (
    "telemetry",
    "in flight",
    "sagas/s",
    "cost %",
    "p50 ms",
    "p99 ms",
    "CPU ms/saga",
    "spans/saga",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode (median)")
    ap.add_argument("--in-flight", type=int, default=32)
    ap.add_argument("--variant", choices=("happy", "compensate"), default="happy")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--span-cost", action="store_true", help="time the SDK alone per span")
    ap.add_argument(
        "--modes",
        type=lambda v: [m.strip() for m in v.split(",")],
        default=list(MODES),
        help=f"comma-separated, 'off' first (default: {','.join(MODES)})",
    )
    args = ap.parse_args()
    if args.modes[0] != "off" or not set(args.modes) <= set(MODES):
        ap.error(f"--modes: 'off' first, then any of {', '.join(MODES[1:])}")
    if args.span_cost:
        hw = bl.hardware()
        title = f"OpenTelemetry SDK alone, CPU per span; {hw['cpus']} CPUs, load {hw['load']}"
        bl.print_table(title, ("attributes", "spans", "CPU µs/span", "exported"), span_cost())
        return
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.8, 0.2, 1
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(run(args))
    hw = bl.hardware()
    bl.print_table(
        f"sagakit telemetry cost, 3-step saga ({args.variant}), SQLite, database transport; "
        f"{hw['cpus']} CPUs, load {hw['load']}; median of {args.rounds}",
        HEADERS,
        rows,
    )
    if args.json:
        print(json.dumps({"rows": [dict(zip(HEADERS, r, strict=True)) for r in rows], **hw}))


if __name__ == "__main__":
    main()
