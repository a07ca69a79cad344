"""Shared fixtures: real services on loopback, skipped (or required) clearly."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from sagakit.errors import ConfigurationError
from sagakit.store import Store, open_store
from sagakit.testing import drop_tables
from sagakit.testing.pgcluster import PgCluster, pg_bin
from sagakit.transport._url import fresh_namespace
from tests import broker_net

REQUIRE = os.environ.get("SAGAKIT_REQUIRE_SERVICES") == "1"

DEFAULTS = {
    "postgres": ("SAGAKIT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "rabbitmq": ("SAGAKIT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "nats": ("SAGAKIT_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "redis": ("SAGAKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "mariadb": ("SAGAKIT_TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/test"),
}


def _reachable(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 0), timeout=1):
            return True
    except OSError:
        return False


def service_url(name: str) -> str:
    """The URL of a service, or skip (fail under SAGAKIT_REQUIRE_SERVICES=1)."""
    env, default = DEFAULTS[name]
    url = os.environ.get(env, default)
    if not _reachable(url):
        msg = f"{name} not reachable at {url} (set {env})"
        if REQUIRE:
            pytest.fail(msg + " and SAGAKIT_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    return url


@pytest.fixture
def statements() -> Iterator[list[tuple[int, str]]]:
    """(connection, statement) for everything asyncpg connections send while the test runs."""
    import asyncpg  # type: ignore[import-untyped]

    sent: list[tuple[int, str]] = []
    patched = {}
    for name in ("execute", "fetch", "fetchrow", "executemany"):
        method = patched[name] = getattr(asyncpg.Connection, name)

        def counted(method: Any = method) -> Any:
            async def call(self: Any, query: str, *args: Any, **kw: Any) -> Any:
                sent.append((id(self), " ".join(query.split())))
                return await method(self, query, *args, **kw)

            return call

        setattr(asyncpg.Connection, name, counted())
    yield sent
    for name, method in patched.items():
        setattr(asyncpg.Connection, name, method)


@pytest.fixture
def postgres_url() -> str:
    return service_url("postgres")


@pytest.fixture
def rabbitmq_url() -> str:
    return service_url("rabbitmq")


@pytest.fixture
def nats_url() -> str:
    return service_url("nats")


@pytest.fixture
def redis_url() -> str:
    return service_url("redis")


@pytest.fixture
def mariadb_url() -> str:
    return service_url("mariadb")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster with prepared transactions on (the shared one has them off)."""
    try:
        pg_bin()
    except ConfigurationError as exc:
        if REQUIRE:
            pytest.fail(f"{exc} and SAGAKIT_REQUIRE_SERVICES=1")
        pytest.skip(str(exc))
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A fresh broker namespace: a test never meets an earlier (interrupted) run's messages."""
    return broker_net.note(fresh_namespace("t"), request.node.nodeid)


#: every prefix handed out this session -> the test it was handed to
ISSUED: dict[str, str] = {}


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A unique table prefix so tests sharing one database never collide."""
    p = f"t{uuid.uuid4().hex[:10]}_"
    ISSUED[p] = request.node.nodeid
    return p


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop PostgreSQL tables a test left under its prefix, remove the broker
    namespaces a test left (:mod:`tests.broker_net`), and name the test.

    Each test should drop its own; this net keeps a shared server from
    filling up across runs and tells which test to mend.
    """
    _sweep_brokers(session)
    env, default = DEFAULTS["postgres"]
    url = os.environ.get(env, default)
    if not ISSUED or not _reachable(url):
        return
    try:
        left = asyncio.run(_drop_leftovers(url))
    except Exception as exc:  # a cleanup net: never fail the run over it
        left = {f"(cleanup failed: {exc!r})": 0}
    _report(session, [f"leftover tables: {n} from {test} (dropped)" for test, n in left.items()])


def _report(session: pytest.Session, lines: list[str]) -> None:
    """What a cleanup net found, one line each, at the end of the run's output."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not lines:
        return
    reporter.ensure_newline()
    for line in sorted(lines):
        reporter.write_line(line)


def _sweep_brokers(session: pytest.Session) -> None:
    if not broker_net.ISSUED:
        return
    urls = {}
    for name in ("rabbitmq", "nats", "redis"):
        env, default = DEFAULTS[name]
        url = os.environ.get(env, default)
        if _reachable(url):
            urls[name] = url
    try:
        left = asyncio.run(broker_net.sweep(urls))
    except Exception as exc:  # a cleanup net: never fail the run over it
        left = {f"(broker cleanup failed: {exc!r})": []}
    lines = [f"{', '.join(ns)} from {test} (removed)" for test, ns in left.items()]
    _report(session, [f"leftover broker namespaces: {line}" for line in lines])


async def _drop_leftovers(url: str) -> dict[str, int]:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables "
            "WHERE schemaname = 'public' AND tablename ~ '^t[0-9a-f]{10}_'"
        )
        left: dict[str, int] = {}
        for (table,) in rows:
            test = ISSUED.get(table[:12])
            if test is None:
                continue  # another run's, or not a test prefix
            await conn.execute(f'DROP TABLE IF EXISTS "{table}" CASCADE')
            left[test] = left.get(test, 0) + 1
        return left
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[Store]:
    """An open store on each backend, under a fresh prefix; its tables dropped after
    (a test module may define its own ``store``, e.g. with a fake clock)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    async with _opened(url, prefix) as st:
        yield st


@pytest.fixture
async def pg(postgres_url: str, prefix: str) -> AsyncIterator[Store]:
    """An open PostgreSQL store (a small pool) under a fresh prefix; its tables dropped after."""
    async with _opened(f"{postgres_url}?max_size=3", prefix) as st:
        yield st


@asynccontextmanager
async def _opened(url: str, prefix: str) -> AsyncIterator[Store]:
    st = open_store(url, prefix=prefix)
    await st.open()
    try:
        yield st
    finally:
        await drop_tables(st)
        await st.close()
