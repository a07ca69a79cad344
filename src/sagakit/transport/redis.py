"""The Redis transport: one Redis Stream per queue, read through a consumer group.

Layout (``namespace``, the deployment's, defaults to ``sagakit``)::

    <namespace>:q:<queue>      a stream; entries are {id, attempt, data}
    <namespace>:bind:<topic>   a set of the queues bound to an event topic

Every key starts with the namespace, so deployments sharing one Redis never
read each other's streams.

* **Fan-out** happens at publish time: an event of topic T is added to the
  stream of every queue in ``<prefix>:bind:T``. A batch is written in one
  ``MULTI``/``EXEC``, so it lands as a whole.
* **Competing consumers**: every queue has one consumer group (``sagakit``);
  each subscription reads with ``XREADGROUP`` under a unique consumer name, so
  an entry goes to exactly one of them. At most ``prefetch`` handlers run at
  once per subscription; a read asks for no more entries than free slots.
* **Ack** is ``XACK`` + ``XDEL`` in one transaction: a stream holds only
  undelivered and unacknowledged entries, so its length stays bounded without
  ``MAXLEN`` trimming (which could drop unacknowledged entries).
* **Nack with a delay** keeps the entry pending (and owned) for the delay,
  then atomically adds a copy with ``attempt + 1`` and acknowledges and deletes
  the original (one Lua script: the copy exists before the original goes, so
  nothing is lost). If the process dies during the delay, the entry is still
  pending and is reclaimed like any abandoned one. Stopping a subscription
  requeues its delayed entries at once, and so the entries of handlers that
  outlived ``stop(grace)`` and were cancelled.
* **Abandoned entries** (the consumer died before acking) are taken over with a
  periodic ``XAUTOCLAIM`` whose min-idle time is the ``lease``. A live
  consumer refreshes the idle time of what it holds (handlers in flight and
  delayed nacks) every ``lease / 3`` with ``XCLAIM ... JUSTID``, so a slow
  handler is not stolen from a healthy process.
* **Attempt** = the entry's ``attempt`` field + its delivery count - 1 (the
  count comes from ``XPENDING`` for reclaimed entries).
* **Reconnects**: the read loop survives dropped connections (``CLIENT KILL``,
  a Redis restart) with capped backoff; if the group vanished (a restart
  without persistence) it is recreated along with this process's bindings.
  Run Redis with AOF persistence in production: a restart that loses data
  loses the messages in it.

Options, as keyword arguments or URL query parameters
(``redis://host:6379/0?namespace=app&lease=10``; ``rediss://`` for TLS):
``namespace`` (older name ``prefix``), ``lease`` (s),
``claim_interval`` (s, default ``min(lease / 2, 5)``), ``block`` (s, longest
wait of one read, default 1). redis-py's own connection options may be in the
query too; any other name is a :class:`~sagakit.errors.ConfigurationError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, TransportError
from . import PING_TIMEOUT
from ._consumer import BrokerDelivery, Consumer
from ._url import Option, parse_url, pick_namespace, redact, require_own, seconds
from ._url import namespace as valid_namespace

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigurationError(
        "the redis transport needs redis-py: pip install 'sagakit[redis]'"
    ) from exc

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

    from ..store import Store
    from . import Handler, Outgoing

log = logging.getLogger("sagakit.transport.redis")

GROUP = "sagakit"
MAX_BACKOFF_S = 2.0
RETRIES = 3
REMOVE_BATCH = 500  # keys per SCAN page and per UNLINK of remove_namespace
CLAIM_PAGES = 10
DEFAULT_PREFIX = "sagakit"
DEFAULT_LEASE = 30.0
DEFAULT_BLOCK = 1.0
# Options as URL query parameters; see the module docstring.
OPTIONS: dict[str, Option[Any]] = {
    "namespace": Option(valid_namespace, None),
    "prefix": Option(valid_namespace, None),  # the older name of ``namespace``
    "lease": Option(seconds, DEFAULT_LEASE),
    "claim_interval": Option(seconds, None),
    "block": Option(seconds, DEFAULT_BLOCK),
}

# Refresh the idle time of entries this consumer still owns (and only those).
_TOUCH = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Add a copy with the next attempt, then ack and delete the original; only if
# this consumer still owns it (otherwise someone else already took over).
_REQUEUE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[4], 'attempt', ARGV[5], 'data', ARGV[6])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""


@contextlib.asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    """Turn redis-py errors into :class:`TransportError` at this boundary."""
    try:
        yield
    except RedisError as exc:
        raise TransportError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


async def _remember_client_id(cell: list[int], conn: AbstractConnection) -> None:
    """On (re)connect: set up the connection, then note its client id."""
    await conn.on_connect()
    await conn.send_command("CLIENT", "ID")
    cell[:] = [int(await conn.read_response())]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (it was abandoned on purpose)."""
    if not fut.cancelled():
        fut.exception()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisDelivery(BrokerDelivery):
    """One stream entry read by one consumer."""

    __slots__ = ("_sub", "entry_id", "message_id")

    def __init__(
        self, sub: RedisSubscription, entry_id: str, message_id: str, data: bytes, attempt: int
    ) -> None:
        super().__init__(data, attempt)
        self._sub = sub
        self.entry_id, self.message_id = entry_id, message_id

    async def _ack(self) -> None:
        await self._sub.ack(self)

    async def _nack(self, delay: float) -> None:
        await self._sub.nack(self, delay)


