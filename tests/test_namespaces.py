"""Deployments sharing one broker stay apart by namespace.

Two Apps with the same participant, saga and queue names (``stock``,
``sagakit.coordinator``, ...) run sagas at the same time on one RabbitMQ
virtual host, one NATS server or one Redis. Each names its namespace a
different way (the URL's ``?namespace=``, or ``Settings.namespace``), and each
must complete exactly its own sagas: a command or reply taken by the other
App would show up as a foreign order in its handler log, a reply from the
wrong App, or a dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.transport._url import with_option
from tests.broker_net import noted_namespace
from tests.test_nats import delete_stream
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts, remove_rabbitmq
from tests.test_redis import remove_redis

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used by name below

pytestmark = pytest.mark.timeout(120)

SAGAS = 8


@sk.command("ns.Reserve")
class Reserve(msgspec.Struct):
    order: str


@sk.reply("ns.Reserved")
class Reserved(msgspec.Struct):
    by: str


@dataclass
class Order:
    order: str
    by: str = ""


@dataclass
class Deployment:
    label: str
    app: sk.App
    saga: sk.SagaDefinition[Order]
    seen: list[str]


def deployment(store: str, transport: str, label: str, namespace: str | None) -> Deployment:
    """One App; both deployments use identical participant and saga names."""
    fast = sk.RetryPolicy(max_attempts=3, initial=0.02)
    settings = sk.Settings(retry=fast, max_poll=0.02, namespace=namespace)
    app = sk.App(store, transport, settings=settings)
    stock = app.participant("stock")
    seen: list[str] = []

    @stock.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> Reserved:
        seen.append(cmd.order)
        return Reserved(label)

    saga = app.saga(
        sk.Saga("ns-order", Order)
        .step("reserve")
        .invoke("stock", lambda d: Reserve(d.order))
        .on_reply(Reserved, lambda d, r: replace(d, by=r.by))
        .build()
    )
    return Deployment(label, app, saga, seen)


async def run_sagas(d: Deployment) -> list[Any]:
    """Start this deployment's sagas, all at once, and wait for every one."""
    ids = [
        await d.app.sagas.start(d.saga, Order(f"{d.label}-{i}"), saga_id=f"{d.label}-{i}")
        for i in range(SAGAS)
    ]
    return [await d.app.sagas.wait(i, timeout=60) for i in ids]


Cleanup = Callable[[sk.App], Awaitable[None]]


async def _nats_cleanup(app: sk.App) -> None:
    t: Any = app.transport
    await delete_stream(t.servers[0], t.stream)


CLEANUPS: dict[str, tuple[str, Cleanup]] = {
    "rabbitmq": ("amqp_url", lambda app: remove_rabbitmq(app.transport)),  # type: ignore[arg-type]
    "nats": ("nats_url", _nats_cleanup),
    "redis": ("redis_url", lambda app: remove_redis(app.transport)),
}


@pytest.mark.parametrize("broker", sorted(CLEANUPS))
async def test_two_namespaces_on_one_broker_each_complete_only_their_own_sagas(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture, cleanup = CLEANUPS[broker]
    url = str(request.getfixturevalue(fixture))
    ns_a, ns_b = noted_namespace("a"), noted_namespace("b")
    a = deployment(f"sqlite:///{tmp_path}/a.db", with_option(url, "namespace", ns_a), "A", None)
    b = deployment(f"sqlite:///{tmp_path}/b.db", url, "B", ns_b)
    assert getattr(a.app.transport, "namespace") == ns_a  # noqa: B009 - every broker has one
    assert getattr(b.app.transport, "namespace") == ns_b  # noqa: B009
    try:
        async with a.app, b.app:
            views = await asyncio.gather(run_sagas(a), run_sagas(b))
            for d, mine in zip((a, b), views, strict=True):
                assert [v.state for v in mine] == ["completed"] * SAGAS
                assert {v.data.by for v in mine} == {d.label}, "the reply came from its own App"
                own = {f"{d.label}-{i}" for i in range(SAGAS)}
                assert set(d.seen) == own, "its handler saw only its own App's commands"
                assert await d.app.store.dead_letters() == []
    finally:
        for d in (a, b):
            await cleanup(d.app)
