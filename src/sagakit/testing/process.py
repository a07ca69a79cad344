"""Given/when/then for process managers: the real machine, a fake clock, no broker.

::

    from sagakit.testing import given, ok, failed

    (given(checkout, CheckoutStarted("o-1", 500, ["card-a", "card-b"]))
        .when(failed(Charge, "payments.CardDeclined"))
        .then(sends=[("payments", Charge("o-1", 500, "card-b"))], status="awaiting_payment"))

    (given(checkout, CheckoutStarted("o-1", 500, ["card-a"]))
        .advance(600)                      # fire every timer due by then
        .then(status="cancelled", events=[CheckoutCancelled("o-1", "payment timed out")]))

``given`` applies its messages one by one, exactly as the runtime would
(:func:`sagakit.process.machine.apply`); ``when`` and ``advance`` collect what
the next input or the timers did, and ``then`` checks it. Replies to the
process manager's commands are written :func:`ok` and :func:`failed`; they go
to the instance the scenario last touched, as the answer to its latest unanswered command of
that type; a reply to no unanswered command is recorded and ignored, as it
would be at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..clock import FakeClock
from ..messages import Done, Failure, spec_of
from ..process.definition import ProcessManager, Replied
from ..process.machine import (
    Input,
    Instance,
    Outcome,
    Verdict,
    apply,
    command_of_step,
    timer_id,
)

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """A reply to the process manager's command of type ``command``."""

    command: type[Any]
    value: Any
    ok: bool


def ok(command: type[Any], value: Any = None) -> ReplyTo:
    """A success reply to ``command`` (``Done()`` unless a reply payload is given)."""
    return ReplyTo(command, Done() if value is None else value, True)


def failed(command: type[Any], code: str, message: str = "", technical: bool = False) -> ReplyTo:
    """A failure reply to ``command`` with a failure ``code``."""
    return ReplyTo(command, Failure(code, message or code, technical), False)


@dataclass
class Scenario:
    """A process manager's instances on a fake clock, fed one input at a time."""

    pm: ProcessManager[Any]
    clock: FakeClock = field(default_factory=FakeClock)
    instances: dict[str, Instance] = field(default_factory=dict)
    #: armed timers: (due, key, name, token), the queue as it would be
    timers: list[tuple[float, str, str, int]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    key: str | None = None
    _n: int = 0

    def given(self, *inputs: Any) -> Scenario:
        """Apply ``inputs`` (messages or replies) as history."""
        for x in inputs:
            self._feed(x)
        self.outcomes.clear()
        return self

    def when(self, x: Any) -> Scenario:
        """Apply one input; :meth:`then` checks what it did."""
        self.outcomes.clear()
        self._feed(x)
        return self

    def advance(self, seconds: float) -> Scenario:
        """Move the clock and fire, in due order, every timer due by then."""
        self.outcomes.clear()
        end = self.clock.now() + seconds
        while self.timers and min(self.timers)[0] <= end:
            due, key, name, token = min(self.timers)
            self.timers.remove((due, key, name, token))
            self.clock.advance(max(0.0, due - self.clock.now()))
            self._apply(Input("timer", name, None, self._id(), key, token))
        self.clock.advance(max(0.0, end - self.clock.now()))
        return self

    def state(self, key: str | None = None) -> Any:
        """The state of the instance ``key`` (default: the last one touched)."""
        return self._inst(key).state

    def then(
        self,
        *,
        sends: list[Any] | None = None,
        events: list[Any] | None = None,
        state: Any = _UNSET,
        status: Any = _UNSET,
        completed: bool | None = None,
        timers: list[str] | None = None,
        verdict: str | None = None,
    ) -> Scenario:
        """Check the last input's effects; only the arguments given are checked."""
        got_sends = [(c.to, c.command) for o in self.outcomes for c in o.commands]
        if sends is not None:
            pairs = all(isinstance(x, tuple) for x in sends)
            _same("sends", list(sends), got_sends if pairs else [c for _, c in got_sends])
        if events is not None:
            _same("events", events, [e for o in self.outcomes for e in o.events])
        inst = self._inst(None) if self.key is not None else None
        if state is not _UNSET:
            _same("state", state, inst.state if inst else None)
        if status is not _UNSET:
            _same("status", status, inst.status if inst else None)
        if completed is not None:
            _same("completed", completed, bool(inst and inst.done))
        if timers is not None:
            _same("timers", sorted(timers), sorted(inst.timers) if inst else [])
        if verdict is not None:
            _same("verdict", verdict, self.outcomes[-1].verdict.value if self.outcomes else None)
        return self

    # -- internals -------------------------------------------------------------------

    def _feed(self, x: Any) -> None:
        if isinstance(x, ReplyTo):
            cmd = spec_of(x.command).name
            replied = Replied(cmd, x.ok, x.value)
            step = self._awaited(cmd)
            self._apply(Input("reply", cmd, replied, self._id(), self.key or "", step=step))
            return
        name = spec_of(type(x)).name
        found = self.pm.key_of(name, x) if not self.pm.stateless else self._id()
        if found is None:
            raise AssertionError(f"{self.pm.name} has no key mapping for {name!r}")
        self._apply(Input("message", name, x, self._id(), found, correlation_id=found))

    def _apply(self, inp: Input) -> None:
        outcome = apply(self.pm, self.instances.get(inp.key), inp, self.clock.now())
        self.outcomes.append(outcome)
        if outcome.verdict is Verdict.HELD:
            raise AssertionError(f"{inp.trigger!r} found no instance {inp.key!r} (held)")
        if outcome.after is not None:
            self.instances[inp.key] = outcome.after
            self.key = inp.key
        gone = set(outcome.cancelled)
        self.timers = [t for t in self.timers if _tid(self.pm, t) not in gone]
        for t in outcome.started:
            self.timers.append((t.armed.due_at, inp.key, t.name, t.armed.token))

    def _awaited(self, command: str) -> str | None:
        """The step of the latest unanswered ``command`` of the current instance."""
        inst = self.instances.get(self.key or "")
        steps = [s for s in (inst.awaiting if inst else ()) if command_of_step(s) == command]
        return max(steps, key=lambda s: int(s.rsplit("#", 1)[1]), default=None)

    def _inst(self, key: str | None) -> Instance:
        key = key or self.key
        if key is None or key not in self.instances:
            raise AssertionError(f"no instance {key!r} in this scenario")
        return self.instances[key]

    def _id(self) -> str:
        self._n += 1
        return f"m{self._n}"


def given(pm: ProcessManager[Any], *inputs: Any, clock: FakeClock | None = None) -> Scenario:
    """A scenario for ``pm`` after ``inputs`` (messages, :func:`ok`/:func:`failed` replies)."""
    return Scenario(pm, clock or FakeClock()).given(*inputs)


def _tid(pm: ProcessManager[Any], t: tuple[float, str, str, int]) -> str:
    return timer_id(pm.name, t[1], t[2], t[3])


def _same(what: str, want: Any, got: Any) -> None:
    if want != got:
        raise AssertionError(f"{what}: expected {want!r}\n{' ' * len(what)}  but got {got!r}")
