"""The RabbitMQ transport (aio-pika), selected by ``amqp://`` and ``amqps://`` URLs.

How it maps the transport contract:

- Every name this transport declares starts with the deployment's
  ``namespace`` (default ``sagakit``), so deployments sharing a virtual host
  never consume each other's messages: sagakit queue ``Q`` is the durable
  RabbitMQ queue ``{namespace}.q.Q``, a quorum queue by default
  (``queue_type=classic`` for brokers without them).
  Commands and replies go through the default exchange straight to their
  queue, which the publisher declares first so nothing sent before the
  consumer starts is dropped.
- Events go to one durable topic exchange, ``{namespace}.events``, with the
  event type as routing key; ``declare(queue, topics)`` binds the queue to each
  topic, so every bound queue gets its own copy (fan-out) and consumers of one
  queue compete for it.
- Every queue and delay bucket is listed, before it is declared, as a small
  persistent message in the namespace's registry queue ``{namespace}.names``
  (once per transport object), since AMQP cannot list queues:
  :meth:`RabbitMQTransport.remove_namespace` reads it to find what every
  process of the namespace created. A transport that opens and finds the
  registry holding more than ``registry.limit`` messages (500) compacts it to
  its distinct entries, without losing one (see ``_rabbitmq_registry``).
- Messages are persistent and published on a channel with publisher confirms:
  :meth:`RabbitMQTransport.publish` returns once the broker holds all of them.
- Consumers use manual acknowledgement and ``basic.qos(prefetch)``; the
  shared consumer skeleton (``_consumer``) keeps in-flight handlers at
  ``prefetch`` even across reconnects. A consumer that dies leaves its
  deliveries unacknowledged and the broker gives them to another consumer;
  ``stop(grace)`` releases the deliveries of handlers it had to cancel at
  once (a republish with no delay).
- ``nack(delay)`` publishes a copy (attempt + 1, confirmed) to a per-delay
  queue ``{namespace}.delay.{ms}`` whose message TTL dead-letters it back to
  the original queue, then acknowledges the original. A crash between the two
  gives a duplicate, never a loss. Delays are rounded up to a small geometric
  set of buckets so there are few delay queues. On quorum queues the delay
  queues use at-least-once dead-lettering.
- ``Delivery.attempt`` is the ``sagakit-attempt`` header (set on republish)
  plus the broker's ``x-delivery-count`` for redeliveries after a consumer
  died (quorum queues; classic queues only tell "redelivered").
- The connection is an aio-pika robust connection: channels, queues, bindings
  and consumers come back after the connection is cut or the broker restarts.
  Broker errors surface as :class:`~sagakit.errors.TransportError`.

Options come as keyword arguments or URL query parameters, e.g.
``amqps://app:pw@rabbit/prod?namespace=orders&queue_type=classic`` (keyword
arguments win); aio-pika's and aiormq's own query parameters (``heartbeat``,
``cafile``, ``certfile``, ...) stay in the URL for them, and any other name
raises :class:`~sagakit.errors.ConfigurationError` naming the valid ones.

This module holds the transport, its deliveries and subscriptions; the
helpers apart, one concept each: the connection (``_rabbitmq_link``), the
queues, bindings and delay buckets and their removal (``_rabbitmq_admin``)
and the registry of names (``_rabbitmq_registry``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigurationError, TransportError

try:
    import aio_pika
    import aio_pika.abc
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "the RabbitMQ transport needs aio-pika: pip install 'sagakit[rabbitmq]'"
    ) from exc

from ._consumer import BrokerDelivery, Consumer
from ._rabbitmq_admin import RabbitAdmin
from ._rabbitmq_link import (
    BROKER_ERRORS,
    PERMANENT_REJECTIONS,  # noqa: F401  (importable here, as before)
    RabbitLink,
    connect_error,
    publish_error,
)
from ._rabbitmq_registry import NameRegistry
from ._url import Option, parse_url, pick_namespace, require_own, seconds, text
from ._url import namespace as valid_namespace

if TYPE_CHECKING:
    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.rabbitmq")

ATTEMPT_HEADER = "sagakit-attempt"
KIND_HEADER = "sagakit-kind"
MIN_DELAY_MS = 10
BUCKETS_PER_DOUBLING = 4

QueueType = Literal["quorum", "classic"]
QUEUE_TYPES = ("quorum", "classic")


def queue_type(value: str) -> str:
    """``quorum`` or ``classic``."""
    if value not in QUEUE_TYPES:
        raise ValueError("not 'quorum' or 'classic'")
    return value


# Options as URL query parameters (keyword arguments win); see RabbitMQTransport.
OPTIONS: dict[str, Option[Any]] = {
    "namespace": Option(valid_namespace, None),
    "queue_type": Option(queue_type, "quorum"),
    "reconnect_interval": Option(seconds, 1.0),
    "publish_timeout": Option(seconds, 30.0),
    "connection_name": Option(text, None),
}
# Query parameters that aio-pika and aiormq read from the URL themselves.
DRIVER_OPTIONS = frozenset(
    {
        "auth",
        "cadata",
        "cafile",
        "capath",
        "certfile",
        "fail_fast",
        "happy_eyeballs_delay",
        "heartbeat",
        "interleave",
        "keyfile",
        "name",
        "no_verify_ssl",
        "timeout",
    }
)


def transport(url: str, **options: Any) -> RabbitMQTransport:
    """The transport for an ``amqp://`` URL (called by ``open_transport``)."""
    return RabbitMQTransport(url, **options)


