"""The NATS JetStream transport against a real nats-server on loopback."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import ConfigurationError, TransportError
from sagakit.transport import Delivery, Outgoing, open_transport
from tests.broker_net import note
from tests.helpers import remove_namespace_of

nats_mod = pytest.importorskip("sagakit.transport.nats")
NatsTransport = nats_mod.NatsTransport

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., Awaitable[Any]]


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def cmd(queue: str, i: int | str) -> Outgoing:
    return Outgoing(str(uuid.uuid4()), "command", queue, f"m{i}".encode())


def evt(topic: str, i: int | str) -> Outgoing:
    return Outgoing(str(uuid.uuid4()), "event", topic, f"e{i}".encode())


async def delete_stream(url: str, stream: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jsm().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def make(nats_url: str, run_id: str) -> AsyncIterator[Factory]:
    """Open NATS transports in a namespace (so a stream) unique to this test."""
    opened: list[Any] = []

    async def factory(**options: Any) -> Any:
        options.setdefault("namespace", note(f"sagakit-t{run_id}"))
        options.setdefault("ack_wait", 2.0)
        options.setdefault("pull_expires", 1.0)
        t = NatsTransport(nats_url, **options)
        await t.open()
        opened.append(t)
        return t

    yield factory
    for t in opened:
        await t.close()
    await delete_stream(nats_url, nats_mod.stream_for(f"sagakit-t{run_id}"))


class Recorder:
    """A handler that records deliveries and acks them (or not, per ``settle``)."""

    def __init__(self, settle: str = "ack", delay: float = 0.0) -> None:
        self.settle, self.delay = settle, delay
        self.got: list[tuple[bytes, int]] = []
        self.active = self.peak = 0

    async def __call__(self, d: Delivery) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.got.append((d.data, d.attempt))
            if self.settle == "ack":
                await d.ack()
        finally:
            self.active -= 1

    @property
    def data(self) -> list[bytes]:
        return [g[0] for g in self.got]


# -- names and configuration -------------------------------------------------


def test_names_are_escaped_into_valid_tokens() -> None:
    esc, tokens, cname = nats_mod.escape, nats_mod.subject_tokens, nats_mod.consumer_name
    assert esc("orders_v2-x") == "orders_v2-x"
    assert esc("a.b*c>d e/é~") == "a~2Eb~2Ac~3Ed~20e~2F~C3~A9~7E"
    assert tokens("customers.CreditReserved") == "customers.CreditReserved"
    assert tokens("a b.*.>") == "a~20b.~2A.~3E"
    with pytest.raises(ConfigurationError):
        tokens("a..b")
    with pytest.raises(ConfigurationError):
        esc("")
    assert cname("sagakit.coordinator") == "sagakit~2Ecoordinator"
    assert cname("q", "t.x") == "q~~t~2Ex"
    # queue/topic pairs never collide, and long names stay short and distinct
    assert cname("a~~b") != cname("a", "b")
    long1, long2 = cname("q", "x" * 300), cname("q", "x" * 299 + "y")
    assert len(long1) <= 200 and long1 != long2
    for name in (cname("a b", "c.d"), long1):
        assert not set(name) & set(" .*>/\\\t")


def test_options_come_from_the_url_query() -> None:
    t = open_transport(
        "nats://127.0.0.1:4222?stream=ORD&prefix=ord.x&ack_wait=7&ack_sync=false",
        store=None,  # type: ignore[arg-type]
    )
    assert isinstance(t, NatsTransport)
    assert t.servers == ["nats://127.0.0.1:4222"]
    assert (t.stream, t.prefix, t.ack_wait, t.ack_sync) == ("ORD", "ord.x", 7.0, False)
    assert t.direct_writer(sk.open_store("memory://")) is None
    assert t.queue_subject("sagakit.coordinator") == "ord.x.q.sagakit.coordinator"
    assert t.topic_subject("shop.Paid") == "ord.x.e.shop.Paid"
    with pytest.raises(ConfigurationError):
        NatsTransport("nats://h:1", prefix="bad.*")
    with pytest.raises(ConfigurationError):
        NatsTransport("nats://h:1", stream="bad.name")
    with pytest.raises(ConfigurationError):
        NatsTransport("nats://h:1?ack_wait=soon")


def test_unknown_or_malformed_url_options_are_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="'ackwait'"):
        NatsTransport("nats://h:1?ackwait=7")  # was silently ignored
    with pytest.raises(ConfigurationError, match="ack_sync"):
        NatsTransport("nats://h:1?ack_sync=flase")  # was silently false
    t = NatsTransport("nats://a:1,nats://b:2?lease=4", ack_wait=9)
    assert t.servers == ["nats://a:1", "nats://b:2"] and t.ack_wait == 9.0
    assert NatsTransport("nats://a:1?lease=4").ack_wait == 4.0


def test_direct_writer_is_none() -> None:
    assert NatsTransport("nats://h:1").direct_writer(None) is None  # type: ignore[arg-type]


def test_missing_nats_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    monkeypatch.delitem(sys.modules, "sagakit.transport.nats")
    with pytest.raises(ConfigurationError, match=r"pip install 'sagakit\[nats\]'"):
        importlib.import_module("sagakit.transport.nats")


async def test_unreachable_server_is_a_transport_error() -> None:
    t = NatsTransport("nats://me:secret@127.0.0.1:1", stream="X", prefix="x")
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(t.open(), 20)
    assert "secret" not in str(info.value) and "me:***@127.0.0.1:1" in str(info.value)


# -- the contract ------------------------------------------------------------


async def test_at_least_once_and_ack(make: Factory) -> None:
    t = await make()
    await t.declare("work", [])
    await t.publish([cmd("work", i) for i in range(20)])
    rec = Recorder()
    sub = await t.consume("work", rec, prefetch=8)
    await eventually(lambda: len(rec.got) == 20)
    await sub.stop()
    assert sorted(rec.data) == sorted(f"m{i}".encode() for i in range(20))
    assert all(a == 1 for _, a in rec.got)
    # acknowledged: a new subscriber gets nothing more, not even after ack_wait
    again = Recorder()
    sub = await t.consume("work", again, prefetch=8)
    await asyncio.sleep(2.5)
    await sub.stop()
    assert again.got == []


async def test_commands_sent_before_declare_are_kept(make: Factory) -> None:
    t = await make()
    await t.publish([cmd("late", 1)])
    rec = Recorder()
    sub = await t.consume("late", rec, prefetch=4)
    await eventually(lambda: rec.data == [b"m1"])
    await sub.stop()


async def test_duplicate_publish_is_stored_once(make: Factory) -> None:
    t = await make()
    m = cmd("dup", 1)
    await t.publish([m])
    await t.publish([m, m])
    rec = Recorder()
    sub = await t.consume("dup", rec, prefetch=4)
    await eventually(lambda: len(rec.got) >= 1)
    await asyncio.sleep(0.5)
    await sub.stop()
    assert rec.data == [b"m1"]


async def test_redelivered_when_consumer_dies_before_ack(make: Factory) -> None:
    dying = await make(ack_wait=1.0)
    await dying.publish([cmd("jobs", 1)])
    lost = Recorder(settle="none")
    await dying.consume("jobs", lost, prefetch=4)
    await eventually(lambda: len(lost.got) == 1)
    await dying.client.close()  # the process dies: no ack, no drain
    survivor = await make(ack_wait=1.0)
    rec = Recorder()
    started = time.monotonic()
    sub = await survivor.consume("jobs", rec, prefetch=4)
    await eventually(lambda: len(rec.got) == 1)
    await sub.stop()
    assert rec.got == [(b"m1", 2)]
    assert time.monotonic() - started < 5


async def test_nack_with_delay_redelivers_later(make: Factory) -> None:
    t = await make()
    seen: list[tuple[int, float]] = []

    async def handler(d: Delivery) -> None:
        seen.append((d.attempt, time.monotonic()))
        if d.attempt == 1:
            await d.nack(0.8)
        else:
            await d.ack()

    await t.publish([cmd("retry", 1)])
    sub = await t.consume("retry", handler, prefetch=4)
    await eventually(lambda: len(seen) == 2)
    await asyncio.sleep(0.3)
    await sub.stop()
    assert [a for a, _ in seen] == [1, 2]
    assert 0.7 <= seen[1][1] - seen[0][1] < 1.9  # delayed, and well before ack_wait=2


async def test_slow_handler_keeps_its_lease(make: Factory) -> None:
    t = await make(ack_wait=1.0)
    rec = Recorder(delay=2.5)  # longer than ack_wait: the lease is extended meanwhile
    await t.publish([cmd("slowpoke", 1)])
    sub = await t.consume("slowpoke", rec, prefetch=4)
    await eventually(lambda: len(rec.got) == 1)
    await asyncio.sleep(1.5)
    await sub.stop()
    assert rec.got == [(b"m1", 1)] and rec.peak == 1


async def test_handler_crash_is_retried(make: Factory) -> None:
    t = await make()
    attempts: list[int] = []

    async def handler(d: Delivery) -> None:
        attempts.append(d.attempt)
        if d.attempt == 1:
            raise RuntimeError("boom")
        await d.ack()

    await t.publish([cmd("crashy", 1)])
    sub = await t.consume("crashy", handler, prefetch=1)
    await eventually(lambda: attempts == [1, 2], timeout=5)
    await sub.stop()


async def test_competing_consumers_share_a_queue(make: Factory) -> None:
    a, b, producer = await make(), await make(), await make()
    await producer.declare("shared", [])
    ra, rb = Recorder(delay=0.01), Recorder(delay=0.01)
    sa = await a.consume("shared", ra, prefetch=2)
    sb = await b.consume("shared", rb, prefetch=2)
    await producer.publish([cmd("shared", i) for i in range(60)])
    await eventually(lambda: len(ra.got) + len(rb.got) == 60)
    await asyncio.sleep(0.3)
    await sa.stop()
    await sb.stop()
    both = Counter(ra.data + rb.data)
    assert len(both) == 60 and set(both.values()) == {1}
    assert ra.got and rb.got


async def test_events_fan_out_to_every_bound_queue(make: Factory) -> None:
    t = await make()
    await t.publish([evt("shop.Paid", "early")])  # before anyone subscribed: nobody gets it
    await t.declare("billing", ["shop.Paid", "shop.Refunded"])
    await t.declare("email", ["shop.Paid"])
    await t.declare("stock", ["shop.Shipped"])
    recs = {q: Recorder() for q in ("billing", "email", "stock")}
    subs = [await t.consume(q, r, prefetch=4) for q, r in recs.items()]
    await t.publish(
        [evt("shop.Paid", 1), evt("shop.Refunded", 2), cmd("billing", 3), evt("other", 4)]
    )
    await eventually(lambda: len(recs["billing"].got) == 3 and len(recs["email"].got) == 1)
    await asyncio.sleep(0.5)
    for s in subs:
        await s.stop()
    assert sorted(recs["billing"].data) == [b"e1", b"e2", b"m3"]
    assert recs["email"].data == [b"e1"]
    assert recs["stock"].data == []


async def test_redeclare_updates_or_keeps_an_existing_consumer(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    first = await make(ack_wait=2.0)
    await first.declare("redecl", ["redecl.E"])
    second = await make(ack_wait=3.0)
    await second.declare("redecl", ["redecl.E"])  # ack_wait can change in place
    jsm = second.client.jsm()
    info = await jsm.consumer_info(second.stream, nats_mod.consumer_name("redecl"))
    assert info.config.ack_wait == 3.0
    # a consumer the server will not change (deliver policy) is kept, with a log line
    await jsm.add_consumer(
        second.stream,
        nats_mod.api.ConsumerConfig(
            durable_name="odd",
            name="odd",
            filter_subject=second.queue_subject("odd"),
            deliver_policy=nats_mod.api.DeliverPolicy.NEW,
        ),
    )
    await second.declare("odd", [])
    assert "kept existing NATS consumer odd" in caplog.text


async def test_a_consumer_declared_elsewhere_is_picked_up(make: Factory) -> None:
    mine = await make(refresh=0.2)
    other = await make()
    rec = Recorder()
    sub = await mine.consume("late-bound", rec, prefetch=4)
    await other.declare("late-bound", ["news.Flash"])  # another process binds a topic
    await asyncio.sleep(0.6)
    await other.publish([evt("news.Flash", 1)])
    await eventually(lambda: rec.data == [b"e1"])
    await sub.stop()


async def test_in_flight_handlers_are_bounded_by_prefetch(make: Factory) -> None:
    t = await make()
    await t.declare("busy", ["busy.A", "busy.B"])
    rec = Recorder(delay=0.03)
    msgs = [cmd("busy", i) for i in range(30)]
    msgs += [evt("busy.A", i) for i in range(30)] + [evt("busy.B", i) for i in range(30)]
    await t.publish(msgs)
    sub = await t.consume("busy", rec, prefetch=3)
    await eventually(lambda: len(rec.got) == 90, timeout=20)
    await sub.stop()
    assert rec.peak == 3


async def test_stop_waits_for_in_flight_handlers(make: Factory) -> None:
    t = await make()
    gate = asyncio.Event()
    done: list[bytes] = []

    async def handler(d: Delivery) -> None:
        await gate.wait()
        await d.ack()
        done.append(d.data)

    await t.publish([cmd("slow", 1)])
    sub = await t.consume("slow", handler, prefetch=1)
    await asyncio.sleep(0.3)
    stopping = asyncio.create_task(sub.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 5)
    assert done == [b"m1"]


async def test_consumer_survives_a_cut_connection(make: Factory) -> None:
    consumer, producer = await make(), await make()
    rec = Recorder()
    sub = await consumer.consume("cut", rec, prefetch=4)
    await producer.publish([cmd("cut", i) for i in range(5)])
    await eventually(lambda: len(rec.got) == 5)
    nc = consumer.client
    before = nc.stats["reconnects"]
    nc._transport.close()  # cut our own socket; the server stays up for everyone else
    await eventually(lambda: nc.stats["reconnects"] > before and nc.is_connected)
    await producer.publish([cmd("cut", i) for i in range(5, 10)])
    await eventually(lambda: len(set(rec.data)) == 10, timeout=15)
    await sub.stop()
    assert set(rec.data) == {f"m{i}".encode() for i in range(10)}


async def test_publish_survives_a_cut_connection(make: Factory) -> None:
    t = await make()
    rec = Recorder()
    sub = await t.consume("cutpub", rec, prefetch=4)
    t.client._transport.close()
    started, failures = time.monotonic(), 0
    m = cmd("cutpub", 1)
    while True:  # like the relay: a publish cut short fails fast and is retried
        try:
            await t.publish([m])
            break
        except TransportError:
            failures += 1
            await asyncio.sleep(0.05)
    assert failures <= 1 and time.monotonic() - started < 5  # no waiting for a timeout
    await eventually(lambda: rec.data == [b"m1"], timeout=15)
    await asyncio.sleep(0.3)
    assert rec.data == [b"m1"]  # a publish repeated after the cut is stored once
    await sub.stop()


async def test_close_drains_and_is_idempotent(make: Factory) -> None:
    t = await make()
    rec = Recorder()
    await t.consume("closing", rec, prefetch=2)
    await t.publish([cmd("closing", 1)])
    await eventually(lambda: len(rec.got) == 1)
    await t.close()
    await t.close()
    with pytest.raises(TransportError):
        await t.publish([cmd("closing", 2)])


# -- end to end: a saga over NATS with the outbox relay -----------------------


@sk.command("natstest.Reserve")
class Reserve(msgspec.Struct):
    order: str
    amount: int


@sk.command("natstest.Release")
class Release(msgspec.Struct):
    order: str


@sk.command("natstest.Ship")
class Ship(msgspec.Struct):
    order: str


@sk.reply("natstest.Reserved")
class Reserved(msgspec.Struct):
    ref: str


@sk.event("natstest.CreditReserved")
class CreditReserved(msgspec.Struct):
    order: str


class OutOfStock(sk.BusinessError):
    code = "natstest.OutOfStock"


@dataclass
class Order:
    order: str
    amount: int
    ref: str = ""


def order_saga() -> sk.SagaDefinition[Order]:
    return (
        sk.Saga("nats-order", Order)
        .step("credit")
        .invoke("credit", lambda d: Reserve(d.order, d.amount))
        .on_reply(Reserved, lambda d, r: replace(d, ref=r.ref))
        .compensate("credit", lambda d: Release(d.order))
        .step("ship")
        .invoke("shipping", lambda d: Ship(d.order))
        .build()
    )


async def test_two_step_saga_over_nats_with_sqlite_store(
    nats_url: str, run_id: str, tmp_path: Any
) -> None:
    stream = nats_mod.stream_for(f"sagakit-e{run_id}")
    url = f"{nats_url}?namespace=sagakit-e{run_id}&pull_expires=1"
    settings = sk.Settings(retry=sk.RetryPolicy(max_attempts=3, initial=0.01), max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/s.db", transport=url, settings=settings)
    credit, shipping, audit = (app.participant(n) for n in ("credit", "shipping", "audit"))
    log: list[str] = []

    @credit.command(Reserve)
    async def reserve(c: Reserve, ctx: sk.Context) -> Reserved:
        log.append(f"reserve {c.order}")
        ctx.publish(CreditReserved(c.order))
        return Reserved(f"r-{c.order}")

    @credit.command(Release)
    async def release(c: Release, ctx: sk.Context) -> None:
        log.append(f"release {c.order}")

    @shipping.command(Ship)
    async def ship(c: Ship, ctx: sk.Context) -> None:
        if c.order.startswith("bad"):
            raise OutOfStock(f"cannot ship {c.order}")
        log.append(f"ship {c.order}")

    @audit.event(CreditReserved)
    async def seen(e: CreditReserved, ctx: sk.Context) -> None:
        log.append(f"audit {e.order}")

    saga = app.saga(order_saga())
    try:
        async with app:
            assert app.transport.direct_writer(app.store) is None  # through the outbox relay
            ok = await app.sagas.start(saga, Order("ok1", 10), saga_id="ok1")
            bad = await app.sagas.start(saga, Order("bad1", 5), saga_id="bad1")
            ok_view = await app.sagas.wait(ok, timeout=20)
            bad_view = await app.sagas.wait(bad, timeout=20)
            await eventually(lambda: "audit ok1" in log and "audit bad1" in log)
    finally:
        await delete_stream(nats_url, stream)
    assert ok_view.state == "completed" and ok_view.data.ref == "r-ok1"
    assert bad_view.state == "compensated"
    assert "natstest.OutOfStock" in (bad_view.error or "")
    assert log.count("reserve ok1") == 1 and log.count("ship ok1") == 1
    assert log.count("release bad1") == 1 and "ship bad1" not in log


# -- hooks for the shared transport contract (tests/test_transport_contract.py) --


def nats_options(tag: str) -> dict[str, Any]:
    """A namespace (so a stream) of the contract test's own, with short timers."""
    return {
        "namespace": tag,
        "ack_wait": 1.0,
        "pull_expires": 1.0,
    }


