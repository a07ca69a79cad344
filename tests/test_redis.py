"""The Redis Streams transport against a real Redis on loopback.

Every test uses its own key prefix and deletes its keys afterwards, so tests
can share one Redis with other suites. Connections are cut with ``CLIENT KILL
ID`` of this test's own connections only; the broker-restart test runs a
private ``redis-server`` on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import shutil
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

import sagakit as sk
from sagakit.errors import ConfigurationError, TransportError
from sagakit.transport import Delivery, Outgoing, open_transport
from sagakit.transport.redis import GROUP, RedisTransport, transport
from tests.broker_net import note
from tests.helpers import eventually, remove_namespace_of

pytestmark = pytest.mark.timeout(60)

LEASE = 0.6


def cmd(queue: str, body: str, mid: str | None = None) -> Outgoing:
    return Outgoing(mid or uuid.uuid4().hex, "command", queue, body.encode())


def evt(topic: str, body: str) -> Outgoing:
    return Outgoing(uuid.uuid4().hex, "event", topic, body.encode())


@pytest.fixture
def key_prefix() -> str:
    return f"sktest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def raw(redis_url: str, key_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client; deletes every key of this test at teardown."""
    r = aioredis.Redis.from_url(redis_url)
    yield r
    keys = [k async for k in r.scan_iter(match=f"{key_prefix}:*", count=500)]
    if keys:
        await r.delete(*keys)
    await r.aclose()


@pytest.fixture
async def make(redis_url: str, key_prefix: str, raw: aioredis.Redis) -> AsyncIterator[Any]:
    """Open transports on this test's prefix; all closed at teardown."""
    made: list[RedisTransport] = []

    async def factory(**options: Any) -> RedisTransport:
        options.setdefault("lease", LEASE)
        t = transport(redis_url, namespace=key_prefix, **options)
        await t.open()
        made.append(t)
        return t

    yield factory
    for t in made:
        await t.close()
    # Collect now what the test left behind (redis-py objects have finalizers),
    # not in the middle of some later test.
    gc.collect()


@pytest.fixture
async def rt(make: Any) -> RedisTransport:
    return await make()  # type: ignore[no-any-return]


class Sink:
    """A handler that records deliveries and acks them (unless told otherwise)."""

    def __init__(self, *, ack: bool = True) -> None:
        self.seen: list[tuple[bytes, int]] = []
        self.auto_ack = ack
        self.held: list[Delivery] = []

    async def __call__(self, d: Delivery) -> None:
        self.seen.append((d.data, d.attempt))
        if self.auto_ack:
            await d.ack()
        else:
            self.held.append(d)

    def bodies(self) -> list[str]:
        return sorted(b.decode() for b, _ in self.seen)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async def check() -> bool:
        return cond()

    await eventually(check, timeout=timeout)


async def crash(t: RedisTransport) -> None:
    """Kill a transport's consumers without settling anything (a process death)."""
    for sub in list(t.subscriptions):
        await sub.abort()
    await t.close()


async def pending(raw: aioredis.Redis, t: RedisTransport, queue: str) -> int:
    info = await raw.xpending(t.stream_key(queue), GROUP)
    return int(info["pending"])


async def kill_connections(raw: aioredis.Redis, t: RedisTransport) -> int:
    """CLIENT KILL every connection of transport ``t`` (and only those)."""
    killed = 0
    for c in await raw.client_list():
        if c.get("name") == t.client_name:
            killed += await raw.execute_command("CLIENT", "KILL", "ID", c["id"])
    return killed


# -- hooks for the shared transport contract (tests/test_transport_contract.py)


def contract_options(tag: str) -> dict[str, Any]:
    """Per-test options: own key prefix, short lease so orphans return fast."""
    return {"namespace": note(f"sktest-{tag}"), "lease": 1.0}


async def cut_redis(t: Any) -> None:
    """Kill every connection of ``t`` on the server (the shared Redis keeps running)."""
    assert isinstance(t, RedisTransport)
    raw = aioredis.Redis.from_url(t.redis_url)
    try:
        assert await kill_connections(raw, t) >= 1
    finally:
        await raw.aclose()


