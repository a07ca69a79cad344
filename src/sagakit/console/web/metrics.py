"""``/metrics`` on the console: the store-wide gauges, for a Prometheus scrape.

The console sees no messages, so it serves only what is read from the store
at scrape time — the gauges of :mod:`sagakit.observe.gauges` (unfinished,
stuck and failed sagas, the oldest one's age, long-retrying steps, outbox
lag, pending timers, dead letters) and, when the console was given the 2PC
databases, the branches in doubt on every node. The names and labels are
the workers' (``sagakit worker --metrics-port``): the values are store-wide
in every process, so aggregate with ``max``. The engine's counters and
histograms are left out (they would read 0 here).

A scrape needs a token like any reader (``Authorization: Bearer`` with a
viewer token) unless ``ConsoleOptions.public_metrics``, which is allowed only
on a loopback address: the gauges carry saga types, step and queue names and
counts, never data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ...errors import ConfigurationError
from .body import http_error

if TYPE_CHECKING:
    from starlette.requests import Request

    from .console import Console

LONG_RETRY = 5  #: the attempt from which a step counts as long-retrying (the workers' default)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def console_metrics(c: Console) -> Any:
    """The console's registry of gauges (built once; needs ``sagakit[metrics]``)."""
    try:
        from ...observe.gauges import StoreGauges
        from ...observe.metrics import Metrics
    except ConfigurationError as exc:
        raise http_error(501, str(exc)) from None
    m = Metrics()
    for collector in (m.started, m.finished, m.saga_duration, m.step_duration, m.attempts,
                      m.failures, m.compensation_failures, m.duplicates, m.outage_waits,
                      m.relay_published):  # fmt: skip
        m.registry.unregister(collector)
    gauges = StoreGauges(c.store, lambda: {"main": c.store},
                         stuck_after=c.options.stuck_after, long_retry=LONG_RETRY)  # fmt: skip
    gauges.register(m)
    if c.in_doubt is not None:
        _in_doubt(m, c)
    return m


def _in_doubt(m: Any, c: Console) -> None:
    twophase = c.in_doubt
    assert twophase is not None

    async def count() -> dict[tuple[str, ...], float]:  # the reachable databases'
        return {(): float(len(await twophase.branches()))}

    async def oldest() -> dict[tuple[str, ...], float]:
        ages = [b["age"] for b in await twophase.branches() if b["age"] is not None]
        return {(): max(ages, default=0.0)}

    m.gauge("twophase_in_doubt", "Prepared branches in doubt (every node)", [], count)
    m.gauge("twophase_oldest_prepared_age_seconds", "Age of the oldest branch in doubt", [], oldest)


async def metrics(c: Console, request: Request) -> Response:
    if not c.options.public_metrics:
        await c.auth.caller(request)
    from prometheus_client import generate_latest

    if c.metrics is None:
        c.metrics = console_metrics(c)
    await c.metrics.refresh()
    return Response(generate_latest(c.metrics.registry), media_type=CONTENT_TYPE)
