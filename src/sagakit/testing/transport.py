"""The transport contract: what every :class:`~sagakit.transport.Transport` must do."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

import msgspec

from ..errors import TransportError
from ..messages import Headers, Kind, command, new_id
from ..store import Store, open_store
from ..store.core import DeadLetter
from ..transport import Delivery, Outgoing, Subscription, Transport
from ._support import eventually as _eventually
from .removal import RemovalContract


@command("sagakit.testing.Ping")
class ContractPing(msgspec.Struct):
    """The command the transport contract's app-level test sends."""

    n: int


class _Deliveries:
    """Collects deliveries for the contract tests and settles them."""

    def __init__(self, *, settle: bool = True, hold: float = 0.0) -> None:
        self.got: list[tuple[bytes, int]] = []
        self.settle, self.hold = settle, hold
        self.running = 0
        self.max_running = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            self.got.append((delivery.data, delivery.attempt))
            if self.settle:
                await delivery.ack()
        finally:
            self.running -= 1

    def data(self) -> list[bytes]:
        return [d for d, _ in self.got]


def _at_least(inbox: _Deliveries, n: int) -> Callable[[], bool]:
    return lambda: len(inbox.data()) >= n


def _out(kind: Kind, destination: str, data: bytes) -> Outgoing:
    return Outgoing(new_id(), kind, destination, data)


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


