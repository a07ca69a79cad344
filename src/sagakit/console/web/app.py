"""The Starlette application: routes, error mapping, security headers, the store's lifetime."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ...errors import (
    AmbiguousOutcome,
    BranchNotFound,
    ConfigurationError,
    ConsoleError,
    DeadLetterNotFound,
    FlowNotFound,
    InvalidOperatorAction,
    NotReplayable,
    SagakitError,
    SagaNotFound,
    StoreError,
    Unauthenticated,
)
from . import api, api_flows, metrics, pages, pages_flows
from .console import ANONYMOUS, Console, source_of
from .options import ConsoleOptions

if TYPE_CHECKING:
    from ...saga.definition import SagaDefinition
    from ...store import Store
    from ...twophase import TwoPhase

log = logging.getLogger("sagakit.console")

Handler = Callable[[Console, Request], Awaitable[Response]]
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(
    store: Store,
    options: ConsoleOptions | None = None,
    *,
    definitions: dict[tuple[str, int], SagaDefinition[Any]] | None = None,
    manage_store: bool = False,
    twophase: TwoPhase | None = None,
) -> Starlette:
    """The console over ``store``; with ``manage_store`` it opens and closes the store
    (and starts and stops ``twophase``, the databases of two-phase commit)."""
    c = Console(store, options or ConsoleOptions(), definitions or {}, twophase)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_store:
            await store.open(migrate=False)
            if c.in_doubt is not None:  # a database that is down does not stop the console
                await c.in_doubt.open()
        try:
            yield
        finally:
            if manage_store:
                if twophase is not None:
                    await twophase.stop()
                await store.close()

    return Starlette(routes=_routes(c), lifespan=lifespan)


def _routes(c: Console) -> list[Route]:
    def r(path: str, fn: Handler, methods: tuple[str, ...] = ("GET",), html: bool = False) -> Route:
        return Route(path, _bind(c, fn, html), methods=list(methods))

    return [
        r("/api/sagas", api.list_sagas),
        r("/api/sagas/{saga_id}", api.get_saga),
        r("/api/sagas/{saga_id}/{action}", api.act, ("POST",)),
        r("/api/bulk/{action}", api.bulk, ("POST",)),
        r("/api/audit", api.audit_list),
        r("/api/dead-letters", api.dead_letters),
        r("/api/dead-letters/bulk/{action}", api.dead_letter_bulk, ("POST",)),
        r("/api/dead-letters/{seq:int}/{action}", api.dead_letter_act, ("POST",)),
        r("/api/flows", api_flows.list_flows),
        r("/api/flows/{correlation_id}", api_flows.get_flow),
        r("/api/processes", api_flows.list_processes),
        r("/api/processes/{process}/{key}", api_flows.get_process),
        r("/api/processes/{process}/{key}/timers/{timer}/{action}", api_flows.timer_act, ("POST",)),
        r("/api/timers/bulk/{action}", api_flows.timer_bulk, ("POST",)),
        r("/api/2pc", api_flows.list_in_doubt),
        r("/api/2pc/{gid}/resolve", api_flows.resolve, ("POST",)),
        r("/api/health", api.get_health),
        r("/api/tokens", api.tokens_list),
        r("/api/tokens", api.token_create, ("POST",)),
        r("/api/tokens/{token_id}", api.token_revoke, ("DELETE",)),
        r("/api/openapi.json", api.openapi),
        r("/metrics", metrics.metrics),
        r("/", pages.home, html=True),
        r("/login", pages.login_form, html=True),
        r("/login", pages.login, ("POST",), html=True),
        r("/logout", pages.logout, ("POST",), html=True),
        r("/sagas", pages.saga_list, html=True),
        r("/sagas/{saga_id}", pages.saga_page, html=True),
        r("/sagas/{saga_id}/{action}", pages.saga_action, ("POST",), html=True),
        r("/bulk", pages.bulk, ("POST",), html=True),
        r("/dead-letters", pages.dead_letter_page, html=True),
        r("/dead-letters/act", pages.dead_letter_action, ("POST",), html=True),
        r("/dead-letters/bulk", pages.dead_letter_bulk, ("POST",), html=True),
        r("/flows", pages_flows.flow_list, html=True),
        r("/flows/{correlation_id}", pages_flows.flow_page, html=True),
        r("/processes", pages_flows.process_list, html=True),
        r("/processes/bulk", pages_flows.timer_bulk, ("POST",), html=True),
        r("/processes/{process}/{key}", pages_flows.process_page, html=True),
        r(
            "/processes/{process}/{key}/timers/{timer}",
            pages_flows.timer_action,
            ("POST",),
            html=True,
        ),
        r("/2pc", pages_flows.in_doubt_page, html=True),
        r("/2pc/resolve", pages_flows.resolve_action, ("POST",), html=True),
        r("/audit", pages.audit_page, html=True),
        r("/health", pages.health_page, html=True),
        r("/static/console.js", pages.script),
        r("/static/console.css", pages.style),
    ]


def _bind(c: Console, fn: Handler, html: bool) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            response = await fn(c, request)
        except Exception as exc:
            if isinstance(exc, Unauthenticated) and request.method != "GET":
                await _deny_anonymous(c, request, str(exc))
            response = _error(c, request, exc, html)
        response.headers.update(HEADERS)
        return response

    return endpoint


async def _deny_anonymous(c: Console, request: Request, why: str) -> None:
    """Audit a state-changing request nobody could be identified for."""
    params = request.path_params
    action = params.get("action", request.url.path)
    target = params.get("saga_id", params.get("token_id", request.url.path))
    if request.url.path.startswith("/api/dead-letters/"):
        action = f"dead-letters.{action}"
        target = f"dead-letter:{params['seq']}" if "seq" in params else "dead-letters"
    line = c.ops.audit.line(ANONYMOUS, action, target, "", "denied", source_of(request), why)
    await c.ops.audit.append(line)


def _error(c: Console, request: Request, exc: Exception, html: bool) -> Response:
    status = status_of(exc)
    if status == 500:
        log.exception("console: %s %s failed", request.method, request.url.path)
    if html and isinstance(exc, Unauthenticated):
        return RedirectResponse("/login", status_code=303)
    if html:
        return pages.error_page(c, request, status, str(exc))
    body = {"error": str(exc) if status != 500 else "internal error", "type": type(exc).__name__}
    return JSONResponse(body, status_code=status)


def status_of(exc: Exception) -> int:
    """The HTTP status of an exception a handler raised."""
    if isinstance(exc, ConsoleError):
        return exc.status
    if isinstance(exc, SagaNotFound | DeadLetterNotFound | BranchNotFound | FlowNotFound):
        return 404
    if isinstance(exc, AmbiguousOutcome):
        return 409
    if isinstance(exc, NotReplayable):
        return 409
    if isinstance(exc, InvalidOperatorAction):
        return 409
    if isinstance(exc, StoreError):
        return 503
    if isinstance(exc, ConfigurationError):  # a bad role or name in a request
        return 422
    if isinstance(exc, ValueError) and not isinstance(exc, SagakitError):
        return 422
    return 500
