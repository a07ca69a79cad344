"""Where things overlap in time: the saga outcome must match what participants committed.

Each test forces one overlap for real, on SQLite and PostgreSQL:

* two copies of one command (a duplicate delivery, or a retry sent after a
  step timeout while the first attempt still runs) never run at once, and the
  first outcome is final: later copies get its stored reply;
* a slow pivot that times out is not compensated around: the retry waits for
  the first attempt and the saga completes with the charge applied once;
* a handler slower than its lease is not handed to a second consumer while it
  runs; a handler past its timeout is cancelled and retried; a message
  delivered too often is dead-lettered with the reason;
* a worker shut down mid-handler releases its lease at once;
* leases and due times come from one clock (PostgreSQL's), whatever the hosts'
  clocks say;
* waiting for a saga is woken by the commit that ends it, not by polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.clock import SystemClock
from sagakit.messages import Headers
from sagakit.store import Store, open_store
from sagakit.testing import drop_tables
from tests.helpers import Do, Refused, Undo, eventually

pytestmark = pytest.mark.timeout(90)

REPLIES = "overlap.replies"


def _url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/o.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request, tmp_path)


def _settings(prefix: str, **kw: object) -> sk.Settings:
    base: dict[str, object] = {
        "prefix": prefix,
        "max_poll": 0.02,
        "retry": sk.RetryPolicy(initial=0.01, max_attempts=3),
    }
    base.update(kw)
    return sk.Settings(**base)  # type: ignore[arg-type]


async def _send(app: sk.App, payload: object, *, attempt: int = 1, phase: str = "forward") -> str:
    headers = Headers(
        saga_id="s1", saga_type="t", step="x", phase=phase, reply_to=REPLIES, attempt=attempt
    )
    env = app.codec.make(payload, headers)
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))
    return env.id


async def _replies(app: sk.App) -> list[tuple[int, str]]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {app.store.prefix}messages WHERE queue = ? ORDER BY seq", REPLIES
        )
    envs = [app.codec.decode(bytes(r[0])) for r in rows]
    return [(e.headers.attempt, e.headers.outcome or "") for e in envs]


async def _count(app: sk.App, table: str) -> int:
    async with app.store.transaction() as tx:
        row = await tx.fetchone(f"SELECT count(*) FROM {app.store.prefix}{table}")
    return int(row[0])


async def _n_replies(app: sk.App, n: int) -> bool:
    return len(await _replies(app)) >= n


@pytest.fixture
async def cleanup(prefix: str) -> AsyncIterator[list[Store]]:
    stores: list[Store] = []
    yield stores
    for store in stores:
        if store.dialect == "postgresql":
            await store.open()
            await drop_tables(store)
            await store.close()


# -- two copies of one command ------------------------------------------------------


async def test_copies_of_one_command_never_run_at_once(
    url: str, prefix: str, cleanup: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    """The same message twice (a duplicated send): one run, both copies answered."""
    app = sk.App(url, settings=_settings(prefix, prefetch=4))
    cleanup.append(app.store)
    part = app.participant("p")
    running, most = 0, 0

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.3)  # long enough for the copy to arrive meanwhile
        await ctx.db.execute(f"INSERT INTO {prefix}once (k) VALUES (?)", cmd.key)
        running -= 1

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {prefix}once (k TEXT PRIMARY KEY)")
        await app.transport.declare(REPLIES, [])
        env = app.codec.make(Do("k"), Headers(reply_to=REPLIES))
        async with app.store.transaction() as tx:
            for _ in range(2):
                await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))
        await eventually(lambda: _n_replies(app, 2), timeout=20)
        assert most == 1, "the copies overlapped"
        assert await _count(app, "once") == 1
        assert await _replies(app) == [(1, "success"), (1, "success")]
        assert await app.store.dead_letters() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_retry_while_the_first_attempt_runs_gets_the_first_outcome(
    url: str, prefix: str, cleanup: list[Store]
) -> None:
    """Attempt 2 (sent after a step timeout) must not fail fast and let attempt 1 win later.

    On round-1 code attempt 2 ran at once, saw the work in progress and
    refused; attempt 1 then committed its effect and overwrote the stored
    failure: the saga had been told "failed" about an effect that happened.
    """
    app = sk.App(url, settings=_settings(prefix, prefetch=4))
    cleanup.append(app.store)
    part = app.participant("p")
    first_in, release = asyncio.Event(), asyncio.Event()
    in_progress = False

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal in_progress
        if in_progress:
            raise Refused("in progress")  # what a handler guarding its resource would say
        in_progress = True
        try:
            first_in.set()
            await release.wait()
            await ctx.db.execute(f"INSERT INTO {prefix}charged (k) VALUES (?)", cmd.key)
        finally:
            in_progress = False

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {prefix}charged (k TEXT PRIMARY KEY)")
        await app.transport.declare(REPLIES, [])
        await _send(app, Do("k"), attempt=1)
        await asyncio.wait_for(first_in.wait(), 10)
        # On SQLite the send itself waits for the running handler's transaction.
        second = asyncio.create_task(_send(app, Do("k"), attempt=2))
        await asyncio.sleep(0.3)
        release.set()
        await second
        await eventually(lambda: _n_replies(app, 2), timeout=20)
        assert await _count(app, "charged") == 1
        assert await _replies(app) == [(1, "success"), (2, "success")]


# -- a slow pivot that times out --------------------------------------------------


@sk.command("overlap.Charge")
class Charge(msgspec.Struct):
    order: str


@sk.command("overlap.Reserve")
class Reserve(msgspec.Struct):
    order: str


@sk.command("overlap.Release")
class Release(msgspec.Struct):
    order: str


class Order(msgspec.Struct):
    order: str


async def test_a_slow_pivot_that_times_out_completes_with_one_charge(
    url: str, prefix: str, cleanup: list[Store]
) -> None:
    """The issue's bank case: slow charge, timeout, fast retry. Never compensate around it."""
    saga = (
        sk.Saga("slow-pivot", Order)
        .step("reserve")
        .invoke("p", lambda d: Reserve(d.order))
        .compensate("p", lambda d: Release(d.order))
        .step("charge")
        .invoke("p", lambda d: Charge(d.order))
        .pivot()
        .timeout(0.3)
        .build()
    )
    app = sk.App(url, settings=_settings(prefix, prefetch=8))
    cleanup.append(app.store)
    app.saga(saga)
    part = app.participant("p")
    charging = False

    @part.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> None:
        await ctx.db.execute(f"INSERT INTO {prefix}ledger (what) VALUES ('reserve')")

    @part.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        await ctx.db.execute(f"INSERT INTO {prefix}ledger (what) VALUES ('release')")

    @part.command(Charge)
    async def charge(cmd: Charge, ctx: sk.Context) -> None:
        nonlocal charging
        if charging:
            raise Refused("a charge is in progress")
        charging = True
        try:
            await asyncio.sleep(1.0)  # slower than the step timeout
            await ctx.db.execute(f"INSERT INTO {prefix}ledger (what) VALUES ('charge')")
        finally:
            charging = False

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {prefix}ledger (what TEXT NOT NULL)")
        view = await app.sagas.wait(await app.sagas.start(saga, Order("o1")), timeout=30)
        await asyncio.sleep(1.5)  # let any late copy finish
        async with app.store.transaction() as tx:
            rows = await tx.fetchall(f"SELECT what FROM {prefix}ledger ORDER BY what")
        effects = sorted(r[0] for r in rows)
    assert view.state == sk.SagaState.COMPLETED
    assert effects == ["charge", "reserve"], "the charge happened once and nothing was undone"