async def cut_nats(t: Any) -> None:
    """Cut ``t``'s own socket (the shared server stays up); nats-py reconnects."""
    assert isinstance(t, NatsTransport)
    t.client._transport.close()


async def nats_leftovers(t: Any, queues: Sequence[str], topics: Sequence[str]) -> list[str]:
    """``t``'s stream if NATS still reports it (stream info not raising NotFoundError)."""
    import nats
    from nats.js.errors import NotFoundError

    assert isinstance(t, NatsTransport)
    nc = await nats.connect(t.servers[0])
    try:
        await nc.jsm().stream_info(t.stream)
    except NotFoundError:
        return []
    finally:
        await nc.close()
    return [t.stream]


async def remove_nats(t: Any) -> None:
    """Remove ``t``'s namespace: its stream, messages and consumers."""
    assert isinstance(t, NatsTransport)
    await remove_namespace_of(t)


async def test_remove_namespace_refuses_a_stream_shared_with_other_subjects(
    nats_url: str, run_id: str
) -> None:
    """A stream that also holds another namespace's subjects is not ours to delete."""
    import nats
    from nats.js import api

    stream, mine, other = f"SHARED-{run_id}", f"mine-{run_id}", f"other-{run_id}"
    nc = await nats.connect(nats_url)
    try:
        await nc.jsm().add_stream(
            api.StreamConfig(name=stream, subjects=[f"{mine}.>", f"{other}.>"])
        )
        t = NatsTransport(nats_url, namespace=mine, stream=stream)
        await t.open()
        try:
            with pytest.raises(sk.ForeignNamespace, match="subjects"):
                await t.remove_namespace(mine)
        finally:
            await t.close()
        assert (await nc.jsm().stream_info(stream)).config.name == stream  # still there
    finally:
        await nc.jsm().delete_stream(stream)
        await nc.close()
