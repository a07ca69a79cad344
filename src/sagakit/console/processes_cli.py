"""``sagakit processes list|show|fire|cancel``: process-manager instances and their timers.

``fire`` and ``cancel`` act on one timer (``--timer NAME``) of one instance
(``PROCESS KEY``), or — without a key — of every instance of ``PROCESS``
that has it armed (``--status`` narrows them; ``--dry-run`` prints the exact
count and a sample instead). They go through the console's action model:
a reason is required, the actor is ``--token``'s holder or ``--actor`` (default
``$SAGAKIT_ACTOR``, else the OS user), and each action is audited.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from .actions import Operations
from .cli import _actor, _print, _run, _store
from .processes import ProcessQuery, bulk_timers, instance, list_instances
from .timers import TimerActions, TimerRef

if TYPE_CHECKING:
    from ..store import Store


def add_parser(sub: Any) -> None:
    """Register ``processes`` under the ``sagakit`` parser."""
    pm = sub.add_parser("processes", help="process-manager instances and their timers")
    cmds = pm.add_subparsers(dest="processes_cmd", required=True)
    ls = _store(cmds.add_parser("list", help="instances, most recently changed first"))
    _filters(ls)
    ls.add_argument("--pending-timers", action="store_true", help="only those with a timer armed")
    ls.set_defaults(func=cmd_list)
    show = _store(cmds.add_parser("show", help="one instance: state, timers, history"))
    show.add_argument("process")
    show.add_argument("key")
    show.set_defaults(func=cmd_show)
    for verb in ("fire", "cancel"):
        p = _store(cmds.add_parser(verb, help=f"{verb} a timer of one instance, or of every match"))
        p.add_argument("process")
        p.add_argument("key", nargs="?", help="the instance (omit to act on every match)")
        p.add_argument("--timer", required=True, help="the timer's name")
        p.add_argument("--reason", required=True, help="why (recorded in the audit)")
        p.add_argument("--dry-run", action="store_true", help="count and sample; change nothing")
        p.add_argument("--token", help="act as this token's holder (default $SAGAKIT_TOKEN)")
        p.add_argument("--actor", help="else this name (default $SAGAKIT_ACTOR, the OS user)")
        _filters(p, process=False)
        p.set_defaults(func=cmd_act, action=f"timer.{verb}")


def _filters(p: argparse.ArgumentParser, *, process: bool = True) -> None:
    if process:
        p.add_argument("--process", help="only this process manager")
    p.add_argument("--status", help="only this status")
    p.add_argument("--correlation-id", help="only this correlation id")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")


def cmd_list(args: argparse.Namespace) -> int:
    q = ProcessQuery(args.process, args.status, args.correlation_id, None, args.pending_timers,
                     args.limit)  # fmt: skip
    rows = _run(args, "list process instances in", lambda store: list_instances(store, q))
    text = [
        f"{r['process']}[{r['key']}]  {r['status']}{'  (done)' if r['done'] else ''}  "
        f"timers {', '.join(_timer(t) for t in r['timers']) or '-'}"
        for r in rows
    ]
    _print(args, rows, "\n".join(text) or "no process instances")
    return 0


def _timer(t: dict[str, Any]) -> str:
    return f"{t['name']} due in {t['due_at'] - time.time():.0f}s"


def cmd_show(args: argparse.Namespace) -> int:
    d = _run(args, "show a process instance in", lambda s: instance(s, args.process, args.key))
    text = [f"{d['process']}[{d['key']}]  {d['status']}  state {d['state']}"]
    text += [f"  timer {_timer(t)}" for t in d["timers"]]
    text += [
        f"  {h['message_type']:<32} {h['verdict']:<12} {h['status_after']}" for h in d["history"]
    ]
    _print(args, d, "\n".join(text))
    return 0


def cmd_act(args: argparse.Namespace) -> int:
    async def job(store: Store) -> dict[str, Any]:
        ops, actor = Operations(store), await _actor(args, store)
        TimerActions(store).register(ops)
        if args.key is None:
            q = ProcessQuery(args.process, args.status, args.correlation_id, limit=args.limit)
            plan = await bulk_timers(ops, q, args.timer, args.action, args.reason, actor=actor,
                                     source="cli", dry_run=args.dry_run)  # fmt: skip
            return dataclasses.asdict(plan)
        ref = TimerRef(args.process, args.key, args.timer)
        if args.dry_run:
            timers = (await instance(store, args.process, args.key))["timers"]
            armed = any(t["name"] == args.timer for t in timers)
            return {"action": args.action, "target": ref.target, "dry_run": True,
                    "outcome": "would run" if armed else "would fail: not armed"}  # fmt: skip
        detail = await ops.perform(args.action, ref.target, args.reason, ref.params(),
                                   actor=actor, source="cli")  # fmt: skip
        return {"action": args.action, "target": ref.target, "outcome": "done", "detail": detail}

    r = _run(args, f"{args.action} in", job)
    if "count" in r:
        verb = "would" if r["dry_run"] else "did"
        text = f"{verb} {r['action']} {r['timer']} on {r['count']} instances"
        text += f" (sample: {', '.join(r['sample'])}); {r['failed']} failed"
    else:
        text = (
            f"{r['action']} {r['target']}: {r.get('outcome', 'would run')} {r.get('detail') or ''}"
        )
    _print(args, r, text.rstrip())
    return 0
