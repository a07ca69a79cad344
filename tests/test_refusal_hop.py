"""A refused command's failure is stored without a second admission, and loses no race.

After a handler refuses, its transaction rolls back and the failure is
recorded in a fresh one. That one first tries to store the failure with no
admission (an insert that changes nothing if the key holds a row: one
statement on PostgreSQL, no BEGIN/COMMIT); only if an outcome is already
there, or a concurrent copy commits one first, is the message admitted the
usual way and answered as a duplicate. Each case is forced for real on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import OutcomeExists
from sagakit.inbox import FAILURE, SUCCESS, Inbox
from sagakit.messages import Headers, new_id
from sagakit.store import Store
from sagakit.store.core import InboxRow
from tests.helpers import Do, Refused, backend_url, drop_app_tables, eventually, queued

pytestmark = pytest.mark.timeout(60)

REPLIES = "refusal.replies"


def _env(saga_id: str = "s1", attempt: int = 1) -> sk.Envelope:
    headers = Headers(saga_id=saga_id, saga_type="t", step="x", reply_to=REPLIES, attempt=attempt)
    return sk.Envelope(new_id(), "test.Do", "command", msgspec.Raw(b'{"key":"k"}'), headers)


async def _stored(store: Store, saga_id: str = "s1") -> InboxRow | None:
    async with store.transaction() as tx:
        return await store.inbox_get(tx, "p", f"saga:{saga_id}:x:forward")


# -- the store: an outcome stored only where none is ----------------------------------


async def test_an_outcome_for_a_free_key_is_one_statement(store: Store) -> None:
    inbox = Inbox(store, "p")
    async with store.transaction() as tx:
        await inbox.record_first(tx, _env(), FAILURE, b"no")
        await store.queue.put(tx, REPLIES, "r1", b"reply")
    if store.dialect == "postgresql":
        assert not getattr(tx, "begun", True)  # no BEGIN, no admission, no COMMIT
    assert await _stored(store) == InboxRow(FAILURE, b"no", REPLIES, 1)
    assert await store.queue.depth(REPLIES) == 1


async def test_an_outcome_for_a_taken_key_writes_nothing(store: Store) -> None:
    inbox = Inbox(store, "p")
    async with store.transaction() as tx:
        await inbox.admit(tx, _env())
        await inbox.record(tx, _env(), SUCCESS, b"done")
    with pytest.raises(OutcomeExists):
        async with store.transaction() as tx:
            await store.queue.put(tx, REPLIES, "r1", b"must not leave")
            await inbox.record_first(tx, _env(attempt=2), FAILURE, b"no")
    assert await store.queue.depth(REPLIES) == 0
    assert await _stored(store) == InboxRow(SUCCESS, b"done", REPLIES, 1)


@pytest.mark.parametrize("commits", [True, False], ids=["copy-commits", "copy-rolls-back"])
async def test_an_outcome_waits_for_a_copy_still_in_its_transaction(
    pg: Store, commits: bool
) -> None:
    """The insert waits on the running copy's key: taken if it commits, free if it rolls back."""
    inbox = Inbox(pg, "p")
    admitted, finish = asyncio.Event(), asyncio.Event()

    async def running_copy() -> None:
        async with pg.transaction() as tx:
            await inbox.admit(tx, _env())
            admitted.set()
            await finish.wait()
            await inbox.record(tx, _env(), SUCCESS, b"done")
            if not commits:
                raise RuntimeError("the copy rolls back")

    async def store_failure() -> None:
        async with pg.transaction() as tx:
            await inbox.record_first(tx, _env(), FAILURE, b"no")

    copy = asyncio.create_task(running_copy())
    await admitted.wait()
    failing = asyncio.create_task(store_failure())
    await asyncio.sleep(0.2)
    assert not failing.done(), "the insert did not wait for the running copy"
    finish.set()
    await asyncio.gather(copy, return_exceptions=True)
    if commits:
        with pytest.raises(OutcomeExists):
            await failing
        assert await _stored(pg) == InboxRow(SUCCESS, b"done", REPLIES, 1)
    else:
        await failing
        assert await _stored(pg) == InboxRow(FAILURE, b"no", REPLIES, 1)


# -- the hop: refusals overlapping other copies -----------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def app(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[sk.App]:
    url = backend_url(request, tmp_path, max_size=4)
    settings = sk.Settings(prefix=prefix, max_poll=0.02, prefetch=4)
    app = sk.App(url, settings=settings)
    yield app
    await drop_app_tables(app)


async def _put(app: sk.App, env: sk.Envelope) -> None:
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))


async def _replies(app: sk.App) -> list[sk.Envelope]:
    return await queued(app, REPLIES)


async def test_a_refusal_twice_is_stored_once_and_answered_twice(app: sk.App) -> None:
    runs: list[str] = []
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        runs.append(cmd.key)
        raise Refused("not today")

    async with app:
        await app.transport.declare(REPLIES, [])
        env = _env()
        await _put(app, env)
        await eventually(lambda: _n(app, 1))
        await _put(app, env)  # a duplicate delivery after the refusal committed
        await eventually(lambda: _n(app, 2))
        first, second = await _replies(app)
        stored = await _stored(app.store)
    assert runs == ["k"]  # the copy was answered from the inbox, not run
    assert first.failed and second.failed and first.id != second.id
    assert stored is not None and stored.outcome == FAILURE


async def test_a_refusal_overtaken_by_a_copy_that_succeeds_answers_success(
    app: sk.App,
) -> None:
    """Copy A refuses and rolls back; copy B, admitted next, succeeds while A records.

    A's insert waits for B's transaction, finds B's success and A answers
    with it: both replies say success and the change is applied once.
    """
    part = app.participant("p")
    calls = 0

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3)  # B is admitted while A still runs, and A records while B runs
        if calls == 1:
            raise Refused("the first copy refuses")
        await ctx.db.execute(f"INSERT INTO {app.settings.prefix}charged (k) VALUES (?)", cmd.key)

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {app.settings.prefix}charged (k TEXT PRIMARY KEY)")
        await app.transport.declare(REPLIES, [])
        env = _env()
        async with app.store.transaction() as tx:
            for _ in range(2):
                await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))
        await eventually(lambda: _n(app, 2), timeout=20)
        replies = await _replies(app)
        async with app.store.transaction() as tx:
            charged = await tx.fetchone(f"SELECT count(*) FROM {app.settings.prefix}charged")
        stored = await _stored(app.store)
    assert calls == 2
    assert [r.headers.outcome for r in replies] == ["success", "success"]
    assert charged[0] == 1
    assert stored is not None and stored.outcome == SUCCESS


async def test_a_retry_that_refuses_replaces_the_stored_failure(app: sk.App) -> None:
    """Attempt 2 of a failed step runs, and its own failure replaces attempt 1's."""
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        raise Refused(f"refused on attempt {ctx.attempt}")

    async with app:
        await app.transport.declare(REPLIES, [])
        await _put(app, _env(attempt=1))
        await eventually(lambda: _n(app, 1))
        await _put(app, _env(attempt=2))
        await eventually(lambda: _n(app, 2))
        replies = await _replies(app)
        stored = await _stored(app.store)
    assert [r.headers.attempt for r in replies] == [1, 2]
    assert "attempt 2" in app.codec.payload(replies[1], sk.Failure).message
    assert stored is not None and (stored.outcome, stored.attempt) == (FAILURE, 2)


async def _n(app: sk.App, n: int) -> bool:
    return len(await _replies(app)) >= n
