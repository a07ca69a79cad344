"""RabbitMQ topology: the queues, bindings and delay buckets of a namespace, and their removal.

:class:`RabbitAdmin` declares the broker queue behind a sagakit queue (listed
in the namespace's registry first, see :mod:`._rabbitmq_registry`), binds it
to event topics, declares the delay queue and exchange of a delay bucket, and
deletes all of them, found through the registry, when the namespace is
removed. Kept apart from :mod:`sagakit.transport.rabbitmq`, which holds the
transport itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
import aio_pika.abc

from ..errors import ForeignNamespace, TransportError
from ._rabbitmq_link import BROKER_ERRORS
from ._url import require_inside

if TYPE_CHECKING:
    from .rabbitmq import RabbitMQTransport


class RabbitAdmin:
    """Declares and removes the RabbitMQ objects of one transport's namespace."""

    def __init__(self, transport: RabbitMQTransport) -> None:
        self.t = transport
        self.queues: set[str] = set()  # declared on this connection
        self.delays: dict[int, aio_pika.abc.AbstractExchange] = {}
        self._lock = asyncio.Lock()

    def reset(self) -> None:
        """The connection is gone: declare again on the next one."""
        self.queues.clear()
        self.delays.clear()

    def queue_arguments(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.t.queue_type == "quorum" else {}

    def used(self, queue: str) -> None:
        """``queue`` exists: no need to declare it before publishing to it."""
        self.queues.add(queue)
        self.t.known_queues.add(queue)

    # -- declaring -----------------------------------------------------------

    async def declare_queue(
        self, channel: aio_pika.abc.AbstractChannel, queue: str
    ) -> aio_pika.abc.AbstractQueue:
        """Declare the broker queue of sagakit queue ``queue`` (listed in the registry first)."""
        await self.t.registry.register(f"q:{queue}")
        return await channel.declare_queue(
            self.t.broker_queue(queue), durable=True, arguments=self.queue_arguments()
        )

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        """Create durable ``queue`` and bind it to the events of ``topics``."""
        try:
            q = await self.declare_queue(self.t.link.channel(), queue)
            self.used(queue)
            for topic in topics:
                await q.bind(self.t.events_exchange, routing_key=topic)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot declare {queue!r}: {exc!r}") from exc

    async def ensure_queue(self, queue: str) -> None:
        """Declare ``queue`` before the first message for it on this connection."""
        if queue in self.queues:
            return
        async with self._lock:
            if queue not in self.queues:
                await self.declare_queue(self.t.link.channel(), queue)
                self.used(queue)

    async def delay_exchange(self, ms: int) -> aio_pika.abc.AbstractExchange:
        """The exchange of delay bucket ``ms``, its queue declared and bound."""
        ex = self.delays.get(ms)
        if ex is not None:
            return ex
        async with self._lock:
            ex = self.delays.get(ms)
            if ex is None:
                ex = self.delays[ms] = await self._declare_delay(ms)
                self.t.known_delays.add(ms)
        return ex

    async def _declare_delay(self, ms: int) -> aio_pika.abc.AbstractExchange:
        channel, name = self.t.link.channel(), self.t.delay_queue(ms)
        await self.t.registry.register(f"delay:{ms}")
        args: dict[str, Any] = {"x-message-ttl": ms, "x-dead-letter-exchange": ""}
        if self.t.queue_type == "quorum":
            args |= {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
        q = await channel.declare_queue(name, durable=True, arguments=args)
        ex = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, durable=True)
        await q.bind(ex)
        return ex

    # -- removing ------------------------------------------------------------

    async def remove(self, namespace: str) -> None:
        """Delete every queue, delay queue and exchange listed in the registry or known here."""
        channel = await self.t.connection.channel()
        try:
            queues, exchanges = self._removal(await self.t.registry.entries(channel))
            for name in queues:
                await channel.queue_delete(name)
            for name in exchanges:
                await channel.exchange_delete(name)
            await channel.queue_delete(self.t.registry_queue)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot remove namespace {namespace!r}: {exc!r}") from exc
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
        self.forget_topology()

    def _removal(self, entries: set[str]) -> tuple[list[str], list[str]]:
        """The queues and exchanges to delete; refuses them all if one is not the namespace's."""
        t = self.t
        ours = {f"q:{q}" for q in t.known_queues} | {f"delay:{ms}" for ms in t.known_delays}
        queues = [self._queue_of_entry(entry) for entry in sorted(entries | ours)]
        delays = [q for q in queues if q.startswith(t.delay_queue(0)[:-1])]
        own = f"{t.namespace}."
        exchanges = [require_inside(n, own) for n in [*delays, t.events_exchange]]
        return [require_inside(n, own) for n in queues], exchanges

    def _queue_of_entry(self, entry: str) -> str:
        """The broker queue of a registry entry (``q:<queue>``, ``delay:<ms>``)."""
        kind, _, rest = entry.partition(":")
        if kind == "q" and rest:
            return self.t.broker_queue(rest)
        if kind == "delay" and rest.isdigit():
            return self.t.delay_queue(int(rest))
        raise ForeignNamespace(
            f"refusing to remove namespace {self.t.namespace!r}: its registry "
            f"{self.t.registry_queue!r} holds {entry!r}, not a sagakit name"
        )

    def forget_topology(self) -> None:
        self.t.known_queues.clear()
        self.t.known_delays.clear()
        self.t.registry.reset()
        self.reset()
