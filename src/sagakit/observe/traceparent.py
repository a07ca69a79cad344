"""W3C ``traceparent`` strings read without OpenTelemetry (the metrics need them too)."""

from __future__ import annotations

LENGTH = 55  #: ``00-`` 32 hex digits ``-`` 16 hex digits ``-`` 2 hex digits


def sampled(traceparent: str | None) -> bool:
    """False only for a well-formed ``traceparent`` whose flags say "not sampled"."""
    if traceparent is None or len(traceparent) != LENGTH:
        return True
    try:
        return bool(int(traceparent[53:], 16) & 1)
    except ValueError:
        return True


def trace_id(traceparent: str | None) -> str | None:
    """The 32 hex digits of the trace id, without validating them."""
    if traceparent is None or len(traceparent) != LENGTH:
        return None
    return traceparent[3:35]
