"""Who is asking: a bearer token, the session cookie, or a trusted proxy's header.

- ``Authorization: Bearer <token>`` (API clients): not sent by browsers on
  their own, so these requests need no CSRF token.
- The session cookie (the dashboard; set by the login form, HttpOnly,
  SameSite=Strict): every state-changing request must also carry the CSRF
  token — a form field ``csrf`` or the header ``X-CSRF-Token`` — derived from
  the session with a per-process secret.
- A trusted reverse proxy's header (only from an allow-listed address):
  treated like a session, CSRF included.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import InvalidOperatorAction, Unauthenticated
from ...ops import Actor

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..tokens import Tokens
    from .options import ConsoleOptions

COOKIE = "sagakit_session"
LOGIN_COOKIE = "sagakit_login"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: the actor, and what CSRF token it owes (None: none)."""

    actor: Actor
    csrf: str | None


class Authenticator:
    """Establishes the caller of each request."""

    def __init__(self, tokens: Tokens, options: ConsoleOptions, secret: bytes) -> None:
        self.tokens = tokens
        self.options = options
        self.secret = secret

    async def caller(self, request: Request) -> Caller:
        """The caller; :class:`Unauthenticated` if there is none."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("Authorization must be 'Bearer <token>'")
            return Caller(await self.tokens.verify(token, via="api"), None)
        proxied = self._proxied(request)
        if proxied is not None:
            return Caller(proxied, self.csrf_for(f"proxy:{proxied.id}"))
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return Caller(await self.tokens.verify(cookie, via="console"), self.csrf_for(cookie))
        raise Unauthenticated("log in, or send 'Authorization: Bearer <token>'")

    def _proxied(self, request: Request) -> Actor | None:
        o = self.options
        if not o.proxy_header or request.client is None:
            return None
        if request.client.host not in o.trusted_proxies:
            return None
        user = request.headers.get(o.proxy_header)
        if not user:
            return None
        role = request.headers.get(o.proxy_role_header, "viewer")
        try:
            return Actor(user, role=role, via="proxy")  # type: ignore[arg-type]
        except InvalidOperatorAction as exc:
            raise Unauthenticated(f"bad proxy identity: {exc}") from None

    def csrf_for(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()[:32]


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Whether a request carries the CSRF token its session owes (or owes none)."""
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected, given)