def delay_bucket(delay: float) -> int:
    """Milliseconds of the delay queue used for ``delay`` seconds (0: no delay).

    Buckets grow by 2**(1/4) (about 19 %), so a delay is never shortened and is
    lengthened by at most a fifth, and there are only a few dozen buckets.
    """
    ms = delay * 1000.0
    if ms < MIN_DELAY_MS:
        return 0
    k = math.ceil(BUCKETS_PER_DOUBLING * math.log2(ms) - 1e-9)
    return math.ceil(2 ** (k / BUCKETS_PER_DOUBLING))


class RabbitDelivery(BrokerDelivery):
    """One message taken from a RabbitMQ queue."""

    __slots__ = ("_message", "_queue", "_transport")

    def __init__(
        self,
        transport: RabbitMQTransport,
        queue: str,
        message: aio_pika.abc.AbstractIncomingMessage,
    ) -> None:
        super().__init__(message.body, attempt_of(message))
        self._transport, self._queue, self._message = transport, queue, message

    async def _ack(self) -> None:
        """Acknowledge. If the channel died meanwhile the broker redelivers it."""
        await self._settle(self._message.ack())

    async def _nack(self, delay: float) -> None:
        """Have the message delivered again after about ``delay`` seconds."""
        try:
            await self._transport.republish(self._queue, self._message, self.attempt + 1, delay)
        except TransportError:
            # No copy exists: hand the original back to the broker right away.
            await self._settle(self._message.nack(requeue=True))
            raise
        await self._settle(self._message.ack())

    async def _settle(self, op: Any) -> None:
        try:
            await op
        except BROKER_ERRORS as exc:
            log.info(
                "could not settle %s on %s (%r); the broker will redeliver it",
                self._message.message_id,
                self._queue,
                exc,
            )


