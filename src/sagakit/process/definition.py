"""Declaring a process manager: its state, its key, and its handlers.

::

    checkout = ProcessManager("checkout", Checkout, key=lambda m: m.order_id)

    @checkout.starts(CheckoutStarted, to="awaiting_payment")
    def started(e: CheckoutStarted) -> Decision:
        return decide(Checkout(e.order_id, e.total)).send("payments", Charge(...)).after("pay", 900)

    @checkout.replied(Charge, when="awaiting_payment", to=("paid", "retrying"))
    def charged(r: Replied, s: Checkout) -> Decision: ...

    @checkout.timer("pay", when="awaiting_payment", to="cancelled")
    def too_slow(t: TimerFired, s: Checkout) -> Decision: ...

The *status* of an instance is one field of its state (``status`` unless
told otherwise); ``when=`` guards a handler by it and ``to=`` lists where the
handler may move it, so the definition is an explicit state machine that can
be checked (:mod:`.check`) and drawn (:mod:`.diagram`). A message with no
instance to go to follows its policy (:class:`Hold` by default, :class:`Ignore`,
or a starting handler): it is never dropped silently.

A :class:`StatelessSaga` is the same API with no state: every handler maps a
message to commands and events.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ..errors import DefinitionError, DuplicateRegistration
from ..messages import Failure, spec_of
from ..saga.coordinator import SagaEnded as SagaEnded
from .decision import Decision

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Decision])
HandlerKind = Literal["start", "message", "reply", "timer"]
Key = Callable[[Any], str]


@dataclass(frozen=True, slots=True)
class Ignore:
    """Policy for a message with no instance: record it in the history and drop it."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Policy for a message with no instance: try again every ``every`` seconds
    for ``seconds`` (its instance may be about to start), then dead-letter it."""

    seconds: float = 60.0
    every: float = 2.0

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.every <= 0:
            raise DefinitionError(f"Hold needs seconds >= 0 and every > 0, got {self}")


MissingPolicy = Ignore | Hold


@dataclass(frozen=True, slots=True)
class TimerFired:
    """What a timer handler receives: which timer, when it was started and due."""

    name: str
    started_at: float
    due_at: float


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to a command the process manager sent: success or failure."""

    command: str
    ok: bool
    value: Any

    @property
    def failure(self) -> Failure | None:
        return self.value if isinstance(self.value, Failure) else None


@dataclass(frozen=True, slots=True)
class Handler:
    """One registered reaction; ``trigger`` is a message type, command type or timer name."""

    kind: HandlerKind
    trigger: str
    fn: Callable[..., Decision]
    when: frozenset[str] | None = None
    to: frozenset[str] | None = None
    missing: MissingPolicy | None = None

    def matches(self, status: str | None) -> bool:
        return self.when is None or status in self.when


