"""The dashboard's pages, rendered on the server; a small script refreshes them live."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import jinja2
import msgspec
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ...errors import SagaNotFound, Unauthenticated
from ...ops.dead_letters import DeadLetterFilter
from ...saga.state import SagaState, progress_decoder
from ..actions import ActionRequest
from ..admissible import SAGA_ACTIONS, refusal
from ..audit import AuditFilter
from ..dead_letters import action_name, letter_json, seq_of, target_of
from ..query import STATES, detail, select, summary
from .api import limit_of, query_of
from .auth import COOKIE, LOGIN_COOKIE, Caller, csrf_ok
from .body import form_body
from .console import ANONYMOUS, Console, source_of
from .health import health

if TYPE_CHECKING:
    from starlette.requests import Request

    from ...store import SagaRecord

HERE = Path(__file__).parent
ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
ENV.filters["ago"] = lambda t: _ago(time.time() - t) if t else "-"
ENV.filters["short"] = lambda s: (s or "")[:12]
ENV.filters["q"] = lambda s: quote(str(s), safe="")
ENV.filters["due"] = lambda t: _due(t - time.time())
ACTION_WAIT = 5.0  #: seconds a form waits for its command's outcome before redirecting


def _due(seconds: float) -> str:
    return "in " + _ago(seconds).removesuffix(" ago") if seconds > 0 else _ago(-seconds)


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(0.0, seconds):.0f}s ago"


def render(
    c: Console, request: Request, name: str, caller: Caller | None, code: int = 200, **ctx: Any
) -> HTMLResponse:
    html = ENV.get_template(name).render(
        caller=caller.actor if caller else None,
        csrf=caller.csrf if caller else "",
        refresh=c.options.refresh,
        read_only=c.options.read_only,
        path=request.url.path,
        **ctx,
    )
    return HTMLResponse(html, status_code=code)


def error_page(c: Console, request: Request, status: int, message: str) -> Response:
    return render(c, request, "error.html", None, status, status=status, message=message)


async def home(c: Console, request: Request) -> Response:
    return RedirectResponse("/sagas", status_code=303)


async def login_form(c: Console, request: Request, error: str = "", status: int = 200) -> Response:
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    page = render(c, request, "login.html", None, status, login_csrf=nonce, error=error)
    page.set_cookie(
        LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=c.options.secure_cookie
    )
    return page


async def login(c: Console, request: Request) -> Response:
    form = await form_body(request, c.options.max_body)
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE) or "-", form.get("csrf")):
        return await login_form(c, request, "the login form expired: try again", 403)
    token = form.get("token", "").strip()
    try:
        await c.tokens.verify(token)
    except Unauthenticated as exc:
        line = c.ops.audit.line(
            ANONYMOUS, "login", "session", "", "denied", source_of(request), str(exc)
        )
        await c.ops.audit.append(line)
        return await login_form(c, request, str(exc), 401)
    page = RedirectResponse("/sagas", status_code=303)
    page.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=c.options.secure_cookie)
    return page


async def logout(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    await c.acting(request, caller, "logout", "session", form.get("csrf"))
    page = RedirectResponse("/login", status_code=303)
    page.delete_cookie(COOKIE)
    return page


async def saga_list(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    q = query_of(request.query_params)
    recs = await select(c.store, q)
    counts = await c.store.saga_counts(type=q.type)
    return render(
        c,
        request,
        "sagas.html",
        caller,
        sagas=[summary(r) for r in recs],
        counts=counts,
        total=sum(counts.values()),
        q=q,
        states=STATES,
        actions=SAGA_ACTIONS,
        query_string=urlencode(q.as_dict()),
    )


async def saga_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    saga_id = request.path_params["saga_id"]
    rec = await c.store.saga_get(saga_id)
    if rec is None:
        raise SagaNotFound(f"no saga {saga_id!r}", saga_id=saga_id)
    saga = detail(rec, await c.store.history(saga_id))
    return render(
        c,
        request,
        "saga.html",
        caller,
        saga=saga,
        diagram=diagram(c, rec, saga),
        fits={
            a: refusal(a, SagaState(rec.state), progress_decoder.decode(rec.progress))
            for a in SAGA_ACTIONS
        },
        audit=await c.ops.audit.list(AuditFilter(target=saga_id, limit=50)),
        message=request.query_params.get("msg", ""),
    )


def diagram(c: Console, rec: SagaRecord, saga: dict[str, Any]) -> list[dict[str, Any]]:
    """The definition's steps in order, each with where this instance stands on it."""
    defn = c.definitions.get((rec.type, rec.version))
    if defn is not None:
        steps = [(s.name, s.kind == "pivot") for s in defn.steps]
    else:  # without the definitions: the steps the history names, in order
        seen = dict.fromkeys(e["step"] for e in saga["timeline"] if e["step"])
        steps = [(name, False) for name in seen]
    return [{"name": n, "pivot": p, "status": _status(n, saga)} for n, p in steps]


