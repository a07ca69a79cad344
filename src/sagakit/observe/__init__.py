"""Observability: logs with ids, OpenTelemetry traces, Prometheus metrics, health.

- :mod:`.hooks`: the one interface the engine calls (:class:`Hooks`);
- :mod:`.logging`: the message context on every log record, text or JSON lines;
- :mod:`.attempts`: which step attempts a decision ended (pure);
- :mod:`.tracing`: messaging and saga spans (``opentelemetry-api``; extra ``otel``);
- :mod:`.metrics` and :mod:`.gauges`: Prometheus instruments (extra ``metrics``);
- :mod:`.telemetry`: :class:`Telemetry`, the hooks that feed both;
- :mod:`.health`: ``/metrics``, ``/healthz``, ``/readyz`` on one port.

See docs/observability.md.
"""

from typing import TYPE_CHECKING, Any

from .hooks import Hooks
from .logging import ContextFilter, JsonFormatter, TextFormatter, configure

if TYPE_CHECKING:
    from .telemetry import Telemetry, TelemetryOptions


def __getattr__(name: str) -> Any:
    # the engine imports the hooks; Telemetry (and the saga package it needs) on demand
    if name in ("Telemetry", "TelemetryOptions"):
        from . import telemetry

        return getattr(telemetry, name)
    raise AttributeError(name)


__all__ = [
    "ContextFilter",
    "Hooks",
    "JsonFormatter",
    "Telemetry",
    "TelemetryOptions",
    "TextFormatter",
    "configure",
]
