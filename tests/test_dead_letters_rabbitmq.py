"""Replaying dead letters onto a broker: from Python and from the CLI, over RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

import sagakit as sk
from sagakit.messages import Headers
from sagakit.transport import Outgoing
from sagakit.transport.rabbitmq import RabbitMQTransport
from tests.helpers import Happened, eventually
from tests.test_dead_letters_cli import ok_json, sagakit
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts, remove_rabbitmq

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)


class Audit:
    def __init__(self) -> None:
        self.broken = True
        self.seen: list[str] = []

    async def on_happened(self, evt: Happened, ctx: sk.Context) -> None:
        if self.broken:
            raise RuntimeError("audit log unavailable")
        self.seen.append(evt.key)


@pytest.fixture
async def audited(amqp_url: str, tmp_path) -> AsyncIterator[tuple[sk.App, Audit, str]]:  # type: ignore[no-untyped-def]
    namespace = f"dl-{uuid.uuid4().hex[:8]}"
    t = RabbitMQTransport(amqp_url, namespace=namespace)
    settings = sk.Settings(retry=sk.RetryPolicy(max_attempts=2, initial=0.01), max_poll=0.05)
    app = sk.App(f"sqlite:///{tmp_path}/dl.db", transport=t, settings=settings)
    audit = Audit()
    app.participant("audit").event(Happened)(audit.on_happened)
    try:
        async with app:
            yield app, audit, f"{amqp_url}?namespace={namespace}"
    finally:
        await remove_rabbitmq(t)


async def test_dead_letters_replay_onto_rabbitmq_once(
    audited: tuple[sk.App, Audit, str],
) -> None:
    app, audit, broker = audited
    for key in ("api", "cli"):
        env = app.codec.make(Happened(key), Headers())
        await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])
    await eventually(lambda: _dead(app, 2), timeout=30)
    by_key = {_key(app, d.data): d for d in await app.dead_letters.list()}
    audit.broken = False

    await app.dead_letters.replay(by_key["api"].seq, actor=sk.Actor("alice"), reason="fixed")
    store = app.store.url
    replay = ("dead-letters", "replay", str(by_key["cli"].seq), "--store", store, "--json")
    done = await asyncio.to_thread(
        sagakit, *replay, "--reason", "fixed", "--actor", "bob", "--transport", broker
    )
    assert len(ok_json(done)["done"]) == 1

    await eventually(lambda: _true(sorted(audit.seen) == ["api", "cli"]), timeout=30)
    await asyncio.sleep(0.5)
    assert sorted(audit.seen) == ["api", "cli"], "each replayed message processed once"
    assert await app.dead_letters.list() == []
    assert sorted(a.actor for a in await app.dead_letters.actions()) == ["alice", "bob"]


async def _dead(app: sk.App, n: int) -> bool:
    return len(await app.dead_letters.list()) >= n


def _key(app: sk.App, data: bytes) -> str:
    return app.codec.payload(app.codec.decode(data), Happened).key


async def _true(value: bool) -> bool:
    return value
