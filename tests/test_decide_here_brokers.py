"""A ``db_only`` step's reply decided on in its own hop, over every broker.

``tests/test_decide_here.py`` forces the cases over the database transport.
Here the commands come through RabbitMQ, NATS JetStream and Redis Streams
(the store on PostgreSQL, the coordinator in the participant's App): no
reply travels, each step and the decision after it commit together, and a
copy of a step's command arriving after the saga moved on is answered from
the inbox through the relay, changing nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

import sagakit as sk
from sagakit.transport import Outgoing
from tests.helpers import Data, Do, eventually
from tests.test_namespaces import CLEANUPS
from tests.test_optimistic_hop_brokers import broker_app
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used by name through CLEANUPS

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("broker", sorted(CLEANUPS))
async def test_steps_decided_in_their_hops_over_a_broker(
    broker: str, request: pytest.FixtureRequest, postgres_url: str, prefix: str
) -> None:
    async with broker_app(broker, request, postgres_url, prefix, "here") as app:
        await _saga_over(app, prefix)


async def _saga_over(app: sk.App, prefix: str) -> None:
    ledger, commands, replies = f"{prefix}here_ledger", [], []

    @app.participant("p").command(Do, db_only=True)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        commands.append(ctx.envelope)
        await ctx.db.later(f"INSERT INTO {ledger} (k) VALUES (?)", cmd.key)

    defn = app.saga(
        sk.Saga("t-here-broker", Data)
        .step("one")
        .invoke("p", lambda d: Do(d.key + "1"))
        .step("two")
        .invoke("p", lambda d: Do(d.key + "2"))
        .build()
    )
    coord = app.sagas.coordinator
    on_reply = coord.on_reply

    async def counted(scope: Any) -> None:
        replies.append(scope.env)
        await on_reply(scope)

    coord.on_reply = counted  # type: ignore[method-assign]
    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {ledger} (k TEXT)")  # no key: a run, a row
        saga_id = await app.sagas.start(defn, Data("k"))
        view = await app.sagas.wait(saga_id, timeout=30)
        assert view.state == "completed"
        assert replies == []  # both steps decided in their own hops
        first = commands[0]
        await app.transport.publish(
            [Outgoing(sk.new_id(), "command", "p", app.codec.encode(_copy(app, first)))]
        )

        async def answered() -> bool:
            return len(replies) == 1

        await eventually(answered, timeout=30)  # the copy's stored reply, re-sent
        async with app.store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT k FROM {ledger} ORDER BY k")
        assert [r[0] for r in rows] == ["k1", "k2"]
        assert len(commands) == 3  # the copy's Python ran (the bet), its write did not
        assert (await app.sagas.get(saga_id)).state == "completed"
        assert await app.store.dead_letters() == []


def _copy(app: sk.App, env: sk.Envelope) -> sk.Envelope:
    """The same command under a new message id (a redelivery the broker can't dedupe)."""
    return app.codec.make(app.codec.payload(env), env.headers)
