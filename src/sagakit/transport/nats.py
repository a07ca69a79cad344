"""The NATS JetStream transport (nats-py), selected by ``nats://`` URLs.

How it maps the transport contract:

- One JetStream stream per deployment ``namespace`` (``sagakit`` by default:
  stream ``SAGAKIT``, file storage, limits retention) holds every message
  under the namespace as subject prefix. Durable consumers live in that
  stream, so deployments with different namespaces on one server never see
  each other's messages.
  Commands and replies for queue ``Q`` are published on ``sagakit.q.<Q>``,
  events of topic ``T`` on ``sagakit.e.<T>``. Names keep their dots as subject
  levels; every other character outside ``[A-Za-z0-9_-]`` is escaped as
  ``~XX`` (hex of its UTF-8 bytes), so names map one-to-one onto subjects.
- A queue is a set of **durable pull consumers**: one on ``sagakit.q.<Q>``
  (deliver policy *all*: commands sent before the queue was declared are
  kept) and, since nats-server 2.9 has no multi-subject filters, one per
  bound topic on ``sagakit.e.<T>`` (deliver policy *new*, like a fresh
  subscription). Every queue bound to a topic has its own consumer, so events
  fan out to every queue; subscribers of one queue pull from the same durable
  consumers, so they compete for its messages.
- :meth:`NatsTransport.publish` waits for every PubAck (the stream holds the
  message on disk) and sets ``Nats-Msg-Id`` to the message id, so a message
  relayed twice within the duplicate window is stored once.
- Consumers pull with their own flow control: requests for at most
  ``ceil(prefetch / consumers)`` messages ahead per consumer, and the shared
  consumer skeleton (``_consumer``) keeps at most ``prefetch`` handlers of a
  subscription running. ``stop(grace)`` NAKs the messages of handlers it had
  to cancel, so they are redelivered at once rather than after ``ack_wait``.
  ``ack`` waits for the server's confirmation (``ack_sync``), ``nack(delay)`` is
  a NAK with delay, and a message nobody acknowledges within ``ack_wait``
  seconds (the lease) is delivered again. ``Delivery.attempt`` is JetStream's
  delivery count. Pull requests expire after ``pull_expires``, at most half
  of ``ack_wait``, so that a dead consumer's requests are gone before its
  messages come back (older servers would count such a redelivery as a first
  delivery).
- The connection reconnects forever; pull requests lost with a connection are
  re-issued after a reconnect (and expire locally in any case). Broker errors
  surface as :class:`~sagakit.errors.TransportError`.

Options come as keyword arguments or URL query parameters, e.g.
``nats://127.0.0.1:4222?namespace=orders&ack_wait=60`` (keyword arguments
win); an unknown or malformed one raises
:class:`~sagakit.errors.ConfigurationError` naming it. ``tls://`` servers (or
any ``tls_*`` option) connect with TLS.

This module holds the transport, its deliveries and subscriptions; the
helpers apart, one concept each: the connection (``_nats_link``), the stream
and its consumers (``_nats_admin``), pull requests (``_nats_pull``) and names
(``_nats_names``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError, TransportError

try:
    import nats  # noqa: F401  (here, so a missing nats-py names the extra)
    from nats.aio.msg import Msg
    from nats.js import api  # noqa: F401  (kept importable from here, as before the split)
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "the NATS transport needs nats-py: pip install 'sagakit[nats]'"
    ) from exc

from ._consumer import BrokerDelivery, Consumer
from ._nats_admin import StreamAdmin
from ._nats_link import BROKER_ERRORS, NatsLink
from ._nats_names import (
    KEEP,
    TLS_OPTIONS,
    Attempts,
    consumer_name,
    escape,
    stream_for,
    subject_tokens,
    tls_context,
)
from ._nats_pull import PullLoop
from ._url import Option, flag, parse_url, pick_namespace, redact, require_own, seconds, text
from ._url import namespace as valid_namespace

if TYPE_CHECKING:
    from nats.aio.client import Client

    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.nats")

DEFAULT_STREAM = "SAGAKIT"
DEFAULT_PREFIX = "sagakit"
PUBLISH_CHUNK = 512

REFRESH_ERRORS: tuple[type[BaseException], ...] = (TransportError, *BROKER_ERRORS)

T = TypeVar("T")

# Options as URL query parameters (keyword arguments win); see NatsTransport.
OPTIONS: dict[str, Option[Any]] = {
    "namespace": Option(valid_namespace, None),
    "prefix": Option(valid_namespace, None),  # the older name of ``namespace``
    "stream": Option(text, None),  # default: the namespace, upper-cased
    "ack_wait": Option(seconds, None),  # the lease; ``lease`` is another name for it
    "lease": Option(seconds, 30.0),
    "max_age": Option(seconds, 7 * 86400.0),
    "duplicate_window": Option(seconds, 120.0),
    "storage": Option(text, "file"),
    "ack_sync": Option(flag, True),
    "keepalive": Option(flag, True),
    "pull_expires": Option(seconds, 5.0),
    "publish_timeout": Option(seconds, 10.0),
    "refresh": Option(seconds, 10.0),
    **{name: Option(text, None) for name in TLS_OPTIONS},
}


def transport(url: str, **options: Any) -> NatsTransport:
    """The transport for a ``nats://`` URL (called by ``open_transport``)."""
    return NatsTransport(url, **options)


