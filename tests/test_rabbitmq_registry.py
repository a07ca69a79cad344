"""The RabbitMQ registry of names (``{namespace}.names``) stays compact and loses no name.

Every process lists the queues and delay buckets it declares in the registry,
so that ``remove_namespace`` can find them; a transport that opens and finds
more than ``registry.limit`` messages there compacts them to their distinct
entries. Against a real broker, in a private virtual host (see test_rabbitmq).
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import aio_pika.abc
import pytest

from sagakit.testing.removal import REMOVAL_DELAY
from sagakit.transport.rabbitmq import RabbitMQTransport, delay_bucket, transport
from tests.test_rabbitmq import amqp_url, rabbitmq_leftovers, rabbitmq_vhosts, remove_rabbitmq

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)

QUEUES = ["orders", "payments", "shipping"]


async def registry_count(t: RabbitMQTransport) -> int:
    """Messages in ``t``'s registry (a passive declare on a channel of its own)."""
    channel = await t.connection.channel()
    try:
        queue = await channel.declare_queue(t.registry_queue, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def registry_entries(t: RabbitMQTransport) -> list[str]:
    """Every registry message, fetched unacknowledged and handed back by closing the channel."""
    channel = await t.connection.channel()
    registry = await channel.declare_queue(t.registry_queue, durable=True)
    bodies: list[str] = []
    while (message := await registry.get(no_ack=False, fail=False)) is not None:
        bodies.append(message.body.decode())
    await channel.close()
    return bodies


async def worker_start(url: str, namespace: str, limit: int) -> RabbitMQTransport:
    """What a worker process does on start: open, declare its queues, use a delay bucket."""
    t = transport(url, namespace=namespace)
    t.registry.limit = limit
    await t.open()
    for queue in QUEUES:
        await t.declare(queue, ["evt"])
    await t.admin.delay_exchange(delay_bucket(REMOVAL_DELAY))
    return t


@pytest.mark.parametrize("limit", [0, 5])
async def test_worker_restarts_keep_the_registry_compact(amqp_url: str, limit: int) -> None:
    namespace = f"skreg-{uuid.uuid4().hex[:8]}"
    distinct = {f"q:{q}" for q in QUEUES} | {f"delay:{delay_bucket(REMOVAL_DELAY)}"}
    counts = []
    for _ in range(12):  # without compaction: 12 x 4 messages
        t = await worker_start(amqp_url, namespace, limit)
        counts.append(await registry_count(t))
        await t.close()
    t = await worker_start(amqp_url, namespace, 0)
    try:
        assert sorted(await registry_entries(t)) == sorted(distinct)  # compacted: each once
        if limit == 0:
            assert counts == [len(distinct)] * 12
        else:
            assert max(counts) <= limit + len(distinct)
    finally:
        await remove_rabbitmq(t)
    assert await rabbitmq_leftovers(t, QUEUES, ["evt"]) == []


async def test_compaction_loses_no_name_registered_meanwhile(amqp_url: str) -> None:
    namespace = f"skreg-{uuid.uuid4().hex[:8]}"
    old = [f"old{i}" for i in range(10)]
    seed = transport(amqp_url, namespace=namespace)
    await seed.open()
    for queue in old:  # 10 entries, then 30 more copies of each: 310 messages
        await seed.declare(queue, [])
    for _ in range(30):
        for queue in old:
            message = aio_pika.Message(f"q:{queue}".encode())
            await seed.link.channel().default_exchange.publish(
                message, routing_key=seed.registry_queue
            )
    other = transport(amqp_url, namespace=namespace)
    await other.open()
    compacting = transport(amqp_url, namespace=namespace)
    compacting.registry.limit = 0
    opening = asyncio.create_task(compacting.open())
    new: list[str] = []
    while True:  # another worker declares queues as long as the compaction runs
        new.append(f"new{len(new)}")
        await other.declare(new[-1], [])
        if opening.done():
            break
    await opening
    try:
        entries = await registry_entries(compacting)
        assert sorted(entries) == sorted(f"q:{q}" for q in old + new)
    finally:
        await seed.close()
        await other.close()
        await remove_rabbitmq(compacting)
    assert await rabbitmq_leftovers(compacting, old + new, []) == []


async def test_a_compaction_that_fails_midway_loses_nothing(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = f"skreg-{uuid.uuid4().hex[:8]}"
    seed = transport(amqp_url, namespace=namespace)
    await seed.open()
    for _ in range(3):
        for queue in QUEUES:
            message = aio_pika.Message(f"q:{queue}".encode())
            await seed.link.channel().default_exchange.publish(
                message, routing_key=seed.registry_queue
            )
    await seed.close()
    t = transport(amqp_url, namespace=namespace)
    t.registry.limit = 0
    real, calls = t.registry._publish, []

    async def cut_after_one(channel: aio_pika.abc.AbstractChannel, body: bytes) -> None:
        calls.append(body)
        if len(calls) > 1:  # the connection "drops" while the copies are being published
            raise ConnectionError("cut")
        await real(channel, body)

    monkeypatch.setattr(t.registry, "_publish", cut_after_one)
    await t.open()  # the compaction is only an economy: the transport opens anyway
    try:
        assert len(calls) == len(QUEUES)  # it did fetch them all and tried
        entries = await registry_entries(t)
        assert set(entries) == {f"q:{q}" for q in QUEUES}
        assert len(entries) >= 3 * len(QUEUES)  # the fetched ones came back
    finally:
        await remove_rabbitmq(t)
