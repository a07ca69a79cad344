"""RabbitMQ transport: its own details, helpers for the contract suite, and a
two-participant saga end to end over a real broker with a SQLite store.

Every test runs in a private virtual host created for this session (when
``rabbitmqctl`` can reach the broker), so queues such as
``sagakit.coordinator`` never mix with other tests that use the broker at the
same time; the virtual host is deleted at the end of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlparse

import aio_pika
import aiormq.exceptions
import msgspec
import pytest

import sagakit as sk
from sagakit.testing.removal import REMOVAL_DELAY
from sagakit.transport import Outgoing, Transport
from sagakit.transport.rabbitmq import RabbitMQTransport, delay_bucket, transport
from tests.helpers import remove_namespace_of

pytestmark = pytest.mark.timeout(120)

# -- helpers shared with tests/test_transport_contract.py -------------------

_VHOSTS: dict[str, str] = {}


def _rabbitmqctl(*args: str, timeout: float = 30.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def _local_ctl(url: str) -> bool:
    host = urlparse(url).hostname or "127.0.0.1"
    return shutil.which("rabbitmqctl") is not None and host in ("127.0.0.1", "localhost", "::1")


@pytest.fixture(scope="session")
def rabbitmq_vhosts() -> Iterator[dict[str, str]]:
    yield _VHOSTS
    for vhost in _VHOSTS.values():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _rabbitmqctl("delete_vhost", vhost)
    _VHOSTS.clear()


@pytest.fixture
def amqp_url(rabbitmq_url: str, rabbitmq_vhosts: dict[str, str]) -> str:
    """``rabbitmq_url`` on a private virtual host (or as is, without rabbitmqctl)."""
    if not _local_ctl(rabbitmq_url) or urlparse(rabbitmq_url).path not in ("", "/"):
        return rabbitmq_url
    if rabbitmq_url not in rabbitmq_vhosts:
        vhost = f"sagakit-test-{uuid.uuid4().hex[:8]}"
        user = urlparse(rabbitmq_url).username or "guest"
        try:
            _rabbitmqctl("add_vhost", vhost)
            _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        except (OSError, subprocess.SubprocessError):
            return rabbitmq_url
        rabbitmq_vhosts[rabbitmq_url] = vhost
    base = rabbitmq_url.rstrip("/")
    return f"{base}/{quote(rabbitmq_vhosts[rabbitmq_url], safe='')}"


async def open_rabbitmq(url: str, namespace: str, **options: object) -> RabbitMQTransport:
    t = transport(url, namespace=namespace, **options)
    await t.open()
    return t


async def remove_rabbitmq(t: RabbitMQTransport) -> None:
    """Remove ``t``'s namespace (reopening it if an app closed it), then close."""
    await remove_namespace_of(t)


async def rabbitmq_leftovers(t: Any, queues: Sequence[str], topics: Sequence[str]) -> list[str]:
    """Which of ``t``'s queues and exchanges RabbitMQ still has (a passive declare each)."""
    assert isinstance(t, RabbitMQTransport)
    names = [t.broker_queue(q) for q in queues]
    names += [t.delay_queue(delay_bucket(REMOVAL_DELAY)), t.registry_queue]
    exchanges = [t.events_exchange, t.delay_queue(delay_bucket(REMOVAL_DELAY))]
    conn = await aio_pika.connect(t.broker_url)
    try:
        found = [n for n in names if await rabbitmq_has(conn, n, "queue")]
        return found + [n for n in exchanges if await rabbitmq_has(conn, n, "exchange")]
    finally:
        await conn.close()


