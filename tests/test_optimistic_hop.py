"""A ``db_only`` command handler runs before its admission: a bet it is the first copy.

On PostgreSQL a forward command registered ``db_only=True`` is admitted only
if its handler begins the transaction (right after BEGIN, before the
handler's first statement); a handler that only holds its writes makes the
whole hop one autocommit statement that stores the outcome insert-if-absent.
On SQLite, where write transactions run one at a time, the handler always
runs first and its outcome is stored insert-if-absent. Every way of losing
the bet is forced here on both backends: a copy of a settled command (whose
write a unique key refuses), two copies at once, a forward command its
compensation barred, a retry of a stored failure, and a handler that
swallows the lost bet. In each the effect is applied once and every copy
gets the one outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import sagakit as sk
from sagakit.messages import Headers
from tests.helpers import Do, Refused, Undo, backend_url, drop_app_tables, eventually, queued

pytestmark = pytest.mark.timeout(60)

REPLIES = "bet.replies"


@pytest.fixture(params=["sqlite", "postgresql"])
async def app(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[sk.App]:
    url = backend_url(request, tmp_path, max_size=4)
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.02, prefetch=4))
    yield app
    await app.stop()
    await drop_app_tables(app)


Handler = Callable[[Do, sk.Context], Awaitable[None]]


async def _start(app: sk.App, handler: Handler, *, undo_db_only: bool = False) -> list[str]:
    """Participant ``p``: ``handler`` for Do (db_only), a delete for its compensation
    (``db_only`` and held, or admitted first and executed); the compensations run."""
    part, table = app.participant("p"), f"{app.store.prefix}bet"
    part.command(Do, db_only=True)(handler)
    undone: list[str] = []

    @part.command(Undo, db_only=undo_db_only)
    async def undo(cmd: Undo, ctx: sk.Context) -> None:
        undone.append(cmd.key)
        write = ctx.db.later if undo_db_only else ctx.db.execute
        await write(f"DELETE FROM {table} WHERE k = ?", cmd.key)

    await app.start()
    async with app.store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {table} (k TEXT PRIMARY KEY)")
        await tx.execute(f"CREATE TABLE {table}_ledger (k TEXT)")  # no key: a run, a row
    await app.transport.declare(REPLIES, [])
    return undone


def _insert(app: sk.App, runs: list[str]) -> Handler:
    async def handler(cmd: Do, ctx: sk.Context) -> None:
        runs.append(cmd.key)
        await ctx.db.later(f"INSERT INTO {app.store.prefix}bet (k) VALUES (?)", cmd.key)

    return handler


async def _send(app: sk.App, cmd: Do | Undo, *, attempt: int = 1, phase: str | None = None) -> None:
    headers = Headers(
        saga_id="s1", saga_type="t", step="x", reply_to=REPLIES, attempt=attempt, phase=phase
    )
    env = app.codec.make(cmd, headers)
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))


async def _replies(app: sk.App, n: int) -> list[sk.Envelope]:
    async def arrived() -> bool:
        return len(await queued(app, REPLIES)) >= n

    await eventually(arrived)
    return await queued(app, REPLIES)


async def _dead_letters(app: sk.App) -> int:
    async with app.store.transaction() as tx:
        row = await tx.fetchone(f"SELECT count(*) FROM {app.store.prefix}dead_letters")
    return int(row[0])


async def _rows(app: sk.App) -> list[str]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(f"SELECT k FROM {app.store.prefix}bet ORDER BY k")
    return [r[0] for r in rows]


async def _outcome(app: sk.App, phase: str = "forward") -> tuple[str, int] | None:
    async with app.store.transaction() as tx:
        row = await app.store.inbox_get(tx, "p", f"saga:s1:x:{phase}")
    return None if row is None else (row.outcome, row.attempt)


async def test_a_hop_that_holds_its_writes_is_one_statement(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    await _start(app, _insert(app, []))
    del statements[:]
    await _send(app, Do("a"))
    [reply] = await _replies(app, 1)
    sent = [sql for _, sql in statements]  # before this test's own reads below
    assert reply.headers.outcome == "success"
    assert await _rows(app) == ["a"]
    assert await _outcome(app) == ("success", 1)
    if app.store.dialect == "postgresql":
        p = app.store.prefix
        touched = [sql for sql in sent if f"{p}inbox" in sql or f"{p}bet" in sql]
        [hop] = touched  # no admission, no statement of the handler's own
        assert hop.startswith("WITH") and f"INSERT INTO {p}bet" in hop, hop


async def test_a_copy_of_a_settled_command_writes_nothing_and_gets_the_stored_reply(
    app: sk.App,
) -> None:
    runs: list[str] = []
    await _start(app, _insert(app, runs))
    await _send(app, Do("a"))
    await _replies(app, 1)
    await _send(app, Do("a"))  # a copy: the same step of the same saga
    first, second = await _replies(app, 2)
    assert first.headers.outcome == second.headers.outcome == "success"
    assert await _rows(app) == ["a"]
    # the copy's Python ran (the bet); its write, refused by the table's key, never
    # counted, and the copy was admitted and answered, not failed or dead-lettered
    assert runs == ["a", "a"]
    assert await _dead_letters(app) == 0


async def test_two_copies_at_once_apply_once(app: sk.App) -> None:
    started, go = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def handler(cmd: Do, ctx: sk.Context) -> None:
        runs.append(cmd.key)
        if len(runs) == 2:
            started.set()
        await asyncio.wait_for(go.wait(), 5)
        await ctx.db.later(f"INSERT INTO {app.store.prefix}bet (k) VALUES (?)", cmd.key)

    await _start(app, handler)
    await _send(app, Do("a"))
    await _send(app, Do("a"))
    if app.store.dialect == "postgresql":  # both run before either is admitted
        await asyncio.wait_for(started.wait(), 5)
    go.set()
    replies = await _replies(app, 2)
    assert [r.headers.outcome for r in replies] == ["success", "success"]
    assert await _rows(app) == ["a"]
    assert await _outcome(app) == ("success", 1)


async def test_a_handler_that_reads_is_admitted_before_its_first_statement(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    table = f"{app.store.prefix}bet"
    runs: list[str] = []

    async def handler(cmd: Do, ctx: sk.Context) -> None:
        runs.append(cmd.key)
        await ctx.db.later(f"INSERT INTO {table} (k) VALUES (?)", cmd.key + "-held")
        await ctx.db.fetchone(f"SELECT count(*) FROM {table}")
        await ctx.db.later(f"INSERT INTO {table} (k) VALUES (?)", cmd.key)

    await _start(app, handler)
    del statements[:]
    await _send(app, Do("a"))
    await _replies(app, 1)
    if app.store.dialect == "postgresql":
        conn = next(c for c, sql in statements if sql.startswith(f"SELECT count(*) FROM {table}"))
        hop = [sql for c, sql in statements if c == conn]
        at = hop.index("BEGIN")
        kinds = [sql.split()[0] for sql in hop[at : at + 4]]
        assert kinds == ["BEGIN", "INSERT", "INSERT", "SELECT"], hop  # admission, held, read
        assert f"{app.store.prefix}inbox" in hop[at + 1] and table in hop[at + 2]
    await _send(app, Do("a"))  # a copy: the read meets the stored outcome
    await _replies(app, 2)
    assert await _rows(app) == ["a", "a-held"]
    assert await _outcome(app) == ("success", 1)


async def test_a_handler_that_swallows_the_lost_bet_still_writes_nothing(app: sk.App) -> None:
    table = f"{app.store.prefix}bet"
    caught: list[str] = []

    async def handler(cmd: Do, ctx: sk.Context) -> None:
        try:
            await ctx.db.fetchone(f"SELECT count(*) FROM {table}")
        except Exception as exc:  # a careless handler
            caught.append(type(exc).__name__)
        await ctx.db.later(f"INSERT INTO {table}_ledger (k) VALUES (?)", cmd.key)

    await _start(app, handler)
    await _send(app, Do("a"))
    await _replies(app, 1)
    await _send(app, Do("a"))
    _, second = await _replies(app, 2)
    assert second.headers.outcome == "success"
    async with app.store.transaction() as tx:
        ledger = await tx.fetchall(f"SELECT k FROM {table}_ledger")
    assert [r[0] for r in ledger] == ["a"]  # the copy's run wrote nothing
    assert await app.store.dead_letters() == []
    assert caught == (["OutcomeExists"] if app.store.dialect == "postgresql" else [])


async def test_a_forward_command_after_its_compensation_has_no_effect(app: sk.App) -> None:
    runs: list[str] = []
    await _start(app, _insert(app, runs))
    await _send(app, Undo("a"), phase="compensate")  # overtakes its forward step
    await _replies(app, 1)
    await _send(app, Do("a"))
    _, forward = await _replies(app, 2)
    assert forward.failed
    assert app.codec.payload(forward, sk.Failure).code == "sagakit.Cancelled"
    assert await _rows(app) == []
    assert await _outcome(app) == ("cancelled", 1)


async def test_a_retry_of_a_stored_failure_runs_again_and_replaces_it(app: sk.App) -> None:
    table = f"{app.store.prefix}bet"

    async def handler(cmd: Do, ctx: sk.Context) -> None:
        if ctx.envelope.headers.attempt == 1:
            raise Refused("not yet")
        await ctx.db.later(f"INSERT INTO {table} (k) VALUES (?)", cmd.key)

    await _start(app, handler)
    await _send(app, Do("a"))
    [refused] = await _replies(app, 1)
    assert refused.failed and await _outcome(app) == ("failure", 1)
    await _send(app, Do("a"), attempt=2)  # the coordinator retrying the step
    _, retried = await _replies(app, 2)
    assert retried.headers.outcome == "success"
    assert await _rows(app) == ["a"]
    assert await _outcome(app) == ("success", 2)


async def test_a_compensation_that_holds_its_writes_is_one_statement(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    undone = await _start(app, _insert(app, []), undo_db_only=True)
    await _send(app, Do("a"))
    await _replies(app, 1)
    del statements[:]
    await _send(app, Undo("a"), phase="compensate")
    _, reply = await _replies(app, 2)
    sent = [sql for _, sql in statements]
    assert reply.headers.outcome == "success" and undone == ["a"]
    assert await _rows(app) == []
    assert await _outcome(app, "compensate") == ("success", 1)
    assert await _outcome(app) == ("success", 1)
    if app.store.dialect == "postgresql":
        p = app.store.prefix
        [hop] = [sql for sql in sent if f"{p}inbox" in sql or f"{p}bet" in sql]
        assert hop.startswith("WITH") and f"DELETE FROM {p}bet" in hop, hop
    await _send(app, Undo("a"), phase="compensate")  # a copy: answered from the inbox
    await _replies(app, 3)
    assert await _rows(app) == [] and await _outcome(app, "compensate") == ("success", 1)


async def test_a_compensation_whose_forward_never_ran_bars_it_and_changes_nothing(
    app: sk.App,
) -> None:
    runs: list[str] = []
    await _start(app, _insert(app, runs), undo_db_only=True)
    async with app.store.transaction() as tx:  # a row the compensation must not touch
        await tx.execute(f"INSERT INTO {app.store.prefix}bet (k) VALUES (?)", "a")
    await _send(app, Undo("a"), phase="compensate")
    [null] = await _replies(app, 1)
    assert null.headers.outcome == "success"
    assert await _rows(app) == ["a"]  # the null compensation's delete never counted
    assert await _outcome(app) == ("cancelled", 1)
    await _send(app, Do("b"))  # the barred forward step: refused, no effect
    _, late = await _replies(app, 2)
    assert app.codec.payload(late, sk.Failure).code == "sagakit.Cancelled"
    assert await _rows(app) == ["a"]


@pytest.mark.parametrize("app", ["postgresql"], indirect=True)  # SQLite: one writer at a time
async def test_a_compensation_overlapping_its_forward_step_waits_for_its_outcome(
    app: sk.App,
) -> None:
    """The forward step still in its transaction when the compensation's bet is sent."""
    go = asyncio.Event()
    table = f"{app.store.prefix}bet"

    async def slow(cmd: Do, ctx: sk.Context) -> None:
        await ctx.db.execute(f"INSERT INTO {table} (k) VALUES (?)", cmd.key)  # admitted now
        await asyncio.wait_for(go.wait(), 5)

    await _start(app, slow, undo_db_only=True)
    await _send(app, Do("a"))
    await eventually(lambda: _holds_key(app))
    await _send(app, Undo("a"), phase="compensate")
    await asyncio.sleep(0.3)  # the compensation meets the forward step's key
    go.set()
    replies = await _replies(app, 2)
    assert [r.headers.outcome for r in replies] == ["success", "success"]
    assert await _rows(app) == []  # the forward step took effect, and was undone
    assert await _outcome(app, "compensate") == ("success", 1)


async def _holds_key(app: sk.App) -> bool:
    async with app.store.transaction() as tx:
        row = await tx.fetchone(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE a.state = 'idle in transaction' AND l.mode = 'RowExclusiveLock'"
        )
    return bool(row[0])