def attempt_of(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """1 for a first delivery; counts redeliveries and delayed retries."""
    headers = message.headers or {}
    base = _int(headers.get(ATTEMPT_HEADER), 1)
    count = headers.get("x-delivery-count")
    if count is not None:
        return base + _int(count, 0)
    return base + (1 if message.redelivered else 0)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class RabbitSubscription(Consumer[RabbitDelivery]):
    """A consumer of one queue on its own channel."""

    def __init__(
        self,
        transport: RabbitMQTransport,
        queue: str,
        handler: Handler,
        prefetch: int,
    ) -> None:
        super().__init__(queue, handler, prefetch, log)
        self._t = transport
        self._channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        channel = await connection.channel()
        self._channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        self._queue = await self._t.declare_queue(channel, self.queue)
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.spawn(RabbitDelivery(self._t, self.queue, message))

    async def _halt(self) -> None:
        """Cancel the broker-side consumer: no new deliveries on this channel."""
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except BROKER_ERRORS as exc:
                log.info("cancel on %s failed: %r", self.queue, exc)

    async def _finish(self) -> None:
        """Close the channel: whatever is still unacknowledged goes back to the queue."""
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except BROKER_ERRORS as exc:
                log.info("closing channel of %s failed: %r", self.queue, exc)
        self._t.forget(self)


class RabbitMQTransport:
    """Queues, a topic exchange for events and delay queues on one RabbitMQ broker.

    Options (keywords or URL query): ``namespace`` (the start of every queue
    and exchange name, default ``sagakit``), ``queue_type`` (``"quorum"`` or
    ``"classic"``), ``reconnect_interval`` (seconds), ``publish_timeout``
    (seconds), ``connection_name`` (shown by the broker's management tools).
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str | None = None,
        queue_type: QueueType | None = None,
        reconnect_interval: float | None = None,
        publish_timeout: float | None = None,
        connection_name: str | None = None,
    ) -> None:
        given = {
            "namespace": namespace,
            "queue_type": queue_type,
            "reconnect_interval": reconnect_interval,
            "publish_timeout": publish_timeout,
            "connection_name": connection_name,
        }
        parsed = parse_url(url, OPTIONS, given=given, foreign=DRIVER_OPTIONS)
        o = parsed.values
        if o["queue_type"] not in QUEUE_TYPES:
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {o['queue_type']!r}"
            )
        self.url = url
        #: the URL handed to aio-pika: sagakit's own options taken out
        self.broker_url = parsed.base
        self.namespace = pick_namespace(o["namespace"])
        self.queue_type: QueueType = o["queue_type"]
        self.reconnect_interval: float = o["reconnect_interval"]
        self.publish_timeout: float = o["publish_timeout"]
        self.connection_name: str = o["connection_name"] or f"sagakit-{uuid.uuid4().hex[:12]}"
        self.events_exchange = f"{self.namespace}.events"
        #: every queue and delay bucket this object used
        self.known_queues: set[str] = set()
        self.known_delays: set[int] = set()
        self._subs: set[RabbitSubscription] = set()
        #: the connection, its publishing channel and the events exchange (:mod:`._rabbitmq_link`)
        self.link = RabbitLink(
            self.broker_url,
            name=self.connection_name,
            reconnect_interval=self.reconnect_interval,
            events_exchange=self.events_exchange,
        )
        #: the namespace's registry of names (:mod:`._rabbitmq_registry`)
        self.registry = NameRegistry(self.link, self.registry_queue, self.publish_timeout)
        #: queues, bindings, delay buckets and their removal (:mod:`._rabbitmq_admin`)
        self.admin = RabbitAdmin(self)

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        """Connect (robustly: it reconnects by itself), declare the exchange and the registry."""
        if self.link.is_open:
            return
        try:
            await self.link.connect()
            await self.registry.open()
        except BROKER_ERRORS as exc:
            await self.close()
            raise TransportError(connect_error(self.broker_url, exc)) from exc

    async def close(self) -> None:
        """Stop the remaining consumers and close the connection."""
        for sub in list(self._subs):
            await sub.stop()
        self.admin.reset()
        self.registry.reset()
        await self.link.close()

    async def ping(self) -> None:
        """The connection and channel are open and the broker answers a passive declare."""
        await self.link.ping(self.url)

    def forget(self, sub: RabbitSubscription) -> None:
        """``sub`` has stopped: :meth:`close` need not stop it."""
        self._subs.discard(sub)

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        return self.link.connection

    # -- topology ----------------------------------------------------------

    def broker_queue(self, queue: str) -> str:
        """The RabbitMQ queue behind sagakit queue ``queue`` (the namespace's own)."""
        return f"{self.namespace}.q.{queue}"

    def delay_queue(self, ms: int) -> str:
        """The delay queue (and its exchange) of one delay bucket."""
        return f"{self.namespace}.delay.{ms}"

    @property
    def registry_queue(self) -> str:
        """The queue listing every queue and delay bucket of the namespace."""
        return f"{self.namespace}.names"

    def queue_arguments(self) -> dict[str, Any]:
        return self.admin.queue_arguments()

    async def declare_queue(
        self, channel: aio_pika.abc.AbstractChannel, queue: str
    ) -> aio_pika.abc.AbstractQueue:
        """Declare the broker queue of sagakit queue ``queue`` (listed in the registry first)."""
        return await self.admin.declare_queue(channel, queue)

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        """Create durable ``queue`` and bind it to the events of ``topics``."""
        await self.admin.declare(queue, topics)

    # -- sending -----------------------------------------------------------

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish persistent messages; returns once the broker confirmed all."""
        if not messages:
            return
        try:
            sends = [await self._send(m) for m in messages]
            results = await asyncio.gather(*sends, return_exceptions=True)
        except BROKER_ERRORS as exc:
            raise publish_error(exc) from exc
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, BROKER_ERRORS):
                    raise publish_error(r) from r
                raise r

    async def _send(self, m: Outgoing) -> Awaitable[object]:
        """The confirmed publish of ``m``, started (its queue declared first if a command)."""
        msg = aio_pika.Message(
            m.data,
            message_id=m.id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={KIND_HEADER: m.kind},
        )
        if m.kind == "event":
            events = self.link.events()
            return events.publish(
                msg, routing_key=m.destination, mandatory=False, timeout=self.publish_timeout
            )
        await self.admin.ensure_queue(m.destination)
        return self.link.channel().default_exchange.publish(
            msg, routing_key=self.broker_queue(m.destination), timeout=self.publish_timeout
        )

    async def republish(
        self,
        queue: str,
        message: aio_pika.abc.AbstractIncomingMessage,
        attempt: int,
        delay: float,
    ) -> None:
        """Put a copy of ``message`` back on ``queue`` after ``delay`` (confirmed)."""
        headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith("x-")}
        headers[ATTEMPT_HEADER] = attempt
        copy = aio_pika.Message(
            message.body,
            message_id=message.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=headers,
        )
        try:
            ms = delay_bucket(delay)
            if ms:
                exchange = await self.admin.delay_exchange(ms)
            else:
                exchange = self.link.channel().default_exchange
            await exchange.publish(
                copy, routing_key=self.broker_queue(queue), timeout=self.publish_timeout
            )
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot requeue a message of {queue!r}: {exc!r}") from exc

    # -- receiving ---------------------------------------------------------

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> RabbitSubscription:
        """Consume ``queue`` on a channel of its own, at most ``prefetch`` at once."""
        sub = RabbitSubscription(self, queue, handler, prefetch)
        try:
            await sub.start(self.connection)
        except BROKER_ERRORS as exc:
            await sub.abort()
            raise TransportError(f"cannot consume {queue!r}: {exc!r}") from exc
        self._subs.add(sub)
        self.admin.used(queue)
        return sub

    def direct_writer(self, store: Store) -> None:
        """None: messages go through the store's outbox and a relay."""
        return None

    # -- administration (tests, tools) -------------------------------------

    async def remove_namespace(self, namespace: str) -> None:
        """Delete every queue, delay queue and exchange of the namespace, by any process.

        The names come from the registry queue (see the module docstring) and
        from this object; the transport must be open. See
        :meth:`sagakit.transport.Transport.remove_namespace`.
        """
        require_own(self.namespace, namespace)
        for sub in list(self._subs):
            await sub.stop()
        await self.admin.remove(namespace)


__all__ = ["RabbitDelivery", "RabbitMQTransport", "RabbitSubscription", "delay_bucket", "transport"]
