"""Prometheus metrics of saga health (``prometheus-client``, the ``metrics`` extra).

Counters and histograms are fed by the engine's hooks as things happen;
gauges that describe the shared store (active, stuck, oldest sagas, outbox
lag, timers, dead letters) are read from it when ``/metrics`` is scraped, so
every process reports the same store-wide value: aggregate them with ``max``,
not ``sum``. No metric has a saga id label. Other parts of an application
(a choreography tracker, the 2PC coordinator) add gauges of their own with
:meth:`Metrics.gauge`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, DuplicateRegistration

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError("metrics need prometheus-client: install sagakit[metrics]") from exc

log = logging.getLogger("sagakit.metrics")

#: seconds; steps are usually milliseconds, sagas up to minutes (or days for long ones)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SAGA_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400)

#: an async function giving a gauge's values by label values (a tuple, () if no labels)
GaugeCallback = Callable[[], Awaitable[Mapping[tuple[str, ...], float]]]


@dataclass(frozen=True, slots=True)
class _Registered:
    gauge: Gauge
    read: GaugeCallback


class Metrics:
    """sagakit's instruments, in a registry of their own (no global state)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, prefix: str = "sagakit"
    ) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.prefix = p = prefix
        self._gauges: dict[str, _Registered] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.started = Counter(f"{p}_sagas_started", "Sagas started", ["saga_type"], registry=r)
        self.finished = Counter(
            f"{p}_sagas_finished",
            "Sagas that reached a final state, by outcome",
            ["saga_type", "outcome"],
            registry=r,
        )
        self.saga_duration = Histogram(
            f"{p}_saga_duration_seconds",
            "Time from a saga's start to its final state",
            ["saga_type", "outcome"],
            buckets=SAGA_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            f"{p}_step_duration_seconds",
            "Time from a step attempt's command to its reply (or timeout)",
            ["saga_type", "step", "phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            f"{p}_step_attempts",
            "Step attempts that ended, by phase and outcome",
            ["saga_type", "step", "phase", "outcome"],
            registry=r,
        )
        self.failures = Counter(
            f"{p}_step_failures",
            "Step attempts that failed or timed out, by error type",
            ["saga_type", "step", "phase", "error_type"],
            registry=r,
        )
        self.compensation_failures = Counter(
            f"{p}_compensation_failures",
            "Compensation attempts that failed or timed out (they are retried)",
            ["saga_type", "step", "error_type"],
            registry=r,
        )
        self.duplicates = Counter(
            f"{p}_inbox_duplicates",
            "Copies of already handled messages, answered from the inbox",
            ["consumer"],
            registry=r,
        )
        self.outage_waits = Counter(
            f"{p}_outage_waits",
            "Messages whose handling waited out a store outage",
            ["endpoint"],
            registry=r,
        )
        self.relay_published = Counter(
            f"{p}_relay_published", "Outbox rows the relay published to the broker", registry=r
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def gauge(self, name: str, documentation: str, labels: list[str], read: GaugeCallback) -> None:
        """Add a gauge whose values ``read`` gives when ``/metrics`` is scraped.

        ``name`` gets the metric prefix (``tracker_unmatched_events`` becomes
        ``sagakit_tracker_unmatched_events``); each name once.
        """
        full = f"{self.prefix}_{name}"
        if full in self._gauges:
            raise DuplicateRegistration(f"gauge {full!r} is already registered")
        gauge = Gauge(full, documentation, labels, registry=self.registry)
        self._gauges[full] = _Registered(gauge, read)

    async def refresh(self) -> None:
        """Read every registered gauge (one that fails keeps its last values)."""
        for name, reg in self._gauges.items():
            try:
                values = await reg.read()
            except Exception as exc:
                log.warning("gauge %s could not be read: %r", name, exc)
                continue
            _set(reg.gauge, values)

    def __contains__(self, name: str) -> bool:
        return f"{self.prefix}_{name}" in self._gauges


def _set(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    gauge.clear()
    for labels, value in values.items():
        (gauge.labels(*labels) if labels else gauge).set(value)
