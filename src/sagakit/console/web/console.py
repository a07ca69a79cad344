"""What every handler of the web console shares: the store, the action model, auth."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...choreography.queries import Flows
from ...ops import Actor
from ..actions import Operations
from ..dead_letters import DeadLetterOperations
from ..timers import TimerActions
from ..tokens import Tokens
from ..twophase import TwoPhaseActions
from .auth import Authenticator, Caller, csrf_ok
from .options import ConsoleOptions

if TYPE_CHECKING:
    from starlette.requests import Request

    from ...saga.definition import SagaDefinition
    from ...store import Store
    from ...twophase import TwoPhase

ANONYMOUS = Actor("anonymous", role="viewer", via="http")


@dataclass
class Console:
    """One console over one store."""

    store: Store
    options: ConsoleOptions = field(default_factory=ConsoleOptions)
    #: the saga definitions, when known (``--app``): the diagram and the pivot
    definitions: dict[tuple[str, int], SagaDefinition[Any]] = field(default_factory=dict)
    #: the databases of two-phase commit (started), to list and resolve branches in doubt
    twophase: TwoPhase | None = None

    def __post_init__(self) -> None:
        self.ops = Operations(self.store, read_only=self.options.read_only)
        self.dead_letters = DeadLetterOperations(self.ops)
        self.flows = Flows(self.store)
        #: the ``/metrics`` registry, built on the first scrape
        self.metrics: Any = None
        TimerActions(self.store).register(self.ops)
        self.in_doubt = TwoPhaseActions(self.twophase) if self.twophase else None
        if self.in_doubt is not None:
            self.in_doubt.register(self.ops)
        self.tokens = Tokens(self.store)
        self.auth = Authenticator(self.tokens, self.options, secrets.token_bytes(32))

    async def acting(
        self, request: Request, caller: Caller, action: str, target: str, given: str | None
    ) -> None:
        """Refuse (and audit) a state-changing request without its CSRF token."""
        if not csrf_ok(caller.csrf, given):
            source = source_of(request)
            await self.ops.deny(
                caller.actor, action, target, "", "CSRF token missing or wrong", source
            )

    async def may_act(self, request: Request, actor: Actor, action: str, target: str) -> None:
        """Refuse (and audit) a viewer's or a read-only console's action before reading a body."""
        if not actor.may_act():
            await self.ops.deny(
                actor, action, target, "", f"role {actor.role} may not act", source_of(request)
            )
        if self.options.read_only:
            await self.ops.deny(
                actor, action, target, "", "the console is read-only", source_of(request)
            )

    async def admin(self, request: Request, actor: Actor, action: str, target: str) -> None:
        if actor.role != "admin":
            await self.ops.deny(
                actor, action, target, "", "only an admin may manage tokens", source_of(request)
            )


def source_of(request: Request) -> str | None:
    return request.client.host if request.client else None
