"""Test support shipped with sagakit: contract suites and a fake clock.

Each backend protocol has one abstract contract suite here; a backend's tests
subclass it and provide the fixture that builds the backend. The same suite
runs against the in-memory backend and every real service.

- :class:`StoreContract` (:mod:`.store`), :class:`TransportContract` (:mod:`.transport`)
- :class:`~sagakit.FakeClock` for timers and leases; :func:`drop_tables` for teardown
- :func:`given` / ``when`` / ``then`` for process managers on a fake clock, with
  :func:`ok` and :func:`failed` replies (:mod:`.process`)
"""

from ..clock import FakeClock
from ._support import drop_tables
from .process import Scenario, failed, given, ok
from .store import StoreContract
from .transport import TransportContract

__all__ = [
    "FakeClock",
    "Scenario",
    "StoreContract",
    "TransportContract",
    "drop_tables",
    "failed",
    "given",
    "ok",
]
