"""The JSON API under ``/api/``: the same reads and the same action model as the pages.

Every endpoint needs a caller (401 without); acting (on sagas or on dead
letters) needs the operator or
admin role, tokens the admin role (403 otherwise, audited). Bodies are JSON
of a declared schema, at most ``ConsoleOptions.max_body`` bytes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.responses import JSONResponse, Response

from ...errors import InvalidOperatorAction, SagaNotFound
from ...ops.dead_letters import DeadLetterFilter
from ..actions import ActionRequest
from ..audit import AuditFilter, Outcome
from ..dead_letters import action_name, letter_json, seq_of, target_of
from ..query import SagaQuery, detail, select, summary
from .body import (
    ActionBody,
    BulkBody,
    DeadLetterActionBody,
    DeadLetterBulkBody,
    TokenBody,
    json_body,
)
from .console import Console, source_of
from .health import health
from .openapi import document

if TYPE_CHECKING:
    from starlette.requests import Request

MAX_WAIT = 30.0


def query_of(params: Any, limit: int = 100) -> SagaQuery:
    """A :class:`SagaQuery` from query-string parameters (a 422 if they do not parse)."""

    def num(name: str, kind: type[Any]) -> Any:
        value = params.get(name) or None
        return None if value is None else kind(value)

    try:
        return _query(params, num, limit)
    except InvalidOperatorAction as exc:
        raise ValueError(str(exc)) from None


def _query(params: Any, num: Any, limit: int) -> SagaQuery:
    return SagaQuery(
        type=params.get("type") or None,
        state=params.get("state") or None,
        step=params.get("step") or None,
        older_than=num("older_than", float),
        stuck_for=num("stuck_for", float),
        correlation_id=params.get("correlation_id") or None,
        version=num("version", int),
        limit=limit if num("limit", int) is None else num("limit", int),
    )


def limit_of(params: Any) -> int:
    """``limit`` from the query string: 1 to 10,000 (default 100); ValueError otherwise."""
    limit = int(params.get("limit") or 100)
    if not 1 <= limit <= 10_000:
        raise ValueError("limit must be between 1 and 10000")
    return limit


async def list_sagas(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    q = query_of(request.query_params)
    recs = await select(c.store, q)
    counts = await c.store.saga_counts(type=q.type)
    return JSONResponse({"sagas": [summary(r) for r in recs], "counts": counts})


async def get_saga(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    saga_id = request.path_params["saga_id"]
    rec = await c.store.saga_get(saga_id)
    if rec is None:
        raise SagaNotFound(f"no saga {saga_id!r}", saga_id=saga_id)
    audit = await c.ops.audit.list(AuditFilter(target=saga_id, limit=50))
    body = detail(rec, await c.store.history(saga_id))
    body["audit"] = [a.as_dict() for a in audit]
    return JSONResponse(body)


async def act(c: Console, request: Request) -> Response:
    saga_id, action = request.path_params["saga_id"], request.path_params["action"]
    caller = await c.auth.caller(request)
    await c.acting(request, caller, action, saga_id, request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, action, saga_id)
    body = await json_body(request, ActionBody, c.options.max_body)
    req = ActionRequest(action, body.reason, body.step, body.patch)
    sub = await c.ops.submit(saga_id, req, actor=caller.actor, source=source_of(request))
    wait = max(0.0, min(body.wait, MAX_WAIT))
    line = await c.ops.outcome(sub.command_id, saga_id, timeout=wait) if wait else None
    result: dict[str, Any] = {"command_id": sub.command_id, "saga_id": saga_id, "action": action}
    result["outcome"] = line.outcome if line else "queued"
    if line is not None and line.outcome == "failed":
        result["error"] = line.detail
    return JSONResponse(result, status_code=202 if line is None else 200)


async def bulk(c: Console, request: Request) -> Response:
    action = request.path_params["action"]
    caller = await c.auth.caller(request)
    await c.acting(request, caller, f"bulk-{action}", "query", request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, f"bulk-{action}", "query")
    body = await json_body(request, BulkBody, c.options.max_body)
    q = SagaQuery(**msgspec.structs.asdict(body.query))
    req = ActionRequest(action, body.reason, body.step, body.patch)
    plan = await c.ops.bulk(
        q, req, actor=caller.actor, source=source_of(request), dry_run=body.dry_run
    )
    return JSONResponse(
        {
            "action": action,
            "dry_run": plan.dry_run,
            "count": plan.count,
            "sample": plan.sample,
            "refused": plan.refused,
            "command_id": plan.command_id,
        }
    )


async def audit_list(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    p = request.query_params
    f = AuditFilter(
        actor=p.get("actor") or None,
        action=p.get("action") or None,
        target=p.get("target") or None,
        outcome=p.get("outcome") or None,
        limit=limit_of(p),
    )
    return JSONResponse([a.as_dict() for a in await c.ops.audit.list(f)])


async def dead_letters(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    letters = await c.store.dead_letters(limit_of(request.query_params))
    return JSONResponse([letter_json(d) for d in letters])


async def dead_letter_act(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    seq, verb = seq_of(request.path_params["seq"]), request.path_params["action"]
    action, target = action_name(verb), target_of(seq)
    await c.acting(request, caller, action, target, request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, action, target)
    body = await json_body(request, DeadLetterActionBody, c.options.max_body)
    sub = await c.dead_letters.submit(
        seq, action, body.reason, actor=caller.actor, source=source_of(request)
    )
    wait = max(0.0, min(body.wait, MAX_WAIT))
    line = await c.ops.outcome(sub.command_id, target, timeout=wait) if wait else None
    result: dict[str, Any] = {"command_id": sub.command_id, "seq": seq, "action": action}
    result["outcome"] = line.outcome if line else "queued"
    if line is not None and line.outcome == "failed":
        result["error"] = line.detail
    return JSONResponse(result, status_code=202 if line is None else 200)


async def dead_letter_bulk(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    action = action_name(request.path_params["action"])
    name = f"bulk-{action}"
    await c.acting(request, caller, name, "dead-letters", request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, name, "dead-letters")
    body = await json_body(request, DeadLetterBulkBody, c.options.max_body)
    which = DeadLetterFilter(**msgspec.structs.asdict(body.filter))
    plan = await c.dead_letters.bulk(
        which,
        action,
        body.reason,
        actor=caller.actor,
        source=source_of(request),
        dry_run=body.dry_run,
    )
    return JSONResponse(dataclasses.asdict(plan))


async def get_health(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    return JSONResponse(await health(c.store))


async def tokens_list(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    await c.admin(request, caller.actor, "token-list", "tokens")
    return JSONResponse([_token(t) for t in await c.tokens.list()])


async def token_create(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    await c.acting(request, caller, "token-create", "tokens", request.headers.get("x-csrf-token"))
    await c.admin(request, caller.actor, "token-create", "tokens")
    body = await json_body(request, TokenBody, c.options.max_body)
    info, token = await c.tokens.create(body.role, name=body.name, created_by=caller.actor.id)
    await c.ops.audit.append(
        c.ops.audit.line(
            caller.actor, "token-create", f"token:{info.id}", info.role, "done", source_of(request)
        )
    )
    return JSONResponse({**_token(info), "token": token}, status_code=201)


async def token_revoke(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    tid = request.path_params["token_id"]
    await c.acting(
        request, caller, "token-revoke", f"token:{tid}", request.headers.get("x-csrf-token")
    )
    await c.admin(request, caller.actor, "token-revoke", f"token:{tid}")
    done = await c.tokens.revoke(tid)
    outcome: Outcome = "done" if done else "failed"
    await c.ops.audit.append(
        c.ops.audit.line(
            caller.actor, "token-revoke", f"token:{tid}", "revoke", outcome, source_of(request)
        )
    )
    return JSONResponse({"id": tid, "revoked": done}, status_code=200 if done else 404)


def _token(t: Any) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "revoked_at": t.revoked_at,
    }


async def openapi(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    return JSONResponse(document())
