"""The transport contract's part on removing a namespace (``Transport.remove_namespace``).

Mixed into :class:`~sagakit.testing.TransportContract`; kept apart so each
module stays one concept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import ForeignNamespace
from ..messages import Kind, new_id
from ..transport import Delivery, Outgoing, Transport
from ._support import raises

#: seconds of the delayed retry the removal test leaves behind (a delay queue on RabbitMQ)
REMOVAL_DELAY = 30.0


def _out(kind: Kind, destination: str, data: bytes) -> Outgoing:
    return Outgoing(new_id(), kind, destination, data)


class _Collect:
    """Acks and records; nacks the first delivery of ``b"later"`` with a long delay."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.got.append(delivery.data)
        if delivery.data == b"later" and delivery.attempt == 1:
            await delivery.nack(REMOVAL_DELAY)
        else:
            await delivery.ack()


class RemovalContract:
    """``remove_namespace``: everything of the namespace goes, and nothing else.

    Hook: :meth:`leftovers`, the broker objects of given queues and topics
    that the broker itself still reports (passive declare, stream info,
    ``EXISTS``); the default asks nothing, and the tests still check by
    behaviour that the messages are gone.
    """

    def new_queue(self) -> str:
        raise NotImplementedError

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        raise NotImplementedError

    async def settle_down(self) -> None:
        raise NotImplementedError

    async def leftovers(
        self, transport: Transport, queues: Sequence[str], topics: Sequence[str]
    ) -> list[str]:
        """Names of objects of ``transport``'s namespace the broker still has."""
        return []

    async def _fill(self, transport: Transport, q: str, topic: str) -> None:
        """Declare, publish a command and an event, and leave one delayed retry pending."""
        await transport.declare(q, [topic])
        inbox = _Collect()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await transport.publish([_out("command", q, b"later")])
            await self.wait(lambda: b"later" in inbox.got, "the delayed message was nacked")
        finally:
            await sub.stop()
        await transport.publish([_out("command", q, b"held"), _out("event", topic, b"event")])

    async def _after_reopen(self, transport: Transport, q: str, topic: str) -> list[bytes]:
        await transport.close()
        await transport.open()
        await transport.declare(q, [topic])
        inbox = _Collect()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await self.settle_down()
        finally:
            await sub.stop()
        return inbox.got

    async def test_remove_namespace_removes_what_it_created(self, transport: Transport) -> None:
        q, topic = self.new_queue(), self.new_queue()
        await self._fill(transport, q, topic)
        await transport.remove_namespace(transport.namespace)
        assert await self.leftovers(transport, [q], [topic]) == []
        await transport.remove_namespace(transport.namespace)  # idempotent
        assert await self._after_reopen(transport, q, topic) == []

    async def test_remove_namespace_is_safe_when_nothing_exists(self, transport: Transport) -> None:
        q, topic = self.new_queue(), self.new_queue()
        await transport.remove_namespace(transport.namespace)
        await transport.remove_namespace(transport.namespace)
        assert await self.leftovers(transport, [q], [topic]) == []

    async def test_remove_namespace_refuses_another_namespace(self, transport: Transport) -> None:
        q, topic = self.new_queue(), self.new_queue()
        await transport.declare(q, [topic])
        await transport.publish([_out("command", q, b"kept")])
        with raises(ForeignNamespace):
            await transport.remove_namespace(f"{transport.namespace}-other")
        inbox = _Collect()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await self.wait(lambda: inbox.got == [b"kept"], "the message survived the refusal")
        finally:
            await sub.stop()
