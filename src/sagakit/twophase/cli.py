"""``sagakit 2pc list|resolve``: in-doubt branches, and resolving one by hand.

The store (``--store``, default ``$SAGAKIT_STORE``) holds the commit records
and the audit log; the databases to look in are given as ``--resource
NAME=URL`` (repeatable; default ``$SAGAKIT_2PC_RESOURCES``, the same pairs
separated by spaces). ``resolve`` wants ``--commit`` or ``--rollback`` and a
``--reason``, and records the ``--actor`` (default ``$SAGAKIT_ACTOR``, else
the OS user) with it — in the 2PC log and in the operator audit
(``sagakit audit list``), through the console's action model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from ..errors import ConfigurationError
from ..ops.dead_letters_cli import DEFAULT_STORE, _actor
from ..store.schema import SCHEMA_VERSION
from ..transport import redact
from .coordinator import TwoPhase, TwoPhaseOptions


def add_parser(sub: Any) -> None:
    """Register ``2pc`` and its commands under the ``sagakit`` parser."""
    tp = sub.add_parser(
        "2pc",
        help="two-phase commit: in-doubt branches",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = tp.add_subparsers(dest="twophase", required=True)
    ls = cmds.add_parser("list", help="prepared branches nobody is finishing, oldest first")
    _common(ls)
    ls.set_defaults(func=cmd_list)
    rs = cmds.add_parser("resolve", help="commit or roll back one in-doubt branch, audited")
    _common(rs)
    rs.add_argument("gid", help="the branch's global id (see list)")
    how = rs.add_mutually_exclusive_group(required=True)
    how.add_argument("--commit", dest="action", action="store_const", const="commit")
    how.add_argument("--rollback", dest="action", action="store_const", const="rollback")
    rs.add_argument("--reason", required=True, help="why (kept in the audit log)")
    rs.add_argument("--actor", help="who (default $SAGAKIT_ACTOR, else the OS user)")
    rs.add_argument("--force", action="store_true", help="roll back even a recorded group")
    rs.set_defaults(func=cmd_resolve)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help=f"store URL (default $SAGAKIT_STORE, else {DEFAULT_STORE})")
    p.add_argument("--prefix", default="sagakit_", help="table name prefix (default sagakit_)")
    p.add_argument(
        "--resource", action="append", default=[], metavar="NAME=URL", help="a database to scan"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_list(args: argparse.Namespace) -> int:
    branches = _run(args, lambda tp: tp.in_doubt())
    if args.json:
        print(json.dumps([asdict(b) for b in branches], indent=2, sort_keys=True))
        return 0
    if branches:
        print(f"{'global id':60} {'resource':16} {'age':>8}  {'record':10} locks held")
    for b in branches:
        age = "?" if b.age is None else f"{b.age:.0f}s"
        record = "recorded" if b.recorded else "no record"
        locks = ", ".join(b.locks) or "-"
        print(f"{b.gid:60} {b.resource:16} {age:>8}  {record:10} {locks}")
    if not branches:
        print("no branch in doubt")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    actor = _actor(args.actor)

    async def job(tp: TwoPhase) -> str:
        """Through the console's action model: checked, and audited in its table too."""
        from ..console.actions import Operations
        from ..console.twophase import RESOLVE, TwoPhaseActions, params_of, target_of

        ops = Operations(tp.store)
        TwoPhaseActions(tp).register(ops)
        params = params_of(args.gid, args.action, args.force)
        detail = await ops.perform(
            RESOLVE, target_of(args.gid), args.reason, params, actor=actor, source="cli"
        )
        return (detail or "").partition(": ")[2]

    outcome = _run(args, job)
    if args.json:
        print(json.dumps({"gid": args.gid, "action": args.action, "outcome": outcome}))
    else:
        print(f"{args.action} {args.gid}: {outcome}")
    return 0


def resources(pairs: list[str]) -> dict[str, str]:
    """``NAME=URL`` pairs (else ``$SAGAKIT_2PC_RESOURCES``) as a dict."""
    given = pairs or os.environ.get("SAGAKIT_2PC_RESOURCES", "").split()
    if not given:
        raise ConfigurationError("which databases? give --resource NAME=URL (or set "
                                 "SAGAKIT_2PC_RESOURCES)")  # fmt: skip
    out = {}
    for pair in given:
        name, sep, url = pair.partition("=")
        if not sep or not url:
            raise ConfigurationError(f"--resource wants NAME=URL, got {redact(pair)!r}")
        out[name] = url
    return out


def _run(args: argparse.Namespace, job: Callable[[TwoPhase], Awaitable[Any]]) -> Any:
    from ..store import open_store

    url = args.store or os.environ.get("SAGAKIT_STORE") or DEFAULT_STORE
    named = resources(args.resource)

    async def run() -> Any:
        store = open_store(url, prefix=args.prefix)
        await store.open(migrate=False, listen=False)
        tp = TwoPhase(store, TwoPhaseOptions(recover_every=None, preflight=False))
        try:
            if await store.schema_version() < SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the schema of {redact(url)} is out of date: run 'sagakit db migrate' first"
                )
            for name, rurl in named.items():
                tp.add(name, rurl)
            await tp.start()
            return await job(tp)
        finally:
            await tp.stop()
            await store.close()

    return asyncio.run(run())
