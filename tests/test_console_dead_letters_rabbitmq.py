"""The console replays a dead letter onto a broker: queued, then published by the
coordinator process (which has the transport), processed once, over RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.web import create_app
from sagakit.messages import Headers
from sagakit.transport import Outgoing
from sagakit.transport.rabbitmq import RabbitMQTransport
from tests.console_bench import token
from tests.helpers import Data, Happened, eventually
from tests.test_console_dead_letters import Ledger, keep
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts, remove_rabbitmq

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def bench(amqp_url: str, tmp_path) -> AsyncIterator[tuple[sk.App, Ledger]]:  # type: ignore[no-untyped-def]
    t = RabbitMQTransport(amqp_url, namespace=f"dlc-{uuid.uuid4().hex[:8]}")
    settings = sk.Settings(retry=sk.RetryPolicy(max_attempts=2, initial=0.01), max_poll=0.05)
    app = sk.App(f"sqlite:///{tmp_path}/dl.db", transport=t, settings=settings)
    app.saga(sk.Saga("noop", Data).step("keep").local(keep).build())  # so a coordinator runs
    ledger = Ledger(app)
    try:
        async with app:
            yield app, ledger
    finally:
        await remove_rabbitmq(t)


async def test_a_replay_from_the_console_is_published_to_the_broker_and_runs_once(
    bench: tuple[sk.App, Ledger],
) -> None:
    app, ledger = bench
    env = app.codec.make(Happened("k1"), Headers())
    await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])
    await eventually(lambda: _dead(app), timeout=30)
    [letter] = await app.dead_letters.list()
    assert not app.dead_letters.in_store(letter), "a broker queue"
    ledger.broken = False
    web = create_app(app.store)
    transport = httpx.ASGITransport(app=web)
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
        r = await http.post(
            f"/api/dead-letters/{letter.seq}/replay",
            headers={"Authorization": f"Bearer {await token(app, 'operator')}"},
            json={"reason": "ledger is back", "wait": 20},
        )
    assert r.json()["outcome"] == "done", r.text
    await eventually(lambda: _true(ledger.seen == ["k1"]), timeout=30)
    await asyncio.sleep(0.5)
    assert ledger.seen == ["k1"] and await app.dead_letters.list() == []
    [line] = await Operations(app.store).audit.list(AuditFilter(action="dead-letters.replay"))
    assert line.outcome == "done" and line.detail == "replay ledger"


async def _dead(app: sk.App) -> bool:
    return len(await app.dead_letters.list()) == 1


async def _true(value: bool) -> bool:
    return value
