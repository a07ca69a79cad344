"""The saga barrier in the participant, with both orders forced by latches.

* A compensation for a step whose command never took effect succeeds without
  running (null compensation).
* A command that arrives after its compensation has no effect and is answered
  with a failure, so nothing hangs.
* On PostgreSQL the two could overlap in time; they no longer do: a
  compensation that arrives while its command is still in its transaction
  waits for it, sees that it took effect, and undoes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

import sagakit as sk
from sagakit.messages import Headers
from sagakit.testing import drop_tables
from tests.helpers import Do, Undo, eventually

REPLIES = "barrier.replies"


@dataclass
class Latches:
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hold: bool = False
    effects: list[str] = field(default_factory=list)


@pytest.fixture(params=["sqlite", "postgresql"])
async def bench(
    request: pytest.FixtureRequest, tmp_path, prefix: str
) -> AsyncIterator[tuple[sk.App, Latches]]:
    url = (
        f"sqlite:///{tmp_path}/b.db"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    app = sk.App(
        url, settings=sk.Settings(prefix=prefix, max_poll=0.02, retry=sk.RetryPolicy(initial=0.01))
    )
    latches = Latches()
    part = app.participant("p")

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        if latches.hold:
            latches.entered.set()
            await latches.release.wait()
        ctx.db.on_commit(lambda: latches.effects.append("do"))

    @part.command(Undo)
    async def undo(cmd: Undo, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: latches.effects.append("undo"))

    async with app:
        await app.transport.declare(REPLIES, [])
        yield app, latches
        if request.param == "postgresql":
            await drop_tables(app.store)


async def send(app: sk.App, payload: object, phase: str) -> None:
    headers = Headers(saga_id="s1", saga_type="t", step="x", phase=phase, reply_to=REPLIES)
    env = app.codec.make(payload, headers)
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "p", env.id, app.codec.encode(env))


async def replies(app: sk.App) -> list[tuple[str, str]]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {app.store.prefix}messages WHERE queue = ? ORDER BY seq", REPLIES
        )
    envs = [app.codec.decode(bytes(r[0])) for r in rows]
    return [(e.headers.phase or "", e.headers.outcome or "") for e in envs]


async def test_null_compensation_then_late_command_is_refused(bench) -> None:
    app, latches = bench
    await send(app, Undo("k"), "compensate")
    await eventually(lambda: _replies(app, 1))
    await send(app, Do("k"), "forward")
    await eventually(lambda: _replies(app, 2))
    assert await replies(app) == [("compensate", "success"), ("forward", "failure")]
    assert latches.effects == []  # neither ran: nothing to undo, and too late to do


async def test_command_then_compensation_both_run(bench) -> None:
    app, latches = bench
    await send(app, Do("k"), "forward")
    await eventually(lambda: _replies(app, 1))
    await send(app, Undo("k"), "compensate")
    await eventually(lambda: _replies(app, 2))
    assert await replies(app) == [("forward", "success"), ("compensate", "success")]
    assert latches.effects == ["do", "undo"]


@pytest.mark.parametrize("bench", ["postgresql"], indirect=True)  # SQLite never overlaps
async def test_compensation_waits_for_its_command_in_flight_then_undoes_it(bench) -> None:
    app, latches = bench
    latches.hold = True
    await send(app, Do("k"), "forward")
    await asyncio.wait_for(latches.entered.wait(), 10)  # the command is mid-transaction
    await send(app, Undo("k"), "compensate")
    await asyncio.sleep(0.5)
    assert await replies(app) == [], "the compensation waits for the command"
    latches.release.set()  # the command commits; the compensation must see it
    await eventually(lambda: _replies(app, 2))
    assert await replies(app) == [("forward", "success"), ("compensate", "success")]
    assert latches.effects == ["do", "undo"]


async def _replies(app: sk.App, n: int) -> bool:
    return len(await replies(app)) >= n
