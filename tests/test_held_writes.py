"""A handler's held writes (``ctx.db.later``): one round trip fewer, nothing else different.

On PostgreSQL a handler whose only change is a held write costs BEGIN, the
admission, one batch and COMMIT; the write commits with the inbox row and
the reply, and a write that fails when the batch is sent (after the handler
returned) rolls the whole hop back and is retried like any technical failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sagakit as sk
from sagakit.messages import Headers
from tests.helpers import Do, backend_url, drop_app_tables, eventually, queued

pytestmark = pytest.mark.timeout(60)

REPLIES = "held.replies"


@pytest.fixture(params=["sqlite", "postgresql"])
async def app(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[sk.App]:
    url = backend_url(request, tmp_path, max_size=3)
    retry = sk.RetryPolicy(max_attempts=2, initial=0.01)
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.02, retry=retry))
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        await ctx.db.later(f"INSERT INTO {prefix}held (k) VALUES (?)", cmd.key)

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {prefix}held (k TEXT PRIMARY KEY)")
        await app.transport.declare(REPLIES, [])
        yield app
    await drop_app_tables(app)


async def _send(app: sk.App, key: str, saga_id: str) -> None:
    headers = Headers(saga_id=saga_id, saga_type="t", step="x", reply_to=REPLIES)
    env = app.codec.make(Do(key), headers)
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))


async def _rows(app: sk.App) -> list[str]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(f"SELECT k FROM {app.store.prefix}held ORDER BY k")
    return [r[0] for r in rows]


async def test_a_held_write_commits_with_the_reply_in_one_batch(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    await _send(app, "a", "s1")
    await eventually(lambda: _n(app, 1))
    assert await _rows(app) == ["a"]
    [reply] = await queued(app, REPLIES)
    assert reply.headers.outcome == "success"
    if app.store.dialect == "postgresql":
        hop = _the_hop(statements)
        assert [s.split()[0] for s in hop] == ["BEGIN", "INSERT", "WITH", "COMMIT"], hop
        assert "held" in hop[2]  # the handler's insert rode in the batch


async def test_a_held_write_that_fails_rolls_the_hop_back_and_is_retried(app: sk.App) -> None:
    await _send(app, "same", "s1")
    await eventually(lambda: _n(app, 1))
    await _send(app, "same", "s2")  # another step, the same key: the held insert fails
    await eventually(lambda: _n(app, 2))
    first, second = await queued(app, REPLIES)
    assert first.headers.outcome == "success"
    failure = app.codec.payload(second, sk.Failure)
    assert second.failed and failure.technical
    assert await _rows(app) == ["same"]
    [dead] = await app.store.dead_letters()
    assert dead.saga_id == "s2"
    async with app.store.transaction() as tx:
        row = await app.store.inbox_get(tx, "p", "saga:s2:x:forward")
    assert row is not None and row.outcome == "failure"  # the retry's, not a success


def _the_hop(statements: list[tuple[int, str]]) -> list[str]:
    """The statements of the participant's hop, on its connection, from BEGIN to COMMIT."""
    at = next(i for i, (_, sql) in enumerate(statements) if "_inbox " in sql)
    conn = statements[at][0]
    mine = [sql for c, sql in statements[:at] if c == conn]
    begin = len(mine) - 1 - mine[::-1].index("BEGIN")
    hop = mine[begin:]
    for c, sql in statements[at:]:
        if c == conn:
            hop.append(sql)
            if sql.endswith("COMMIT"):  # with the NOTIFYs of the queues it wrote to
                return [*hop[:-1], "COMMIT"]
    raise AssertionError(f"no COMMIT after the admission: {hop}")


async def _n(app: sk.App, n: int) -> bool:
    return len(await queued(app, REPLIES)) >= n


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "WITH x AS (SELECT 1) INSERT INTO t (k) SELECT * FROM x",
        "INSERT INTO t (k) VALUES (?) RETURNING k",
        "DELETE FROM t;",
    ],
)
async def test_a_write_that_cannot_be_held_is_refused_up_front(app: sk.App, sql: str) -> None:
    with pytest.raises(sk.errors.StoreError, match="held write") as caught:
        async with app.store.transaction() as tx:
            await tx.later(sql, "k")
    assert not caught.value.retryable
