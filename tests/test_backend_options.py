"""URL options that behave the same on every backend: namespaces, unknown
names, TLS schemes, PostgreSQL pool sizes and ``sslmode``, the ``??`` escape,
and configuration errors that never show a password.

Most tests need no server (they build, never open); the PostgreSQL ones use
the local server.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import uuid
from typing import Any

import pytest

import sagakit as sk
from sagakit.errors import ConfigurationError
from sagakit.store import open_store
from sagakit.transport import open_transport
from sagakit.transport._url import fresh_namespace, with_option

SECRET = "s3cret"
NO_STORE: Any = None  # broker transports never touch the store

# -- unknown options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "valid"),
    [
        (f"amqp://app:{SECRET}@127.0.0.1:5672/?namespase=x", "namespace"),
        (f"nats://app:{SECRET}@127.0.0.1:4222?namespase=x", "namespace"),
        (f"redis://:{SECRET}@127.0.0.1:6379/0?namespase=x", "namespace"),
        (f"postgresql://app:{SECRET}@127.0.0.1/test?namespase=x", "max_size"),
    ],
)
def test_an_unknown_option_is_refused_naming_the_valid_ones(url: str, valid: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        if url.startswith("postgresql"):
            open_store(url)
        else:
            open_transport(url, NO_STORE)
    message = str(info.value)
    assert "'namespase'" in message and "valid options:" in message and valid in message
    assert SECRET not in message and ":***@" in message


@pytest.mark.parametrize(
    "url",
    [
        "amqp://h/?namespace=a%20b",
        "nats://h:4222?namespace=a..b",
        "redis://h/0?namespace=a*",
        "amqp://h/?queue_type=stream",
        "nats://h:4222?namespace=a&prefix=b",  # the old name disagreeing with the new
    ],
)
def test_bad_namespace_or_option_values_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_transport(url, NO_STORE)


# -- namespaces --------------------------------------------------------------


def test_rabbitmq_names_everything_in_its_namespace() -> None:
    from sagakit.transport.rabbitmq import RabbitMQTransport

    t = open_transport("amqp://g:g@h/vh?namespace=shop&queue_type=classic&heartbeat=5", NO_STORE)
    assert isinstance(t, RabbitMQTransport)
    assert (t.namespace, t.queue_type) == ("shop", "classic")
    assert t.broker_queue("sagakit.coordinator") == "shop.q.sagakit.coordinator"
    assert (t.events_exchange, t.delay_queue(120)) == ("shop.events", "shop.delay.120")
    assert t.broker_url == "amqp://g:g@h/vh?heartbeat=5", "sagakit's options are taken out"
    assert RabbitMQTransport("amqp://h/").broker_queue("q") == "sagakit.q.q"


def test_nats_namespace_names_the_subjects_and_the_stream() -> None:
    from sagakit.transport.nats import NatsTransport

    t = open_transport("nats://h:4222?namespace=shop.eu", NO_STORE)
    assert isinstance(t, NatsTransport)
    assert (t.prefix, t.stream) == ("shop.eu", "SHOP_EU")
    assert t.queue_subject("sagakit.coordinator") == "shop.eu.q.sagakit.coordinator"
    default = NatsTransport("nats://h:4222")
    assert (default.prefix, default.stream) == ("sagakit", "SAGAKIT"), "unchanged defaults"
    assert NatsTransport("nats://h:4222?prefix=old").namespace == "old", "the older name"


def test_redis_namespace_starts_every_key() -> None:
    from sagakit.transport.redis import RedisTransport

    t = open_transport("redis://h:6379/0?namespace=shop", NO_STORE)
    assert isinstance(t, RedisTransport)
    assert (t.stream_key("stock"), t.bind_key("shop.Paid")) == (
        "shop:q:stock",
        "shop:bind:shop.Paid",
    )


def test_settings_namespace_reaches_the_transport_and_the_url_wins() -> None:
    for url in ("amqp://h/", "nats://h:4222", "redis://h:6379/0"):
        app = sk.App("memory://", url, settings=sk.Settings(namespace="from-settings"))
        assert getattr(app.transport, "namespace") == "from-settings"  # noqa: B009
        app = sk.App(
            "memory://",
            with_option(url, "namespace", "from-url"),
            settings=sk.Settings(namespace="from-settings"),
        )
        assert getattr(app.transport, "namespace") == "from-url"  # noqa: B009


def test_fresh_namespaces_differ_and_with_option_keeps_a_given_one() -> None:
    assert fresh_namespace() != fresh_namespace()
    assert with_option("redis://h/0", "namespace", "x") == "redis://h/0?namespace=x"
    assert with_option("redis://h/0?lease=1", "namespace", "x") == "redis://h/0?lease=1&namespace=x"
    assert with_option("redis://h/0?namespace=y", "namespace", "x") == "redis://h/0?namespace=y"


# -- TLS ---------------------------------------------------------------------


async def test_amqps_builds_a_tls_connection() -> None:
    import aiormq
    import aiormq.connection

    t: Any = open_transport("amqps://u:p@h:5671/?namespace=x&cafile=/etc/ca.pem", NO_STORE)
    conn = aiormq.Connection(t.broker_url)
    assert conn.url.scheme == "amqps" and conn.ssl_certs.cafile == "/etc/ca.pem"
    assert isinstance(conn._transport_factory, aiormq.connection.TLSTransportFactory)


def test_nats_tls_scheme_builds_a_verifying_tls_context() -> None:
    from sagakit.transport.nats import NatsTransport

    t = open_transport("tls://h:4222?namespace=x&tls_hostname=nats.example", NO_STORE)
    assert isinstance(t, NatsTransport)
    options = t.connect_options()
    assert isinstance(options["tls"], ssl.SSLContext)
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED
    assert options["tls_hostname"] == "nats.example"
    assert "tls" not in NatsTransport("nats://h:4222").connect_options()
    with pytest.raises(ConfigurationError, match="TLS"):
        NatsTransport("tls://h:4222?tls_ca_file=/nonexistent/ca.pem")


async def test_nats_tls_is_never_silently_plain(nats_url: str) -> None:
    """The local server has no TLS: asking for it must fail, not fall back."""
    from sagakit.transport.nats import NatsTransport

    t = NatsTransport(nats_url.replace("nats://", "tls://", 1), namespace=fresh_namespace())
    with pytest.raises(ConfigurationError, match="TLS"):
        await t.open()
    await t.close()


async def test_rediss_builds_a_tls_connection() -> None:
    from redis.asyncio.connection import SSLConnection

    from sagakit.transport.redis import RedisTransport

    t = open_transport(f"rediss://:{SECRET}@h:6380/0?namespace=x&ssl_cert_reqs=required", NO_STORE)
    assert isinstance(t, RedisTransport)
    client = t.make_client()
    try:
        assert client.connection_pool.connection_class is SSLConnection
    finally:
        await client.aclose()


# -- PostgreSQL --------------------------------------------------------------


async def _backends(postgres_url: str, name: str) -> int:
    store = open_store(f"{postgres_url}?max_size=1")  # one more connection, no more
    await store.driver.open()
    try:
        rows = await store.driver.fetch_single(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = ?", name
        )
        return int(rows[0][0])
    finally:
        await store.driver.close()


async def test_postgres_pool_sizes_come_from_the_url(postgres_url: str, prefix: str) -> None:
    name = f"sk-pool-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?min_size=2&max_size=3&application_name={name}"
    store = open_store(url, prefix=prefix)
    await store.driver.open()
    try:
        assert await _backends(postgres_url, name) == 2, "min_size connections at once"

        async def hold() -> None:
            async with store.driver.transaction() as tx:
                await tx.execute("SELECT pg_sleep(0.3)")

        busy = asyncio.gather(*(hold() for _ in range(6)))
        await asyncio.sleep(0.15)
        assert await _backends(postgres_url, name) == 3, "never more than max_size"
        await busy
    finally:
        await store.driver.close()


async def test_postgres_sslmode_from_the_url_is_applied(postgres_url: str) -> None:
    plain = open_store(f"{postgres_url}?sslmode=disable&max_size=1")
    await plain.driver.open()
    await plain.driver.close()
    # The local server has no TLS: asking for it must fail, so sslmode was honoured.
    tls = open_store(f"{postgres_url}?sslmode=require&max_size=1&min_size=1")
    with pytest.raises(sk.StoreError):
        await tls.driver.open()
    await tls.driver.close()


async def test_double_question_mark_is_a_literal_for_jsonb(postgres_url: str, prefix: str) -> None:
    store = open_store(f"{postgres_url}?max_size=1", prefix=prefix)
    await store.driver.open()
    table = f"{prefix}docs"
    try:
        async with store.driver.transaction() as tx:
            await tx.execute(f"CREATE TABLE {table} (id INT, doc JSONB)")
            await tx.execute(f"INSERT INTO {table} VALUES (?, ?::jsonb)", 1, '{"a": 1, "b": "?"}')
            await tx.execute(f"INSERT INTO {table} VALUES (?, ?::jsonb)", 2, '{"c": 1}')
            has = await tx.fetchall(f"SELECT id FROM {table} WHERE doc ?? ? ORDER BY id", "a")
            anyof = await tx.fetchall(
                f"SELECT id FROM {table} WHERE doc ??| ? AND id > ? ORDER BY id", ["c", "z"], 0
            )
            quoted = await tx.fetchone(f"SELECT doc->>'b', '??' FROM {table} WHERE id = ?", 1)
            await tx.execute(f"DROP TABLE {table}")
    finally:
        await store.driver.close()
    assert [r[0] for r in has] == [1] and [r[0] for r in anyof] == [2]
    assert tuple(quoted) == ("?", "??"), "text in quotes is left alone"


@pytest.mark.parametrize("query", ["max_size=0", "max_size=many", "maxsize=3"])
def test_postgres_configuration_errors_hide_the_password(query: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store(f"postgresql://app:{SECRET}@127.0.0.1:5432/test?{query}")
    assert SECRET not in str(info.value) and "app:***@127.0.0.1" in str(info.value)


def test_missing_asyncpg_is_a_one_line_install_hint() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from sagakit.cli import main\n"
        f"sys.exit(main(['db', 'migrate', '--store', 'postgresql://u:{SECRET}@127.0.0.1:1/x']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pip install 'sagakit[postgres]'" in lines[0] and SECRET not in lines[0]
