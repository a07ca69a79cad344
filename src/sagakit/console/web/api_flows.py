"""The JSON API for choreography flows, process managers and two-phase commit.

Reads need a caller; the timer actions and resolving a branch in doubt need
the operator or admin role and go through the action model (checks, reason,
audit) like the saga actions.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from ..processes import ProcessQuery, bulk_timers, instance, list_instances, timer_audit
from ..timers import TIMER_ACTIONS, TimerRef
from ..twophase import RESOLVE, params_of, target_of
from .api import limit_of
from .body import ReasonBody, ResolveBody, TimerBulkBody, http_error, json_body
from .console import Console, source_of

if TYPE_CHECKING:
    from starlette.requests import Request

    from ...choreography.queries import FlowView


def flow_json(v: Any, timeline: bool) -> dict[str, Any]:
    out = dataclasses.asdict(v)
    out["finished"] = v.finished
    if not timeline:
        out.pop("timeline")
    return out


async def find_flows(
    c: Console, flow: str | None, status: str | None, correlation_id: str | None, limit: int
) -> list[FlowView]:
    """Flows by choreography and status, or those of one correlation id."""
    if not correlation_id:
        return await c.flows.list(flow=flow, status=status, limit=limit)
    rows = await c.flows.rows.get(correlation_id, flow)
    views = [await c.flows.get(correlation_id, flow=r.flow, timeline=False) for r in rows]
    return [v for v in views if status in (None, v.status)]


async def list_flows(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    p = request.query_params
    flow, status = p.get("flow") or None, p.get("status") or None
    views = await find_flows(c, flow, status, p.get("correlation_id") or None, limit_of(p))
    counts = await c.flows.counts(flow=flow)
    return JSONResponse({"flows": [flow_json(v, False) for v in views], "counts": counts})


async def get_flow(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    corr = request.path_params["correlation_id"]
    view = await c.flows.get(corr, flow=request.query_params.get("flow") or None)
    out = flow_json(view, True)
    out["story"] = [dataclasses.asdict(s) for s in await c.flows.history(corr)]
    return JSONResponse(out)


def process_query(p: Any) -> ProcessQuery:
    """A :class:`ProcessQuery` from query-string parameters (ValueError: a 422)."""
    done = p.get("done") or None
    if done not in (None, "true", "false"):
        raise ValueError("done is true or false")
    return ProcessQuery(
        process=p.get("process") or None,
        status=p.get("status") or None,
        correlation_id=p.get("correlation_id") or None,
        done=None if done is None else done == "true",
        with_timers=p.get("timers") == "pending",
        limit=limit_of(p),
    )


async def list_processes(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    found = await list_instances(c.store, process_query(request.query_params))
    return JSONResponse({"processes": found})


async def get_process(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    process, key = request.path_params["process"], request.path_params["key"]
    out = await instance(c.store, process, key)
    out["audit"] = [a.as_dict() for a in await timer_audit(c.ops.audit, process, key)]
    return JSONResponse(out)


def timer_ref(params: Any) -> tuple[TimerRef, str]:
    action = f"timer.{params['action']}"
    if action not in TIMER_ACTIONS:
        raise http_error(404, f"no timer action {params['action']!r} (fire or cancel)")
    return TimerRef(params["process"], params["key"], params["timer"]), action


async def timer_act(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    ref, action = timer_ref(request.path_params)
    await c.acting(request, caller, action, ref.target, request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, action, ref.target)
    body = await json_body(request, ReasonBody, c.options.max_body)
    detail = await c.ops.perform(
        action, ref.target, body.reason, ref.params(), actor=caller.actor, source=source_of(request)
    )
    return JSONResponse(
        {"action": action, "target": ref.target, "outcome": "done", "detail": detail}
    )


async def timer_bulk(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    action = f"timer.{request.path_params['action']}"
    if action not in TIMER_ACTIONS:
        raise http_error(404, "no such bulk timer action (fire or cancel)")
    name = f"bulk-{action}"
    await c.acting(request, caller, name, "timers", request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, name, "timers")
    body = await json_body(request, TimerBulkBody, c.options.max_body)
    q = ProcessQuery(body.process, body.status, body.correlation_id, limit=body.limit)
    plan = await bulk_timers(
        c.ops, q, body.timer, action, body.reason, actor=caller.actor,
        source=source_of(request), dry_run=body.dry_run,
    )  # fmt: skip
    return JSONResponse(dataclasses.asdict(plan))


async def list_in_doubt(c: Console, request: Request) -> Response:
    await c.auth.caller(request)
    branches = await c.in_doubt.branches() if c.in_doubt else []
    unreachable = c.in_doubt.unreachable_json() if c.in_doubt else {}
    body = {"configured": c.in_doubt is not None, "branches": branches, "unreachable": unreachable}
    return JSONResponse(body)


async def resolve(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    gid = request.path_params["gid"]
    target = target_of(gid)
    await c.acting(request, caller, RESOLVE, target, request.headers.get("x-csrf-token"))
    await c.may_act(request, caller.actor, RESOLVE, target)
    body = await json_body(request, ResolveBody, c.options.max_body)
    if c.in_doubt is None:
        raise http_error(409, "this console was given no 2PC databases (--resource NAME=URL)")
    params = params_of(gid, body.outcome, body.force)
    detail = await c.ops.perform(
        RESOLVE, target, body.reason, params, actor=caller.actor, source=source_of(request)
    )
    return JSONResponse({"action": RESOLVE, "target": target, "outcome": "done", "detail": detail})
