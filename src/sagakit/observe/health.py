"""``/metrics``, ``/healthz`` and ``/readyz`` on one port (``sagakit worker --metrics-port``).

A small HTTP/1.1 server on the App's own event loop, with no dependency:

- ``/healthz``: 200 while the process's event loop answers (liveness);
- ``/readyz``: 200 when every store this process uses answers a query and the
  transport's broker a ping (:meth:`~sagakit.transport.Transport.ping`), each
  within ``READY_TIMEOUT``, and the App is started with its consumers running,
  else 503 with the reasons in the body (readiness: take no traffic meanwhile);
- ``/metrics``: the Prometheus text format, or OpenMetrics (with exemplars
  carrying trace ids) when the scraper asks for it; store-wide gauges are
  read first. 404 when the process has no metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from ..transport._url import redact

if TYPE_CHECKING:
    from ..app import App
    from .metrics import Metrics

log = logging.getLogger("sagakit.health")

READY_TIMEOUT = 2.0  #: seconds a store may take to answer the readiness query
GAUGE_TIMEOUT = 5.0  #: seconds the store-wide gauges may take at a scrape
MAX_REQUEST = 8192


class HealthServer:
    """Serves the three endpoints for one App until :meth:`stop`."""

    def __init__(
        self, app: App, metrics: Metrics | None, *, host: str = "0.0.0.0", port: int = 9464
    ) -> None:
        self.app, self.metrics = app, metrics
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        self.port = int(sock[1])
        log.info("metrics and health on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            status, ctype, body = await self.respond(head[:MAX_REQUEST].decode("latin-1"))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except Exception as exc:  # a broken gauge must not take the endpoint down
            log.warning("health endpoint failed: %r", exc)
            status, ctype, body = 500, "text/plain", f"{type(exc).__name__}\n".encode()
        writer.write(_response(status, ctype, body))
        with contextlib.suppress(Exception):
            await writer.drain()
            writer.close()

    async def respond(self, head: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request head."""
        line, _, rest = head.partition("\r\n")
        parts = line.split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = parts[1].split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            return await self.ready()
        if path == "/metrics" and self.metrics is not None:
            return await self.scrape("application/openmetrics-text" in rest.lower())
        return 404, "text/plain", b"not found\n"

    async def ready(self) -> tuple[int, str, bytes]:
        problems = await readiness(self.app)
        body = json.dumps({"ready": not problems, "problems": problems}).encode() + b"\n"
        return (503 if problems else 200), "application/json", body

    async def scrape(self, openmetrics: bool) -> tuple[int, str, bytes]:
        assert self.metrics is not None
        try:
            await asyncio.wait_for(self.metrics.refresh(), GAUGE_TIMEOUT)
        except TimeoutError:
            log.warning("store-wide gauges took over %.0fs; serving the last values", GAUGE_TIMEOUT)
        if openmetrics:
            from prometheus_client.openmetrics.exposition import (
                CONTENT_TYPE_LATEST,
                generate_latest,
            )

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)  # type: ignore[no-untyped-call]
        from prometheus_client import CONTENT_TYPE_LATEST as TEXT
        from prometheus_client import generate_latest as text

        return 200, TEXT, text(self.metrics.registry)


async def readiness(app: App) -> list[str]:
    """What keeps ``app`` from taking work (empty: ready)."""
    if not app.started:
        return ["the app is not started"]
    problems = [f"consumer {name} stopped" for name in app.stopped_consumers()]
    for store in app.stores_in_use():
        try:
            await asyncio.wait_for(store.driver.read("SELECT 1"), READY_TIMEOUT)
        except Exception as exc:
            problems.append(f"store {store.prefix} on {store.dialect} unreachable: {exc!r}")
    ping = getattr(app.transport, "ping", None)  # a transport written before ping() has none
    if ping is None:
        return problems
    try:
        await asyncio.wait_for(ping(), READY_TIMEOUT)
    except Exception as exc:
        problems.append(f"transport {redact(app.transport.url)} unreachable: {exc!r}")
    return problems


def _response(status: int, ctype: str, body: bytes) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    reason |= {500: "Internal Server Error", 503: "Service Unavailable"}
    head = (
        f"HTTP/1.1 {status} {reason.get(status, '')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