async def rabbitmq_has(conn: Any, name: str, kind: str) -> bool:
    """A passive declare on a channel of its own: RabbitMQ closes it (404) if ``name`` is gone."""
    channel = await conn.channel()
    try:
        if kind == "queue":
            await channel.declare_queue(name, passive=True)
        else:
            await channel.get_exchange(name, ensure=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    with contextlib.suppress(Exception):
        await channel.close()
    return True


async def cut_rabbitmq(t: Transport) -> None:
    """Have the broker close ``t``'s connection, as a network cut or restart would."""
    assert isinstance(t, RabbitMQTransport)
    if not _local_ctl(t.url):
        pytest.skip("rabbitmqctl is needed to cut a connection")
    name = t.connection_name

    def names() -> list[str]:
        # tab-separated: "<rabbit@host.1.2.3>\t[{...connection_name,longstr,NAME}...]"
        out = _rabbitmqctl("list_connections", "pid", "client_properties", "-q")
        return [line.split("\t", 1)[0] for line in out.splitlines() if name in line]

    loop = asyncio.get_running_loop()
    conns: list[str] = []
    for _ in range(50):  # the broker lists a new connection after a moment
        conns = await loop.run_in_executor(None, names)
        if conns:
            break
        await asyncio.sleep(0.1)
    assert conns, f"connection {name} not found on the broker"
    for conn in conns:
        await loop.run_in_executor(
            None, lambda c=conn: _rabbitmqctl("close_connection", c, "sagakit contract test")
        )


# -- transport details -------------------------------------------------------


def test_delay_buckets_round_up_a_little() -> None:
    assert delay_bucket(0) == 0 and delay_bucket(0.005) == 0
    for delay in (0.01, 0.05, 0.3, 1.0, 2.5, 30.0, 600.0):
        ms = delay_bucket(delay)
        assert delay * 1000 <= ms <= delay * 1000 * 1.2 + 1
    buckets = {delay_bucket(d / 100) for d in range(1, 3001)}
    assert len(buckets) < 60, "few delay queues for delays up to 30 s"


def test_bad_queue_type_is_a_configuration_error() -> None:
    with pytest.raises(sk.ConfigurationError):
        RabbitMQTransport("amqp://x", queue_type="stream")  # type: ignore[arg-type]


def test_open_transport_picks_rabbitmq_by_url() -> None:
    t = sk.open_transport("amqp://guest:guest@127.0.0.1:5672/", sk.open_store("memory://"))
    assert isinstance(t, RabbitMQTransport)
    assert t.direct_writer(sk.open_store("memory://")) is None


async def test_unreachable_broker_is_a_transport_error() -> None:
    t = RabbitMQTransport("amqp://guest:secret@127.0.0.1:1/", reconnect_interval=0.1)
    with pytest.raises(sk.TransportError) as caught:
        await asyncio.wait_for(t.open(), 20)
    assert "secret" not in str(caught.value) and "guest:***@127.0.0.1:1" in str(caught.value)
    await t.close()


async def test_classic_queues_work_too(amqp_url: str) -> None:
    t = await open_rabbitmq(amqp_url, f"classic-{uuid.uuid4().hex[:8]}", queue_type="classic")
    try:
        q = f"classic-{uuid.uuid4().hex[:8]}"
        await t.declare(q, [])
        seen: list[int] = []

        async def handler(d: sk.transport.Delivery) -> None:
            seen.append(d.attempt)
            await (d.nack(0.05) if d.attempt == 1 else d.ack())

        sub = await t.consume(q, handler, prefetch=1)
        await t.publish([Outgoing(sk.new_id(), "command", q, b"x")])
        for _ in range(500):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.01)
        await sub.stop()
        assert seen == [1, 2]
    finally:
        await remove_rabbitmq(t)


@contextlib.contextmanager
def broker_max_message_size(size: int) -> Iterator[None]:
    """Lower the broker's max_message_size for a moment (restored afterwards)."""
    old = _rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).").strip()
    _rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {size}).")
    try:
        yield
    finally:
        value = old.removeprefix("{ok,").removesuffix("}")
        restore = value if value.isdigit() else "134217728"
        _rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {restore}).")


async def test_a_message_the_broker_refuses_is_not_an_outage(amqp_url: str) -> None:
    """A 406 (the message is larger than the broker allows) is permanent: the error
    says it is not retryable, so the relay dead-letters the row instead of waiting
    for ever; the transport goes on publishing other messages."""
    if not _local_ctl(amqp_url):
        pytest.skip("rabbitmqctl is needed to change the broker's max_message_size")
    with broker_max_message_size(4096):  # read by the broker when a channel opens
        t = await open_rabbitmq(amqp_url, f"reject-{uuid.uuid4().hex[:8]}")
    try:
        q = f"reject-{uuid.uuid4().hex[:8]}"
        await t.declare(q, [])
        with pytest.raises(sk.TransportError) as err:
            await t.publish([Outgoing(sk.new_id(), "command", q, b"x" * 8192)])
        assert err.value.retryable is False
        assert not sk.errors.is_outage(err.value)
        for _ in range(50):  # the robust channel reopens after the broker closed it
            with contextlib.suppress(sk.TransportError):
                await t.publish([Outgoing(sk.new_id(), "command", q, b"small")])
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the transport did not publish again after the rejection")
    finally:
        await remove_rabbitmq(t)


# -- a saga end to end over RabbitMQ -----------------------------------------


@sk.command("rmq.Reserve")
class Reserve(msgspec.Struct):
    order: str
    amount: int


@sk.command("rmq.Release")
class Release(msgspec.Struct):
    order: str


@sk.reply("rmq.Reserved")
class Reserved(msgspec.Struct):
    amount: int


class OutOfStock(sk.BusinessError):
    code = "rmq.OutOfStock"


@dataclass
class Order:
    order: str
    amount: int
    reserved: int = 0