async def redis_leftovers(t: Any, queues: Sequence[str], topics: Sequence[str]) -> list[str]:
    """Which of ``t``'s stream and binding keys Redis still has (``EXISTS``)."""
    assert isinstance(t, RedisTransport)
    raw = aioredis.Redis.from_url(t.redis_url)
    keys = [t.stream_key(q) for q in queues] + [t.bind_key(topic) for topic in topics]
    try:
        return [k for k in keys if await raw.exists(k)]
    finally:
        await raw.aclose()


async def remove_redis(t: Any) -> None:
    """Remove ``t``'s namespace, then delete any other key under its prefix."""
    assert isinstance(t, RedisTransport)
    await remove_namespace_of(t)
    raw = aioredis.Redis.from_url(t.redis_url)
    try:
        keys = [k async for k in raw.scan_iter(match=f"{t.prefix}:*", count=500)]
        if keys:
            await raw.delete(*keys)
    finally:
        await raw.aclose()
    gc.collect()


# -- delivery ------------------------------------------------------------------


async def test_at_least_once_and_acked_entries_are_deleted(
    rt: RedisTransport, raw: aioredis.Redis
) -> None:
    await rt.declare("q", [])
    sink = Sink()
    sub = await rt.consume("q", sink, prefetch=8)
    await rt.publish([cmd("q", f"m{i}") for i in range(50)])
    await until(lambda: len(sink.seen) == 50)
    assert sink.bodies() == sorted(f"m{i}" for i in range(50))
    assert {a for _, a in sink.seen} == {1}
    await until(lambda: True)
    await sub.stop()
    assert await raw.xlen(rt.stream_key("q")) == 0
    assert await pending(raw, rt, "q") == 0
    # the stopped consumer left the group
    assert await raw.xinfo_consumers(rt.stream_key("q"), GROUP) == []


async def test_messages_published_before_declare_are_kept(rt: RedisTransport) -> None:
    await rt.publish([cmd("early", "first")])
    await rt.declare("early", [])
    sink = Sink()
    sub = await rt.consume("early", sink, prefetch=1)
    await until(lambda: len(sink.seen) == 1)
    await sub.stop()


async def test_entry_holds_message_id_and_envelope_bytes(
    rt: RedisTransport, raw: aioredis.Redis
) -> None:
    await rt.declare("q", [])
    await rt.publish([cmd("q", "payload", mid="mid-1")])
    [(_, fields)] = await raw.xrange(rt.stream_key("q"))
    assert fields == {b"id": b"mid-1", b"attempt": b"1", b"data": b"payload"}


async def test_unacked_message_is_reclaimed_after_its_consumer_dies(
    make: Any, raw: aioredis.Redis
) -> None:
    dying, survivor = await make(), await make()
    await dying.declare("q", [])
    lost = Sink(ack=False)
    await dying.consume("q", lost, prefetch=4)
    await dying.publish([cmd("q", "x"), cmd("q", "y")])
    await until(lambda: len(lost.seen) == 2)
    await crash(dying)

    sink = Sink()
    sub = await survivor.consume("q", sink, prefetch=4)
    await until(lambda: len(sink.seen) == 2)
    assert sink.bodies() == ["x", "y"]
    assert {a for _, a in sink.seen} == {2}  # the second delivery of each
    await sub.stop()
    await survivor.close()
    assert await pending(raw, survivor, "q") == 0


async def test_handler_slower_than_the_lease_is_not_stolen(make: Any) -> None:
    a, b = await make(), await make()
    await a.declare("q", [])
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(d: Delivery) -> None:
        seen.append("a")
        await release.wait()
        await d.ack()

    async def other(d: Delivery) -> None:
        seen.append("b")
        await d.ack()

    sa = await a.consume("q", slow, prefetch=1)
    await a.publish([cmd("q", "slow")])
    await until(lambda: seen == ["a"])
    sb = await b.consume("q", other, prefetch=1)
    await asyncio.sleep(LEASE * 4)  # several leases: heartbeats keep it owned by a
    release.set()
    await sa.stop()
    await sb.stop()
    assert seen == ["a"]
    await a.close()
    await b.close()


