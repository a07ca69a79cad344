"""The transport contract (:class:`sagakit.testing.TransportContract`) against
every transport: memory, database (SQLite in memory and in a file,
PostgreSQL) and the brokers.

To add a broker transport, add one line to ``BROKERS``: the conftest fixture
that gives its URL, the module exposing ``transport(url, **options)``, and the
optional per-test options, connection-cut hook and cleanup. Its subscriptions
should offer ``abort()`` (stop without settling anything, like a crashed
process) for the dead-consumer test.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sagakit.clock import SystemClock
from sagakit.store import Store, open_store
from sagakit.store.consumer import QueueConsumer
from sagakit.testing import TransportContract, drop_tables
from sagakit.transport import Subscription, Transport
from sagakit.transport.database import DatabaseTransport
from sagakit.transport.memory import MemoryTransport
from tests.broker_net import noted_namespace
from tests.test_nats import cut_nats, nats_leftovers, nats_options, remove_nats
from tests.test_rabbitmq import (
    amqp_url,
    cut_rabbitmq,
    rabbitmq_leftovers,
    rabbitmq_vhosts,
    remove_rabbitmq,
)
from tests.test_redis import contract_options, cut_redis, redis_leftovers, remove_redis

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used through BROKERS by name

pytestmark = pytest.mark.timeout(120)

LEASE = 1.0  # database lease: how long a dead consumer holds a message


# -- memory ------------------------------------------------------------------


class TestMemoryTransport(TransportContract):
    """Not durable: a consumer cannot die apart from its broker (the process)."""

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        t = MemoryTransport()
        await t.open()
        yield t
        await t.close()


# -- database ----------------------------------------------------------------


class DatabaseContract(TransportContract):
    """Queues are rows; a dead consumer's rows come back when its lease ends."""

    async def open_peer(self, transport: Transport) -> Transport:
        assert isinstance(transport, DatabaseTransport)
        store = transport.store
        if store.dialect == "postgresql":  # really another process: its own pool
            store = open_store(store.url, prefix=store.prefix)
        peer = DatabaseTransport(store, lease=LEASE, max_poll=0.05)
        await peer.open()
        return peer

    async def close_peer(self, transport: Transport, peer: Transport) -> None:
        assert isinstance(transport, DatabaseTransport) and isinstance(peer, DatabaseTransport)
        await peer.close()
        if peer.store is not transport.store:
            await peer.store.close()

    def app_store(self, transport: Transport) -> Store:
        assert isinstance(transport, DatabaseTransport)
        return transport.store

    async def crash(self, transport: Transport, subscription: Subscription) -> None:
        assert isinstance(subscription, QueueConsumer)
        subscription._stopping = True
        subscription._task.cancel()
        subscription._beat.cancel()
        for task in list(subscription._inflight):
            task.cancel()


async def _database_transport(store: Store) -> AsyncIterator[Transport]:
    t = DatabaseTransport(store, lease=LEASE, max_poll=0.05)
    await t.open()
    try:
        yield t
    finally:
        await t.close()
        await store.open()  # the app-level test closes it; reopen to clean up
        await drop_tables(store)
        await store.close()


class TestDatabaseSqliteMemory(DatabaseContract):
    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        async for t in _database_transport(open_store("memory://", clock=SystemClock())):
            yield t


class TestDatabaseSqliteFile(DatabaseContract):
    @pytest.fixture
    async def transport(self, tmp_path: Path) -> AsyncIterator[Transport]:
        store = open_store(f"sqlite:///{tmp_path}/queue.db")
        async for t in _database_transport(store):
            yield t


class TestDatabasePostgres(DatabaseContract):
    @pytest.fixture
    async def transport(self, postgres_url: str, prefix: str) -> AsyncIterator[Transport]:
        async for t in _database_transport(open_store(postgres_url, prefix=prefix)):
            yield t


# -- brokers -----------------------------------------------------------------


Leftovers = Callable[[Any, Sequence[str], Sequence[str]], Awaitable[list[str]]]


@dataclass(frozen=True)
class Broker:
    """How to run the contract against one broker transport."""

    url_fixture: str
    module: str
    options: Callable[[str], dict[str, Any]] = field(default=lambda tag: {})
    cut: Callable[[Transport], Awaitable[None]] | None = None
    cleanup: Callable[[Any], Awaitable[None]] | None = None
    #: which of a namespace's objects the broker still reports (its own API)
    leftovers: Leftovers | None = None


BROKERS: dict[str, Broker] = {
    "rabbitmq": Broker(
        "amqp_url",
        "sagakit.transport.rabbitmq",
        options=lambda tag: {"namespace": tag, "reconnect_interval": 0.5},
        cut=cut_rabbitmq,
        cleanup=remove_rabbitmq,
        leftovers=rabbitmq_leftovers,
    ),
    "nats": Broker(
        "nats_url",
        "sagakit.transport.nats",
        options=nats_options,
        cut=cut_nats,
        cleanup=remove_nats,
        leftovers=nats_leftovers,
    ),
    "redis": Broker(
        "redis_url",
        "sagakit.transport.redis",
        options=contract_options,
        cut=cut_redis,
        cleanup=remove_redis,
        leftovers=redis_leftovers,
    ),
}

_PEERS: dict[int, Callable[[], Awaitable[Transport]]] = {}
_CUTS: dict[int, Callable[[Transport], Awaitable[None]] | None] = {}
_LEFTOVERS: dict[int, Leftovers | None] = {}


class TestBrokerTransport(TransportContract):
    @pytest.fixture(params=sorted(BROKERS))
    async def transport(self, request: pytest.FixtureRequest) -> AsyncIterator[Transport]:
        broker = BROKERS[request.param]
        url = str(request.getfixturevalue(broker.url_fixture))
        module = importlib.import_module(broker.module)
        options = broker.options(noted_namespace("contract"))

        async def open_one() -> Transport:
            t: Transport = module.transport(url, **options)
            await t.open()
            return t

        t = await open_one()
        _PEERS[id(t)], _CUTS[id(t)] = open_one, broker.cut
        _LEFTOVERS[id(t)] = broker.leftovers
        try:
            yield t
        finally:
            del _PEERS[id(t)], _CUTS[id(t)], _LEFTOVERS[id(t)]
            await t.close()
            if broker.cleanup is not None:
                await broker.cleanup(t)

    async def open_peer(self, transport: Transport) -> Transport:
        return await _PEERS[id(transport)]()

    async def leftovers(
        self, transport: Transport, queues: Sequence[str], topics: Sequence[str]
    ) -> list[str]:
        check = _LEFTOVERS[id(transport)]
        assert check is not None, f"no leftovers hook for {type(transport).__name__}"
        return await check(transport, queues, topics)

    async def crash(self, transport: Transport, subscription: Subscription) -> None:
        abort = getattr(subscription, "abort", None)
        if abort is None:
            pytest.skip(f"{type(subscription).__name__} has no abort()")
        await abort()

    async def cut_connection(self, transport: Transport) -> None:
        cut = _CUTS[id(transport)]
        if cut is None:
            pytest.skip(f"no connection-cut hook for {type(transport).__name__}")
        await cut(transport)