# -- deliveries --------------------------------------------------------------


class NatsDelivery(BrokerDelivery):
    """One message pulled from a JetStream consumer by ``loop``."""

    __slots__ = ("_key", "_msg", "_transport", "loop", "received")

    def __init__(self, transport: NatsTransport, msg: Msg, loop: PullLoop) -> None:
        key: tuple[str, int] | None = None
        try:
            meta = msg.metadata
            reported = meta.num_delivered
            key = (meta.consumer, meta.sequence.stream)
        except Exception:  # not a JetStream message: cannot happen on a pull consumer
            reported = 1
        super().__init__(msg.data, transport.attempts.of(key, reported))
        self._transport, self._msg, self._key, self.loop = transport, msg, key, loop
        self.received = time.monotonic()

    async def touch(self) -> None:
        """Tell the server we are still working on it (restarts ``ack_wait``)."""
        if not self.settled:
            await self._msg.in_progress()

    async def _ack(self) -> None:
        self._transport.attempts.forget(self._key)
        try:
            if self._transport.ack_sync:
                t, msg = self._transport, self._msg
                await t.guarded(lambda: msg.ack_sync(timeout=t.ack_timeout), "ack")
            else:
                await self._msg.ack()
        except BROKER_ERRORS as exc:
            raise TransportError(f"could not acknowledge a NATS message: {exc!r}") from exc

    async def _nack(self, delay: float) -> None:
        try:
            await self._msg.nak(delay=delay if delay > 0 else None)
        except BROKER_ERRORS as exc:
            raise TransportError(f"could not nak a NATS message: {exc!r}") from exc


# -- consuming ---------------------------------------------------------------


class NatsSubscription(Consumer[NatsDelivery]):
    """The consumers of one queue, with at most ``prefetch`` handlers running."""

    def __init__(
        self, transport: NatsTransport, queue: str, handler: Handler, prefetch: int
    ) -> None:
        super().__init__(queue, handler, prefetch, log)
        self.transport = transport
        self.loops: dict[str, PullLoop] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def start(self, consumers: Sequence[str]) -> None:
        await self._add(consumers)
        self._refresher = asyncio.create_task(self._refresh(), name=f"sagakit-nats-{self.queue}")
        if self.transport.keepalive:
            self._keeper = asyncio.create_task(self._keep(), name=f"sagakit-nats-keep-{self.queue}")

    async def _add(self, consumers: Sequence[str]) -> None:
        new = [c for c in consumers if c not in self.loops]
        if not new or self.stopping:
            return
        cap = max(1, math.ceil(self.prefetch / (len(self.loops) + len(new))))
        for loop in self.loops.values():
            loop.cap = cap
        for name in new:
            loop = self.loops[name] = PullLoop(self, name, cap)
            await loop.start()

    async def _refresh(self) -> None:
        """Pick up consumers that other processes declared for this queue."""
        while not self.stopping:
            await asyncio.sleep(self.transport.refresh)
            try:
                await self._add(await self.transport.consumers_of(self.queue))
            except REFRESH_ERRORS as exc:
                log.debug("could not list consumers of %s: %r", self.queue, exc)

    async def _keep(self) -> None:
        """Extend the lease of deliveries held longer than a third of ``ack_wait``,
        so a slow handler is not mistaken for a dead one; a process that dies
        stops extending and its messages come back after ``ack_wait``."""
        every = max(0.05, self.transport.ack_wait / 3)
        while True:
            await asyncio.sleep(every)
            old = time.monotonic() - every
            for delivery in [d for d in self.deliveries() if d.received <= old]:
                try:
                    await delivery.touch()
                except BROKER_ERRORS as exc:
                    log.debug("could not extend a lease on %s: %r", self.queue, exc)

    def reset(self) -> None:
        for loop in self.loops.values():
            loop.reset()

    def dispatch(self, loop: PullLoop, msg: Msg) -> None:
        self.spawn(NatsDelivery(self.transport, msg, loop))

    def _dequeued(self, delivery: NatsDelivery) -> None:
        """A slot was found (or never will be): the pull loop may ask for more."""
        delivery.loop.waiting -= 1
        delivery.loop.wake()

    async def _halt(self) -> None:
        """No new pulls, no new consumers; pulled messages still go through ``spawn``."""
        self.transport.forget(self)
        await _cancel(self._refresher)
        await asyncio.gather(*(loop.close() for loop in self.loops.values()))

    async def _finish(self) -> None:
        await _cancel(self._keeper)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- the transport -----------------------------------------------------------