async def test_nack_with_delay_redelivers_a_copy_with_the_next_attempt(
    rt: RedisTransport, raw: aioredis.Redis
) -> None:
    await rt.declare("q", [])
    loop = asyncio.get_running_loop()
    times: list[tuple[int, float]] = []

    async def flaky(d: Delivery) -> None:
        times.append((d.attempt, loop.time()))
        if d.attempt < 3:
            await d.nack(0.3)
        else:
            await d.ack()

    sub = await rt.consume("q", flaky, prefetch=2)
    await rt.publish([cmd("q", "retry-me")])
    await until(lambda: len(times) == 3)
    assert [a for a, _ in times] == [1, 2, 3]
    assert times[1][1] - times[0][1] >= 0.29
    assert times[2][1] - times[1][1] >= 0.29
    await sub.stop()
    assert await raw.xlen(rt.stream_key("q")) == 0
    assert await pending(raw, rt, "q") == 0


async def test_stop_requeues_delayed_nacks_at_once(make: Any) -> None:
    a, b = await make(), await make()
    await a.declare("q", [])

    async def later(d: Delivery) -> None:
        await d.nack(3600)

    sa = await a.consume("q", later, prefetch=1)
    await a.publish([cmd("q", "x")])
    await until(lambda: len(sa.held) == 1)
    await sa.stop()
    sink = Sink()
    sb = await b.consume("q", sink, prefetch=1)
    await until(lambda: len(sink.seen) == 1, timeout=5)
    assert sink.seen == [(b"x", 2)]
    await sb.stop()


async def test_handler_crash_releases_the_message(rt: RedisTransport) -> None:
    await rt.declare("q", [])
    attempts: list[int] = []

    async def boom(d: Delivery) -> None:
        attempts.append(d.attempt)
        if d.attempt == 1:
            raise RuntimeError("boom")
        await d.ack()

    sub = await rt.consume("q", boom, prefetch=1)
    await rt.publish([cmd("q", "x")])
    await until(lambda: attempts == [1, 2], timeout=5)
    await sub.stop()


# -- groups --------------------------------------------------------------------


async def test_competing_consumers_share_a_queue(make: Any) -> None:
    a, b = await make(), await make()
    await a.declare("work", [])
    counts: Counter[str] = Counter()
    bodies: list[bytes] = []

    def worker(name: str) -> Callable[[Delivery], Any]:
        async def handle(d: Delivery) -> None:
            counts[name] += 1
            bodies.append(d.data)
            await asyncio.sleep(0.005)
            await d.ack()

        return handle

    sa = await a.consume("work", worker("a"), prefetch=2)
    sb = await b.consume("work", worker("b"), prefetch=2)
    await a.publish([cmd("work", f"m{i}") for i in range(100)])
    await until(lambda: len(bodies) == 100)
    await asyncio.sleep(0.05)
    assert len(bodies) == 100 and len(set(bodies)) == 100  # each exactly once
    assert counts["a"] > 0 and counts["b"] > 0
    await sa.stop()
    await sb.stop()


async def test_events_fan_out_to_every_bound_queue(rt: RedisTransport, raw: aioredis.Redis) -> None:
    await rt.declare("billing", ["order.Placed"])
    await rt.declare("shipping", ["order.Placed", "order.Paid"])
    await rt.declare("other", ["order.Cancelled"])
    sinks = {q: Sink() for q in ("billing", "shipping", "other")}
    subs = [await rt.consume(q, s, prefetch=4) for q, s in sinks.items()]
    await rt.publish(
        [evt("order.Placed", "placed"), evt("order.Paid", "paid"), cmd("billing", "direct")]
    )
    await until(lambda: len(sinks["billing"].seen) == 2 and len(sinks["shipping"].seen) == 2)
    await rt.publish([evt("nobody.Listens", "void")])  # no bound queue: nothing stored
    await asyncio.sleep(0.1)
    assert sinks["billing"].bodies() == ["direct", "placed"]
    assert sinks["shipping"].bodies() == ["paid", "placed"]
    assert sinks["other"].seen == []
    assert await raw.smembers(rt.bind_key("order.Placed")) == {b"billing", b"shipping"}
    for s in subs:
        await s.stop()


