"""Property: a choreography keeps the saga guarantee, and its tracker agrees.

Hypothesis generates choreographies — one participant per step, a pivot,
which step refuses (its failure event triggers the undo of every earlier
undoable step) — and runs each through real participants on a SQLite file,
with faults:

- crashes: the App is stopped hard (in-flight handlers cancelled, their
  transactions rolled back) after some effects committed, and a new App
  resumes from the same file with the clock moved past the lease;
- duplicates: between runs every message still queued is copied, same id;
- reordering: the tracker does not run while the participants work; its
  queue is then shuffled (and copied) before it starts, and it may crash too.

The effects that committed in the participants' transactions must be
T1..Tn, or T1..Tj and then exactly one compensation of each undoable step
among them (a choreography runs the compensations of one failure
concurrently, so their order among themselves is free); and the tracker's
final status must say the same: completed, or compensated with nothing owed.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sagakit as sk
from sagakit.choreography import Choreography
from tests.helpers import Refused

EXAMPLES = int(os.environ.get("SAGAKIT_CHOREO_EXAMPLES", "40"))
MAX_STEPS = 4
SETTINGS = sk.Settings(
    retry=sk.RetryPolicy(max_attempts=20, initial=0.001, max_delay=0.005, jitter=0.0),
    max_poll=0.005,
    lease=5.0,
    shutdown_grace=0.0,
)
EFFECTS = "CREATE TABLE IF NOT EXISTS effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, e TEXT)"


def _event(name: str) -> Any:
    return sk.event(f"prop.{name}")(msgspec.defstruct(f"Prop{name}", [("key", str)]))


START, COMPLETED, ENDED = _event("Start"), _event("Completed"), _event("Ended")
DONE = [_event(f"Done{i}") for i in range(MAX_STEPS)]
FAILED = [_event(f"Failed{i}") for i in range(MAX_STEPS)]
UNDONE = [_event(f"Undone{i}") for i in range(MAX_STEPS)]


class JumpClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


@dataclass(frozen=True)
class Shape:
    n: int
    pivot: int | None
    refuse: int | None
    crashes: tuple[int, ...]  # stop the participants after this many effects
    duplicate: bool
    tracker_crash: int | None  # stop the tracker after this many timeline rows
    seed: int

    def failable(self, i: int) -> bool:
        return self.pivot is None or i <= self.pivot

    def undoable(self, i: int) -> bool:
        later = any(self.failable(k) for k in range(i + 1, self.n))
        return (self.pivot is None or i < self.pivot) and later


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    n = draw(st.integers(1, MAX_STEPS))
    pivot = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    last = n - 1 if pivot is None else pivot
    refuse = draw(st.one_of(st.none(), st.integers(0, last)))
    crashes = tuple(sorted(draw(st.lists(st.integers(0, 2 * n), max_size=2))))
    tracker_crash = draw(st.one_of(st.none(), st.integers(1, 2 * n + 2)))
    return Shape(n, pivot, refuse, crashes, draw(st.booleans()), tracker_crash, draw(st.integers()))


def contract(s: Shape) -> sk.ChoreographyDefinition:
    c = Choreography("prop").starts_on(START).hold_early_events(seconds=600)
    for i in range(s.n):
        c.step(f"s{i}", done=DONE[i], failed=FAILED[i] if s.failable(i) else None)
        if s.pivot == i:
            c.pivot()
    for j in range(s.n):
        if s.undoable(j):
            on = tuple(FAILED[k] for k in range(j + 1, s.n) if s.failable(k))
            c.undo(f"s{j}", on=on, done=UNDONE[j])
    return c.completes_on(COMPLETED, ENDED).build()


def wire(app: sk.App, s: Shape, committed: list[str]) -> None:
    parts = {f"s{i}": app.participant(f"s{i}") for i in range(s.n)}
    end = app.participant("end")
    for i in range(s.n):
        _forward(parts[f"s{i}"], s, i, committed)
        if s.undoable(i):
            for k in range(i + 1, s.n):
                if s.failable(k):
                    _undo(parts[f"s{i}"], i, k, committed)
    _end(end, s)
    app.track(contract(s))


def _forward(p: sk.Participant, s: Shape, i: int, committed: list[str]) -> None:
    trigger = START if i == 0 else DONE[i - 1]
    publishes = (DONE[i], FAILED[i]) if s.failable(i) else (DONE[i],)
    refusal = (lambda exc, e: FAILED[i](e.key)) if s.failable(i) else None

    @p.event(trigger, publishes=publishes, on_refusal=refusal)
    async def forward(e: Any, ctx: sk.Context) -> None:
        if s.refuse == i:
            raise Refused(f"s{i} refuses")
        await _effect(ctx, f"T:s{i}", committed)
        ctx.publish(DONE[i](e.key))


def _undo(p: sk.Participant, i: int, k: int, committed: list[str]) -> None:
    @p.event(FAILED[k], publishes=(UNDONE[i],))
    async def undo(e: Any, ctx: sk.Context) -> None:
        await _effect(ctx, f"C:s{i}", committed)
        ctx.publish(UNDONE[i](e.key))


def _end(p: sk.Participant, s: Shape) -> None:
    @p.event(DONE[s.n - 1], publishes=(COMPLETED,))
    async def complete(e: Any, ctx: sk.Context) -> None:
        ctx.publish(COMPLETED(e.key))

    for k in range(s.n):
        if s.failable(k):

            @p.event(FAILED[k], publishes=(ENDED,))
            async def ended(e: Any, ctx: sk.Context) -> None:
                ctx.publish(ENDED(e.key))


async def _effect(ctx: sk.Context, label: str, committed: list[str]) -> None:
    await ctx.db.execute(EFFECTS)
    await ctx.db.execute("INSERT INTO effects (e) VALUES (?)", label)
    ctx.db.on_commit(lambda: committed.append(label))


# -- running ---------------------------------------------------------------------


async def run_case(s: Shape, folder: str) -> tuple[Any, list[str]]:
    url, clock, committed = f"sqlite:///{folder}/prop.db", JumpClock(), []
    rng = random.Random(s.seed)
    participants = [f"s{i}" for i in range(s.n)] + ["end"]
    crashes, started = list(s.crashes), False
    while True:
        app = _app(url, clock, s, committed, participants)
        await app.start()
        if not started:
            async with app.begin("end", correlation_id="k") as ctx:
                ctx.publish(START("k"))
            started = True
        limit = crashes.pop(0) if crashes else None
        quiet = await _until(partial(_quiet, app, participants, committed, limit))
        await app.stop()
        clock.offset += SETTINGS.lease + 1
        await _disturb(url, clock, rng, s.duplicate)
        if quiet == "quiet":
            break
    return await _track(url, clock, s, committed, rng), await _effects(url, clock)


def _app(url: str, clock: JumpClock, s: Shape, committed: list[str], run: list[str]) -> sk.App:
    app = sk.App(url, clock=clock, settings=SETTINGS, run=run)
    wire(app, s, committed)
    return app


async def _quiet(app: sk.App, queues: list[str], committed: list[str], limit: int | None) -> str:
    if limit is not None and len(committed) >= limit:
        return "crash"
    depths = [await app.store.queue.depth(q) for q in queues]
    return "quiet" if not any(depths) else ""


async def _until(check: Any, timeout: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        verdict: str = await check()
        if verdict:
            return verdict
        await asyncio.sleep(0.002)
    raise AssertionError("did not settle in time")


async def _disturb(url: str, clock: JumpClock, rng: random.Random, duplicate: bool) -> None:
    """Put every queued message back in a random order; with ``duplicate``, twice (same id)."""
    cols = "id, queue, destination, data, available_at, created_at, kind"
    store = sk.open_store(url, clock=clock)
    async with store, store.transaction() as tx:
        rows = list(await tx.fetchall(f"SELECT {cols} FROM sagakit_messages"))
        await tx.execute("DELETE FROM sagakit_messages")
        copies = rows + (rows if duplicate and len(rows) < 200 else [])
        rng.shuffle(copies)
        for row in copies:
            await tx.execute(
                f"INSERT INTO sagakit_messages ({cols}, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                *row[:4],
                clock.now() - 1.0,
                *row[5:],
            )


async def _track(
    url: str, clock: JumpClock, s: Shape, committed: list[str], rng: random.Random
) -> Any:
    """Run the tracker (crashing it once if asked) until its queue is drained."""
    crash = s.tracker_crash
    while True:
        app = _app(url, clock, s, committed, ["tracker"])
        async with app:
            queue = app.flows.trackers["prop"].queue

            verdict = await _until(partial(_drained, app, queue, crash))
            if verdict == "done":
                return await app.flows.get("k")
        crash = None
        clock.offset += SETTINGS.lease + 1
        await _disturb(url, clock, rng, s.duplicate)


async def _drained(app: sk.App, queue: str, crash: int | None) -> str:
    if crash is not None and await _rows(app) >= crash:
        return "crash"
    return "done" if await app.store.queue.depth(queue) == 0 else ""


async def _rows(app: sk.App) -> int:
    rows = await app.store.driver.read("SELECT count(*) FROM sagakit_chor_timeline")
    return int(rows[0][0])


async def _effects(url: str, clock: JumpClock) -> list[str]:
    store = sk.open_store(url, clock=clock)
    async with store, store.transaction() as tx:
        await tx.execute(EFFECTS)
        return [r[0] for r in await tx.fetchall("SELECT e FROM effects ORDER BY seq")]


def check(s: Shape, effects: list[str], flow: Any) -> None:
    forward = [e[2:] for e in effects if e.startswith("T:")]
    backward = [e[2:] for e in effects if e.startswith("C:")]
    assert effects == [f"T:{x}" for x in forward] + [f"C:{x}" for x in backward], effects
    assert len(set(backward)) == len(backward), effects
    if s.refuse is None:
        assert forward == [f"s{i}" for i in range(s.n)] and not backward, effects
        assert flow.status == "completed", (flow.status, flow.timeline)
        return
    assert forward == [f"s{i}" for i in range(s.refuse)], effects
    assert sorted(backward) == sorted(f"s{j}" for j in range(s.refuse) if s.undoable(j)), effects
    assert flow.status == "compensated", (flow.status, flow.timeline)
    assert flow.owed == [] and flow.expects == [], flow
    assert sorted(flow.compensated) == sorted(backward), flow


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(shapes())
def test_choreographies_keep_the_saga_guarantee_and_the_tracker_agrees(s: Shape) -> None:
    folder = tempfile.mkdtemp(prefix="sagakit-choreo-")
    try:
        flow, effects = asyncio.run(run_case(s, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    event(f"status={flow.status}")
    event(f"crashes={len(s.crashes)}")
    event(f"held={sum(r.kind == 'released' for r in flow.timeline) > 0}")
    check(s, effects, flow)
