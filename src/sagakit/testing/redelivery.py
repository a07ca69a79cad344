"""The transport contract's part on redelivery: delayed nacks and leases of dead consumers."""

from __future__ import annotations

import asyncio
import itertools

from ..transport import Delivery, Transport
from ._contract import Deliveries, TransportHooks, out


class RedeliveryContract(TransportHooks):
    """Redelivery: delayed nacks and leases.

    A nack comes back after its delay; a dead consumer's message comes back
    when its lease ends, as a new attempt.
    """

    async def test_nack_redelivers_after_the_delay_with_growing_attempt(
        self, transport: Transport
    ) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        loop = asyncio.get_running_loop()
        seen: list[tuple[float, int]] = []
        delay = 0.3

        async def retry_twice(delivery: Delivery) -> None:
            seen.append((loop.time(), delivery.attempt))
            if delivery.attempt < 3:
                await delivery.nack(delay)
            else:
                await delivery.ack()

        sub = await transport.consume(q, retry_twice, prefetch=2)
        try:
            await transport.publish([out("command", q, b"retry me")])
            await self.wait(lambda: len(seen) >= 3, "three attempts")
            await self.settle_down()
            assert [a for _, a in seen] == [1, 2, 3]
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
            assert all(g >= delay * 0.8 for g in gaps), gaps
        finally:
            await sub.stop()

    async def test_message_of_a_dead_consumer_is_delivered_again(
        self, transport: Transport
    ) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        peer = await self.open_peer(transport)
        taken: list[int] = []
        never = asyncio.Event()

        async def dies(delivery: Delivery) -> None:
            taken.append(delivery.attempt)
            await never.wait()

        doomed = await peer.consume(q, dies, prefetch=1)
        await transport.publish([out("command", q, b"orphan")])
        try:
            await self.wait(lambda: bool(taken), "taken by the doomed consumer")
            await self.crash(peer, doomed)
        finally:
            never.set()
            await self.close_peer(transport, peer)
        inbox = Deliveries()
        sub = await transport.consume(q, inbox, prefetch=1)
        try:
            await self.wait(lambda: bool(inbox.got), "redelivered to a live consumer")
            assert inbox.got[0][0] == b"orphan"
            assert inbox.got[0][1] >= 2, "a redelivery counts as a new attempt"
        finally:
            await sub.stop()