async def test_in_flight_handlers_are_bounded_by_prefetch(rt: RedisTransport) -> None:
    await rt.declare("q", [])
    gate = asyncio.Event()
    running = 0
    peak = 0
    done = 0

    async def handle(d: Delivery) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1
        await d.ack()

    sub = await rt.consume("q", handle, prefetch=3)
    await rt.publish([cmd("q", f"m{i}") for i in range(20)])
    await until(lambda: running == 3)
    await asyncio.sleep(0.2)  # reads and reclaims keep going; none may exceed 3
    assert peak == 3
    gate.set()
    await until(lambda: done == 20)
    assert peak == 3
    await sub.stop()


# -- connections -----------------------------------------------------------------


async def test_consumer_and_publisher_survive_killed_connections(
    rt: RedisTransport, raw: aioredis.Redis
) -> None:
    await rt.declare("q", [])
    sink = Sink()
    sub = await rt.consume("q", sink, prefetch=4)
    await rt.publish([cmd("q", "before")])
    await until(lambda: len(sink.seen) == 1)
    for round_ in range(3):
        assert await kill_connections(raw, rt) >= 1  # the blocked reader at least
        await rt.publish([cmd("q", f"after{round_}")])
        await until(lambda n=round_: len(sink.seen) == n + 2)
    assert sink.bodies() == ["after0", "after1", "after2", "before"]
    await sub.stop()
    assert await pending(raw, rt, "q") == 0


async def test_stop_is_prompt_while_a_read_is_blocked(rt: RedisTransport) -> None:
    slow = transport(rt.redis_url, prefix=rt.prefix, lease=LEASE, block=30.0)
    await slow.open()
    await slow.declare("idle", [])
    sub = await slow.consume("idle", Sink(), prefetch=1)
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await sub.stop()
    assert loop.time() - t0 < 2.0
    await slow.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(tmp: Path) -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found for the restart test")
    port = _free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(tmp)]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))

    def kill() -> None:
        procs[-1].kill()
        procs[-1].wait()

    start()
    try:
        yield port, start, kill
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


async def _ping(url: str) -> bool:
    r = aioredis.Redis.from_url(url)
    try:
        return bool(await r.ping())
    except Exception:
        return False
    finally:
        await r.aclose()


async def test_consumer_survives_a_broker_restart_that_lost_its_data(tmp_path: Path) -> None:
    with private_redis(tmp_path) as (port, start, kill):
        url = f"redis://127.0.0.1:{port}/0"
        await eventually(lambda: _ping(url), timeout=10)
        t = transport(url, lease=LEASE)
        await t.open()
        await t.declare("q", ["some.Event"])
        sink = Sink()
        sub = await t.consume("q", sink, prefetch=4)
        await t.publish([cmd("q", "before")])
        await until(lambda: len(sink.seen) == 1)

        kill()
        await asyncio.sleep(0.3)
        start()
        await eventually(lambda: _ping(url), timeout=10)
        # the consumer recreates its group and its bindings (the data is gone)
        await until(lambda: sub.transport.client is not None, timeout=1)
        r = aioredis.Redis.from_url(url)
        await eventually(
            lambda: r.sismember(t.bind_key("some.Event"), "q"),  # type: ignore[arg-type]
            timeout=10,
        )
        await r.aclose()
        await t.publish([evt("some.Event", "after")])
        await until(lambda: len(sink.seen) == 2)
        assert sink.bodies() == ["after", "before"]
        await sub.stop()
        await t.close()


# -- configuration ---------------------------------------------------------------


async def test_open_transport_reads_options_from_the_url(redis_url: str) -> None:
    t = open_transport(f"{redis_url}?prefix=abc&lease=2.5&block=0.5", store=None)  # type: ignore[arg-type]
    assert isinstance(t, RedisTransport)
    assert (t.prefix, t.lease, t.block, t.claim_interval) == ("abc", 2.5, 0.5, 1.25)
    assert t.direct_writer(sk.open_store("memory://")) is None
    assert "prefix" not in t.redis_url
    with pytest.raises(ConfigurationError):
        transport("redis://127.0.0.1:6379/0?lease=soon")


def test_url_options_for_redis_py_pass_through_and_typos_are_refused() -> None:
    t = transport("redis://:pw@127.0.0.1:6379/0?socket_timeout=3&lease=2&health_check_interval=5")
    assert t.lease == 2.0
    assert t.redis_url == "redis://:pw@127.0.0.1:6379/0?socket_timeout=3&health_check_interval=5"
    assert t.direct_writer(None) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="'leese'") as info:
        transport("redis://:pw@127.0.0.1:6379/0?leese=2")
    assert "pw" not in str(info.value)


