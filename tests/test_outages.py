"""An outage is not poison: a database that refuses connections is waited out.

Round 1 treated "too many clients" like a bad message: retried it a few times
within seconds, then dead-lettered it. Here a participant's database refuses
every new connection for a few seconds (its role's connection limit drops to
0 and its sessions are ended: what PostgreSQL does when its connections run
out), while commands keep arriving over the transport. Nothing may be
dead-lettered, every command must be handled exactly once after the outage,
and a worker started during the outage must wait for the database.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

import sagakit as sk
from sagakit.errors import StoreUnavailable
from sagakit.messages import Headers
from sagakit.transport import Outgoing
from tests.helpers import Do, eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def own_database(postgres_url: str) -> AsyncIterator[tuple[str, Any]]:
    """A database and a login role of this test's own, and an admin connection to them."""
    name = f"sk_outage_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE ROLE {name} LOGIN")
    await admin.execute(f"CREATE DATABASE {name} OWNER {name}")
    base = postgres_url.rsplit("/", 1)[0].replace("postgres@", f"{name}@")
    try:
        yield f"{base}/{name}", admin
    finally:
        await _allow(admin, name, -1)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


async def _allow(admin: Any, role: str, limit: int) -> None:
    """Set the role's connection limit; with 0, end its sessions too: an outage."""
    await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT {limit}")
    if limit == 0:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )


def _role(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _app(url: str) -> tuple[sk.App, list[str]]:
    settings = sk.Settings(
        retry=sk.RetryPolicy(max_attempts=3, initial=0.01), max_poll=0.02, outage_patience=60
    )
    app = sk.App(url, "memory://", settings=settings)
    handled: list[str] = []
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        await ctx.db.execute("INSERT INTO done (k) VALUES (?)", cmd.key)
        ctx.db.on_commit(lambda: handled.append(cmd.key))

    return app, handled


async def _send(app: sk.App, keys: list[str]) -> None:
    envs = [app.codec.make(Do(k), Headers()) for k in keys]
    await app.transport.publish([Outgoing(e.id, "command", "p", app.codec.encode(e)) for e in envs])


async def test_a_database_outage_is_waited_out_not_dead_lettered(
    own_database: tuple[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    url, admin = own_database
    app, handled = _app(url)
    async with app:
        async with app.store.transaction() as tx:
            await tx.execute("CREATE TABLE done (k TEXT PRIMARY KEY)")
        await _send(app, ["before"])
        await eventually(lambda: _true(handled == ["before"]))
        await _allow(admin, _role(url), 0)  # the database refuses everyone now
        await _send(app, [f"during-{i}" for i in range(20)])
        await asyncio.sleep(3.0)  # several retry policies' worth of failures
        assert handled == ["before"]
        await _allow(admin, _role(url), -1)
        await eventually(lambda: _true(len(handled) == 21), timeout=60)
        assert await app.store.dead_letters() == []
        async with app.store.transaction() as tx:
            assert (await tx.fetchone("SELECT count(*) FROM done"))[0] == 21
    assert any("unavailable" in r.getMessage() for r in caplog.records)


async def test_a_worker_started_during_an_outage_waits_for_the_database(
    own_database: tuple[str, Any], tmp_path: Any
) -> None:
    url, admin = own_database
    await _allow(admin, _role(url), 0)
    app, _ = _app(url)
    with pytest.raises(StoreUnavailable):  # a library App fails fast
        await app.start()
    await app.stop()
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagakit.cli",
        "worker",
        "--app",
        "tests.workers.cli_app:create",
        "--store",
        url,
        "--ready-file",
        str(tmp_path / "ready"),
        "--connect-patience",
        "60",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(2.0)
        assert worker.returncode is None, "the worker waits instead of exiting"
        await _allow(admin, _role(url), -1)
        await eventually(lambda: _true((tmp_path / "ready").exists()), timeout=60)
    finally:
        worker.terminate()
        _, err = await worker.communicate()
    assert b"cannot start yet" in err


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    "message",
    [
        "cannot call Connection.execute(): connection has been released back to the pool",
        "connection is closed",
    ],
)
def test_a_connection_lost_under_a_transaction_is_an_outage(message: str) -> None:
    """After pg_terminate_backend asyncpg detaches the connection in use: not a bug, an outage."""
    from sagakit.store.postgres import translate

    assert isinstance(translate(asyncpg.InterfaceError(message)), StoreUnavailable)


def test_asyncpg_confused_by_a_dropped_connection_is_an_outage() -> None:
    """Seen when a worker started while its backends were terminated: asyncpg's
    state machine raised InternalClientError and the worker exited 1."""
    from sagakit.store.postgres import translate

    exc = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert isinstance(translate(exc), StoreUnavailable)


def test_a_broken_statement_is_not_an_outage() -> None:
    from sagakit.store.postgres import translate

    error = translate(asyncpg.PostgresSyntaxError("syntax error at or near"))
    assert not isinstance(error, StoreUnavailable) and not error.retryable


async def test_a_process_opens_only_the_stores_of_what_it_runs(tmp_path: Any) -> None:
    """The connection budget: a worker for one service doesn't connect to every database."""
    app = sk.App(f"sqlite:///{tmp_path}/main.db", "memory://", run=["a"])
    app.participant("a", store=f"sqlite:///{tmp_path}/a.db")
    app.participant("b", store=f"sqlite:///{tmp_path}/b.db")
    async with app:
        assert (tmp_path / "a.db").exists()
        assert not (tmp_path / "b.db").exists(), "b runs elsewhere: its database stays closed"


async def test_an_ack_the_broker_cannot_take_after_commit_is_not_the_handlers_failure(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos harness on Redis and NATS: a broker restarting between
    the handler's commit and its ack made every copy's ack fail; the hop counted
    that as the handler failing, used up the message's retries and dead-lettered
    a message whose work had committed. Now the work stands, the copy is
    answered from the inbox, and nothing is dead-lettered."""
    from sagakit.transport.memory import MemoryDelivery

    broker_down = {"acks_refused": 0}

    async def refused_ack(self: MemoryDelivery) -> None:
        if broker_down["acks_refused"] < 8:  # more than the retry policy's attempts
            broker_down["acks_refused"] += 1
            self._transport.put(self._queue, self.data, self.attempt + 1)  # unacked: it comes back
            raise sk.TransportError("ack failed: Connection closed by server.")

    monkeypatch.setattr(MemoryDelivery, "_ack", refused_ack)
    app, handled = _app(f"sqlite:///{tmp_path}/s.db")
    async with app:
        async with app.store.transaction() as tx:
            await tx.execute("CREATE TABLE done (k TEXT PRIMARY KEY)")
        await _send(app, ["k1"])
        await eventually(lambda: _true(broker_down["acks_refused"] == 8), timeout=30)
        await asyncio.sleep(0.5)
        assert handled == ["k1"], "the handler ran once; its copies were answered from the inbox"
        assert await app.store.dead_letters() == []


@pytest.mark.parametrize("use", ["transaction", "single statement"])
async def test_a_pool_that_stays_full_fails_after_acquire_timeout_and_loses_no_connection(
    postgres_url: str, prefix: str, use: str
) -> None:
    """Every connection held: the next caller waits ``acquire_timeout``, then gets an
    outage; once the holder is done the pool serves again, nothing leaked."""
    from sagakit.store import open_store
    from sagakit.testing import drop_tables

    store = open_store(f"{postgres_url}?max_size=1&acquire_timeout=0.3", prefix=prefix)
    await store.open()
    try:
        release, held = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with store.transaction() as tx:
                await tx.fetchone("SELECT 1")
                held.set()
                await release.wait()

        task = asyncio.create_task(holder())
        await held.wait()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(StoreUnavailable):
            if use == "transaction":
                async with store.transaction() as tx:
                    await tx.fetchone("SELECT 1")
            else:
                await store.driver.fetch_single("SELECT 1")
        assert 0.25 < loop.time() - began < 5.0
        release.set()
        await task
        for _ in range(3):  # the one connection is back, every time
            assert [tuple(r) for r in await store.driver.fetch_single("SELECT 2")] == [(2,)]
    finally:
        await drop_tables(store)
        await store.close()
