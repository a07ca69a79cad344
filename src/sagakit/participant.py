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

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .endpoint import Route, Scope
from .errors import (
    BusinessError,
    ConfigurationError,
    DuplicateRegistration,
    MissingCorrelation,
    Refusal,
    UndeclaredEvent,
)
from .inbox import SUCCESS, Deferred, Inbox, key_of
from .messages import Done, Envelope, Headers, caused_by, encode_json, new_id, spec_of

if TYPE_CHECKING:
    from .outbox import OutboxWriter
    from .store import Store, Tx

M = TypeVar("M")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
CommandHandler = Callable[[Any, "Context"], Awaitable[Any]]
EventHandler = Callable[[Any, "Context"], Awaitable[None]]
#: builds the failure event an event handler publishes when it refuses
OnRefusal = Callable[[BusinessError, Any], Any]


class Context:
    """What a handler gets besides its message: the transaction and a way out."""

    __slots__ = ("_publishes", "_scope")

    def __init__(self, scope: Scope, publishes: frozenset[str] | None = None) -> None:
        self._scope = scope
        self._publishes = publishes

    def start_saga(self, definition: Any, data: Any, *, saga_id: str | None = None) -> str:
        """Start an orchestrated saga when this transaction commits; its id.

        The request goes to the coordinator through this handler's outbox, so
        the saga starts exactly once, with this message's correlation id (the
        saga id too, unless given: one id space for the business transaction).
        A choreography continues on the saga's ``on_completed`` /
        ``on_compensated`` events.
        """
        from .saga.coordinator import COORDINATOR_QUEUE, StartSaga

        scope = self._scope
        cid = scope.env.headers.correlation_id or scope.env.id
        saga_id = saga_id or cid
        raw = msgspec.Raw(encode_json(data))
        request = StartSaga(definition.name, definition.version, raw, saga_id, cid)
        headers = caused_by(scope.env, correlation_id=cid, saga_id=None, saga_type=None)
        scope.out.send(scope.codec.make(request, headers), COORDINATOR_QUEUE)
        return saga_id

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

    def publish(self, event: Any, *, new_conversation: bool = False) -> None:
        """Publish an event when this transaction commits.

        The event carries the handled message's correlation id (and this
        message as its cause); a command sent from outside without one begins
        the conversation, so its id becomes the correlation id. An *event*
        without one broke the chain upstream: publishing from its handler is
        refused with :class:`~sagakit.errors.MissingCorrelation` unless the
        handler begins a new business transaction on purpose
        (``new_conversation=True`` gives the event a correlation id of its own).
        """
        scope = self._scope
        name = spec_of(type(event)).name
        if self._publishes is not None and name not in self._publishes:
            raise UndeclaredEvent(f"the handler publishes {name!r} but did not declare it")
        if new_conversation:
            headers = caused_by(scope.env, correlation_id=new_id(), saga_id=None, saga_type=None)
        elif scope.env.headers.correlation_id is None and scope.env.kind == "event":
            raise MissingCorrelation(
                f"{name!r} would leave without a correlation id: the message being handled "
                "has none; pass new_conversation=True to begin a new one"
            )
        else:
            headers = caused_by(scope.env)
        scope.out.publish(scope.codec.make(event, headers))

    def send(self, command: Any, to: str, *, reply_to: str | None = None) -> None:
        """Send a command to participant ``to`` when this transaction commits."""
        scope = self._scope
        headers = caused_by(scope.env, reply_to=reply_to, step=None, saga_id=None)
        scope.out.send(scope.codec.make(command, headers), to)


@dataclass(frozen=True, slots=True)
class _Registered:
    handler: Callable[[Any, Context], Awaitable[Any]]
    timeout: float | None
    #: the event types it may publish (None: not declared, not checked)
    publishes: frozenset[str] | None = None
    on_refusal: OnRefusal | None = None
    #: every effect of the handler goes through ctx.db (see Participant.command)
    db_only: bool = False


