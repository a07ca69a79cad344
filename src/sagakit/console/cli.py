"""``sagakit console``, ``sagakit console token``, ``sagakit sagas <action>``, ``sagakit audit``.

The commands act through the same action model as the web console
(:class:`~sagakit.console.Operations`): each action is checked, queued as a
durable command for a coordinator to execute, and audited. The CLI waits
(``--wait``, default 10 s) for the outcome and prints it; a command no
coordinator has run yet is reported as ``queued``. Without a saga id an
action takes every saga the filters select — a bulk action — and
``--dry-run`` prints the exact count and a sample instead of acting.

Who acts: ``--token`` (or ``$SAGAKIT_TOKEN``), else ``--actor`` (or
``$SAGAKIT_ACTOR``, else the OS user) as an operator: whoever can reach the
store's database can act on it anyway, the name is what the audit records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from .actions import ActionRequest, Operations
from .admissible import SAGA_ACTIONS
from .audit import Audit, AuditEntry, AuditFilter
from .query import SagaQuery, detail, select, summary
from .tokens import ROLES, Tokens

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import Store

ACTIONS = tuple(a for a in SAGA_ACTIONS)


def add_parser(sub: Any) -> None:
    """Register ``console`` (with ``token``) and ``audit`` under the ``sagakit`` parser."""
    c = sub.add_parser("console", help="the web dashboard and JSON API; its tokens")
    _store(c)
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    c.add_argument("--app", help="MODULE:APP whose saga definitions to draw (optional)")
    c.add_argument("--read-only", action="store_true", help="refuse every action")
    c.add_argument("--proxy-header", help="trust this user header from --trusted-proxy")
    c.add_argument("--trusted-proxy", action="append", default=[], help="a proxy address")
    c.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without a token (loopback --host only)")  # fmt: skip
    c.add_argument("--resource", action="append", default=[], metavar="NAME=URL",
                   help="a 2PC database to list and resolve branches in doubt "
                        "(repeatable; default $SAGAKIT_2PC_RESOURCES)")  # fmt: skip
    c.set_defaults(func=cmd_serve)
    tok = c.add_subparsers(dest="console_cmd").add_parser("token", help="API tokens")
    cmds = tok.add_subparsers(dest="token_cmd", required=True)
    create = cmds.add_parser("create", help="create a token; prints it once, last")
    _store(create, sub=True)
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", default="", help="a name for the audit (default role-id)")
    create.set_defaults(func=cmd_token_create)
    _store(cmds.add_parser("list", help="tokens (never their secrets)"), sub=True).set_defaults(
        func=cmd_token_list
    )
    revoke = cmds.add_parser("revoke", help="revoke a token by its id")
    _store(revoke, sub=True)
    revoke.add_argument("id", help="the id (the 12 hex digits after sgk_)")
    revoke.set_defaults(func=cmd_token_revoke)
    audit = sub.add_parser("audit", help="the audit of operator actions")
    al = audit.add_subparsers(dest="audit_cmd", required=True).add_parser(
        "list", help="newest first"
    )
    _store(al)
    for name in ("actor", "action", "target"):
        al.add_argument(f"--{name}", help=f"only this {name}")
    al.add_argument("--outcome", choices=("done", "denied", "failed"))
    al.add_argument("--limit", type=int, default=100)
    al.set_defaults(func=cmd_audit_list)


def add_saga_actions(sg: Any) -> None:
    """Add ``show`` and the actions to ``sagakit sagas``; richer filters for ``list``."""
    _filters(sg.choices["list"], listing=True)
    sg.choices["list"].set_defaults(func=cmd_list)
    show = sg.add_parser("show", help="one saga: data, progress, timeline, audit")
    _store(show)
    show.add_argument("saga_id")
    show.set_defaults(func=cmd_show)
    for action in ACTIONS:
        p = sg.add_parser(action, help=f"{action} one saga, or (without an id) every match")
        _store(p)
        p.add_argument("saga_id", nargs="?", help="the saga (omit to act on every match)")
        p.add_argument("--reason", required=True, help="why (recorded in the audit)")
        p.add_argument("--dry-run", action="store_true", help="check and count; change nothing")
        p.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the outcome")
        p.add_argument("--token", help="act as this token's holder (default $SAGAKIT_TOKEN)")
        p.add_argument("--actor", help="else this name (default $SAGAKIT_ACTOR, the OS user)")
        if action == "skip":
            p.add_argument("--expect-step", help="the step meant to be skipped (a guard)")
        if action in ("skip", "edit"):
            p.add_argument("--patch", required=action == "edit", help="a JSON patch on the data")
        _filters(p)
        p.set_defaults(func=cmd_act, action=action)


def _store(p: argparse.ArgumentParser, *, sub: bool = False) -> argparse.ArgumentParser:
    default = argparse.SUPPRESS if sub else None
    p.add_argument("--store", default=default, help="store URL (default $SAGAKIT_STORE)")
    p.add_argument(
        "--prefix", default=argparse.SUPPRESS if sub else "sagakit_", help="table prefix"
    )
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if sub else False)
    return p


def _filters(p: argparse.ArgumentParser, *, listing: bool = False) -> None:
    from ..cli import duration

    if not listing:
        p.add_argument("--state", help="only this state")
        p.add_argument("--type", help="only this saga type")
        p.add_argument("--stuck", type=duration, help="only sagas without progress this long")
        p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.add_argument("--step", dest="on_step", help="only sagas stuck on or waiting for this step")
    p.add_argument("--older-than", type=duration, help="only sagas created this long ago")
    p.add_argument("--correlation-id", help="only this correlation id")
    p.add_argument("--version", type=int, help="only this definition version")


def _query(args: argparse.Namespace) -> SagaQuery:
    return SagaQuery(
        type=args.type,
        state=args.state,
        step=args.on_step,
        older_than=args.older_than,
        stuck_for=args.stuck,
        correlation_id=args.correlation_id,
        version=args.version,
        limit=args.limit,
    )


def _run(args: argparse.Namespace, what: str, job: Any) -> Any:
    from ..cli import _on_store

    for name, default in (("store", None), ("prefix", "sagakit_"), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return _on_store(args, what, job)


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value) if args.json else text)


# -- sagas -----------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    q = _query(args)

    async def job(store: Store) -> list[dict[str, Any]]:
        return [summary(r) for r in await select(store, q)]

    rows = _run(args, "list sagas in", job)
    lines = [  # the line 'sagas list' printed before the console: kept as it was
        f"{r['id']}  {r['type']} v{r['version']}  {r['state']}  "
        f"idle {time.time() - r['updated_at']:.0f}s  pending {','.join(r['pending']) or '-'}"
        for r in rows
    ]
    _print(args, rows, "\n".join(lines) or "no sagas")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    async def job(store: Store) -> dict[str, Any]:
        rec = await store.saga_get(args.saga_id)
        if rec is None:
            raise ConfigurationError(f"no saga {args.saga_id!r}")
        out = detail(rec, await store.history(rec.id))
        out["audit"] = [a.as_dict() for a in await Audit(store).list(AuditFilter(target=rec.id))]
        return out

    d = _run(args, "show a saga in", job)
    text = [f"{d['id']}  {d['type']} v{d['version']}  {d['state']}  {d['error'] or ''}"]
    text += [
        f"  {e['lane']:<12} {e['entry']:<18} {e['step'] or '':<12} {e['detail'] or ''}"
        for e in d["timeline"]
    ]
    _print(args, d, "\n".join(text))
    return 0


def cmd_act(args: argparse.Namespace) -> int:
    patch = _patch(getattr(args, "patch", None))
    req = ActionRequest(args.action, args.reason, getattr(args, "expect_step", None), patch)
    if args.saga_id is None:
        return _bulk(args, req)

    async def job(store: Store) -> dict[str, Any]:
        ops, actor = Operations(store), await _actor(args, store)
        if args.dry_run:
            return await _check(store, args.saga_id, req)
        sub = await ops.submit(args.saga_id, req, actor=actor, source="cli")
        line = await ops.outcome(sub.command_id, args.saga_id, timeout=max(0.0, args.wait))
        return _outcome(sub.command_id, args.saga_id, args.action, line)

    result = _run(args, f"{args.action} a saga in", job)
    _print(
        args,
        result,
        f"{args.action} {args.saga_id}: {result['outcome']}"
        + (f" ({result['error']})" if result.get("error") else ""),
    )
    return 1 if result["outcome"] == "failed" else 0


async def _check(store: Store, saga_id: str, req: ActionRequest) -> dict[str, Any]:
    from .actions import refusal_of

    rec = await store.saga_get(saga_id)
    why = "no such saga" if rec is None else refusal_of(req, rec)
    return {
        "saga_id": saga_id,
        "action": req.action,
        "dry_run": True,
        "outcome": "would fail" if why else "would run",
        "error": why,
    }


def _outcome(command_id: str, saga_id: str, action: str, line: AuditEntry | None) -> dict[str, Any]:
    out: dict[str, Any] = {"command_id": command_id, "saga_id": saga_id, "action": action}
    out["outcome"] = line.outcome if line else "queued"
    if line is not None and line.outcome == "failed":
        out["error"] = line.detail
    return out


def _bulk(args: argparse.Namespace, req: ActionRequest) -> int:
    q = _query(args)
    if not any(v is not None for k, v in q.as_dict().items() if k != "limit"):
        raise ConfigurationError(f"{args.action} what? give a saga id or at least one filter")

    async def job(store: Store) -> dict[str, Any]:
        plan = await Operations(store).bulk(
            q, req, actor=await _actor(args, store), source="cli", dry_run=args.dry_run
        )
        return {
            "action": plan.action,
            "dry_run": plan.dry_run,
            "count": plan.count,
            "sample": plan.sample,
            "refused": plan.refused,
            "command_id": plan.command_id,
        }

    r = _run(args, f"{args.action} sagas in", job)
    verb = "would" if r["dry_run"] else "queued"
    _print(
        args,
        r,
        f"{verb} {r['action']} {r['count']} sagas (sample: {', '.join(r['sample'])}); "
        f"{r['refused']} matching left alone",
    )
    return 0


def _patch(text: str | None) -> list[dict[str, Any]] | None:
    if not text:
        return None
    try:
        patch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"--patch is not JSON: {exc}") from None
    if not isinstance(patch, list):
        raise ConfigurationError("--patch is a JSON list of operations")
    return patch


async def _actor(args: argparse.Namespace, store: Store) -> Actor:
    from ..ops.dead_letters_cli import _actor as named

    token = args.token or os.environ.get("SAGAKIT_TOKEN")
    if token:
        return await Tokens(store).verify(token, via="cli")
    return named(args.actor)


# -- console and tokens ------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the dashboard until interrupted."""
    import uvicorn

    from ..cli import DEFAULT_STORE, _app_of, _load_app
    from ..store import open_store
    from .web import ConsoleOptions, create_app

    url = args.store or os.environ.get("SAGAKIT_STORE") or DEFAULT_STORE
    options = ConsoleOptions(
        host=args.host,
        port=args.port,
        read_only=args.read_only,
        proxy_header=args.proxy_header,
        trusted_proxies=tuple(args.trusted_proxy),
        public_metrics=args.public_metrics,
    )
    definitions = {}
    if args.app:  # an App, or a factory of one: only its saga definitions are used
        built = _app_of(_load_app(args.app, defaults={"store": url}))
        if built is None:
            raise ConfigurationError(f"{args.app} is not an App (nor has one as .app)")
        definitions = dict(built.sagas.definitions)
    store = open_store(url, prefix=args.prefix)
    app = create_app(
        store, options, definitions=definitions, manage_store=True, twophase=_twophase(args, store)
    )
    print(
        f"sagakit console on http://{args.host}:{args.port}/ (store {url.split('@')[-1]})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _twophase(args: argparse.Namespace, store: Store) -> Any:
    """The 2PC databases given (``--resource``, ``$SAGAKIT_2PC_RESOURCES``), else None."""
    from ..twophase import TwoPhase, TwoPhaseOptions
    from ..twophase.cli import resources

    if not args.resource and not os.environ.get("SAGAKIT_2PC_RESOURCES"):
        return None
    tp = TwoPhase(store, TwoPhaseOptions(recover_every=None, preflight=False))
    for name, url in resources(args.resource).items():
        tp.add(name, url)
    return tp


def cmd_token_create(args: argparse.Namespace) -> int:
    async def job(store: Store) -> tuple[Any, str]:
        return await Tokens(store).create(args.role, name=args.name, created_by="cli")

    info, token = _run(args, "create a token in", job)
    if args.json:
        print(json.dumps({"id": info.id, "name": info.name, "role": info.role, "token": token}))
    else:
        print(f"{info.role} token {info.name} (id {info.id}); shown once, store it now:")
        print(token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    rows = _run(args, "list tokens in", lambda store: Tokens(store).list())
    data = [
        {
            "id": t.id,
            "name": t.name,
            "role": t.role,
            "created_at": t.created_at,
            "revoked": t.revoked_at is not None,
        }
        for t in rows
    ]
    _print(
        args,
        data,
        "\n".join(
            f"{t['id']}  {t['role']:<8} {t['name']}{'  (revoked)' if t['revoked'] else ''}"
            for t in data
        )
        or "no tokens",
    )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    done = _run(args, "revoke a token in", lambda store: Tokens(store).revoke(args.id))
    if not done:
        raise ConfigurationError(f"no live token {args.id!r}")
    print(f"revoked {args.id}")
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    f = AuditFilter(args.actor, args.action, args.target, args.outcome, args.limit)
    lines = _run(args, "read the audit of", lambda store: Audit(store).list(f))
    rows = [a.as_dict() for a in lines]
    text = [
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(a.at))}  {a.outcome:<6} "
        f"{a.action:<12} {a.target}  by {a.actor} ({a.role}, {a.via}): {a.reason}"
        for a in lines
    ]
    _print(args, rows, "\n".join(text) or "nothing audited yet")
    return 0
