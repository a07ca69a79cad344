"""The ``db_only`` bet over every broker: two copies of one command at once apply once.

``tests/test_optimistic_hop.py`` forces each way of losing the bet over the
database transport. Here the copies come through RabbitMQ, NATS JetStream and
Redis Streams (the store on PostgreSQL): both copies run their handler before
either is admitted, one commits, the other's single statement changes
nothing and is answered from the inbox, and the reply of each leaves through
the outbox relay and the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import sagakit as sk
from sagakit.messages import Headers
from sagakit.testing import drop_tables
from sagakit.transport import Delivery, Outgoing
from sagakit.transport._url import with_option
from tests.broker_net import noted_namespace
from tests.helpers import Do, eventually
from tests.test_namespaces import CLEANUPS
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used by name through CLEANUPS

pytestmark = pytest.mark.timeout(120)

REPLIES = "bet.replies"


@asynccontextmanager
async def broker_app(
    broker: str, request: pytest.FixtureRequest, postgres_url: str, prefix: str, tag: str
) -> AsyncIterator[sk.App]:
    """An App on PostgreSQL over ``broker`` in a namespace of its own, cleaned up after."""
    fixture, cleanup = CLEANUPS[broker]
    url = with_option(str(request.getfixturevalue(fixture)), "namespace", noted_namespace(tag))
    settings = sk.Settings(prefix=prefix, max_poll=0.02, prefetch=4)
    app = sk.App(f"{postgres_url}?max_size=4", url, settings=settings)
    try:
        yield app
    finally:
        await cleanup(app)
        await app.store.open()
        await drop_tables(app.store)
        await app.store.close()


@pytest.mark.parametrize("broker", sorted(CLEANUPS))
async def test_two_copies_at_once_over_a_broker_apply_once(
    broker: str, request: pytest.FixtureRequest, postgres_url: str, prefix: str
) -> None:
    async with broker_app(broker, request, postgres_url, prefix, "bet") as app:
        await _two_copies(app, prefix)


async def _two_copies(app: sk.App, prefix: str) -> None:
    ledger, runs, both = f"{prefix}bet_ledger", [], asyncio.Event()

    @app.participant("p").command(Do, db_only=True)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        runs.append(cmd.key)
        if len(runs) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 20)  # both copies in their handler at once
        await ctx.db.later(f"INSERT INTO {ledger} (k) VALUES (?)", cmd.key)

    replies: list[sk.Envelope] = []

    async def collect(delivery: Delivery) -> None:
        replies.append(app.codec.decode(delivery.data))
        await delivery.ack()

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {ledger} (k TEXT)")  # no key: a run, a row
        await app.transport.declare(REPLIES, [])
        sub = await app.transport.consume(REPLIES, collect, prefetch=4)
        await app.transport.publish([_copy(app), _copy(app)])

        async def answered() -> bool:
            return len(replies) >= 2

        await eventually(answered, timeout=30)
        await sub.stop()
        assert [r.headers.outcome for r in replies] == ["success", "success"]
        assert runs == ["a", "a"]  # the bet: both ran before either was admitted
        async with app.store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT k FROM {ledger}")
            stored = await app.store.inbox_get(tx, "p", "saga:s1:x:forward")
        assert [r[0] for r in rows] == ["a"]
        assert stored is not None and stored.outcome == "success"
        assert await app.store.dead_letters() == []


def _copy(app: sk.App) -> Outgoing:
    """A copy of one saga command: its own message id, the step's inbox key."""
    headers = Headers(saga_id="s1", saga_type="t", step="x", reply_to=REPLIES)
    env = app.codec.make(Do("a"), headers)
    return Outgoing(env.id, "command", "p", app.codec.encode(env))