class TransportContract(RemovalContract):
    """The contract every :class:`~sagakit.transport.Transport` keeps.

    Subclass it in a test module and provide the fixture ``transport``: an
    opened transport, closed (and its queues removed) at teardown. Override
    as needed:

    - :meth:`open_peer`: a *second* opened transport on the same broker or
      database (another process, in effect); by default the same object. The
      tests close the peers they open;
    - :meth:`crash`: abandon a subscription like a process that died, without
      settling its deliveries (default: skip the test);
    - :meth:`cut_connection`: cut the transport's connection to its broker or
      restart the broker (default: skip the test);
    - :meth:`app_store`: the store of the app-level tests (default: a new
      in-memory SQLite store; the database transport gives its own store);
    - :meth:`new_queue`: a unique queue name (the fixture can clean up after
      the names it hands out);
    - :meth:`leftovers`: what the broker itself still reports of the
      namespace after ``remove_namespace`` (:class:`.removal.RemovalContract`).

    Hooks are methods rather than fixtures so this module imports without
    pytest; ``pytest.skip`` is only imported by the default hooks that skip.
    """

    #: seconds to wait for something that must happen
    timeout: ClassVar[float] = 15.0
    #: seconds of quiet after which "nothing more arrived" is believed
    quiet: ClassVar[float] = 0.5

    # -- hooks -------------------------------------------------------------

    def new_queue(self) -> str:
        """A queue (or topic) name no other test uses."""
        return f"contract-{uuid.uuid4().hex[:12]}"

    async def open_peer(self, transport: Transport) -> Transport:
        """Another opened transport on the same broker; the test closes it."""
        return transport

    def app_store(self, transport: Transport) -> Store:
        """The store of the app in the app-level test."""
        return open_store("memory://")

    async def crash(self, transport: Transport, subscription: Subscription) -> None:
        """Make ``subscription`` vanish with its deliveries unsettled."""
        _skip(f"{type(transport).__name__}: a consumer cannot die apart from its broker")

    async def cut_connection(self, transport: Transport) -> None:
        """Cut the connection under ``transport`` (or restart its broker)."""
        _skip(f"{type(transport).__name__} has no connection to cut")

    async def close_peer(self, transport: Transport, peer: Transport) -> None:
        if peer is not transport:
            await peer.close()

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        await _eventually(check, self.timeout, what)

    async def settle_down(self) -> None:
        """Give stray (wrong) deliveries time to show up."""
        await asyncio.sleep(self.quiet)

    # -- health ------------------------------------------------------------

    async def test_ping_answers_while_the_broker_is_reachable(self, transport: Transport) -> None:
        for _ in range(3):  # cheap enough to ask at every readiness probe
            await asyncio.wait_for(transport.ping(), self.timeout)

    # -- at-least-once -----------------------------------------------------

    async def test_delivers_each_message(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=8)
        try:
            sent = [f"m{i}".encode() for i in range(20)]
            await transport.publish([_out("command", q, d) for d in sent])
            await self.wait(lambda: len(inbox.got) >= len(sent), "all delivered")
            await self.settle_down()
            assert sorted(inbox.data()) == sorted(sent)  # acked: no redelivery
            assert {a for _, a in inbox.got} == {1}
        finally:
            await sub.stop()

    async def test_holds_messages_until_a_consumer_comes(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        await transport.publish([_out("command", q, b"early"), _out("reply", q, b"r")])
        inbox = _Deliveries()
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
            await transport.publish([_out("command", q, b"x")])
            await self.wait(lambda: len(attempts) >= 2, "redelivered after a crash")
            await self.settle_down()
            assert attempts == [1, 2]
        finally:
            await sub.stop()

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
            await transport.publish([_out("command", q, b"retry me")])
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
        await transport.publish([_out("command", q, b"orphan")])
        try:
            await self.wait(lambda: bool(taken), "taken by the doomed consumer")
            await self.crash(peer, doomed)
        finally:
            never.set()
            await self.close_peer(transport, peer)
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=1)
        try:
            await self.wait(lambda: bool(inbox.got), "redelivered to a live consumer")
            assert inbox.got[0][0] == b"orphan"
            assert inbox.got[0][1] >= 2, "a redelivery counts as a new attempt"
        finally:
            await sub.stop()

    # -- consumers and fan-out ---------------------------------------------

    async def test_competing_consumers_share_a_queue(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        peer = await self.open_peer(transport)
        a, b = _Deliveries(hold=0.02), _Deliveries(hold=0.02)
        sub_a = await transport.consume(q, a, prefetch=1)
        sub_b = await peer.consume(q, b, prefetch=1)
        try:
            sent = [f"w{i}".encode() for i in range(30)]
            await transport.publish([_out("command", q, d) for d in sent])
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
        boxes = {q: _Deliveries() for q in (q1, q2, q3)}
        subs = [await transport.consume(q, box, prefetch=4) for q, box in boxes.items()]
        try:
            await transport.publish([_out("event", topic, b"e1"), _out("event", topic, b"e2")])
            await transport.publish([_out("event", other, b"o1")])
            await transport.publish([_out("event", f"{topic}.nobody", b"lost")])
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
        a, b = _Deliveries(hold=0.01), _Deliveries(hold=0.01)
        subs = [await transport.consume(q, a, prefetch=1), await peer.consume(q, b, prefetch=1)]
        try:
            sent = [f"e{i}".encode() for i in range(10)]
            await transport.publish([_out("event", topic, d) for d in sent])
            await self.wait(lambda: len(a.got) + len(b.got) >= len(sent), "events handled")
            await self.settle_down()
            assert sorted(a.data() + b.data()) == sorted(sent)
        finally:
            for sub in subs:
                await sub.stop()
            await self.close_peer(transport, peer)

    # -- flow control and lifecycle ----------------------------------------

    async def test_in_flight_handlers_never_exceed_prefetch(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries(hold=0.03)
        sub = await transport.consume(q, inbox, prefetch=3)
        try:
            await transport.publish([_out("command", q, f"{i}".encode()) for i in range(24)])
            await self.wait(lambda: len(inbox.got) >= 24, "all handled")
            assert 1 <= inbox.max_running <= 3
        finally:
            await sub.stop()

    async def test_stop_waits_for_handlers_in_flight(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries(hold=0.3)
        sub = await transport.consume(q, inbox, prefetch=2)
        await transport.publish([_out("command", q, b"slow")])
        await self.wait(lambda: inbox.running > 0, "handler started")
        await sub.stop()
        assert inbox.got == [(b"slow", 1)] and inbox.running == 0

    async def test_reconnects_after_the_connection_is_cut(self, transport: Transport) -> None:
        q = self.new_queue()
        await transport.declare(q, [])
        inbox = _Deliveries()
        sub = await transport.consume(q, inbox, prefetch=4)
        try:
            await transport.publish([_out("command", q, b"before")])
            await self.wait(lambda: len(inbox.got) == 1, "delivered before the cut")
            await self.cut_connection(transport)
            loop = asyncio.get_running_loop()
            end = loop.time() + self.timeout
            while True:  # callers retry a failed publish (the relay does)
                try:
                    await transport.publish([_out("command", q, b"after")])
                    break
                except TransportError:
                    if loop.time() > end:
                        raise
                    await asyncio.sleep(0.1)
            await self.wait(lambda: b"after" in inbox.data(), "delivered after the cut")
        finally:
            await sub.stop()

    # -- poison messages, one layer up ---------------------------------------

    async def test_poison_message_is_dead_lettered_and_the_queue_moves_on(
        self, transport: Transport
    ) -> None:
        from ..app import App

        name = self.new_queue()
        app_store = self.app_store(transport)
        app = App(store=app_store, transport=transport)
        handled: list[int] = []
        part = app.participant(name)

        @part.command(ContractPing)
        async def ping(cmd: ContractPing, ctx: Any) -> None:
            handled.append(cmd.n)

        await app.start()
        try:
            garbage = b"\xff\x00 this is not an envelope"
            good = app.codec.encode(app.codec.make(ContractPing(7), Headers()))
            await transport.publish([_out("command", name, garbage)])
            await transport.publish([_out("command", name, good)])
            dead: list[DeadLetter] = []

            async def dead_lettered() -> bool:
                dead[:] = [d for d in await app_store.dead_letters(1000) if d.queue == name]
                return bool(dead)

            await self.wait(lambda: handled == [7], "the valid message was handled")
            await _eventually(dead_lettered, self.timeout, "the garbage was dead-lettered")
            await self.settle_down()
            assert handled == [7]
            assert await dead_lettered() and len(dead) == 1
            assert dead[0].data == garbage
            assert dead[0].error_type == "MalformedMessage"
            assert dead[0].reason
        finally:
            await app.stop()

    async def test_a_duplicate_command_gets_the_stored_reply_and_it_arrives(
        self, transport: Transport
    ) -> None:
        """A step retried after its timeout runs once, and *both* replies arrive.

        The second reply is the first one re-sent from the inbox: a broker that
        dedupes by message id (NATS JetStream) must not drop it.
        """
        from ..app import App

        name, replies = self.new_queue(), self.new_queue()
        app = App(store=self.app_store(transport), transport=transport)
        runs: list[int] = []
        part = app.participant(name)

        @part.command(ContractPing)
        async def ping(cmd: ContractPing, ctx: Any) -> None:
            runs.append(cmd.n)

        await app.start()
        inbox = _Deliveries()
        await transport.declare(replies, [])
        sub = await transport.consume(replies, inbox, prefetch=4)
        try:
            saga_id = new_id()
            for attempt in (1, 2):  # the retry is a new message for the same step
                headers = Headers(
                    saga_id=saga_id, step="ping", phase="forward", reply_to=replies, attempt=attempt
                )
                env = app.codec.make(ContractPing(attempt), headers)
                await transport.publish([_out("command", name, app.codec.encode(env))])
                await self.wait(_at_least(inbox, attempt), f"reply {attempt} arrived")
            await self.settle_down()
            got = [app.codec.decode(d) for d in inbox.data()]
            assert runs == [1], "the handler ran once"
            assert [e.headers.outcome for e in got] == ["success", "success"]
            assert [e.headers.attempt for e in got] == [1, 2]
            assert len({e.id for e in got}) == 2, "the re-sent reply has an id of its own"
        finally:
            await sub.stop()
            await app.stop()
