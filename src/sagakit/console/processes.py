"""Finding process-manager instances for the console: list, filters, one instance.

Read straight from the store's ``processes`` and ``process_log`` tables, so
the console needs no definition: the state is shown as the JSON it is
stored as, the timers from the instance's bookkeeping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import InvalidOperatorAction, SagaNotFound, UnknownAction
from ..process.records import _COLS, ProcessRecord, ProcessTable
from ..process.records import _record as record_of
from .actions import SAMPLE, ActionRequest
from .audit import AuditFilter
from .timers import MAX_PART, TIMER_ACTIONS, TimerRef, armed_timers

SCAN = 10_000  #: instances one query reads at most

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import Store
    from .actions import Operations
    from .audit import Audit, AuditEntry


@dataclass(frozen=True, slots=True)
class ProcessQuery:
    """Which instances: every given field must match."""

    process: str | None = None
    status: str | None = None
    correlation_id: str | None = None
    #: True: finished ones only; False: running ones only
    done: bool | None = None
    #: only instances with at least one armed timer
    with_timers: bool = False
    limit: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")


async def list_instances(store: Store, q: ProcessQuery) -> list[dict[str, Any]]:
    """The matching instances, most recently changed first."""
    conds = {"process": q.process, "status": q.status, "correlation_id": q.correlation_id}
    given: dict[str, Any] = {k: v for k, v in conds.items() if v is not None}
    if q.done is not None:
        given["done"] = int(q.done)
    where = " AND ".join(f"{k} = ?" for k in given)
    sql = f"SELECT {_COLS} FROM {store.prefix}processes"
    sql += (f" WHERE {where}" if where else "") + " ORDER BY updated_at DESC LIMIT ?"
    rows = await store.driver.read(sql, *given.values(), SCAN if q.with_timers else q.limit)
    found = [summary(record_of(r)) for r in rows]
    return [f for f in found if f["timers"]][: q.limit] if q.with_timers else found


async def instance(store: Store, process: str, key: str) -> dict[str, Any]:
    """One instance with its state, timers and decision history."""
    table = ProcessTable(store)
    rec = await table.get(process, key)
    if rec is None:
        raise SagaNotFound(f"no {process} instance {key!r}")
    out = summary(rec)
    out["state"] = msgspec.json.decode(rec.state)
    out["history"] = [asdict(e) for e in await table.history(process, key)]
    return out


async def timer_audit(audit: Audit, process: str, key: str) -> list[AuditEntry]:
    """The latest timer actions on one instance, newest first."""
    prefix = TimerRef(process, key, "-").target[:-1]
    lines = []
    for action in TIMER_ACTIONS:
        lines += await audit.list(AuditFilter(action=action, limit=500))
    mine = [a for a in lines if a.target.startswith(prefix)]
    return sorted(mine, key=lambda a: -a.seq)[:50]


async def process_names(store: Store) -> list[str]:
    rows = await store.driver.read(f"SELECT DISTINCT process FROM {store.prefix}processes")
    return sorted(str(r[0]) for r in rows)


def summary(rec: ProcessRecord) -> dict[str, Any]:
    return {
        "process": rec.process,
        "key": rec.key,
        "version": rec.version,
        "status": rec.status,
        "done": rec.done,
        "correlation_id": rec.correlation_id,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "timers": [asdict(t) for t in armed_timers(rec)],
    }


@dataclass(slots=True)
class TimerPlan:
    """What a bulk timer action takes (dry run) or took."""

    action: str
    timer: str
    dry_run: bool
    count: int
    #: up to ten ``process/key`` of the instances it takes
    sample: list[str]
    #: of those it ran on, how many failed (the timer fired meanwhile)
    failed: int = 0


async def bulk_timers(
    ops: Operations,
    q: ProcessQuery,
    timer: str,
    action: str,
    reason: str,
    *,
    actor: Actor,
    source: str | None = None,
    dry_run: bool = True,
) -> TimerPlan:
    """Fire or cancel the timer ``timer`` of every instance ``q`` selects that has it armed.

    The dry run counts exactly what the run would take (given no change in
    between) and changes and records nothing; the run audits one line for the
    bulk command and one per instance (each in its own transaction).
    """
    if action not in TIMER_ACTIONS:
        raise UnknownAction(f"no timer action {action!r} (timer.fire or timer.cancel)")
    if not timer or len(timer) > MAX_PART:
        raise ValueError(f"a timer's name is 1 to {MAX_PART} characters")
    target = "timers:" + msgspec.json.encode({**asdict(q), "timer": timer}).decode()
    await ops.allowed(actor, ActionRequest(action, reason), target, source, action=f"bulk-{action}")
    found = await list_instances(store=ops.store, q=q)
    fit = [i for i in found if any(t["name"] == timer for t in i["timers"])]
    sample = [f"{i['process']}/{i['key']}" for i in fit[:SAMPLE]]
    plan = TimerPlan(action, timer, dry_run, len(fit), sample)
    if dry_run or not fit:
        return plan
    detail = msgspec.json.encode({"count": len(fit), "sample": sample}).decode()
    await ops.audit.append(
        ops.audit.line(actor, f"bulk-{action}", target, reason, "done", source, detail)
    )
    for i in fit:
        ref = TimerRef(i["process"], i["key"], timer)
        try:
            await ops.perform(action, ref.target, reason, ref.params(), actor=actor, source=source)
        except InvalidOperatorAction:
            plan.failed += 1
    return plan
