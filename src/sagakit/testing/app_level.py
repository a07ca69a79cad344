"""The transport contract's part one layer up: an app on the transport.

Poison messages and duplicate commands, as the app sees them through the transport.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..messages import Headers, command, new_id
from ..store.core import DeadLetter
from ..transport import Transport
from ._contract import Deliveries, TransportHooks, at_least, out
from ._support import eventually


@command("sagakit.testing.Ping")
class ContractPing(msgspec.Struct):
    """The command the transport contract's app-level test sends."""

    n: int


class AppLevelContract(TransportHooks):
    """An app on the transport: poison messages and duplicate commands.

    A poison message is dead-lettered and the queue moves on; a duplicate
    command gets the stored reply, and both replies arrive.
    """

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
            await transport.publish([out("command", name, garbage)])
            await transport.publish([out("command", name, good)])
            dead: list[DeadLetter] = []

            async def dead_lettered() -> bool:
                dead[:] = [d for d in await app_store.dead_letters(1000) if d.queue == name]
                return bool(dead)

            await self.wait(lambda: handled == [7], "the valid message was handled")
            await eventually(dead_lettered, self.timeout, "the garbage was dead-lettered")
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
        inbox = Deliveries()
        await transport.declare(replies, [])
        sub = await transport.consume(replies, inbox, prefetch=4)
        try:
            saga_id = new_id()
            for attempt in (1, 2):  # the retry is a new message for the same step
                headers = Headers(
                    saga_id=saga_id, step="ping", phase="forward", reply_to=replies, attempt=attempt
                )
                env = app.codec.make(ContractPing(attempt), headers)
                await transport.publish([out("command", name, app.codec.encode(env))])
                await self.wait(at_least(inbox, attempt), f"reply {attempt} arrived")
            await self.settle_down()
            got = [app.codec.decode(d) for d in inbox.data()]
            assert runs == [1], "the handler ran once"
            assert [e.headers.outcome for e in got] == ["success", "success"]
            assert [e.headers.attempt for e in got] == [1, 2]
            assert len({e.id for e in got}) == 2, "the re-sent reply has an id of its own"
        finally:
            await sub.stop()
            await app.stop()