@pytest.fixture
async def saga_app(
    amqp_url: str, tmp_path
) -> AsyncIterator[tuple[sk.App, sk.SagaDefinition[Order]]]:
    tag = uuid.uuid4().hex[:8]
    credit, stock = f"credit-{tag}", f"stock-{tag}"
    t = RabbitMQTransport(amqp_url, namespace=f"saga-{tag}")
    settings = sk.Settings(retry=sk.RetryPolicy(max_attempts=3, initial=0.05), max_poll=0.05)
    app = sk.App(f"sqlite:///{tmp_path}/saga.db", transport=t, settings=settings)
    c, s = app.participant(credit), app.participant(stock)

    @c.command(Reserve)
    async def reserve_credit(cmd: Reserve, ctx: sk.Context) -> Reserved:
        await ctx.db.execute("INSERT INTO effects (what) VALUES (?)", f"credit+{cmd.order}")
        return Reserved(cmd.amount)

    @c.command(Release)
    async def release_credit(cmd: Release, ctx: sk.Context) -> None:
        await ctx.db.execute("INSERT INTO effects (what) VALUES (?)", f"credit-{cmd.order}")

    @s.command(Reserve)
    async def reserve_stock(cmd: Reserve, ctx: sk.Context) -> Reserved:
        if cmd.amount > 10:
            raise OutOfStock(f"only 10 left for {cmd.order}")
        await ctx.db.execute("INSERT INTO effects (what) VALUES (?)", f"stock+{cmd.order}")
        return Reserved(cmd.amount)

    defn = app.saga(
        sk.Saga(f"order-{tag}", Order)
        .step("credit")
        .invoke(credit, lambda d: Reserve(d.order, d.amount))
        .on_reply(Reserved, lambda d, r: replace(d, reserved=r.amount))
        .compensate(credit, lambda d: Release(d.order))
        .step("stock")
        .invoke(stock, lambda d: Reserve(d.order, d.amount))
        .build()
    )
    await app.store.open()
    async with app.store.transaction() as tx:
        await tx.execute("CREATE TABLE IF NOT EXISTS effects (what TEXT NOT NULL)")
    try:
        async with app:
            yield app, defn
    finally:
        await remove_rabbitmq(t)


async def effects(app: sk.App) -> list[str]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall("SELECT what FROM effects ORDER BY rowid")
    return [r[0] for r in rows]


async def test_saga_completes_over_rabbitmq(
    saga_app: tuple[sk.App, sk.SagaDefinition[Order]],
) -> None:
    app, defn = saga_app
    ids = [await app.sagas.start(defn, Order(f"o{i}", 5)) for i in range(5)]
    views = [await app.sagas.wait(i, timeout=30) for i in ids]
    assert [v.state for v in views] == ["completed"] * 5
    assert all(v.data.reserved == 5 for v in views)
    got = await effects(app)
    assert sorted(got) == sorted(
        [f"credit+o{i}" for i in range(5)] + [f"stock+o{i}" for i in range(5)]
    )
    # The relay deletes a batch after the broker confirmed it, so a saga can
    # complete a moment before its last outbox row is gone.
    for _ in range(200):
        if await app.store.queue.depth("sagakit.outbox") == 0:
            break
        await asyncio.sleep(0.05)
    assert await app.store.queue.depth("sagakit.outbox") == 0, "the relay emptied the outbox"
    assert await app.store.dead_letters() == []


async def test_saga_compensates_over_rabbitmq(
    saga_app: tuple[sk.App, sk.SagaDefinition[Order]],
) -> None:
    app, defn = saga_app
    saga_id = await app.sagas.start(defn, Order("big", 50))
    view = await app.sagas.wait(saga_id, timeout=30)
    assert view.state == "compensated"
    assert "rmq.OutOfStock" in (view.error or "")
    assert await effects(app) == ["credit+big", "credit-big"]


async def test_remove_namespace_refuses_a_registry_entry_it_did_not_write(amqp_url: str) -> None:
    """An entry that is not a sagakit name stops the removal before anything is deleted."""
    t = transport(amqp_url, namespace=f"skreg-{uuid.uuid4().hex[:8]}")
    await t.open()
    try:
        await t.declare("kept", [])
        await t.publish([Outgoing("m1", "command", "kept", b"x")])
        stray = aio_pika.Message(b"someone else's")
        await t.link.channel().default_exchange.publish(stray, routing_key=t.registry_queue)
        with pytest.raises(sk.ForeignNamespace, match="registry"):
            await t.remove_namespace(t.namespace)
        assert await rabbitmq_leftovers(t, ["kept"], []) != []  # nothing was deleted
    finally:
        await t.close()
        await t.open()
        channel = await t.connection.channel()
        await channel.queue_delete(t.registry_queue)  # the stray entry with it
        await channel.close()
        await remove_rabbitmq(t)
