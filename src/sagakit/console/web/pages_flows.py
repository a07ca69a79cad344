"""The dashboard's pages for choreography flows, process managers and 2PC in doubt."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.responses import RedirectResponse, Response

from ...choreography.queries import FlowView
from ..audit import AuditFilter
from ..processes import (
    ProcessQuery,
    bulk_timers,
    instance,
    list_instances,
    process_names,
    timer_audit,
)
from ..twophase import RESOLVE, params_of, target_of
from .api import limit_of
from .api_flows import find_flows, process_query, timer_ref
from .body import form_body
from .console import Console, source_of
from .pages import render

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclasses.dataclass(frozen=True, slots=True)
class FlowFilter:
    flow: str | None
    status: str | None
    correlation_id: str | None


async def flow_list(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    p = request.query_params
    f = FlowFilter(p.get("flow") or None, p.get("status") or None, p.get("correlation_id") or None)
    views = await find_flows(c, f.flow, f.status, f.correlation_id, limit_of(p))
    counts = await c.flows.counts(flow=f.flow)
    return render(c, request, "flows.html", caller, flows=views, counts=counts, f=f)


async def flow_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    corr = request.path_params["correlation_id"]
    view: FlowView = await c.flows.get(corr, flow=request.query_params.get("flow") or None)
    story = await c.flows.history(corr)
    return render(c, request, "flow.html", caller, v=view, story=story)


async def process_list(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    q = process_query(request.query_params)
    found, names = await list_instances(c.store, q), await process_names(c.store)
    return render(c, request, "processes.html", caller, processes=found, q=q, names=names)


async def process_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    process, key = request.path_params["process"], request.path_params["key"]
    p = await instance(c.store, process, key)
    audit = await timer_audit(c.ops.audit, process, key)
    msg = request.query_params.get("msg", "")
    return render(c, request, "process.html", caller, p=p, audit=audit, message=msg)


async def timer_action(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    ref, action = timer_ref({**request.path_params, "action": form.get("action", "")})
    await c.acting(request, caller, action, ref.target, form.get("csrf"))
    await c.may_act(request, caller.actor, action, ref.target)
    reason, source = form.get("reason", ""), source_of(request)
    detail = await c.ops.perform(action, ref.target, reason, ref.params(), actor=caller.actor,
                                 source=source)  # fmt: skip
    msg = f"{action} {ref.timer}: done — {detail}"
    page = f"/processes/{quote(ref.process, safe='')}/{quote(ref.key, safe='')}"
    return RedirectResponse(f"{page}?msg={quote(msg)}", status_code=303)


async def timer_bulk(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    verb = form.get("action", "")
    action = f"timer.{verb}"
    await c.acting(request, caller, f"bulk-{action}", "timers", form.get("csrf"))
    await c.may_act(request, caller.actor, f"bulk-{action}", "timers")
    given = {k: form.get(k) or None for k in ("process", "status", "correlation_id")}
    q = ProcessQuery(given["process"], given["status"], given["correlation_id"], limit=1000)
    reason, dry_run = form.get("reason", ""), form.get("dry_run", "1") == "1"
    timer, source = form.get("timer", ""), source_of(request)
    plan = await bulk_timers(
        c.ops, q, timer, action, reason, actor=caller.actor, source=source, dry_run=dry_run
    )
    filt = {k: v for k, v in given.items() if v}
    return render(c, request, "processes_bulk.html", caller, plan=plan, verb=verb,
                  reason=reason, filter=filt)  # fmt: skip


async def in_doubt_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    branches = await c.in_doubt.branches() if c.in_doubt else []
    unreachable = c.in_doubt.unreachable_json() if c.in_doubt else {}
    audit = await c.ops.audit.list(AuditFilter(action=RESOLVE, limit=50))
    msg = request.query_params.get("msg", "")
    return render(c, request, "twophase.html", caller, branches=branches, audit=audit,
                  configured=c.in_doubt is not None, message=msg,
                  unreachable=unreachable)  # fmt: skip


async def resolve_action(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    gid = form.get("gid", "")
    target = target_of(gid)
    await c.acting(request, caller, RESOLVE, target, form.get("csrf"))
    await c.may_act(request, caller.actor, RESOLVE, target)
    params = params_of(gid, form.get("outcome", ""), form.get("force") == "1")
    if c.in_doubt is None:
        raise ValueError("this console was given no 2PC databases (--resource NAME=URL)")
    detail = await c.ops.perform(RESOLVE, target, form.get("reason", ""), params,
                                 actor=caller.actor, source=source_of(request))  # fmt: skip
    return RedirectResponse(f"/2pc?msg={quote(f'{gid}: {detail}')}", status_code=303)
