"""The transport contract's part on flow control, stopping and outages."""

from __future__ import annotations

import asyncio

from ..errors import TransportError
from ..transport import Transport
from ._contract import Deliveries, TransportHooks, out


class LifecycleContract(TransportHooks):
    """Flow control, stopping and outages.

    ``prefetch`` bounds the handlers running; ``stop`` waits for them; a cut
    connection heals.
    """

    async def test_in_flight_handlers_never_exceed_prefetch(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = Deliveries(hold=0.03)
        sub = await transport.consume(q, inbox, prefetch=3)
        try:
            await transport.publish([out("command", q, f"{i}".encode()) for i in range(24)])
            await self.wait(lambda: len(inbox.got) >= 24, "all handled")
            assert 1 <= inbox.max_running <= 3
        finally:
            await sub.stop()

    async def test_stop_waits_for_handlers_in_flight(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = Deliveries(hold=0.3)
        sub = await transport.consume(q, inbox, prefetch=2)
        await transport.publish([out("command", q, b"slow")])
        await self.wait(lambda: inbox.running > 0, "handler started")
        await sub.stop()
        assert inbox.got == [(b"slow", 1)] and inbox.running == 0

    async def test_reconnects_after_the_connection_is_cut(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = Deliveries()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await transport.publish([out("command", q, b"before")])
            await self.wait(lambda: len(inbox.got) == 1, "delivered before the cut")
            await self.cut_connection(transport)
            loop = asyncio.get_running_loop()
            end = loop.time() + self.timeout
            while True:  # callers retry a failed publish (the relay does)
                try:
                    await transport.publish([out("command", q, b"after")])
                    break
                except TransportError:
                    if loop.time() > end:
                        raise
                    await asyncio.sleep(0.1)
            await self.wait(lambda: b"after" in inbox.data(), "delivered after the cut")
        finally:
            await sub.stop()
