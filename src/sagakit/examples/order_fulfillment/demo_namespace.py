"""The demo's own broker namespace: made fresh for a run, removed after it.

The default store is fresh per run; :func:`own_namespace` does the same for
the broker, and :func:`remove_own_namespace` removes it at the end (unless
``sagakit demo --keep``). A namespace the user names is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import sagakit as sk
from sagakit.transport import BROKER_SCHEMES, redact
from sagakit.transport._url import fresh_namespace, has_option, with_option

log = logging.getLogger("sagakit.examples.order_fulfillment.demo")


def own_namespace(transport: str) -> str:
    """A broker URL in a namespace of this run's own, unless it names one.

    The default store is fresh per run; this does the same for the broker, so
    a run never consumes what an interrupted earlier run left in its queues.
    """
    if transport.split(":", 1)[0] not in BROKER_SCHEMES or has_option(
        transport, "namespace", "prefix"
    ):
        return transport
    return with_option(transport, "namespace", fresh_namespace("demo"))


def remove_own_namespace(transport: str) -> None:
    """Remove the broker namespace :func:`own_namespace` made for this run.

    A failure is a warning on stderr: the run's result stands, and what is left
    can be removed later with ``Transport.remove_namespace``.
    """
    try:
        asyncio.run(_remove_namespace(transport))
    except (sk.ConfigurationError, sk.TransportError, OSError) as exc:
        log.info("removing the namespace failed", exc_info=True)
        print(f"sagakit: warning: demo: broker objects left in {redact(transport)}: {exc}",
              file=sys.stderr)  # fmt: skip


async def _remove_namespace(url: str) -> None:
    t = sk.open_transport(url, sk.open_store("memory://"))
    await t.open()
    try:
        await t.remove_namespace(t.namespace)
    finally:
        await t.close()