async def test_unreachable_redis_is_a_transport_error() -> None:
    t = transport(f"redis://127.0.0.1:{_free_port()}/0?socket_connect_timeout=0.5")
    with pytest.raises(TransportError):
        await t.open()


async def test_closed_transport_raises_transport_error(rt: RedisTransport) -> None:
    await rt.close()
    with pytest.raises(TransportError):
        await rt.publish([cmd("q", "x")])


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sagakit.transport.redis")
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'sagakit\[redis\]'"):
        importlib.import_module("sagakit.transport.redis")


# -- end to end ------------------------------------------------------------------


@sk.command("redistest.Reserve")
class Reserve(msgspec.Struct):
    key: str


@sk.command("redistest.Release")
class Release(msgspec.Struct):
    key: str


@sk.reply("redistest.Reserved")
class Reserved(msgspec.Struct):
    value: int


class Refused(sk.BusinessError):
    code = "redistest.Refused"


@dataclass
class Order:
    key: str
    total: int = 0


EFFECTS = "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY, saga TEXT, what TEXT)"


def reserving(part: sk.Participant, refuse: set[str]) -> None:
    """A participant that reserves (refusing keys in ``refuse``) and releases."""

    async def effect(ctx: sk.Context, key: str, what: str) -> None:
        await ctx.db.execute(EFFECTS)
        await ctx.db.execute("INSERT INTO effects (saga, what) VALUES (?, ?)", key, what)

    @part.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> Reserved:
        if cmd.key in refuse:
            raise Refused(f"{part.name} refuses {cmd.key}")
        await effect(ctx, cmd.key, f"T:{part.name}")
        return Reserved(1)

    @part.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        await effect(ctx, cmd.key, f"C:{part.name}")


async def effects(store: sk.Store, key: str) -> list[str]:
    async with store.transaction() as tx:
        await tx.execute(EFFECTS)
        rows = await tx.fetchall("SELECT what FROM effects WHERE saga = ? ORDER BY seq", key)
    return [r[0] for r in rows]


def two_steps() -> sk.SagaDefinition[Order]:
    saga = sk.Saga("redis-two-steps", Order)
    for name in ("a", "b"):
        (
            saga.step(name)
            .invoke(name, lambda d: Reserve(d.key))
            .on_reply(Reserved, lambda d, r: Order(d.key, d.total + r.value))
            .compensate(name, lambda d: Release(d.key))
        )
    return saga.build()


async def test_two_step_saga_over_redis_with_a_sqlite_store(
    tmp_path: Path, redis_url: str, key_prefix: str, raw: aioredis.Redis
) -> None:
    fast = sk.RetryPolicy(max_attempts=4, initial=0.01, max_delay=0.02)
    app = sk.App(
        f"sqlite:///{tmp_path}/e2e.db",
        transport=f"{redis_url}?namespace={key_prefix}&lease=2",
        settings=sk.Settings(retry=fast, max_poll=0.02),
    )
    reserving(app.participant("a"), refuse=set())
    reserving(app.participant("b"), refuse={"bad"})
    two = app.saga(two_steps())
    async with app:
        assert isinstance(app.transport, RedisTransport)
        await app.sagas.start(two, Order("good"), saga_id="good")
        await app.sagas.start(two, Order("bad"), saga_id="bad")
        good = await app.sagas.wait("good", timeout=20)
        bad = await app.sagas.wait("bad", timeout=20)
        assert good.state == "completed" and good.data.total == 2
        assert bad.state == "compensated" and "redistest.Refused" in (bad.error or "")
        assert await effects(app.store, "good") == ["T:a", "T:b"]
        assert await effects(app.store, "bad") == ["T:a", "C:a"]
    # everything the saga sent went through Redis and was acknowledged
    streams = [k async for k in raw.scan_iter(match=f"{key_prefix}:q:*")]
    assert len(streams) >= 3  # a, b, and the coordinator's queue
    for key in streams:
        assert await raw.xlen(key) == 0