def _names(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


class ProcessManager(Generic[S]):
    """A named, versioned state machine that reacts to messages and timers."""

    def __init__(
        self,
        name: str,
        state: type[S] | None,
        *,
        key: Key | None = None,
        version: int = 1,
        status: str = "status",
        states: Iterable[str] | None = None,
        final: Iterable[str] = (),
        missing: MissingPolicy | None = None,
        upgrade: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise DefinitionError(f"process manager name {name!r}: letters, digits, - _ . only")
        self.name, self.state_type, self.version = name, state, version
        self.key, self.status_field, self.upgrade = key, status, upgrade
        self.missing: MissingPolicy = missing or Hold()
        self.final = frozenset(final)
        declared = list(states) if states is not None else _literal_states(state, status)
        self.states: tuple[str, ...] = tuple(dict.fromkeys([*declared, *self.final]))
        self.handlers: dict[tuple[HandlerKind, str], list[Handler]] = {}
        self.keys: dict[str, Key] = {}
        self.types: dict[str, type[Any]] = {}

    @property
    def stateless(self) -> bool:
        return self.state_type is None

    @property
    def queue(self) -> str:
        """The queue its messages and replies arrive on."""
        return f"sagakit.process.{self.name}"

    # -- registration ---------------------------------------------------------

    def starts(
        self, cls: type[Any], *, to: str | Iterable[str] | None = None, key: Key | None = None
    ) -> Callable[[F], F]:
        """The handler ``fn(message) -> Decision`` that creates an instance."""
        if self.stateless:
            raise DefinitionError(f"{self.name}: a stateless saga has no instances to start")
        return self._add("start", cls, None, to, key, None)

    def on(
        self,
        cls: type[Any],
        *,
        when: str | Iterable[str] | None = None,
        to: str | Iterable[str] | None = None,
        key: Key | None = None,
        missing: MissingPolicy | None = None,
    ) -> Callable[[F], F]:
        """The handler ``fn(message, state) -> Decision`` (``fn(message)`` when stateless)."""
        return self._add("message", cls, when, to, key, missing)

    def replied(
        self,
        command: type[Any],
        *,
        returns: type[Any] | None = None,
        when: str | Iterable[str] | None = None,
        to: str | Iterable[str] | None = None,
    ) -> Callable[[F], F]:
        """The handler ``fn(replied, state) -> Decision`` for replies to ``command``.

        ``returns`` names the success reply's type, so ``replied.value`` is
        decoded into it in every process (without it, a reply type this
        process has not met arrives as plain JSON: dicts and lists).
        """
        if returns is not None:
            self.types[spec_of(returns).name] = returns
        return self._add("reply", command, when, to, None, None)

    def timer(
        self,
        name: str,
        *,
        when: str | Iterable[str] | None = None,
        to: str | Iterable[str] | None = None,
    ) -> Callable[[F], F]:
        """The handler ``fn(timer_fired, state) -> Decision`` of the timer ``name``."""
        if self.stateless:
            raise DefinitionError(f"{self.name}: a stateless saga has no timers")
        return self._register(Handler("timer", name, _unset, _names(when), _names(to)))

    def correlate(self, cls: type[Any], key: Key) -> None:
        """Map messages of ``cls`` to an instance key (instead of the default ``key``)."""
        self.keys[spec_of(cls).name] = key
        self.types[spec_of(cls).name] = cls

    def _add(
        self,
        kind: HandlerKind,
        cls: type[Any],
        when: str | Iterable[str] | None,
        to: str | Iterable[str] | None,
        key: Key | None,
        missing: MissingPolicy | None,
    ) -> Callable[[F], F]:
        spec = spec_of(cls)
        self.types[spec.name] = cls
        if key is not None:
            self.keys[spec.name] = key
        handler = Handler(kind, spec.name, _unset, _names(when), _names(to), missing)
        return self._register(handler)

    def _register(self, handler: Handler) -> Callable[[F], F]:
        self._check_states(handler)
        slot = self.handlers.setdefault((handler.kind, handler.trigger), [])
        for other in slot:
            if other.when is None or handler.when is None or other.when & handler.when:
                raise DuplicateRegistration(
                    f"{self.name}: two {handler.kind} handlers of {handler.trigger!r} "
                    "for the same state"
                )

        def decorate(fn: F) -> F:
            slot.append(dataclasses.replace(handler, fn=fn))
            return fn

        return decorate

    def _check_states(self, h: Handler) -> None:
        if self.stateless and (h.when or h.to):
            raise DefinitionError(f"{self.name}: a stateless saga has no states (when=/to=)")
        unknown = ((h.when or frozenset()) | (h.to or frozenset())) - set(self.states)
        if self.states and unknown:
            raise DefinitionError(
                f"{self.name}: {h.kind} handler of {h.trigger!r} names undeclared "
                f"state(s) {sorted(unknown)}; declared: {list(self.states)}"
            )

    # -- lookup -------------------------------------------------------------------

    def handler(self, kind: HandlerKind, trigger: str, status: str | None) -> Handler | None:
        """The handler of ``trigger`` for an instance in ``status`` (None: none applies)."""
        for h in self.handlers.get((kind, trigger), ()):
            if h.matches(status):
                return h
        return None

    def key_of(self, type_name: str, payload: Any) -> str | None:
        """The instance key a message maps to, or None without a mapping."""
        fn = self.keys.get(type_name, self.key)
        return None if fn is None else str(fn(payload))

    def policy(self, type_name: str) -> MissingPolicy:
        """What happens to a ``type_name`` message that finds no instance."""
        for h in self.handlers.get(("message", type_name), ()):
            if h.missing is not None:
                return h.missing
        return self.missing

    def status_of(self, state: Any) -> str | None:
        value = getattr(state, self.status_field, None)
        return None if value is None else str(value)

    def subscribed(self) -> list[str]:
        """The event types it listens to (starting or reacting)."""
        return sorted(
            t
            for (kind, t) in self.handlers
            if kind in ("start", "message") and spec_of(self.types[t]).kind == "event"
        )


class StatelessSaga(ProcessManager[None]):
    """Reactions only: each handler maps a message to commands and events, with no state."""

    def __init__(self, name: str) -> None:
        super().__init__(name, None, missing=Ignore())


def _unset(*args: Any) -> Decision:  # replaced by the decorated function
    raise AssertionError("handler not decorated")


def _literal_states(state: type[Any] | None, field: str) -> list[str]:
    """The states named by a ``Literal[...]`` annotation of the status field, if any."""
    if state is None:
        return []
    try:
        hint = typing.get_type_hints(state).get(field)
    except (NameError, TypeError):
        return []
    if typing.get_origin(hint) is Literal:
        return [str(a) for a in typing.get_args(hint)]
    return []