class NatsTransport:
    """Queues and topics on one JetStream stream; see the module docstring."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        namespace: str | None = None,
        stream: str | None = None,
        prefix: str | None = None,
        ack_wait: float | None = None,
        lease: float | None = None,
        max_age: float | None = None,
        duplicate_window: float | None = None,
        storage: str | None = None,
        ack_sync: bool | None = None,
        pull_expires: float | None = None,
        publish_timeout: float | None = None,
        refresh: float | None = None,
        keepalive: bool | None = None,
        name: str = "sagakit",
        **tls: str | None,
    ) -> None:
        given = {
            **tls,
            "namespace": namespace,
            "stream": stream,
            "prefix": prefix,
            "ack_wait": ack_wait or lease,
            "max_age": max_age,
            "duplicate_window": duplicate_window,
            "storage": storage,
            "ack_sync": ack_sync,
            "pull_expires": pull_expires,
            "publish_timeout": publish_timeout,
            "refresh": refresh,
            "keepalive": keepalive,
        }
        parsed = parse_url(url, OPTIONS, given=given)
        o = parsed.values
        self.servers = [s.strip() for s in parsed.base.split(",") if s.strip()]
        if not self.servers:
            raise ConfigurationError(f"no NATS server in {redact(url)!r}")
        self.url = url
        #: the deployment namespace: subject prefix, and the stream's name by default
        self.namespace = self.prefix = pick_namespace(o["namespace"], o["prefix"])
        self.stream: str = o["stream"] or stream_for(self.namespace)
        if not self.stream or set(self.stream) - KEEP:
            raise ConfigurationError(f"invalid JetStream stream name {self.stream!r}")
        self.tls = tls_context(self.servers, o)
        self.tls_hostname: str | None = o["tls_hostname"]
        self.ack_wait: float = o["lease"] if o["ack_wait"] is None else o["ack_wait"]
        self.max_age: float = o["max_age"]
        self.duplicate_window: float = o["duplicate_window"]
        self.storage: str = o["storage"].lower()
        if self.storage not in ("file", "memory"):
            raise ConfigurationError(f"NATS storage must be 'file' or 'memory': {self.storage!r}")
        self.ack_sync: bool = o["ack_sync"]
        self.ack_timeout = 5.0
        self.keepalive: bool = o["keepalive"]
        # A pull request must expire well before a message delivered to it can
        # come back (``ack_wait`` after its last lease extension): nats-server
        # < 2.10 re-sends a redelivery that finds only dead requests (expired,
        # or their subscriber gone, e.g. a crashed process's) as a *first*
        # delivery (num_delivered 1). Capped at half of ``ack_wait``, a crashed
        # consumer's requests are gone before its messages are redelivered.
        self.pull_expires = min(o["pull_expires"], max(0.1, self.ack_wait / 2))
        self.publish_timeout: float = o["publish_timeout"]
        self.refresh: float = o["refresh"]
        self.name = name
        self._subs: set[NatsSubscription] = set()
        self.attempts = Attempts()
        #: the connection and its JetStream contexts (:mod:`._nats_link`)
        self.link = NatsLink(
            self.servers,
            name=name,
            tls=self.tls,
            tls_hostname=self.tls_hostname,
            timeout=self.publish_timeout,
            on_reconnected=self._reconnected,
        )
        #: the stream and its consumers (:mod:`._nats_admin`)
        self.admin = StreamAdmin(self)

    # -- connection ----------------------------------------------------------

    @property
    def client(self) -> Client:
        return self.link.client

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def ping(self) -> None:
        """The connection is up and the server answers a PING (``flush``)."""
        await self.link.ping(self.url)

    async def open(self) -> None:
        if self.link.is_open:
            return
        try:
            await self.link.connect()
            await self.admin.ensure_stream()
        except BROKER_ERRORS as exc:
            await self.link.abandon()
            where = ", ".join(redact(u) for u in self.servers)
            raise TransportError(f"cannot open NATS at {where}: {exc!r}") from exc
        except BaseException:
            await self.link.abandon()
            raise

    def connect_options(self) -> dict[str, Any]:
        """The keyword arguments of ``nats.connect`` (TLS included when configured)."""
        return self.link.connect_options()

    async def close(self) -> None:
        """Stop every subscription, flush pending acks and close the connection."""
        for sub in list(self._subs):
            await sub.stop()
        self.admin.declared.clear()
        await self.link.close()

    def _reconnected(self) -> None:
        """Pull requests were lost with the connection: the subscriptions re-issue them."""
        for sub in list(self._subs):
            sub.reset()

    async def guarded(self, start: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a request, failing fast if the connection drops meanwhile (see ``NatsLink``)."""
        return await self.link.guarded(start, what)

    def forget(self, sub: NatsSubscription) -> None:
        self._subs.discard(sub)

    # -- names ---------------------------------------------------------------

    def queue_subject(self, queue: str) -> str:
        return f"{self.prefix}.q.{subject_tokens(queue)}"

    def topic_subject(self, topic: str) -> str:
        return f"{self.prefix}.e.{subject_tokens(topic)}"

    # -- the Transport protocol ----------------------------------------------

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        await self.admin.ensure_consumer(queue, None)
        for topic in topics:
            await self.admin.ensure_consumer(queue, topic)

    async def consumers_of(self, queue: str) -> list[str]:
        """Names of the durable consumers that feed ``queue``."""
        return await self.admin.consumers_of(queue)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        js = self.link.jetstream()

        async def one(m: Outgoing) -> None:
            subject = (
                self.topic_subject(m.destination)
                if m.kind == "event"
                else self.queue_subject(m.destination)
            )
            await js.publish(
                subject,
                m.data,
                timeout=self.publish_timeout,
                stream=self.stream,
                headers={"Nats-Msg-Id": m.id},
            )

        async def batch(chunk: Sequence[Outgoing]) -> None:
            await asyncio.gather(*(one(m) for m in chunk))

        try:
            for i in range(0, len(messages), PUBLISH_CHUNK):
                chunk = messages[i : i + PUBLISH_CHUNK]
                await self.guarded(functools.partial(batch, chunk), "publish")
        except BROKER_ERRORS as exc:
            raise TransportError(f"NATS publish failed: {exc!r}") from exc

    def direct_writer(self, store: Store) -> None:
        """None: messages go through the store's outbox and a relay."""
        return None

    async def remove_namespace(self, namespace: str) -> None:
        """Delete the namespace's stream, and with it its messages and consumers.

        Refuses (:class:`~sagakit.errors.ForeignNamespace`) a stream that also
        holds other subjects than the namespace's: it is shared, not ours.
        """
        require_own(self.namespace, namespace)
        for sub in list(self._subs):
            await sub.stop()
        await self.admin.remove_stream()

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> NatsSubscription:
        try:
            own = await self.admin.ensure_consumer(queue, None)
            consumers = sorted({own, *await self.consumers_of(queue)})
            sub = NatsSubscription(self, queue, handler, prefetch)
            self._subs.add(sub)
            await sub.start(consumers)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot consume {queue!r} from NATS: {exc!r}") from exc
        return sub


__all__ = [
    "NatsDelivery",
    "NatsSubscription",
    "NatsTransport",
    "consumer_name",
    "escape",
    "subject_tokens",
    "transport",
]
