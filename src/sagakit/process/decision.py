"""What a process-manager handler returns: a decision, pure data.

A handler never sends, sleeps or writes; it describes what should happen and
the runtime does all of it in one transaction::

    return (
        evolve(s, status="awaiting_stock")
        .cancel("pay-timeout")
        .send("inventory", ReserveStock(s.order_id))
    )

Every builder method returns a new :class:`Decision`, so a decision can be
built up step by step and shared without surprises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgspec


@dataclass(frozen=True, slots=True)
class Send:
    """A command for participant ``to``; its reply comes back to the process manager."""

    to: str
    command: Any
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Timer:
    """Start (or restart) the named timer: it fires after ``seconds``."""

    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class StartSaga:
    """Start an orchestrated saga; its outcome comes back as a :class:`SagaEnded`."""

    saga: Any  # a SagaDefinition
    data: Any
    saga_id: str


@dataclass(frozen=True, slots=True)
class Decision:
    """New state, commands, events, timers to start or cancel, and whether it is complete.

    ``changed`` is False when the handler kept the state it was given
    (:func:`react`); a stateless saga's decisions never change state.
    """

    state: Any = None
    changed: bool = False
    sends: tuple[Send, ...] = ()
    events: tuple[Any, ...] = ()
    timers: tuple[Timer, ...] = ()
    cancels: tuple[str, ...] = ()
    sagas: tuple[StartSaga, ...] = ()
    completed: bool = False
    note: str | None = field(default=None)

    def send(self, to: str, command: Any, *, attempt: int = 1) -> Decision:
        """Also send ``command`` to participant ``to`` (``attempt``: its header, for a resend)."""
        return dataclasses.replace(self, sends=(*self.sends, Send(to, command, attempt)))

    def publish(self, event: Any) -> Decision:
        """Also publish ``event``."""
        return dataclasses.replace(self, events=(*self.events, event))

    def after(self, name: str, seconds: float) -> Decision:
        """Start the timer ``name``; one already running under that name is replaced."""
        if seconds < 0:
            raise ValueError(f"timer {name!r}: seconds must be >= 0, got {seconds}")
        kept = tuple(t for t in self.timers if t.name != name)
        return dataclasses.replace(self, timers=(*kept, Timer(name, float(seconds))))

    def cancel(self, name: str) -> Decision:
        """Cancel the timer ``name`` (a no-op if it is not running)."""
        kept = tuple(t for t in self.timers if t.name != name)
        return dataclasses.replace(self, timers=kept, cancels=(*self.cancels, name))

    def start_saga(self, saga: Any, data: Any, *, saga_id: str) -> Decision:
        """Start an orchestrated saga with a deterministic ``saga_id``."""
        return dataclasses.replace(self, sagas=(*self.sagas, StartSaga(saga, data, saga_id)))

    def complete(self, **changes: Any) -> Decision:
        """Finish the instance (after applying ``changes`` to the state): later
        messages are recorded and ignored, running timers never fire."""
        d = self if not changes else _with_state(self, _replace(self.state, changes))
        return dataclasses.replace(d, completed=True)

    def noted(self, note: str) -> Decision:
        """Attach a line for the decision history (why this happened)."""
        return dataclasses.replace(self, note=note)


def decide(state: Any) -> Decision:
    """A decision whose new state is ``state``."""
    return Decision(state=state, changed=True)


def evolve(state: Any, **changes: Any) -> Decision:
    """A decision whose new state is ``state`` with ``changes`` (dataclass or Struct)."""
    return decide(_replace(state, changes))


def react() -> Decision:
    """A decision that keeps the state as it is (and for stateless sagas, the only kind)."""
    return Decision()


def _with_state(d: Decision, state: Any) -> Decision:
    return dataclasses.replace(d, state=state, changed=True)


def _replace(state: Any, changes: dict[str, Any]) -> Any:
    if state is None:
        raise ValueError("nothing to change: this decision has no state (use decide())")
    if isinstance(state, msgspec.Struct):
        return msgspec.structs.replace(state, **changes)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **changes)
    raise TypeError(f"state must be a dataclass or msgspec Struct, not {type(state).__name__}")