def _status(step: str, saga: dict[str, Any]) -> str:
    if step == saga["stuck_step"]:
        return "stuck"
    if step in saga["compensated"]:
        return "compensated"
    if step in saga["pending"]:
        return "compensating" if saga["pending"][step]["phase"] == "compensate" else "in-flight"
    return "done" if step in saga["done"] else "not-yet"


async def saga_action(c: Console, request: Request) -> Response:
    saga_id, action = request.path_params["saga_id"], request.path_params["action"]
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    await c.acting(request, caller, action, saga_id, form.get("csrf"))
    await c.may_act(request, caller.actor, action, saga_id)
    patch = _patch(form.get("patch", ""))
    req = ActionRequest(action, form.get("reason", ""), form.get("step") or None, patch)
    sub = await c.ops.submit(saga_id, req, actor=caller.actor, source=source_of(request))
    line = await c.ops.outcome(sub.command_id, saga_id, timeout=ACTION_WAIT)
    msg = (
        f"{action}: {line.outcome}" if line else f"{action}: queued (no coordinator has run it yet)"
    )
    if line is not None and line.detail and line.outcome == "failed":
        msg += f" — {line.detail}"
    return RedirectResponse(f"/sagas/{quote(saga_id, safe='')}?msg={quote(msg)}", status_code=303)


def _patch(text: str) -> list[dict[str, Any]] | None:
    if not text.strip():
        return None
    try:
        patch = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ValueError(f"the patch is not JSON: {exc}") from None
    if not isinstance(patch, list):
        raise ValueError("a patch is a JSON list of operations")
    return patch


async def bulk(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    action = form.get("action", "")
    await c.acting(request, caller, f"bulk-{action}", "query", form.get("csrf"))
    await c.may_act(request, caller.actor, f"bulk-{action}", "query")
    q = query_of(form, limit=1000)
    dry_run = form.get("dry_run", "1") == "1"
    req = ActionRequest(action, form.get("reason", ""))
    plan = await c.ops.bulk(q, req, actor=caller.actor, source=source_of(request), dry_run=dry_run)
    return render(
        c, request, "bulk.html", caller, plan=plan, q=q, reason=req.reason, query=q.as_dict()
    )


async def dead_letter_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    letters = await c.store.dead_letters(limit_of(request.query_params))
    return render(
        c,
        request,
        "dead_letters.html",
        caller,
        letters=[letter_json(d) for d in letters],
        message=request.query_params.get("msg", ""),
    )


async def dead_letter_action(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    action = action_name(form.get("action", ""))
    seq = seq_of(form.get("seq", ""))
    target = target_of(seq)
    await c.acting(request, caller, action, target, form.get("csrf"))
    await c.may_act(request, caller.actor, action, target)
    sub = await c.dead_letters.submit(
        seq, action, form.get("reason", ""), actor=caller.actor, source=source_of(request)
    )
    line = await c.ops.outcome(sub.command_id, target, timeout=ACTION_WAIT)
    msg = f"{action} #{seq}: " + (line.outcome if line else "queued (no coordinator ran it yet)")
    if line is not None and line.detail and line.outcome == "failed":
        msg += f" — {line.detail}"
    return RedirectResponse(f"/dead-letters?msg={quote(msg)}", status_code=303)


async def dead_letter_bulk(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    form = await form_body(request, c.options.max_body)
    verb = form.get("action", "")
    action = action_name(verb)
    await c.acting(request, caller, f"bulk-{action}", "dead-letters", form.get("csrf"))
    await c.may_act(request, caller.actor, f"bulk-{action}", "dead-letters")
    which = DeadLetterFilter(
        queue=form.get("queue") or None,
        error_type=form.get("error_type") or None,
        saga_id=form.get("saga_id") or None,
        limit=1000,
    )
    reason, dry_run = form.get("reason", ""), form.get("dry_run", "1") == "1"
    plan = await c.dead_letters.bulk(
        which, action, reason, actor=caller.actor, source=source_of(request), dry_run=dry_run
    )
    given = {"queue": which.queue, "error_type": which.error_type, "saga_id": which.saga_id}
    filt = {k: v for k, v in given.items() if v}
    return render(
        c,
        request,
        "dead_letters_bulk.html",
        caller,
        plan=plan,
        verb=verb,
        reason=reason,
        filter=filt,
    )


async def audit_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    p = request.query_params
    f = AuditFilter(
        actor=p.get("actor") or None,
        action=p.get("action") or None,
        target=p.get("target") or None,
        outcome=p.get("outcome") or None,
        limit=limit_of(p),
    )
    return render(c, request, "audit.html", caller, lines=await c.ops.audit.list(f), f=f)


async def health_page(c: Console, request: Request) -> Response:
    caller = await c.auth.caller(request)
    return render(c, request, "health.html", caller, h=await health(c.store))


async def script(c: Console, request: Request) -> Response:
    return Response((HERE / "static" / "console.js").read_text(), media_type="text/javascript")


async def style(c: Console, request: Request) -> Response:
    return Response((HERE / "static" / "console.css").read_text(), media_type="text/css")
