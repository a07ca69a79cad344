"""The factory ``sagakit worker`` loads to run part of the demo application.

::

    sagakit worker --app sagakit.examples.order_fulfillment.worker:create \\
        --store postgresql://postgres@127.0.0.1:5432/test \\
        --transport amqp://guest:guest@127.0.0.1:5672/ \\
        --service shipping --lease 3

runs the shipping service's handlers in this process (``--service
coordinator`` runs the saga coordinator, its timers and local steps). The
store and transport can also come from ``SAGAKIT_STORE`` and
``SAGAKIT_TRANSPORT``. The process creates the services' tables if missing
but never resets or seeds them: the demo's parent process does that before it
starts the workers (see :mod:`sagakit.examples.order_fulfillment.cluster`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import sagakit as sk

from .app import OrderFulfillment, build

#: the stock locks' time-to-live in seconds, set by ``sagakit demo --lock-ttl``
LOCK_TTL_ENV = "SAGAKIT_DEMO_LOCK_TTL"


def create(
    store: str | None = None,
    transport: str | None = None,
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """The order-fulfillment application, consuming only for ``run``."""
    if not store:
        raise sk.ConfigurationError(
            f"{__name__}:create needs a store: --store URL or SAGAKIT_STORE"
        )
    ttl = os.environ.get(LOCK_TTL_ENV)
    lock_ttl = float(ttl) if ttl else None
    return build(store, transport or "database", settings=settings, run=run, lock_ttl=lock_ttl)