@dataclass
class Participant:
    """A named endpoint with handlers; its name is its queue."""

    name: str
    commands: dict[str, _Registered] = field(default_factory=dict)
    events: dict[str, _Registered] = field(default_factory=dict)
    types: list[type[Any]] = field(default_factory=list)
    #: event type -> saga definitions its handler starts (declared)
    starts: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def command(
        self,
        cls: type[M],
        *,
        timeout: float | None = None,
        publishes: tuple[type[Any], ...] | None = None,
        db_only: bool = False,
    ) -> Callable[[Callable[[M, Context], Awaitable[R]]], Callable[[M, Context], Awaitable[R]]]:
        """Register the handler of command type ``cls``.

        ``timeout`` bounds one run of the handler (default:
        ``Settings.handler_timeout``); a run past it is cancelled and retried.
        ``publishes`` declares the event types it may publish (see :meth:`event`).

        ``db_only=True`` says every effect of the handler goes through
        ``ctx.db`` and ``ctx.publish``/``ctx.send`` (no HTTP call, e-mail or
        file). sagakit may then run the handler before checking the inbox,
        betting that it is the first copy (and, for a compensation, that its
        forward step took effect): on PostgreSQL the admission waits for the
        handler's first statement, and a handler that only uses
        ``ctx.db.later`` makes the whole hop one statement. A copy that loses
        the bet has its writes discarded (never applied) and is answered from
        the inbox; only its Python ran, so anything it did outside the
        database would have happened again. Where the coordinator runs in
        this process on this participant's store, a saga's first step with
        such a handler may run inside ``app.sagas.start``, in the caller's
        task; if it fails there, the start is made again with the command sent.
        """
        reg = _Registered(_unset, timeout, _names(publishes), db_only=db_only)
        return self._register(cls, "command", self.commands, reg)

    def event(
        self,
        cls: type[M],
        *,
        timeout: float | None = None,
        publishes: tuple[type[Any], ...] | None = None,
        on_refusal: OnRefusal | None = None,
        starts: tuple[Any, ...] = (),
    ) -> Callable[[Callable[[M, Context], Awaitable[R]]], Callable[[M, Context], Awaitable[R]]]:
        """Register a handler of event type ``cls`` (this participant subscribes).

        Its business change, its inbox row and the events it publishes commit
        in one local transaction. ``publishes`` declares which event types it
        may publish: publishing another raises, and ``sagakit check`` reads the
        declarations to lint choreographies. ``on_refusal(error, event)``
        turns a :class:`~sagakit.BusinessError` the handler raises into a
        failure event: the handler's changes are rolled back and the failure
        event is published with the inbox row in a fresh transaction. Without
        it a business error is a technical failure (retried, then dead-lettered).
        ``starts`` names the saga definitions it starts (``ctx.start_saga``), for
        ``sagakit check``, which counts their completion events as published.
        """
        declared = _names(publishes)
        self.starts[spec_of(cls).name] = tuple(starts)
        if on_refusal is not None and declared is None:
            raise ConfigurationError("on_refusal= needs publishes= naming its failure event")
        return self._register(
            cls, "event", self.events, _Registered(_unset, timeout, declared, on_refusal)
        )

    def _register(
        self, cls: type[Any], kind: str, table: dict[str, _Registered], reg: _Registered
    ) -> Callable[[F], F]:
        spec = spec_of(cls)
        if spec.kind != kind:
            raise ConfigurationError(f"{spec.name!r} is a {spec.kind}, not a {kind}")
        if spec.name in table:
            raise DuplicateRegistration(f"{self.name!r} already handles {spec.name!r}")

        def decorate(fn: F) -> F:
            table[spec.name] = replace(reg, handler=fn)
            self.types.append(cls)
            return fn

        return decorate

    def handlers(self) -> list[tuple[str, str, frozenset[str] | None]]:
        """(kind, type it handles, event types it declares publishing) per handler.

        The completion events of the sagas an event handler starts count as
        its own: they follow from it.
        """
        rows = [("command", n, r.publishes) for n, r in self.commands.items()]
        for n, r in self.events.items():
            announced = frozenset(name for d in self.starts.get(n, ()) for name in d.announces)
            if r.publishes is None and not announced:
                rows.append(("event", n, None))
            else:
                rows.append(("event", n, (r.publishes or frozenset()) | announced))
        return rows

    def wrap(self, wrapper: Callable[[str, CommandHandler], CommandHandler]) -> None:
        """Wrap every command handler registered so far, e.g. for instrumentation.

        ``wrapper(type_name, handler)`` returns the handler to run instead (or
        the same one); each handler's timeout stays as registered.
        """
        for name, reg in list(self.commands.items()):
            self.commands[name] = replace(reg, handler=wrapper(name, reg.handler))

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
        reg = self.events[env.type]
        try:
            await reg.handler(payload, Context(scope, reg.publishes))
        except BusinessError as exc:
            if reg.on_refusal is None:
                raise
            raise Refusal(exc, _publisher(reg, exc, payload)) from exc
        await scope.inbox.record(scope.tx, env, SUCCESS, None)

    def db_only(self, command_type: str) -> bool:
        """Whether the handler of ``command_type`` is registered ``db_only``."""
        reg = self.commands.get(command_type)
        return reg is not None and reg.db_only

    async def _run_command(self, scope: Scope) -> None:
        """Admit, run, answer; a ``db_only`` handler may run again, so its reply may
        be decided on in its own transaction (:attr:`Scope.fold`)."""
        env = scope.env
        db_only = self.commands[env.type].db_only
        if db_only and (bet := Deferred(scope)).placed():
            return await bet.answer(await self._call(scope), SUCCESS)  # admitted at BEGIN, if any
        if env.headers.phase == "compensate":  # admitted and past the barrier at once
            admission, took_effect = await scope.inbox.admit_compensation(scope.tx, env)
            if await scope.settled_elsewhere(admission):
                return
            result = await self._call(scope) if took_effect else Done()  # else null compensation
            return await scope.answer(result, SUCCESS, fold=db_only)
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        await scope.answer(await self._call(scope), SUCCESS, fold=db_only)

    async def _call(self, scope: Scope) -> Any:
        """The command's handler; its result, or :class:`Done` for None."""
        payload: Any = scope.codec.payload(scope.env)
        reg = self.commands[scope.env.type]
        try:
            result = await reg.handler(payload, Context(scope, reg.publishes))
        except BusinessError as exc:
            # Roll the whole transaction back (no savepoint on the happy path);
            # the endpoint records the refusal in a fresh one.
            raise Refusal(exc) from exc
        return Done() if result is None else result


