"""Two copies of one command handled at the same time on PostgreSQL.

The second copy's handler trips over the first copy's unique key. That must
not dead-letter anything: the copy is delivered again and answered from the
inbox, and the business change exists once.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

import sagakit as sk
from sagakit.messages import Headers
from sagakit.testing import drop_tables
from tests.helpers import Do, eventually

REPLIES = "dup.replies"


async def test_overlapping_copies_apply_once_and_both_get_the_reply(
    postgres_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = sk.App(postgres_url, settings=sk.Settings(prefix=prefix, max_poll=0.02, prefetch=4))
    part = app.participant("p")
    both_inside = asyncio.Barrier(2)

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        async with asyncio.timeout(5):
            await both_inside.wait()  # the two copies really overlap
        await ctx.db.execute(f"INSERT INTO {prefix}once (k) VALUES (?)", cmd.key)

    async with app:
        async with app.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {prefix}once (k TEXT PRIMARY KEY)")
        await app.transport.declare(REPLIES, [])
        env = app.codec.make(Do("k"), Headers(reply_to=REPLIES))
        async with app.store.transaction() as tx:
            for _ in range(2):  # the same message id twice, as a duplicated send
                await app.store.enqueue(tx, "p", env.id, app.codec.encode(env))
        await eventually(lambda: _replies(app, 2), timeout=20)
        async with app.store.transaction() as tx:
            rows = await tx.fetchone(f"SELECT count(*) FROM {prefix}once")
            outcomes = await tx.fetchall(
                f"SELECT data FROM {prefix}messages WHERE queue = ?", REPLIES
            )
        assert rows[0] == 1
        assert [app.codec.decode(bytes(r[0])).headers.outcome for r in outcomes] == [
            "success",
            "success",
        ]
        assert await app.store.dead_letters() == []
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # a quiet retry
        async with app.store.transaction() as tx:
            await tx.execute(f"DROP TABLE {prefix}once")
        await drop_tables(app.store)


async def _replies(app: sk.App, n: int) -> bool:
    return await app.store.queue_depth(REPLIES) >= n