class RedisSubscription(Consumer[RedisDelivery]):
    """Reads one queue's stream as one consumer of its group."""

    def __init__(
        self, transport: RedisTransport, queue: str, handler: Handler, prefetch: int
    ) -> None:
        super().__init__(queue, handler, prefetch, log)
        self.transport = transport
        self.key = transport.stream_key(queue)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        #: entries this consumer owns: handlers in flight and delayed nacks
        self.held: dict[str, RedisDelivery] = {}
        self._delayed: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._read_done = asyncio.Event()  # stopping, and the read loop has ended
        self._settled = asyncio.Event()  # nothing held any more: heartbeats may end
        # The reader's server-side client id, kept up to date on every reconnect
        # (a cell, not self: no reference cycle through the connection).
        self._reader_id: list[int] = []
        # A connection of its own for blocking reads: no automatic retries (the
        # loop reconnects), and its client id is known so stop() can unblock it.
        self._reader = aioredis.Redis.from_url(
            transport.redis_url,
            single_connection_client=True,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=transport.block + 10.0,
            redis_connect_func=functools.partial(_remember_client_id, self._reader_id),
            client_name=transport.client_name,
        )
        self._task = asyncio.create_task(self._read_loop(), name=f"sagakit-redis-{queue}")
        self._beat = asyncio.create_task(self._heartbeat(), name=f"sagakit-redis-beat-{queue}")

    # -- reading ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        t = self.transport
        backoff = 0.05
        next_claim = 0.0
        while not self.stopping:
            free = self.free
            if free <= 0:
                await self.wait_free()
                continue
            try:
                now = loop.time()
                if now >= next_claim:
                    next_claim = now + t.claim_interval
                    await self._claim(free)
                    continue
                await self._read(free, min(t.block, max(0.001, next_claim - now)))
                backoff = 0.05
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("group of %s is gone (Redis lost its data?); recreating", self.key)
                    with contextlib.suppress(RedisError, TransportError):
                        await t.redeclare(self.queue)
                else:
                    log.warning("redis error on %s: %s", self.key, exc)
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except RedisError as exc:
                log.warning("redis connection lost on %s, reconnecting: %r", self.key, exc)
                self._reader_id.clear()
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception:
                log.exception("unexpected error reading %s", self.key)
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _read(self, count: int, block: float) -> None:
        read = asyncio.ensure_future(
            self._reader.xreadgroup(
                GROUP, self.consumer, {self.key: ">"}, count=count, block=max(1, int(block * 1000))
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
            while not read.done():  # stopping: end the blocking read now
                for client_id in self._reader_id:
                    with contextlib.suppress(RedisError):
                        await self.transport.client.client_unblock(client_id)
                await asyncio.wait({read}, timeout=0.05)
        finally:
            stop.cancel()
            if not read.done():  # this task was cancelled
                read.cancel()
                read.add_done_callback(_retrieve)
        # Entries read while stopping are released at once (see Consumer.spawn).
        result: Any = read.result()
        for _stream, entries in result or ():
            for entry_id, fields in entries:
                self.spawn(self._delivery(entry_id, fields, 1))

    async def _claim(self, free: int) -> None:
        """Take over entries idle for longer than the lease (abandoned)."""
        r, t = self.transport.client, self.transport
        start: bytes | str = "0-0"
        claimed: list[tuple[bytes, dict[bytes, bytes]]] = []
        dead: list[bytes] = []
        for _ in range(CLAIM_PAGES):
            res = await r.xautoclaim(
                self.key, GROUP, self.consumer, int(t.lease * 1000), start, count=free
            )
            cursor, entries = res[0], res[1]
            for entry_id, fields in entries:
                if fields:
                    claimed.append((entry_id, fields))
                elif entry_id is not None:  # deleted meanwhile (Redis 6.2 lists them)
                    dead.append(entry_id)
            free -= len(entries)
            if _text(cursor) == "0-0" or free <= 0:
                break
            start = cursor
        if dead:
            await r.xack(self.key, GROUP, *dead)
        if not claimed:
            return
        pipe = r.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(self.key, GROUP, entry_id, entry_id, 1)
        counts = await pipe.execute()
        log.info("reclaimed %d abandoned entries of %s", len(claimed), self.key)
        for (entry_id, fields), pending in zip(claimed, counts, strict=True):
            delivered = int(pending[0]["times_delivered"]) if pending else 2
            self.spawn(self._delivery(entry_id, fields, delivered))

    def _delivery(
        self, entry_id: bytes | str, fields: dict[bytes, bytes], delivered: int
    ) -> RedisDelivery:
        try:
            first = int(fields.get(b"attempt", b"1"))
        except ValueError:  # not written by sagakit; the endpoint judges the data
            first = 1
        attempt = first + max(0, delivered - 1)
        return RedisDelivery(
            self,
            _text(entry_id),
            _text(fields.get(b"id", b"")),
            fields.get(b"data", b""),
            attempt,
        )

    # -- handling --------------------------------------------------------------

    def spawn(self, delivery: RedisDelivery) -> None:
        self.held[delivery.entry_id] = delivery
        super().spawn(delivery)

    def _unsettled(self, delivery: RedisDelivery) -> None:
        # Neither acked nor nacked: stop refreshing it, XAUTOCLAIM redelivers it.
        log.warning("handler left %s unsettled; it will be redelivered", delivery.entry_id)
        self.held.pop(delivery.entry_id, None)

    async def ack(self, delivery: RedisDelivery) -> None:
        try:
            async with _translated("ack"):
                pipe = self.transport.client.pipeline(transaction=True)
                pipe.xack(self.key, GROUP, delivery.entry_id)
                pipe.xdel(self.key, delivery.entry_id)
                await pipe.execute()
        finally:
            # If the ack failed, the entry stays pending and is reclaimed after the
            # lease; the endpoint's inbox makes the redelivery a no-op.
            self.held.pop(delivery.entry_id, None)

    async def nack(self, delivery: RedisDelivery, delay: float) -> None:
        if delay <= 0 and not self.stopping:
            await self._requeue(delivery)
            return
        task = asyncio.create_task(self._requeue_after(delivery, delay))
        self._delayed.add(task)
        task.add_done_callback(self._delayed.discard)

    async def _requeue_after(self, delivery: RedisDelivery, delay: float) -> None:
        # Cut short by stop(), once this consumer reads no more (or it would
        # read the copy back itself).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._read_done.wait(), delay if delay > 0 else None)
        backoff = 0.05
        while True:
            try:
                await self._requeue(delivery)
                return
            except TransportError as exc:
                if self.stopping:
                    # Left pending: reclaimed by another consumer after the lease.
                    log.warning("could not requeue %s: %s", delivery.entry_id, exc)
                    return
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _requeue(self, d: RedisDelivery) -> None:
        args = [GROUP, self.consumer, d.entry_id, d.message_id, d.attempt + 1, d.data]
        async with _translated("nack"):
            await self.transport.requeue_script(keys=[self.key], args=args)
        self.held.pop(d.entry_id, None)

    async def _heartbeat(self) -> None:
        interval = self.transport.lease / 3
        while not self._settled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), interval)
            ids = list(self.held)
            if ids and not self._settled.is_set():
                try:
                    await self.transport.touch_script(
                        keys=[self.key], args=[GROUP, self.consumer, *ids]
                    )
                except RedisError as exc:
                    log.warning("could not refresh entries of %s: %r", self.key, exc)

    # -- stopping --------------------------------------------------------------

    async def _halt(self) -> None:
        """End the read loop (unblocking its read); then delayed nacks requeue at once."""
        self._stop.set()
        await asyncio.gather(self._task, return_exceptions=True)
        self._read_done.set()

    async def _finish(self) -> None:
        """Requeue delayed nacks, stop the heartbeat, leave the group if owning nothing."""
        if self._delayed:
            await asyncio.gather(*self._delayed, return_exceptions=True)
        self._settled.set()
        await asyncio.gather(self._beat, return_exceptions=True)
        r = self.transport.client
        with contextlib.suppress(RedisError):
            # Drop this consumer from the group, but never while it owns entries:
            # deleting a consumer deletes its pending entries.
            mine = await r.xpending_range(self.key, GROUP, "-", "+", 1, consumername=self.consumer)
            if not mine:
                await r.xgroup_delconsumer(self.key, GROUP, self.consumer)
        await self._close_reader()

    async def abort(self) -> None:
        """Vanish like a crashed process: settle nothing, refresh nothing.

        What this consumer held stays pending and is reclaimed by another
        consumer once its idle time passes the lease. For tests.
        """
        self._begin_stop()
        self._stop.set()
        self._settled.set()
        tasks = [self._task, self._beat, *self._delayed]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._cancel(list(self._tasks))
        self.held.clear()
        await self._close_reader()

    async def _close_reader(self) -> None:
        with contextlib.suppress(RedisError):
            await self._reader.aclose()
        self.transport.subscriptions.discard(self)


