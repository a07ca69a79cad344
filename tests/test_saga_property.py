"""Property: every instance executes T1..Tn, or T1..Tj then Cj..C1 (plus forward retries).

Steps of one parallel group are unordered among themselves, in both directions.

Hypothesis generates saga shapes (compensatable steps, parallel groups, a
pivot, retriable steps after it), a business failure point, transient
failures of retriable steps, and crashes of the whole process at random
moments. The effects that really committed in the participants' local
transactions are then checked against the guarantee of the saga paper.

A crash is a hard stop: in-flight transactions are cancelled (rolled back),
nothing is flushed, and a new App resumes from the same database files with
the clock moved past the lease, as after a restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sagakit as sk
from tests.helpers import Data, DidIt, Do, Undo
from tests.saga_harness import Plan, bench, committed

EXAMPLES = int(os.environ.get("SAGAKIT_PROPERTY_EXAMPLES", "500"))
POLICY = sk.RetryPolicy(max_attempts=4, initial=0.001, max_delay=0.005, jitter=0.0)


class JumpClock:
    """Real time plus a jump after each simulated restart (leases expire)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


@dataclass(frozen=True)
class Shape:
    kinds: tuple[str, ...]  # "comp", "plain", "pivot", "retry"
    parallel: tuple[bool, ...]
    refuse: int | None  # index of the step that refuses (business failure)
    transient: tuple[int, ...]  # failures before success, per retriable step
    crashes: tuple[int, ...]  # crash after this many committed effects


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    n = draw(st.integers(1, 5))
    pivot = draw(st.one_of(st.none(), st.integers(0, n - 1)))
    kinds = []
    for i in range(n):
        if pivot is None:
            kinds.append(draw(st.sampled_from(["comp", "comp", "plain"])))
        else:
            kinds.append("comp" if i < pivot else "pivot" if i == pivot else "retry")
    parallel = tuple(
        i > 0
        and kinds[i] in ("comp", "plain")
        and kinds[i - 1] in ("comp", "plain")
        and draw(st.booleans())
        for i in range(n)
    )
    last_refusable = n - 1 if pivot is None else pivot
    refuse = draw(st.one_of(st.none(), st.integers(0, last_refusable)))
    transient = tuple(draw(st.integers(0, 2)) if k == "retry" else 0 for k in kinds)
    crashes = tuple(sorted(draw(st.lists(st.integers(0, 2 * n), max_size=2))))
    return Shape(tuple(kinds), parallel, refuse, transient, crashes)


def names(shape: Shape) -> list[str]:
    return [f"s{i}" for i in range(len(shape.kinds))]


def definition(shape: Shape) -> sk.SagaDefinition[Data]:
    saga = sk.Saga("prop", Data, compensation_retry=POLICY)
    for name, kind, par in zip(names(shape), shape.kinds, shape.parallel, strict=True):
        b = saga.step(name, parallel=par).invoke(name, lambda d: Do(d.key))
        b.on_reply(DidIt, lambda d, r: d)
        if kind == "comp":
            b.compensate(name, lambda d: Undo(d.key))
        elif kind == "pivot":
            b.pivot()
        elif kind == "retry":
            b.retry(POLICY)
    return saga.build()


async def run_case(shape: Shape, folder: str) -> tuple[str, list[str]]:
    plan, clock, steps = Plan(), JumpClock(), names(shape)
    if shape.refuse is not None:
        plan.refuse["k"] = {steps[shape.refuse]}
    for name, times in zip(steps, shape.transient, strict=True):
        plan.refuse_times[("k", name)] = times
    defn = definition(shape)
    crashes = list(shape.crashes)
    started = False
    for _ in range(len(crashes) + 1):
        app = sk.App(f"sqlite:///{folder}/sagas.db", clock=clock, settings=SETTINGS)
        bench(app, steps, plan)
        app.saga(defn)
        await app.start()
        if not started:
            await app.sagas.start(defn, Data("k"), saga_id="k")
            started = True
        limit = crashes.pop(0) if crashes else None
        done = await _run_until(app, plan, limit)
        await _crash(app) if not done else await app.stop()
        clock.offset += SETTINGS.lease + 1
        if done:
            break
    rec = await _final_state(folder, clock, plan, steps, defn)
    return rec, committed(plan, "k")


SETTINGS = sk.Settings(retry=POLICY, max_poll=0.005, lease=5.0, shutdown_grace=0.0)


async def _run_until(app: sk.App, plan: Plan, crash_after: int | None) -> bool:
    """Run until the saga is final (True) or ``crash_after`` effects committed (False)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while loop.time() < end:
        if crash_after is not None and len(plan.committed) >= crash_after:
            return False
        rec = await app.store.saga_get("k")
        if rec is not None and rec.state in ("completed", "compensated", "failed"):
            return True
        await asyncio.sleep(0.001)
    raise AssertionError("saga did not finish in time")


async def _crash(app: sk.App) -> None:
    """Stop abruptly: in-flight handlers are cancelled and roll back."""
    await app.stop()


async def _final_state(
    folder: str, clock: JumpClock, plan: Plan, steps: list[str], defn: sk.SagaDefinition[Data]
) -> str:
    app = sk.App(f"sqlite:///{folder}/sagas.db", clock=clock, settings=SETTINGS)
    bench(app, steps, plan)
    app.saga(defn)
    async with app:
        view = await app.sagas.wait("k", timeout=20, poll=0.001)
        await asyncio.sleep(0.01)  # let stray deliveries settle
    return view.state


def check(shape: Shape, state: str, effects: list[str]) -> None:
    steps = names(shape)
    kind = dict(zip(steps, shape.kinds, strict=True))
    group = _groups(shape)
    forward = [e[2:] for e in effects if e.startswith("T:")]
    backward = [e[2:] for e in effects if e.startswith("C:")]
    assert effects == [f"T:{s}" for s in forward] + [f"C:{s}" for s in backward], effects
    assert len(set(forward)) == len(forward) and len(set(backward)) == len(backward), effects
    assert [group[s] for s in forward] == sorted(group[s] for s in forward), effects
    if shape.refuse is None:
        assert state == "completed", (state, effects)
        assert sorted(forward) == sorted(steps) and not backward, effects
        return
    assert state == "compensated", (state, effects)
    assert steps[shape.refuse] not in forward, effects
    assert "pivot" not in {kind[s] for s in forward}, effects
    # Compensations undo exactly the compensatable steps that ran, a later group
    # before an earlier one. Siblings of one parallel group ran concurrently, so
    # they are unordered among themselves; with single-step groups this is the
    # strict reverse order Cj..C1.
    assert sorted(backward) == sorted(s for s in forward if kind[s] == "comp"), effects
    groups = [group[s] for s in backward]
    assert groups == sorted(groups, reverse=True), effects


def _groups(shape: Shape) -> dict[str, int]:
    g, out = -1, {}
    for name, par in zip(names(shape), shape.parallel, strict=True):
        g = g if par else g + 1
        out[name] = g
    return out


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(shapes())
def test_every_instance_runs_t1_tn_or_t1_tj_then_cj_c1(shape: Shape) -> None:
    folder = tempfile.mkdtemp(prefix="sagakit-prop-")
    try:
        state, effects = asyncio.run(run_case(shape, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    event(f"state={state}")
    event(f"crashes={len(shape.crashes)}")
    event(f"effects={len(effects)}")
    check(shape, state, effects)
