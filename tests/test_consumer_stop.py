"""The shared consumer skeleton (``sagakit.transport._consumer``).

Unit tests of its rules with a fake delivery, then the one rule every broker
must carry out itself: ``stop(grace)`` cancels handlers that outlive the grace
period and releases their messages at once, so a restarted worker gets them
promptly, long before the lease would have run out.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from sagakit.transport import Delivery, Outgoing, Transport
from sagakit.transport._consumer import BrokerDelivery, Consumer
from sagakit.transport.memory import MemoryTransport
from tests.helpers import eventually
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts
from tests.test_transport_contract import BROKERS

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used through BROKERS by name

pytestmark = pytest.mark.timeout(60)

LONG_LEASE = 30.0  # a released message must come back well before this
PROMPTLY = 5.0
# Options that make a broker's lease long: only a release brings a message back soon.
LEASE_OPTIONS: dict[str, dict[str, Any]] = {
    "rabbitmq": {},  # no lease: an unacked message returns when the channel closes
    "nats": {"ack_wait": LONG_LEASE},
    "redis": {"lease": LONG_LEASE},
}

log = logging.getLogger("tests.consumer")


async def until(check: Callable[[], bool], timeout: float = PROMPTLY) -> None:
    async def ok() -> bool:
        return check()

    await eventually(ok, timeout=timeout)


# -- the skeleton, with a fake delivery ----------------------------------------


class Fake(BrokerDelivery):
    """Records how it was settled."""

    __slots__ = ("log",)

    def __init__(self, data: bytes = b"x") -> None:
        super().__init__(data, 1)
        self.log: list[tuple[str, float]] = []

    async def _ack(self) -> None:
        self.log.append(("ack", 0.0))

    async def _nack(self, delay: float) -> None:
        self.log.append(("nack", delay))


def consumer(handler: Callable[[Delivery], Awaitable[None]], prefetch: int = 1) -> Consumer[Fake]:
    return Consumer("q", handler, prefetch, log)


async def test_a_delivery_is_settled_at_most_once() -> None:
    d = Fake()
    await d.ack()
    await d.nack(0)
    await d.ack()
    assert d.log == [("ack", 0.0)]
    e = Fake()
    await e.nack(2.0)
    await e.ack()
    assert e.log == [("nack", 2.0)]
    assert await e.ack_in(None, None) is False  # type: ignore[arg-type]


async def test_a_crashing_handler_is_nacked_after_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom(d: Delivery) -> None:
        raise RuntimeError("boom")

    c, d = consumer(boom), Fake()
    c.spawn(d)
    await until(lambda: bool(d.log))
    assert d.log == [("nack", 1.0)]
    assert "handler crashed on q" in caplog.text
    await c.stop(grace=1)


async def test_at_most_prefetch_handlers_run() -> None:
    gate = asyncio.Event()

    async def slow(d: Delivery) -> None:
        await gate.wait()
        await d.ack()

    c = consumer(slow, prefetch=2)
    deliveries = [Fake() for _ in range(5)]
    for d in deliveries:
        c.spawn(d)
    await until(lambda: c.running == 2)
    await asyncio.sleep(0.05)
    assert c.running == 2 and c.free == -3
    gate.set()
    await until(lambda: all(d.log == [("ack", 0.0)] for d in deliveries))
    await c.stop(grace=1)


async def test_stop_waits_out_the_grace_then_cancels_and_releases_at_once() -> None:
    cancelled: list[bytes] = []
    quick_done = asyncio.Event()

    async def handler(d: Delivery) -> None:
        if d.data == b"quick":
            await asyncio.sleep(0.05)
            await d.ack()
            quick_done.set()
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(d.data)
            raise

    c = consumer(handler, prefetch=2)
    quick, stuck, waiting = Fake(b"quick"), Fake(b"stuck"), Fake(b"waiting")
    for d in (quick, stuck, waiting):
        c.spawn(d)
    await until(lambda: c.running == 2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await c.stop(grace=0.3)
    assert 0.25 <= loop.time() - started < 2
    assert quick.log == [("ack", 0.0)]  # finished within the grace period
    assert stuck.log == [("nack", 0)] and cancelled == [b"stuck"]
    # got the slot "quick" freed, but after stop began: released, never handled
    assert waiting.log == [("nack", 0)]
    assert c.free == c.prefetch


async def test_abort_settles_nothing() -> None:
    async def stuck(d: Delivery) -> None:
        await asyncio.Event().wait()

    c, d = consumer(stuck), Fake()
    c.spawn(d)
    await until(lambda: c.running == 1)
    await c.abort()
    assert d.log == [] and c.free == c.prefetch


async def test_a_second_stop_returns_at_once() -> None:
    c = consumer(lambda d: d.ack())
    await c.stop(grace=1)
    await asyncio.wait_for(c.stop(grace=1), 0.1)


# -- every transport ----------------------------------------------------------


async def _open(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Callable[[], Any]]:
    """Yield an opener of transports on one broker; close and clean them up after."""
    broker = BROKERS[name]
    url = str(request.getfixturevalue(broker.url_fixture))
    module = importlib.import_module(broker.module)
    options = broker.options(f"stop-{uuid.uuid4().hex[:8]}") | LEASE_OPTIONS[name]
    opened: list[Transport] = []

    async def open_one() -> Transport:
        t: Transport = module.transport(url, **options)
        await t.open()
        opened.append(t)
        return t

    yield open_one
    for t in opened:
        await t.close()
    if broker.cleanup is not None and opened:
        await broker.cleanup(opened[0])


@pytest.fixture(params=["memory", *sorted(BROKERS)])
async def opener(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[], Any]]:
    if request.param == "memory":
        memory = MemoryTransport()

        async def same() -> Transport:
            return memory

        yield same
        return
    async for open_one in _open(request, request.param):
        yield open_one


async def test_stop_releases_the_message_of_a_cancelled_handler_at_once(
    opener: Callable[[], Awaitable[Transport]],
) -> None:
    worker, restarted = await opener(), await opener()
    q = f"stop-{uuid.uuid4().hex[:12]}"
    await worker.declare(q, [])
    taken: list[int] = []
    cancelled = asyncio.Event()

    async def stuck(d: Delivery) -> None:
        taken.append(d.attempt)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sub = await worker.consume(q, stuck, prefetch=1)
    await worker.publish([Outgoing(uuid.uuid4().hex, "command", q, b"stuck")])
    await until(lambda: bool(taken))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(sub.stop(grace=0.2), PROMPTLY)
    assert cancelled.is_set()
    assert loop.time() - started < PROMPTLY

    got: list[tuple[bytes, int]] = []

    async def ack(d: Delivery) -> None:
        got.append((d.data, d.attempt))
        await d.ack()

    again = await restarted.consume(q, ack, prefetch=1)
    try:
        await until(lambda: bool(got))  # within seconds, not the 30 s lease
        assert loop.time() - started < LONG_LEASE / 2
        assert got[0][0] == b"stuck" and got[0][1] >= taken[0]
    finally:
        await again.stop()
