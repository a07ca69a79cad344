"""The namespace's registry of names: the RabbitMQ queue ``{namespace}.names``.

AMQP cannot list queues, so every process lists each queue and delay bucket
it declares (``q:<queue>``, ``delay:<ms>``) as a small persistent message in
the registry queue, before declaring it; ``remove_namespace`` reads the
registry to find what every process of the namespace created.

One message per name per transport object grows without bound in a
long-lived deployment that restarts workers often, so a transport that opens
and finds the registry holding more than :attr:`NameRegistry.limit`
messages compacts it: it fetches them unacknowledged, publishes their
distinct entries with publisher confirms, and only then acknowledges the
fetched ones. No entry is lost: one fetched is back in the registry before
it is acknowledged, one registered meanwhile and not fetched stays where it
is, and if the compaction fails midway the broker puts whatever was not yet
acknowledged back (a duplicate at worst). The entries found are then known
to be in the registry, so this transport does not write them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import aio_pika
import aio_pika.abc

from ._rabbitmq_link import BROKER_ERRORS

if TYPE_CHECKING:
    from ._rabbitmq_link import RabbitLink

log = logging.getLogger("sagakit.transport.rabbitmq")

#: Messages the registry may hold before the next transport to open compacts it.
COMPACT_ABOVE = 500


class NameRegistry:
    """The registry queue of one transport's namespace."""

    def __init__(self, link: RabbitLink, queue: str, publish_timeout: float) -> None:
        self.link, self.queue, self.publish_timeout = link, queue, publish_timeout
        #: compact on open when the registry holds more messages than this
        self.limit = COMPACT_ABOVE
        self.written: set[str] = set()  # entries known to be in the registry

    async def open(self) -> None:
        """Declare the registry queue; compact it if it has grown past :attr:`limit`."""
        declared = await self.link.channel().declare_queue(self.queue, durable=True)
        count = declared.declaration_result.message_count or 0
        if count <= self.limit:
            return
        try:
            await self.compact(count)
        except BROKER_ERRORS as exc:  # only an economy: the transport works without it
            log.warning("could not compact the registry %s: %r", self.queue, exc)

    def reset(self) -> None:
        self.written.clear()

    async def register(self, entry: str) -> None:
        """List ``entry`` (``q:<queue>`` or ``delay:<ms>``) in the registry, once."""
        if entry in self.written:
            return
        await self._publish(self.link.channel(), entry.encode())
        self.written.add(entry)

    async def compact(self, at_most: int) -> set[str]:
        """Replace up to ``at_most`` registry messages by their distinct entries (returned)."""
        channel = await self.link.connection.channel(publisher_confirms=True)
        try:
            registry = await channel.declare_queue(self.queue, durable=True)
            fetched = await _fetch(registry, at_most)
            bodies = sorted({m.body for m in fetched})
            await asyncio.gather(*(self._publish(channel, body) for body in bodies))
            if fetched:
                await fetched[-1].ack(multiple=True)  # every fetched one, after the copies
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()
        entries = {body.decode("utf-8", "replace") for body in bodies}
        self.written |= entries
        log.info("compacted registry %s: %d to %d", self.queue, len(fetched), len(bodies))
        return entries

    async def entries(self, channel: aio_pika.abc.AbstractChannel) -> set[str]:
        """Every entry, left unacknowledged on ``channel`` (back in the registry if it closes)."""
        registry = await channel.declare_queue(self.queue, durable=True)
        return {m.body.decode("utf-8", "replace") for m in await _fetch(registry, None)}

    async def _publish(self, channel: aio_pika.abc.AbstractChannel, body: bytes) -> None:
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(
            message, routing_key=self.queue, timeout=self.publish_timeout
        )


async def _fetch(
    registry: aio_pika.abc.AbstractQueue, at_most: int | None
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Up to ``at_most`` (None: all) messages of ``registry``, unacknowledged."""
    fetched: list[aio_pika.abc.AbstractIncomingMessage] = []
    while at_most is None or len(fetched) < at_most:
        message = await registry.get(no_ack=False, fail=False)
        if message is None:
            break
        fetched.append(message)
    return fetched
