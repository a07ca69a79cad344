"""The transport contract's part on delivery: health, at-least-once and acknowledgement."""

from __future__ import annotations

import asyncio

from ..transport import Delivery, Transport
from ._contract import Deliveries, TransportHooks, out


class DeliveryContract(TransportHooks):
    """Health and at-least-once delivery.

    A reachable broker answers; every message arrives, is held until
    consumed, and is delivered again until acknowledged.
    """

    async def test_ping_answers_while_the_broker_is_reachable(self, transport: Transport) -> None:
        for _ in range(3):  # cheap enough to ask at every readiness probe
            await asyncio.wait_for(transport.ping(), self.timeout)

    async def test_delivers_each_message(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = Deliveries()
        sub = await transport.consume(q, inbox, prefetch=8)
        try:
            sent = [f"m{i}".encode() for i in range(20)]
            await transport.publish([out("command", q, d) for d in sent])
            await self.wait(lambda: len(inbox.got) >= len(sent), "all delivered")
            await self.settle_down()
            assert sorted(inbox.data()) == sorted(sent)  # acked: no redelivery
            assert {a for _, a in inbox.got} == {1}
        finally:
            await sub.stop()

    async def test_holds_messages_until_a_consumer_comes(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        await transport.publish([out("command", q, b"early"), out("reply", q, b"r")])
        inbox = Deliveries()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await self.wait(lambda: len(inbox.got) == 2, "held messages delivered")
            assert sorted(inbox.data()) == [b"early", b"r"]
        finally:
            await sub.stop()

    async def test_handler_that_raises_gets_the_message_again(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        attempts: list[int] = []

        async def flaky(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if len(attempts) == 1:
                raise RuntimeError("boom: not acknowledged")
            await delivery.ack()

        sub = await transport.consume(q, flaky, prefetch=1)
        try:
            await transport.publish([out("command", q, b"x")])
            await self.wait(lambda: len(attempts) >= 2, "redelivered after a crash")
            await self.settle_down()
            assert attempts == [1, 2]
        finally:
            await sub.stop()
