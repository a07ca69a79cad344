"""Test support shipped with sagakit: contract suites and a fake clock.

Each backend protocol has one abstract contract suite here; a backend's tests
subclass it and provide the fixture that builds the backend. The same suite
runs against the in-memory backend and every real service.
"""

from __future__ import annotations

from .clock import FakeClock

__all__ = ["FakeClock"]
