"""Where the worker's tracer provider comes from: the environment, never code edits.

Two ways, both standard OpenTelemetry:

- run the worker under ``opentelemetry-instrument`` (package
  ``opentelemetry-distro``), which configures the SDK from every ``OTEL_*``
  variable before sagakit starts: sagakit finds that provider and uses it;
- or install ``sagakit[otel]`` and set ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): the worker makes an SDK provider
  with a batching OTLP/HTTP exporter; the SDK reads ``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the exporter's
  own variables itself.

``OTEL_SDK_DISABLED=true`` turns both off.
"""

from __future__ import annotations

import os
from typing import Any

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def _disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def configured_provider() -> bool:
    """True if some code (``opentelemetry-instrument``, the application) set a real provider."""
    if _disabled():
        return False
    try:
        from opentelemetry import trace
    except ModuleNotFoundError:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def provider_from_env(service: str = "sagakit") -> Any:
    """An SDK provider exporting over OTLP/HTTP if an OTLP endpoint is set, else None."""
    if _disabled() or not any(os.environ.get(k) for k in ENDPOINTS):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
