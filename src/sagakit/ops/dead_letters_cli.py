"""``sagakit dead-letters list|show|replay|purge``: the CLI over :class:`DeadLetters`.

There is no App here, so replay needs to know where queues live: by default
every queue is taken to be the store's own (the database transport);
``--transport URL`` publishes to a broker instead, for every queue but the
store's own (timers, local steps, the outbox). Replay and purge want a
``--reason`` and record the ``--actor`` (default ``$SAGAKIT_ACTOR``, else the
OS user) with it — in the dead-letter log and in the operator audit
(``sagakit audit list``); ``--dry-run`` shows what would happen and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, InvalidOperatorAction
from ..store.schema import SCHEMA_VERSION
from ..transport import open_transport, redact
from .actor import Actor
from .dead_letters import DeadLetterFilter, DeadLetterOutcome, DeadLetters

if TYPE_CHECKING:
    from ..store import DeadLetter

DEFAULT_STORE = "sqlite:///.sagakit/sagakit.db"


def add_parser(sub: Any) -> None:
    """Register ``dead-letters`` and its four commands under the ``sagakit`` parser."""
    dl = sub.add_parser(
        "dead-letters",
        help="list, show, replay and purge dead letters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = dl.add_subparsers(dest="dead_letters", required=True)
    _add_list(cmds)
    show = cmds.add_parser("show", help="one dead letter, with its bytes")
    _common(show)
    show.add_argument("seq", type=int, help="the dead letter's number (see list)")
    show.set_defaults(func=cmd_show)
    for action in ("replay", "purge"):
        _add_action(cmds, action)


def _add_list(cmds: Any) -> None:
    p = cmds.add_parser("list", help="dead letters, oldest first")
    _common(p)
    _filters(p)
    p.set_defaults(func=cmd_list)


def _add_action(cmds: Any, action: str) -> None:
    helps = {
        "replay": "put dead letters back on their queues, as a redelivery would",
        "purge": "delete dead letters for good",
    }
    p = cmds.add_parser(action, help=helps[action])
    _common(p)
    p.add_argument("seq", type=int, nargs="?", help="one dead letter (else: the filters)")
    _filters(p)
    p.add_argument("--all", action="store_true", help="every dead letter (no seq, no filter)")
    p.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    p.add_argument("--reason", required=True, help="why (recorded with the action)")
    p.add_argument("--actor", help="who (default $SAGAKIT_ACTOR, else the OS user)")
    if action == "replay":
        p.add_argument("--transport", help="broker URL to publish to (default: the store's queues)")
    p.set_defaults(func=cmd_action, action=action)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help=f"store URL (default $SAGAKIT_STORE, else {DEFAULT_STORE})")
    p.add_argument("--prefix", default="sagakit_", help="table name prefix (default sagakit_)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", help="only letters from this queue")
    p.add_argument("--error-type", help="only letters with this error type")
    p.add_argument("--saga", help="only letters of this saga id")
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="only letters this old")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")


# -- commands ----------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    async def run(dl: DeadLetters) -> list[DeadLetter]:
        return await dl.list(**_filter_args(args))

    letters = asyncio.run(_with(args, run))
    if args.json:
        _print_json([summary(d) for d in letters])
    else:
        for d in letters:
            print(_line(d))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    async def run(dl: DeadLetters) -> DeadLetter:
        return await dl.get(args.seq)

    letter = asyncio.run(_with(args, run))
    shown = detail(letter)
    if args.json:
        _print_json(shown)
    else:
        for key, value in shown.items():
            print(f"{key:12} {value}")
    return 0


def cmd_action(args: argparse.Namespace) -> int:
    which = _which(args)
    actor = _actor(args.actor)

    async def run(dl: DeadLetters) -> DeadLetterOutcome:
        act = dl.replay if args.action == "replay" else dl.purge
        return await act(which, actor=actor, reason=args.reason, dry_run=args.dry_run)

    outcome = asyncio.run(_with(args, run, getattr(args, "transport", None)))
    if args.json:
        _print_json(report(outcome))
    else:
        _print_outcome(outcome)
    return 0


# -- plumbing ----------------------------------------------------------------


async def _with(args: argparse.Namespace, body: Any, transport_url: str | None = None) -> Any:
    """Open the store (and the broker, if asked), run ``body`` over them, close."""
    from ..store import open_store

    url = args.store or os.environ.get("SAGAKIT_STORE") or DEFAULT_STORE
    async with AsyncExitStack() as stack:
        store = open_store(url, prefix=args.prefix)
        await store.open(migrate=False)
        stack.push_async_callback(store.close)
        if await store.schema_version() < SCHEMA_VERSION:
            raise ConfigurationError(
                f"the schema of {redact(url)} is out of date: run 'sagakit db migrate' first"
            )
        transport = open_transport(transport_url, store) if transport_url else None
        if transport is not None:
            await transport.open()
            stack.push_async_callback(transport.close)
        from ..console.dead_letters import DeadLetterAuditLog  # the console's operator audit

        return await body(
            DeadLetters(store, transport, audit=DeadLetterAuditLog(store, source="cli"))
        )


def _filter_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "queue": args.queue,
        "error_type": args.error_type,
        "saga_id": args.saga,
        "older_than": args.older_than,
        "limit": args.limit,
    }


def _which(args: argparse.Namespace) -> int | DeadLetterFilter:
    """One letter, or a filter; acting on everything must be asked for with --all."""
    f = _filter_args(args)
    filtered = any(v is not None for k, v in f.items() if k != "limit")
    if args.seq is not None and (filtered or args.all):
        raise ConfigurationError("give a dead letter's number or filters (or --all), not both")
    if args.seq is not None:
        return int(args.seq)
    if not filtered and not args.all:
        raise ConfigurationError(f"{args.action} what? give a number, a filter, or --all")
    return DeadLetterFilter(**f)


def _actor(name: str | None) -> Actor:
    """The operator: --actor, else $SAGAKIT_ACTOR, else the OS user."""
    who = name or os.environ.get("SAGAKIT_ACTOR")
    if not who:
        try:
            who = getpass.getuser()
        except (OSError, KeyError):
            raise ConfigurationError(
                "no operator name: pass --actor or set SAGAKIT_ACTOR"
            ) from None
    try:
        return Actor(who, via="cli")
    except InvalidOperatorAction as exc:  # a name the action log cannot hold
        raise ConfigurationError(str(exc)) from exc


def summary(d: DeadLetter) -> dict[str, Any]:
    """A dead letter without its bytes, for listings."""
    return {
        "seq": d.seq,
        "id": d.id,
        "queue": d.queue,
        "error_type": d.error_type,
        "reason": d.reason,
        "saga_id": d.saga_id,
        "created_at": d.created_at,
        "kind": d.kind,
        "destination": d.destination,
        "size": d.size if d.size is not None else len(d.data),
        "truncated": d.truncated,
    }


def detail(d: DeadLetter) -> dict[str, Any]:
    """A dead letter with its bytes: as text when they are UTF-8, always as base64."""
    try:
        text: str | None = d.data.decode()
    except UnicodeDecodeError:
        text = None
    return {**summary(d), "data": text, "data_base64": base64.b64encode(d.data).decode()}


def report(o: DeadLetterOutcome) -> dict[str, Any]:
    return {
        "action": o.action,
        "dry_run": o.dry_run,
        "done": [summary(d) for d in o.done],
        "refused": [{**summary(d), "why": why} for d, why in o.refused],
    }


def _print_outcome(o: DeadLetterOutcome) -> None:
    verb = {"replay": "replayed", "purge": "purged"}[o.action]
    head = f"would be {verb}" if o.dry_run else verb
    print(f"{len(o.done)} dead letter(s) {head}, {len(o.refused)} refused")
    for d in o.done:
        print(f"  {_line(d)}")
    for d, why in o.refused:
        print(f"  refused {d.seq}: {why}")


def _line(d: DeadLetter) -> str:
    age = max(0.0, time.time() - d.created_at)
    return f"{d.seq:>6}  {d.queue:24} {d.error_type:24} {age:>8.0f}s  {d.saga_id or '-'}  {d.id}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))
