"""Participants: a service's command and event handlers.

A command handler returns its reply (or ``None`` for :class:`~sagakit.Done`)
and may raise :class:`~sagakit.BusinessError` to refuse. It runs in one local
transaction with the inbox row and the outgoing messages, so a redelivered
command never applies its change twice: the stored reply is sent again.

Saga commands also pass a *barrier* keyed by (saga id, step, phase): a
compensation for a step whose command never took effect succeeds without
running (null compensation), and a command that arrives after its compensation
is refused without effect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .endpoint import RaceLost, Refusal, inbox_key
from .errors import BusinessError, ConfigurationError, DuplicateRegistration
from .messages import Done, Envelope, Failure, caused_by, spec_of
from .store.core import InboxRow

if TYPE_CHECKING:
    from .endpoint import Endpoint, Outbox
    from .store import Tx

T = TypeVar("T")
CommandHandler = Callable[[Any, "Context"], Awaitable[Any]]
EventHandler = Callable[[Any, "Context"], Awaitable[None]]

CANCELLED = "cancelled"


class Cancelled(BusinessError):
    """The command arrived after its compensation; it had no effect."""

    code = "sagakit.Cancelled"


@dataclass(slots=True)
class Context:
    """What a handler gets besides its message: the transaction and a way out."""

    db: Tx
    envelope: Envelope
    _endpoint: Endpoint
    _out: Outbox

    @property
    def saga_id(self) -> str | None:
        return self.envelope.headers.saga_id

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.headers.correlation_id

    @property
    def attempt(self) -> int:
        return self.envelope.headers.attempt

    @property
    def now(self) -> float:
        return self._endpoint.store.clock.now()

    def publish(self, event: Any) -> None:
        """Publish an event when this transaction commits."""
        self._out.publish(self._endpoint.codec.make(event, caused_by(self.envelope)))

    def send(self, command: Any, to: str, *, reply_to: str | None = None) -> None:
        """Send a command to participant ``to`` when this transaction commits."""
        headers = caused_by(self.envelope, reply_to=reply_to, step=None, saga_id=None)
        self._out.send(self._endpoint.codec.make(command, headers), to)


@dataclass
class Participant:
    """A named endpoint with handlers; its name is its queue."""

    name: str
    commands: dict[str, CommandHandler] = field(default_factory=dict)
    events: dict[str, EventHandler] = field(default_factory=dict)
    types: list[type[Any]] = field(default_factory=list)

    def command(self, cls: type[Any]) -> Callable[[CommandHandler], CommandHandler]:
        """Register the handler of command type ``cls``."""
        return self._register(cls, "command", self.commands)

    def event(self, cls: type[Any]) -> Callable[[EventHandler], EventHandler]:
        """Register a handler of event type ``cls`` (this participant subscribes)."""
        return self._register(cls, "event", self.events)

    def _register(self, cls: type[Any], kind: str, table: dict[str, Any]) -> Callable[[T], T]:
        spec = spec_of(cls)
        if spec.kind != kind:
            raise ConfigurationError(f"{spec.name!r} is a {spec.kind}, not a {kind}")
        if spec.name in table:
            raise DuplicateRegistration(f"{self.name!r} already handles {spec.name!r}")

        def decorate(fn: T) -> T:
            table[spec.name] = fn
            self.types.append(cls)
            return fn

        return decorate

    def route(self, env: Envelope) -> Callable[..., Awaitable[None]] | None:
        if env.kind == "command" and env.type in self.commands:
            return self._run_command
        if env.kind == "event" and env.type in self.events:
            return self._run_event
        return None

    async def _run_event(self, env: Envelope, tx: Tx, out: Outbox, ep: Endpoint) -> None:
        if not await ep.store.inbox_put(tx, ep.name, env.id, InboxRow("success", None, None, 1)):
            return
        payload: Any = ep.codec.payload(env)
        await self.events[env.type](payload, Context(tx, env, ep, out))

    async def _run_command(self, env: Envelope, tx: Tx, out: Outbox, ep: Endpoint) -> None:
        seen = await ep.store.inbox_get(tx, ep.name, inbox_key(env))
        if seen is not None and seen.outcome == CANCELLED:
            return _refuse(env, out, ep)
        if seen is not None and not _retry_of_failure(env, seen):
            return _resend(env, seen, out, ep)
        payload: Any = ep.codec.payload(env)
        compensating = env.headers.phase == "compensate"
        if compensating and await _null_compensation(env, tx, ep):
            return await _answer(env, Done(), "success", tx, out, ep)
        if not compensating and env.headers.saga_id and await _compensated_already(env, tx, ep):
            return _refuse(env, out, ep)
        try:
            result = await self.commands[env.type](payload, Context(tx, env, ep, out))
        except BusinessError as exc:
            # Roll the whole transaction back (no savepoint on the happy path);
            # the endpoint records the refusal in a fresh one.
            raise Refusal(exc) from exc
        await _answer(env, Done() if result is None else result, "success", tx, out, ep)


def _retry_of_failure(env: Envelope, seen: InboxRow) -> bool:
    return seen.outcome == "failure" and env.headers.attempt > seen.attempt


def _refuse(env: Envelope, out: Outbox, ep: Endpoint) -> None:
    """Answer a command that came after its compensation: failure, no effect."""
    if env.headers.reply_to:
        failure = Failure(Cancelled.code, "the step was already compensated")
        out.send(ep.make_reply(env, failure, outcome="failure"), env.headers.reply_to)


def _resend(env: Envelope, seen: InboxRow, out: Outbox, ep: Endpoint) -> None:
    """Answer a duplicate with the stored reply, re-addressed to this command."""
    if seen.reply is None or not env.headers.reply_to:
        return
    stored = ep.codec.decode(seen.reply)
    h = env.headers
    stored.headers = caused_by(
        env, step=h.step, phase=h.phase, outcome=stored.headers.outcome, attempt=h.attempt
    )
    out.send(stored, h.reply_to or "")


async def _answer(
    env: Envelope, payload: Any, outcome: str, tx: Tx, out: Outbox, ep: Endpoint
) -> None:
    reply_env = ep.make_reply(env, payload, outcome=outcome)
    await ep.remember(tx, env, outcome, reply_env)
    if env.headers.reply_to:
        out.send(reply_env, env.headers.reply_to)


def _sibling(env: Envelope, phase: str) -> str:
    h = env.headers
    return f"saga:{h.saga_id}:{h.step}:{phase}"


async def _null_compensation(env: Envelope, tx: Tx, ep: Endpoint) -> bool:
    """True if the forward command never took effect; bars it from now on."""
    fwd = await ep.store.inbox_get(tx, ep.name, _sibling(env, "forward"))
    if fwd is not None and fwd.outcome == "success":
        return False
    if fwd is None:
        row = InboxRow(CANCELLED, None, None, env.headers.attempt)
        if not await ep.store.inbox_put(tx, ep.name, _sibling(env, "forward"), row):
            raise RaceLost(
                "the forward command committed concurrently", saga_id=env.headers.saga_id
            )
    return True


async def _compensated_already(env: Envelope, tx: Tx, ep: Endpoint) -> bool:
    comp = await ep.store.inbox_get(tx, ep.name, _sibling(env, "compensate"))
    return comp is not None


__all__ = ["Cancelled", "Context", "Failure", "Participant"]
