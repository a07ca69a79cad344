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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigurationError, ForeignNamespace, TransportError
from . import PING_TIMEOUT
from ._consumer import BrokerDelivery, Consumer
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
from ._url import Option, flag, parse_url, pick_namespace, redact, require_own, seconds, text
from ._url import namespace as valid_namespace

try:
    import nats
    import nats.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSub
    from nats.js import api
    from nats.js.errors import APIError, NotFoundError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "the NATS transport needs nats-py: pip install 'sagakit[nats]'"
    ) from exc

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.manager import JetStreamManager

    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.nats")

DEFAULT_STREAM = "SAGAKIT"
DEFAULT_PREFIX = "sagakit"
STATUS = "Status"
PUBLISH_CHUNK = 512

# Errors that mean "the broker or the connection failed": translated at this boundary.
BROKER_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError)
PING_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, TimeoutError)

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


class _Request:
    """A pull request we sent and the messages it may still bring."""

    __slots__ = ("deadline", "remaining")

    def __init__(self, remaining: int, deadline: float) -> None:
        self.remaining, self.deadline = remaining, deadline


class PullLoop:
    """Keeps pull requests outstanding on one durable consumer."""

    def __init__(self, sub: NatsSubscription, consumer: str, cap: int) -> None:
        self.sub, self.consumer, self.cap = sub, consumer, cap
        t = sub.transport
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{t.stream}.{consumer}"
        self._requests: deque[_Request] = deque()
        self.waiting = 0  # received, waiting for a handler slot
        self._wake = asyncio.Event()
        self._closed = False
        self._nsub: NatsSub | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        return sum(r.remaining for r in self._requests)

    async def start(self) -> None:
        nc = self.sub.transport.client
        self._inbox = nc.new_inbox()
        self._nsub = await nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._run(), name=f"sagakit-nats-pull-{self.consumer}")

    def wake(self) -> None:
        self._wake.set()

    def reset(self) -> None:
        """Forget outstanding requests (after a reconnect they are gone)."""
        self._requests.clear()
        self.wake()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is not None and not msg.data:
            if status in ("408", "409", "404"):
                # the oldest request ended (expired, or refused by the server)
                if self._requests:
                    self._requests.popleft()
                if status == "409":
                    log.debug("pull on %s refused: %s", self.consumer, msg.headers)
                self.wake()
            return  # 100 (heartbeat) or anything else: nothing to do
        while self._requests and self._requests[0].remaining <= 0:
            self._requests.popleft()
        if self._requests:
            self._requests[0].remaining -= 1
            if self._requests[0].remaining <= 0:
                self._requests.popleft()
        self.waiting += 1
        self.sub.dispatch(self, msg)

    async def _run(self) -> None:
        t = self.sub.transport
        backoff = 0.05
        while not self._closed:
            now = time.monotonic()
            while self._requests and self._requests[0].deadline <= now:
                self._requests.popleft()
            pending = self.waiting + self.outstanding
            want = self.cap - pending
            if want > 0 and (not self._requests or want >= max(1, self.cap // 2)):
                if t.connected:
                    try:
                        await self._pull(want)
                        backoff = 0.05
                    except BROKER_ERRORS as exc:
                        log.warning("pull on %s failed, will retry: %r", self.consumer, exc)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                    continue
                timeout = 0.25  # disconnected: reset() wakes us on reconnect
            else:
                nearest = min((r.deadline for r in self._requests), default=now + t.pull_expires)
                timeout = max(0.01, nearest - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _pull(self, batch: int) -> None:
        t = self.sub.transport
        expires = t.pull_expires
        request = {"batch": batch, "expires": int(expires * 1e9)}
        self._requests.append(_Request(batch, time.monotonic() + expires + 1.0))
        await t.client.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)

    async def close(self) -> None:
        self._closed = True
        self.wake()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nsub is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._nsub.unsubscribe()


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
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._declared: set[str] = set()
        self._subs: set[NatsSubscription] = set()
        self.attempts = Attempts()
        self._closing = False
        self._up = asyncio.Event()  # set while connected
        self._down = asyncio.Event()  # set once the current connection is lost

    # -- connection ----------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._nc is None:
            raise TransportError("the NATS transport is not open")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def ping(self) -> None:
        """The connection is up and the server answers a PING (``flush``)."""
        if not self.connected:
            raise TransportError(f"not connected to NATS at {redact(self.url)}")
        try:
            await asyncio.wait_for(self.client.flush(), PING_TIMEOUT)
        except PING_ERRORS as exc:
            raise TransportError(f"NATS did not answer a ping: {exc!r}") from exc

    async def open(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            return
        try:
            self._nc = await nats.connect(**self.connect_options())
            self._require_tls(self._nc)
            self._nc.options["max_reconnect_attempts"] = -1
            self._js = self._nc.jetstream(timeout=self.publish_timeout)
            self._jsm = self._nc.jsm(timeout=self.publish_timeout)
            self._down = asyncio.Event()
            self._up.set()
            self._closing = False
            await self._ensure_stream()
        except BROKER_ERRORS as exc:
            await self._abandon()
            where = ", ".join(redact(u) for u in self.servers)
            raise TransportError(f"cannot open NATS at {where}: {exc!r}") from exc
        except BaseException:
            await self._abandon()
            raise

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

    async def _abandon(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = self._js = self._jsm = None

    async def close(self) -> None:
        """Stop every subscription, flush pending acks and close the connection."""
        for sub in list(self._subs):
            await sub.stop()
        self._closing = True
        nc, self._nc, self._js, self._jsm = self._nc, None, None, None
        self._declared.clear()
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
        for sub in list(self._subs):
            sub.reset()

    async def guarded(self, start: Callable[[], Awaitable[T]], what: str) -> T:
        """Run a request, failing fast if the connection drops meanwhile.

        A request written just before a connection is lost never gets its answer;
        rather than wait for its timeout, give up as soon as nats-py notices, so
        the caller can retry on the new connection. While reconnecting, wait
        (up to ``publish_timeout``) for the connection to come back first.
        """
        if not self._up.is_set():
            try:
                await asyncio.wait_for(self._up.wait(), self.publish_timeout)
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

    def forget(self, sub: NatsSubscription) -> None:
        self._subs.discard(sub)

    def _manager(self) -> JetStreamManager:
        if self._jsm is None:
            raise TransportError("the NATS transport is not open")
        return self._jsm

    async def _ensure_stream(self) -> None:
        jsm = self._manager()
        subjects = f"{self.prefix}.>"
        try:
            info = await jsm.stream_info(self.stream)
        except NotFoundError:
            config = api.StreamConfig(
                name=self.stream,
                subjects=[subjects],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType(self.storage),
                max_age=self.max_age or None,
                duplicate_window=self.duplicate_window,
                description="sagakit messages",
            )
            try:
                await jsm.add_stream(config)
                return
            except APIError:  # created concurrently by another process?
                info = await jsm.stream_info(self.stream)
        if subjects not in (info.config.subjects or []):
            raise ConfigurationError(
                f"JetStream stream {self.stream!r} exists without subjects {subjects!r}"
            )

    # -- names ---------------------------------------------------------------

    def queue_subject(self, queue: str) -> str:
        return f"{self.prefix}.q.{subject_tokens(queue)}"

    def topic_subject(self, topic: str) -> str:
        return f"{self.prefix}.e.{subject_tokens(topic)}"

    # -- the Transport protocol ----------------------------------------------

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        await self._ensure_consumer(queue, None)
        for topic in topics:
            await self._ensure_consumer(queue, topic)

    async def _ensure_consumer(self, queue: str, topic: str | None) -> str:
        name = consumer_name(queue, topic)
        if name in self._declared:
            return name
        subject = self.queue_subject(queue) if topic is None else self.topic_subject(topic)
        description = json.dumps({"sagakit": 1, "queue": queue, "topic": topic})
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.ALL if topic is None else api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
        )
        jsm = self._manager()
        try:
            try:
                await jsm.add_consumer(self.stream, config)
            except APIError as exc:
                # exists with a config that cannot be changed in place: keep it
                info = await jsm.consumer_info(self.stream, name)
                log.warning("kept existing NATS consumer %s (%r): %r", name, info.config, exc)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot declare NATS consumer {name!r}: {exc!r}") from exc
        self._declared.add(name)
        return name

    async def consumers_of(self, queue: str) -> list[str]:
        """Names of the durable consumers that feed ``queue``."""
        jsm = self._manager()
        names: list[str] = []
        offset = 0
        try:
            while True:
                page = await jsm.consumers_info(self.stream, offset=offset)
                for info in page:
                    if _queue_of(info) == queue and info.name:
                        names.append(info.name)
                if len(page) < 256:
                    break
                offset += len(page)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot list NATS consumers: {exc!r}") from exc
        return sorted(names)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        if self._js is None:
            raise TransportError("the NATS transport is not open")
        js = self._js

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
        jsm = self._manager()
        try:
            info = await jsm.stream_info(self.stream)
        except NotFoundError:
            info = None
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot look up NATS stream {self.stream!r}: {exc!r}") from exc
        if info is not None:
            self._require_own_stream(info.config.subjects or [])
            await self._delete_stream()
        self._declared.clear()

    def _require_own_stream(self, subjects: Sequence[str]) -> None:
        if list(subjects) != [f"{self.prefix}.>"]:
            raise ForeignNamespace(
                f"refusing to delete NATS stream {self.stream!r}: its subjects {subjects!r} "
                f"are not only namespace {self.namespace!r}'s"
            )

    async def _delete_stream(self) -> None:
        try:
            await self._manager().delete_stream(self.stream)
        except NotFoundError:
            pass  # deleted meanwhile: the same outcome
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot delete NATS stream {self.stream!r}: {exc!r}") from exc

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> NatsSubscription:
        try:
            own = await self._ensure_consumer(queue, None)
            consumers = sorted({own, *await self.consumers_of(queue)})
            sub = NatsSubscription(self, queue, handler, prefetch)
            self._subs.add(sub)
            await sub.start(consumers)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot consume {queue!r} from NATS: {exc!r}") from exc
        return sub


def _queue_of(info: api.ConsumerInfo) -> str | None:
    description = info.config.description if info.config else None
    if not description or not description.startswith("{"):
        return None
    try:
        data = json.loads(description)
    except ValueError:
        return None
    queue = data.get("queue") if isinstance(data, dict) and data.get("sagakit") else None
    return queue if isinstance(queue, str) else None


__all__ = [
    "NatsDelivery",
    "NatsSubscription",
    "NatsTransport",
    "consumer_name",
    "escape",
    "subject_tokens",
    "transport",
]
