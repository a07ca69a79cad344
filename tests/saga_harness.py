"""A saga test bench: participants that record every applied effect.

Each participant handles ``Do`` (forward) and ``Undo`` (compensation) and
writes a row to ``effects`` inside its local transaction, so the sequence of
effects that really committed can be read back and checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sagakit as sk
from tests.helpers import Data, DidIt, Do, Refused, Undo

EFFECTS = (
    "CREATE TABLE IF NOT EXISTS effects "
    "(seq INTEGER PRIMARY KEY AUTOINCREMENT, saga TEXT, step TEXT, action TEXT)"
)


@dataclass
class Plan:
    """What each step does, keyed by saga key then step name."""

    refuse: dict[str, set[str]] = field(default_factory=dict)
    refuse_times: dict[tuple[str, str], int] = field(default_factory=dict)
    crash_undo_times: dict[tuple[str, str], int] = field(default_factory=dict)
    hold: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    committed: list[tuple[str, str]] = field(default_factory=list)
    #: register the handlers db_only (their replies decided on in their own hops)
    db_only: bool = False


def bench(app: sk.App, steps: list[str], plan: Plan, stores: Path | None = None) -> None:
    """Register one participant per step name (the participant is the step).

    With ``stores``, each participant gets its own SQLite database there, so a
    handler held inside its transaction blocks only its own service.
    """
    for name in steps:
        store = f"sqlite:///{stores}/{name}.db" if stores else None
        part = app.participant(name, store=store)
        _handlers(part, name, plan)


def _handlers(part: sk.Participant, name: str, plan: Plan) -> None:
    @part.command(Do, db_only=plan.db_only)
    async def do(cmd: Do, ctx: sk.Context) -> DidIt:
        key = (cmd.key, name)
        if key in plan.hold:
            await plan.hold[key].wait()
        if name in plan.refuse.get(cmd.key, set()):
            raise Refused(f"{name} refuses {cmd.key}")
        if plan.refuse_times.get(key, 0) > 0:
            plan.refuse_times[key] -= 1
            raise Refused(f"{name} not yet")
        await _effect(ctx, cmd.key, name, "do", plan)
        return DidIt(1)

    @part.command(Undo, db_only=plan.db_only)
    async def undo(cmd: Undo, ctx: sk.Context) -> None:
        key = (cmd.key, name)
        if plan.crash_undo_times.get(key, 0) > 0:
            plan.crash_undo_times[key] -= 1
            raise Refused(f"{name} cannot undo yet")
        await _effect(ctx, cmd.key, name, "undo", plan)


async def _effect(ctx: sk.Context, saga: str, step: str, action: str, plan: Plan) -> None:
    await ctx.db.execute(EFFECTS)
    await ctx.db.execute(
        "INSERT INTO effects (saga, step, action) VALUES (?, ?, ?)", saga, step, action
    )
    label = f"{'T' if action == 'do' else 'C'}:{step}"
    ctx.db.on_commit(lambda: plan.committed.append((saga, label)))


def committed(plan: Plan, saga: str) -> list[str]:
    """Effects of ``saga`` in the order their transactions committed."""
    return [label for s, label in plan.committed if s == saga]


async def effects(store: sk.Store, saga: str) -> list[str]:
    async with store.transaction() as tx:
        await tx.execute(EFFECTS)
        rows = await tx.fetchall(
            "SELECT step, action FROM effects WHERE saga = ? ORDER BY seq", saga
        )
    return [f"{'T' if r[1] == 'do' else 'C'}:{r[0]}" for r in rows]


def linear(
    name: str,
    steps: list[str],
    *,
    pivot: str | None = None,
    retriable: dict[str, sk.RetryPolicy] | None = None,
    version: int = 1,
    timeouts: dict[str, float] | None = None,
    **kw: Any,
) -> sk.SagaDefinition[Data]:
    """A saga with one step per participant, in order."""
    retriable = retriable or {}
    saga = sk.Saga(name, Data, version=version, **kw)
    for s in steps:
        b = saga.step(s).invoke(s, lambda d: Do(d.key))
        b.on_reply(DidIt, lambda d, r: Data(d.key, d.total + r.value, d.log))
        if s in retriable:
            b.retry(retriable[s])
        elif s == pivot:
            b.pivot()
        else:
            b.compensate(s, lambda d: Undo(d.key))
        if timeouts and s in timeouts:
            b.timeout(timeouts[s])
    return saga.build()
