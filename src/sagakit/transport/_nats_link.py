"""The NATS connection under the transport: opened, watched across reconnects, closed.

:class:`NatsLink` holds the nats-py client and its JetStream contexts, keeps
track of whether the connection is up, and runs requests through
:meth:`NatsLink.guarded` so that one written just before the connection drops
fails fast instead of waiting for its timeout. Kept apart from
:mod:`sagakit.transport.nats`, which holds the transport itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import nats
import nats.errors

from ..errors import ConfigurationError, TransportError
from . import PING_TIMEOUT
from ._url import redact

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext
    from nats.js.manager import JetStreamManager

log = logging.getLogger("sagakit.transport.nats")

# Errors that mean "the broker or the connection failed": translated at this boundary.
BROKER_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError)
PING_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, TimeoutError)

T = TypeVar("T")


class NatsLink:
    """One nats-py connection with its JetStream contexts."""

    def __init__(
        self,
        servers: list[str],
        *,
        name: str,
        tls: ssl.SSLContext | None,
        tls_hostname: str | None,
        timeout: float,
        on_reconnected: Callable[[], None],
    ) -> None:
        self.servers, self.name = servers, name
        self.tls, self.tls_hostname = tls, tls_hostname
        self.timeout = timeout  # of JetStream requests, and of waiting for a reconnect
        self._on_reconnected_cb = on_reconnected
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._closing = False
        self._up = asyncio.Event()  # set while connected
        self._down = asyncio.Event()  # set once the current connection is lost

    @property
    def client(self) -> Client:
        if self._nc is None:
            raise TransportError("the NATS transport is not open")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def is_open(self) -> bool:
        return self._nc is not None and not self._nc.is_closed

    def jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise TransportError("the NATS transport is not open")
        return self._js

    def manager(self) -> JetStreamManager:
        if self._jsm is None:
            raise TransportError("the NATS transport is not open")
        return self._jsm

    async def ping(self, url: str) -> None:
        """The connection is up and the server answers a PING (``flush``)."""
        if not self.connected:
            raise TransportError(f"not connected to NATS at {redact(url)}")
        try:
            await asyncio.wait_for(self.client.flush(), PING_TIMEOUT)
        except PING_ERRORS as exc:
            raise TransportError(f"NATS did not answer a ping: {exc!r}") from exc

    async def connect(self) -> None:
        """Connect (failing fast), then reconnect forever once connected."""
        self._nc = await nats.connect(**self.connect_options())
        self._require_tls(self._nc)
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self.timeout)
        self._jsm = self._nc.jsm(timeout=self.timeout)
        self._down = asyncio.Event()
        self._up.set()
        self._closing = False

    def connect_options(self) -> dict[str, Any]:
        """The keyword arguments of ``nats.connect`` (TLS included when configured)."""
        options: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": 1,  # fail fast while opening; forever once open
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self.tls is not None:
            options["tls"] = self.tls
        if self.tls_hostname:
            options["tls_hostname"] = self.tls_hostname
        return options

    def _require_tls(self, nc: Client) -> None:
        """Refuse a plain connection when TLS was asked for.

        nats-py upgrades to TLS only if the server's INFO says ``tls_required``;
        a server (or someone in between) that does not would otherwise get
        the credentials and messages in clear text.
        """
        info = getattr(nc, "_server_info", None)  # nats-py keeps no public copy
        if self.tls is not None and isinstance(info, dict) and not info.get("tls_required"):
            raise ConfigurationError("TLS was asked for, but the NATS server does not require it")

    async def abandon(self) -> None:
        """Close a connection that failed to open, ignoring errors."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = self._js = self._jsm = None

    async def close(self) -> None:
        """Flush pending acks (``drain``) and close the connection."""
        self._closing = True
        nc, self._nc, self._js, self._jsm = self._nc, None, None, None
        if nc is None or nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), 10.0)
        except BROKER_ERRORS as exc:
            log.warning("NATS drain failed, closing: %r", exc)
            with contextlib.suppress(Exception):
                await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS connection error: %r", exc)

    async def _on_disconnected(self) -> None:
        self._up.clear()
        self._down.set()
        if not self._closing:
            log.warning("NATS disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self._down = asyncio.Event()
        self._up.set()
        log.info("NATS reconnected")
        self._on_reconnected_cb()

    async def guarded(self, start: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a request, failing fast if the connection drops meanwhile.

        A request written just before a connection is lost never gets its answer;
        rather than wait for its timeout, give up as soon as nats-py notices, so
        the caller can retry on the new connection. While reconnecting, wait
        (up to ``timeout``) for the connection to come back first.
        """
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), self.timeout)
            except TimeoutError:
                raise TransportError(f"NATS {what}: not connected") from None
        down = self._down
        task = asyncio.ensure_future(start())
        lost = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise TransportError(f"NATS {what}: the connection was lost; retry")
        return task.result()