class RedisTransport:
    """Queues are Redis Streams read through consumer groups."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str | None = None,
        prefix: str | None = None,
        lease: float = DEFAULT_LEASE,
        claim_interval: float | None = None,
        block: float = DEFAULT_BLOCK,
    ) -> None:
        if lease <= 0 or block <= 0:
            raise ConfigurationError("lease and block must be positive")
        self.url = url
        self.redis_url = url
        #: the deployment namespace, the start of every key (``prefix`` is its older name)
        self.namespace = self.prefix = pick_namespace(namespace, prefix)
        self.lease, self.block = lease, block
        self.claim_interval = claim_interval if claim_interval else min(lease / 2, 5.0)
        self.subscriptions: set[RedisSubscription] = set()
        self._declared: dict[str, set[str]] = {}
        self._client: aioredis.Redis | None = None
        self._touch: Any = None
        self._requeue: Any = None

    @property
    def client_name(self) -> str:
        """The name of this transport's connections (``CLIENT LIST``)."""
        name = "".join(c if c.isprintable() and not c.isspace() else "_" for c in self.prefix)
        return f"sagakit:{name}"

    def stream_key(self, queue: str) -> str:
        return f"{self.prefix}:q:{queue}"

    def bind_key(self, topic: str) -> str:
        return f"{self.prefix}:bind:{topic}"

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise TransportError("the redis transport is not open")
        return self._client

    async def touch_script(self, *, keys: list[str], args: list[Any]) -> Any:
        return await self._touch(keys=keys, args=args)

    async def requeue_script(self, *, keys: list[str], args: list[Any]) -> Any:
        return await self._requeue(keys=keys, args=args)

    def make_client(self) -> aioredis.Redis:
        """A client for commands (not yet connected); ``rediss://`` makes it use TLS."""
        return aioredis.Redis.from_url(
            self.redis_url,
            client_name=self.client_name,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        )

    async def open(self) -> None:
        if self._client is not None:
            return
        # Commands retry on a dropped connection (a stale pooled connection after
        # a kill or restart); a retried publish may duplicate, consumers dedupe.
        client = self.make_client()
        try:
            async with _translated(f"connect to {redact(self.url)}"):
                await client.ping()
        except TransportError:
            await client.aclose()
            raise
        self._client = client
        self._touch = client.register_script(_TOUCH)
        self._requeue = client.register_script(_REQUEUE)

    async def ping(self) -> None:
        """``PING`` on a fresh connection, with no retry: the answer is about now."""
        probe = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=PING_TIMEOUT,
                                        socket_timeout=PING_TIMEOUT)  # fmt: skip
        try:
            async with _translated("ping"):
                await probe.ping()
        finally:
            with contextlib.suppress(RedisError):
                await probe.aclose()

    async def close(self) -> None:
        for sub in list(self.subscriptions):
            await sub.stop()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(RedisError):
                await client.aclose()

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        self._declared.setdefault(queue, set()).update(topics)
        async with _translated(f"declare {queue!r}"):
            await self._declare(queue, topics)

    async def redeclare(self, queue: str) -> None:
        """Recreate a queue's group and this process's bindings to it."""
        await self._declare(queue, sorted(self._declared.get(queue, ())))

    async def _declare(self, queue: str, topics: Sequence[str]) -> None:
        r = self.client
        try:
            # From id 0: entries published before the group existed are delivered.
            await r.xgroup_create(self.stream_key(queue), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if topics:
            pipe = r.pipeline(transaction=False)
            for topic in topics:
                pipe.sadd(self.bind_key(topic), queue)
            await pipe.execute()

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        r = self.client
        async with _translated("publish"):
            topics = sorted({m.destination for m in messages if m.kind == "event"})
            bound: dict[str, list[str]] = {}
            if topics:
                pipe = r.pipeline(transaction=False)
                for topic in topics:
                    pipe.smembers(self.bind_key(topic))
                members = await pipe.execute()
                bound = {
                    t: sorted(_text(q) for q in m) for t, m in zip(topics, members, strict=True)
                }
            pipe = r.pipeline(transaction=True)
            added = 0
            for m in messages:
                targets = bound.get(m.destination, []) if m.kind == "event" else [m.destination]
                for queue in targets:
                    fields: dict[Any, Any] = {"id": m.id, "attempt": 1, "data": m.data}
                    pipe.xadd(self.stream_key(queue), fields)
                    added += 1
            if added:
                await pipe.execute()

    def direct_writer(self, store: Store) -> None:
        """None: messages go through the store's outbox and a relay."""
        return None

    async def remove_namespace(self, namespace: str) -> None:
        """Delete the namespace's streams (with their consumer groups) and binding sets.

        Only keys of this transport's layout go (``<namespace>:q:*`` and
        ``<namespace>:bind:*``); namespaces cannot hold ``:``, so no other
        namespace's key matches.
        """
        require_own(self.namespace, namespace)
        for sub in list(self.subscriptions):
            await sub.stop()
        r = self.client
        async with _translated(f"remove namespace {namespace!r}"):
            for pattern in (self.stream_key("*"), self.bind_key("*")):
                keys = [k async for k in r.scan_iter(match=pattern, count=REMOVE_BATCH)]
                for i in range(0, len(keys), REMOVE_BATCH):
                    await r.unlink(*keys[i : i + REMOVE_BATCH])
        self._declared.clear()

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> RedisSubscription:
        self.client  # noqa: B018 - fail early when not open
        sub = RedisSubscription(self, queue, handler, prefetch)
        self.subscriptions.add(sub)
        return sub


def _redis_py_options() -> frozenset[str]:
    """Query parameters redis-py takes from a URL: those it parses, and the
    keyword arguments of its connection classes (it passes the rest on as is)."""
    from redis.asyncio import connection

    names = set(connection.URL_QUERY_ARGUMENT_PARSERS)
    for cls in connection.SSLConnection.__mro__ + connection.UnixDomainSocketConnection.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None and cls is not object:
            names.update(
                p.name
                for p in inspect.signature(init).parameters.values()
                if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
            )
    return frozenset(names - {"self"})


def transport(url: str, **options: Any) -> RedisTransport:
    """A Redis transport for ``redis://`` (or ``rediss://``, TLS) ``url``.

    sagakit's own options may be given in the query string (keyword arguments
    win); redis-py's connection options there go to redis-py, and any other
    name raises :class:`~sagakit.errors.ConfigurationError`.
    """
    parsed = parse_url(url, OPTIONS, given=options, foreign=_redis_py_options())
    t = RedisTransport(parsed.base, **parsed.values)
    t.url = url
    return t


__all__ = ["RedisDelivery", "RedisSubscription", "RedisTransport", "transport"]
