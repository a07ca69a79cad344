"""The RabbitMQ connection under the transport: opened robustly, pinged, closed.

:class:`RabbitLink` holds the aio-pika robust connection, the channel (with
publisher confirms) that publishes and declares, and the events exchange;
it also says what a broker error is and how it reads to the caller. Kept
apart from :mod:`sagakit.transport.rabbitmq`, which holds the transport itself.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote, urlsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from ..errors import TransportError
from . import PING_TIMEOUT
from ._url import redact

log = logging.getLogger("sagakit.transport.rabbitmq")

# Errors that mean "the broker or the connection failed": translated at this boundary.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)

# The broker refused a message for what it is (406: larger than its max_message_size,
# say): sending it again cannot help, so it is not an outage.
PERMANENT_REJECTIONS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelPreconditionFailed,
)


def publish_error(exc: BaseException) -> TransportError:
    """Our error for a failed publish: retryable unless the broker refused the message."""
    permanent = isinstance(exc, PERMANENT_REJECTIONS)
    return TransportError(f"publish failed: {exc!r}", retryable=not permanent)


def connect_error(url: str, exc: BaseException) -> str:
    """Why connecting failed, with the fix when the broker refused the virtual host.

    RabbitMQ answers the opening of a vhost that does not exist, or that the
    user has no permissions on, by closing the connection; aiormq reports it
    only as an unexpected ``Connection.Close`` frame.
    """
    text = f"cannot connect to RabbitMQ at {redact(url)}: {exc!r}"
    if "Connection.OpenOk" not in str(exc) or "Connection.Close" not in str(exc):
        return text
    u = urlsplit(url)
    vhost, user = unquote(u.path[1:]) or "/", unquote(u.username or "guest")
    return (
        f"RabbitMQ at {redact(url)} refused the virtual host {vhost!r} for user {user!r}: "
        "it does not exist or the user has no permissions on it; create and grant it with "
        f"rabbitmqctl add_vhost {vhost} && "
        f"rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*' (docs/how-to/brokers.md)"
    )


class RabbitLink:
    """One aio-pika robust connection, its publishing channel and the events exchange."""

    def __init__(
        self, broker_url: str, *, name: str, reconnect_interval: float, events_exchange: str
    ) -> None:
        self.broker_url, self.name = broker_url, name
        self.reconnect_interval = reconnect_interval
        self.events_exchange = events_exchange
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._events: aio_pika.abc.AbstractExchange | None = None

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        if self._connection is None:
            raise TransportError("the RabbitMQ transport is not open")
        return self._connection

    def channel(self) -> aio_pika.abc.AbstractChannel:
        """The channel that publishes (with confirms) and declares."""
        if self._channel is None:
            raise TransportError("the RabbitMQ transport is not open")
        return self._channel

    def events(self) -> aio_pika.abc.AbstractExchange:
        """The namespace's topic exchange for events."""
        if self._events is None:
            raise TransportError("the RabbitMQ transport is not open")
        return self._events

    async def connect(self) -> None:
        """Connect (robustly: it reconnects by itself) and declare the events exchange."""
        conn = await aio_pika.connect_robust(
            self.broker_url,
            reconnect_interval=self.reconnect_interval,
            client_properties={"connection_name": self.name},
        )
        self._connection = conn
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        self._events = await channel.declare_exchange(
            self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def close(self) -> None:
        """Close the connection (and its channels); errors are only logged."""
        conn, self._connection = self._connection, None
        self._channel = self._events = None
        if conn is not None and not conn.is_closed:
            try:
                await conn.close()
            except BROKER_ERRORS as exc:
                log.info("closing the RabbitMQ connection failed: %r", exc)

    async def ping(self, url: str) -> None:
        """The connection and channel are open and the broker answers a passive declare."""
        channel = self._channel
        if self._connection is None or self._connection.is_closed or channel is None:
            raise TransportError(f"not connected to RabbitMQ at {redact(url)}")
        try:
            await asyncio.wait_for(
                channel.get_exchange(self.events_exchange, ensure=True), PING_TIMEOUT
            )
        except BROKER_ERRORS as exc:  # TimeoutError among them
            raise TransportError(f"RabbitMQ did not answer: {exc!r}") from exc
