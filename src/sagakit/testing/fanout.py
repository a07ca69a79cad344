"""The transport contract's part on fan-out: competing consumers and events to every bound queue."""

from __future__ import annotations

from ..transport import Transport
from ._contract import Deliveries, TransportHooks, out


class FanOutContract(TransportHooks):
    """Competing consumers and fan-out.

    Consumers of one queue compete for its messages; an event reaches every
    queue bound to its topic, and only those.
    """

    async def test_competing_consumers_share_a_queue(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        peer = await self.open_peer(transport)
        a, b = Deliveries(hold=0.02), Deliveries(hold=0.02)
        sub_a = await transport.consume(q, a, prefetch=1)
        sub_b = await peer.consume(q, b, prefetch=1)
        try:
            sent = [f"w{i}".encode() for i in range(30)]
            await transport.publish([out("command", q, d) for d in sent])
            await self.wait(lambda: len(a.got) + len(b.got) >= len(sent), "all handled")
            await self.settle_down()
            handled = a.data() + b.data()
            assert sorted(handled) == sorted(sent), "each message to exactly one consumer"
            assert a.got and b.got, "both consumers took work"
        finally:
            await sub_a.stop()
            await sub_b.stop()
            await self.close_peer(transport, peer)

    async def test_events_fan_out_to_every_bound_queue(self, transport: Transport) -> None:
        topic, other = f"{self.new_queue()}.Happened", f"{self.new_queue()}.Other"
        q1, q2, q3 = self.new_queue(), self.new_queue(), self.new_queue()
        await transport.declare(q1, [topic])
        await transport.declare(q2, [topic, other])
        await transport.declare(q3, [other])
        boxes = {q: Deliveries() for q in (q1, q2, q3)}
        subs = [await transport.consume(q, box, prefetch=4) for q, box in boxes.items()]
        try:
            await transport.publish([out("event", topic, b"e1"), out("event", topic, b"e2")])
            await transport.publish([out("event", other, b"o1")])
            await transport.publish([out("event", f"{topic}.nobody", b"lost")])
            await self.wait(
                lambda: len(boxes[q1].got) >= 2 and len(boxes[q2].got) >= 3 and bool(boxes[q3].got),
                "events fanned out",
            )
            await self.settle_down()
            assert sorted(boxes[q1].data()) == [b"e1", b"e2"]
            assert sorted(boxes[q2].data()) == [b"e1", b"e2", b"o1"]
            assert boxes[q3].data() == [b"o1"]
        finally:
            for sub in subs:
                await sub.stop()

    async def test_competing_consumers_share_events_of_one_queue(
        self, transport: Transport
    ) -> None:
        topic, q = f"{self.new_queue()}.Happened", self.new_queue()
        await transport.declare(q, [topic])
        peer = await self.open_peer(transport)
        a, b = Deliveries(hold=0.01), Deliveries(hold=0.01)
        subs = [await transport.consume(q, a, prefetch=1), await peer.consume(q, b, prefetch=1)]
        try:
            sent = [f"e{i}".encode() for i in range(10)]
            await transport.publish([out("event", topic, d) for d in sent])
            await self.wait(lambda: len(a.got) + len(b.got) >= len(sent), "events handled")
            await self.settle_down()
            assert sorted(a.data() + b.data()) == sorted(sent)
        finally:
            for sub in subs:
                await sub.stop()
            await self.close_peer(transport, peer)