# -- slow handlers, hung handlers, endless redelivery -------------------------------


async def test_a_handler_slower_than_its_lease_runs_once(
    url: str, prefix: str, cleanup: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1 redelivered it every lease period while it still ran; it never committed."""
    app = sk.App(url, settings=_settings(prefix, lease=0.6, prefetch=4))
    cleanup.append(app.store)
    part = app.participant("p")
    runs = 0

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(2.0)  # more than three leases

    caplog.set_level(logging.WARNING, logger="sagakit")
    async with app:
        await app.transport.declare(REPLIES, [])
        await _send(app, Do("k"))
        await eventually(lambda: _n_replies(app, 1), timeout=20)
        await asyncio.sleep(0.7)
        assert runs == 1
        assert await _replies(app) == [(1, "success")]
        assert await app.store.queue.depth("p") == 0
    assert any("longer than its" in r.getMessage() for r in caplog.records)


async def test_a_hung_handler_is_timed_out_retried_then_answered(
    url: str, prefix: str, cleanup: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    app = sk.App(url, settings=_settings(prefix, handler_timeout=0.2))
    cleanup.append(app.store)
    part = app.participant("p")
    runs = 0

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal runs
        runs += 1
        await asyncio.Event().wait()  # hangs for ever

    async with app:
        await app.transport.declare(REPLIES, [])
        await _send(app, Do("k"))
        await eventually(lambda: _n_replies(app, 1), timeout=20)
        dead = await app.store.dead_letters()
    assert runs == 3, "retried by the policy, then given up"
    assert await _replies_after(app) == [(1, "failure")]
    assert [d.error_type for d in dead] == ["HandlerTimeout"]
    assert any("giving up" in r.getMessage() for r in caplog.records)


async def _replies_after(app: sk.App) -> list[tuple[int, str]]:
    await app.store.open()
    try:
        return await _replies(app)
    finally:
        await app.store.close()


async def test_a_message_delivered_too_often_is_dead_lettered(
    url: str, prefix: str, cleanup: list[Store], caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that keeps killing its process never fails: the delivery cap catches it."""
    app = sk.App(url, settings=_settings(prefix, max_deliveries=3))
    cleanup.append(app.store)
    part = app.participant("p")
    ran = False

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal ran
        ran = True

    await app.store.open()
    await app.transport.declare(REPLIES, [])
    await _send(app, Do("k"))
    for _ in range(3):  # three consumers died holding it: claimed, never settled
        [item] = await app.store.queue.claim("p", 1, 30.0)
        await app.store.queue.release(item, 0.0)
    await app.store.close()
    async with app:
        await eventually(lambda: _n_replies(app, 1), timeout=20)
        dead = await app.store.dead_letters()
        replies = await _replies(app)
    assert not ran
    assert replies == [(1, "failure")]
    assert [d.error_type for d in dead] == ["DeliveryLimitExceeded"]
    assert any("over the limit" in r.getMessage() for r in caplog.records)


# -- shutdown ---------------------------------------------------------------------


async def test_shutdown_releases_the_lease_of_a_cancelled_handler(
    url: str, prefix: str, cleanup: list[Store]
) -> None:
    """Round 1 kept the lease: the restarted worker waited out all 30 seconds."""
    hang = True

    def build() -> sk.App:
        app = sk.App(url, settings=_settings(prefix, lease=30.0, shutdown_grace=0.2))
        part = app.participant("p")

        @part.command(Do)
        async def do(cmd: Do, ctx: sk.Context) -> None:
            if hang:
                await asyncio.Event().wait()

        return app

    first = build()
    cleanup.append(first.store)
    async with first:
        await first.transport.declare(REPLIES, [])
        await _send(first, Do("k"))
        await asyncio.sleep(0.3)  # the handler is running
    hang = False
    second = build()
    async with second:  # well within the 30 s lease the first worker had taken
        await eventually(lambda: _n_replies(second, 1), timeout=20)


# -- one clock --------------------------------------------------------------------


class _Skewed(SystemClock):
    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


async def test_a_host_whose_clock_is_ahead_never_steals_a_lease(
    postgres_url: str, prefix: str, cleanup: list[Store]
) -> None:
    here = open_store(postgres_url, prefix=prefix)
    ahead = open_store(postgres_url, prefix=prefix, clock=_Skewed(40.0))
    cleanup.append(here)
    async with here, ahead:
        async with here.transaction() as tx:
            await here.queue.put(tx, "q", "m1", b"x")
        assert len(await here.queue.claim("q", 1, 30.0)) == 1
        await asyncio.sleep(0.2)
        assert await ahead.queue.claim("q", 1, 30.0) == [], "stolen 0.2 s into a 30 s lease"


async def test_a_message_from_a_host_ahead_is_due_at_once(
    postgres_url: str, prefix: str, cleanup: list[Store]
) -> None:
    here = open_store(postgres_url, prefix=prefix)
    ahead = open_store(postgres_url, prefix=prefix, clock=_Skewed(10.0))
    cleanup.append(here)
    async with here, ahead:
        async with ahead.transaction() as tx:
            await ahead.queue.put(tx, "q", "m1", b"x")
        assert len(await here.queue.claim("q", 1, 30.0)) == 1, "delayed by the sender's clock"


# -- waiting without polling ---------------------------------------------------------


def _waited_app(url: str, prefix: str, **kw: object) -> tuple[sk.App, sk.SagaDefinition[Order]]:
    saga = sk.Saga("waited", Order).step("do").invoke("p", lambda d: Do(d.order)).build()
    app = sk.App(url, settings=_settings(prefix), **kw)  # type: ignore[arg-type]
    app.saga(saga)
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        await asyncio.sleep(0.2)

    return app, saga


async def test_wait_is_woken_by_the_commit_not_by_polling(
    url: str, prefix: str, cleanup: list[Store]
) -> None:
    app, saga = _waited_app(url, prefix)
    cleanup.append(app.store)
    async with app:
        saga_id = await app.sagas.start(saga, Order("o"))
        # The fallback poll is out of reach: only the finishing commit can wake it.
        async with asyncio.timeout(20):
            view = await app.sagas.wait(saga_id, timeout=20, poll=60.0)
        assert view.state == sk.SagaState.COMPLETED


async def test_wait_in_another_process_is_woken_by_notify(
    postgres_url: str, prefix: str, cleanup: list[Store]
) -> None:
    """A client process with no coordinator waits; PostgreSQL's NOTIFY wakes it."""
    worker, saga = _waited_app(postgres_url, prefix)
    cleanup.append(worker.store)
    client, _ = _waited_app(postgres_url, prefix, run=[])
    async with worker, client:
        saga_id = await client.sagas.start(saga, Order("o"))
        async with asyncio.timeout(20):
            view = await client.sagas.wait(saga_id, timeout=20, poll=60.0)
        assert view.state == sk.SagaState.COMPLETED


async def test_wait_gives_up_with_a_typed_timeout(url: str, prefix: str) -> None:
    app = sk.App(url, settings=_settings(prefix), run=[])
    saga = sk.Saga("never", Order).step("do").invoke("nobody", lambda d: Undo(d.order)).build()
    app.saga(saga)
    async with app:
        saga_id = await app.sagas.start(saga, Order("o"))
        with pytest.raises(sk.WaitTimeout) as caught:
            await app.sagas.wait(saga_id, timeout=0.3)
        assert isinstance(caught.value, TimeoutError)
        if app.store.dialect == "postgresql":
            await drop_tables(app.store)
