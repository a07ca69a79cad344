"""Participants: a service's command and event handlers.

A command handler returns its reply (or ``None`` for :class:`~sagakit.Done`)
and may raise :class:`~sagakit.BusinessError` to refuse. It runs in one local
transaction with its inbox row and outgoing messages (see :mod:`sagakit.inbox`
for the rules): a redelivered or duplicated command never applies its change
twice, copies never run at the same time, and every copy gets the stored reply.

Saga compensations pass the barrier: a compensation whose forward command
never took effect succeeds without running (null compensation), and the
forward command is refused if it arrives afterwards.

Side effects outside the database (an HTTP call to a payment provider) are
not covered by the local transaction: a crash between the call and the commit
runs the handler again. Pass :attr:`Context.idempotency_key` to such calls; it
is the same for every copy and every retry of one saga step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .endpoint import Route, Scope
from .errors import BusinessError, ConfigurationError, DuplicateRegistration, Refusal
from .inbox import SUCCESS, key_of
from .messages import Done, Envelope, caused_by, spec_of

if TYPE_CHECKING:
    from .store import Tx

M = TypeVar("M")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
CommandHandler = Callable[[Any, "Context"], Awaitable[Any]]
EventHandler = Callable[[Any, "Context"], Awaitable[None]]


class Context:
    """What a handler gets besides its message: the transaction and a way out."""

    __slots__ = ("_scope",)

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    @property
    def db(self) -> Tx:
        """The local transaction: business changes commit with the inbox and outbox."""
        return self._scope.tx

    @property
    def envelope(self) -> Envelope:
        return self._scope.env

    @property
    def saga_id(self) -> str | None:
        return self._scope.env.headers.saga_id

    @property
    def correlation_id(self) -> str | None:
        return self._scope.env.headers.correlation_id

    @property
    def attempt(self) -> int:
        return self._scope.env.headers.attempt

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every copy and retry of this step (or message).

        Give it to external calls (payment providers, e-mail APIs) so a run
        repeated after a crash does not repeat their effect.
        """
        return key_of(self._scope.env)

    @property
    def now(self) -> float:
        return self._scope.inbox.store.clock.now()

    def publish(self, event: Any) -> None:
        """Publish an event when this transaction commits."""
        scope = self._scope
        scope.out.publish(scope.codec.make(event, caused_by(scope.env)))

    def send(self, command: Any, to: str, *, reply_to: str | None = None) -> None:
        """Send a command to participant ``to`` when this transaction commits."""
        scope = self._scope
        headers = caused_by(scope.env, reply_to=reply_to, step=None, saga_id=None)
        scope.out.send(scope.codec.make(command, headers), to)


@dataclass(frozen=True, slots=True)
class _Registered:
    handler: Callable[[Any, Context], Awaitable[Any]]
    timeout: float | None


@dataclass
class Participant:
    """A named endpoint with handlers; its name is its queue."""

    name: str
    commands: dict[str, _Registered] = field(default_factory=dict)
    events: dict[str, _Registered] = field(default_factory=dict)
    types: list[type[Any]] = field(default_factory=list)

    def command(
        self, cls: type[M], *, timeout: float | None = None
    ) -> Callable[[Callable[[M, Context], Awaitable[R]]], Callable[[M, Context], Awaitable[R]]]:
        """Register the handler of command type ``cls``.

        ``timeout`` bounds one run of the handler (default:
        ``Settings.handler_timeout``); a run past it is cancelled and retried.
        """
        return self._register(cls, "command", self.commands, timeout)

    def event(
        self, cls: type[M], *, timeout: float | None = None
    ) -> Callable[[Callable[[M, Context], Awaitable[R]]], Callable[[M, Context], Awaitable[R]]]:
        """Register a handler of event type ``cls`` (this participant subscribes)."""
        return self._register(cls, "event", self.events, timeout)

    def _register(
        self, cls: type[Any], kind: str, table: dict[str, _Registered], timeout: float | None
    ) -> Callable[[F], F]:
        spec = spec_of(cls)
        if spec.kind != kind:
            raise ConfigurationError(f"{spec.name!r} is a {spec.kind}, not a {kind}")
        if spec.name in table:
            raise DuplicateRegistration(f"{self.name!r} already handles {spec.name!r}")

        def decorate(fn: F) -> F:
            table[spec.name] = _Registered(fn, timeout)
            self.types.append(cls)
            return fn

        return decorate

    def wrap(self, wrapper: Callable[[str, CommandHandler], CommandHandler]) -> None:
        """Wrap every command handler registered so far, e.g. for instrumentation.

        ``wrapper(type_name, handler)`` returns the handler to run instead (or
        the same one); each handler's timeout stays as registered.
        """
        for name, reg in list(self.commands.items()):
            self.commands[name] = _Registered(wrapper(name, reg.handler), reg.timeout)

    def route(self, env: Envelope) -> Route | None:
        """The hop route for ``env``, or None if this participant does not take it."""
        if env.kind == "command" and env.type in self.commands:
            return Route(self._run_command, self.commands[env.type].timeout)
        if env.kind == "event" and env.type in self.events:
            return Route(self._run_event, self.events[env.type].timeout)
        return None

    async def _run_event(self, scope: Scope) -> None:
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        payload: Any = scope.codec.payload(env)
        await self.events[env.type].handler(payload, Context(scope))
        await scope.inbox.record(scope.tx, env, SUCCESS, None)

    async def _run_command(self, scope: Scope) -> None:
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        payload: Any = scope.codec.payload(env)
        compensating = env.headers.phase == "compensate"
        if compensating and not await scope.inbox.forward_took_effect(scope.tx, env):
            return await scope.answer(Done(), SUCCESS)  # null compensation
        try:
            result = await self.commands[env.type].handler(payload, Context(scope))
        except BusinessError as exc:
            # Roll the whole transaction back (no savepoint on the happy path);
            # the endpoint records the refusal in a fresh one.
            raise Refusal(exc) from exc
        await scope.answer(Done() if result is None else result, SUCCESS)


__all__ = ["Context", "Participant"]