@asynccontextmanager
async def conversation(
    store: Store, writer: OutboxWriter, participant: str, correlation_id: str
) -> AsyncIterator[Context]:
    """A participant's transaction outside any handler (see ``App.begin``).

    Its messages are caused by a stand-in origin message that carries the
    correlation id, so they propagate it like a handler's would.
    """
    headers = Headers(correlation_id=correlation_id, created_at=time.time())
    origin = Envelope(new_id(), "sagakit.Origin", "event", msgspec.Raw(b"null"), headers)
    async with store.transaction() as tx:
        scope = Scope(origin, tx, Inbox(store, participant), writer.codec)
        yield Context(scope)
        await writer.flush(tx, scope.out)


async def _unset(payload: Any, ctx: Context) -> None:  # replaced when decorating
    raise NotImplementedError


def _names(types: tuple[type[Any], ...] | None) -> frozenset[str] | None:
    return None if types is None else frozenset(spec_of(t).name for t in types)


def _publisher(reg: _Registered, exc: BusinessError, payload: Any) -> Callable[[Scope], None]:
    """Publish the handler's failure event on the scope of the fresh transaction."""

    def publish(scope: Scope) -> None:
        assert reg.on_refusal is not None
        Context(scope, reg.publishes).publish(reg.on_refusal(exc, payload))

    return publish


__all__ = ["Context", "Participant"]
