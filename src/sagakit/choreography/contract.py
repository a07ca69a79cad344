"""The declared choreography: which events start, advance, fail and end a flow.

::

    place_order = (
        Choreography("place-order")
        .starts_on(OrderPlaced)
        .step("reserve-credit", done=CreditReserved, failed=CreditRefused)
        .step("reserve-stock", done=StockReserved, failed=StockRefused)
        .step("charge-card", done=PaymentCaptured, failed=PaymentDeclined).pivot()
        .step("ship", done=OrderShipped)
        .undo("reserve-credit", on=(StockRefused, PaymentDeclined), done=CreditReleased)
        .undo("reserve-stock", on=(PaymentDeclined,), done=StockReleased)
        .completes_on(OrderApproved, OrderRejected)
        .deadline(minutes=30)
        .build()
    )

The declaration couples no service to another at run time: participants
still only react to events. It is read by the tracker (what a flow has done,
still expects and still owes), by ``sagakit check`` (does some handler publish
each declared event) and by the diagram. ``build()`` checks the rules and names
the step and rule it rejects, like a saga definition:

- step names are unique, and each event type has one role in the flow;
- only steps before the pivot may fail (a failure event) or be undone; steps
  after it go forward only;
- an ``undo`` is triggered by failure events of *later* steps, and each
  failure event triggers the undo of every undoable step before it, so the
  compensations a failure owes are exactly the steps done before it;
- the flow ends on a completion event; a flow that saw a failure ends
  compensated, otherwise completed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import DefinitionError
from ..messages import spec_of

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DEFAULT_HOLD = 60.0


@dataclass(frozen=True, slots=True)
class ChoreoStep:
    """One step: the event that says it happened, and the one that says it failed."""

    name: str
    index: int
    done: str
    failed: str | None
    after_pivot: bool


@dataclass(frozen=True, slots=True)
class Undo:
    """The compensation of ``step``: owed when one of ``on`` is seen, confirmed by ``done``."""

    step: str
    on: tuple[str, ...]
    done: str
    failed: str | None = None


@dataclass(frozen=True)
class ChoreographyDefinition:
    """A validated choreography contract (build it with :class:`Choreography`)."""

    name: str
    start: str
    steps: tuple[ChoreoStep, ...]
    undos: tuple[Undo, ...]
    completions: tuple[str, ...]
    deadline: float | None
    hold: float
    #: a payload field holding the correlation key (None: the correlation_id header)
    correlate: str | None
    types: tuple[type[Any], ...] = field(repr=False, default=())
    #: other event types the tracker records in a flow's timeline (as outside the contract)
    recorded: tuple[str, ...] = ()

    def watched(self) -> list[str]:
        """Every event type the tracker subscribes to."""
        return self.events() + [r for r in self.recorded if r not in self.events()]

    @property
    def pivot(self) -> str | None:
        before = [s for s in self.steps if not s.after_pivot]
        if len(before) == len(self.steps):
            return None
        return before[-1].name if before else None

    def step(self, name: str) -> ChoreoStep:
        return next(s for s in self.steps if s.name == name)

    def events(self) -> list[str]:
        """Every event type the contract names, start first."""
        names = [self.start]
        for s in self.steps:
            names += [s.done] + ([s.failed] if s.failed else [])
        for u in self.undos:
            names += [u.done] + ([u.failed] if u.failed else [])
        return names + list(self.completions)

    def role(self, event: str) -> tuple[str, str | None]:
        """What an event type means here: (role, step) — start, done, failed,
        undone, undo-failed, completion, or ("outside", None)."""
        return self._roles.get(event, ("outside", None))

    @cached_property
    def _roles(self) -> dict[str, tuple[str, str | None]]:
        roles: dict[str, tuple[str, str | None]] = {self.start: ("start", None)}
        for s in self.steps:
            roles[s.done] = ("done", s.name)
            if s.failed:
                roles[s.failed] = ("failed", s.name)
        for u in self.undos:
            roles[u.done] = ("undone", u.step)
            if u.failed:
                roles[u.failed] = ("undo-failed", u.step)
        for c in self.completions:
            roles[c] = ("completion", None)
        return roles


class Choreography:
    """Builder of a :class:`ChoreographyDefinition`; ``build()`` validates it.

    ``correlate`` names a payload field that holds the correlation key (every
    event of the flow must have it); by default the ``correlation_id`` header,
    which sagakit propagates from each handled message to what it publishes.
    """

    def __init__(self, name: str, *, correlate: str | None = None) -> None:
        if not _NAME.match(name):
            raise DefinitionError(f"choreography name {name!r}: lowercase letters, digits, '-'")
        self.name = name
        self._correlate = correlate
        self._start: type[Any] | None = None
        self._steps: list[tuple[str, type[Any], type[Any] | None]] = []
        self._pivot: int | None = None
        self._undos: list[tuple[str, tuple[type[Any], ...], type[Any], type[Any] | None]] = []
        self._completions: tuple[type[Any], ...] = ()
        self._deadline: float | None = None
        self._hold = DEFAULT_HOLD
        self._recorded: tuple[type[Any], ...] = ()

    def starts_on(self, event: type[Any]) -> Choreography:
        """The event that begins a flow (its correlation key names the flow)."""
        self._start = event
        return self

    def step(self, name: str, *, done: type[Any], failed: type[Any] | None = None) -> Choreography:
        """A step, in the order the flow runs them: its success and failure events."""
        self._steps.append((name, done, failed))
        return self

    def pivot(self) -> Choreography:
        """Make the last step the point of no return: later steps only go forward."""
        if not self._steps:
            raise DefinitionError(f"{self.name}: pivot() before any step")
        self._pivot = len(self._steps) - 1
        return self

    def undo(
        self,
        step: str,
        *,
        on: tuple[type[Any], ...],
        done: type[Any],
        failed: type[Any] | None = None,
    ) -> Choreography:
        """``step`` is compensated when one of ``on`` is seen; ``done`` confirms it,
        ``failed`` (optional) says the compensation gave up (the flow fails)."""
        self._undos.append((step, tuple(on), done, failed))
        return self

    def completes_on(self, *events: type[Any]) -> Choreography:
        """The events that end a flow (approved or rejected, say)."""
        self._completions = events
        return self

    def deadline(self, *, seconds: float = 0.0, minutes: float = 0.0) -> Choreography:
        """A flow not finished this long after its start is stuck (and says so)."""
        self._deadline = seconds + 60.0 * minutes
        return self

    def hold_early_events(self, *, seconds: float) -> Choreography:
        """How long an event that arrives before its flow's start is held (default 60 s)."""
        self._hold = seconds
        return self

    def also_records(self, *events: type[Any]) -> Choreography:
        """Event types outside the contract that the tracker still shows in a
        flow's timeline (as ``outside``), e.g. other services' reactions."""
        self._recorded = events
        return self

    def build(self) -> ChoreographyDefinition:
        """Validate and freeze the contract; raises :class:`DefinitionError`."""
        return _validate(self)


def _name(cls: type[Any], who: str) -> str:
    spec = spec_of(cls)
    if spec.kind != "event":
        raise DefinitionError(f"{who}: {spec.name!r} is a {spec.kind}, not an event")
    return spec.name


def _validate(b: Choreography) -> ChoreographyDefinition:
    n = b.name
    if b._start is None:
        raise DefinitionError(f"{n}: no starts_on() event")
    if not b._steps:
        raise DefinitionError(f"{n}: a choreography needs at least one step")
    steps = _steps(b)
    undos = _undos(b, steps)
    completions = tuple(_name(c, f"{n}: completes_on") for c in b._completions)
    if b._deadline is not None and b._deadline <= 0:
        raise DefinitionError(f"{n}: the deadline must be positive")
    if b._hold < 0:
        raise DefinitionError(f"{n}: the hold time cannot be negative")
    types = tuple(
        {id(t): t for t in _all_types(b)}.values()  # each class once, in order
    )
    defn = ChoreographyDefinition(
        n,
        _name(b._start, f"{n}: starts_on"),
        steps,
        undos,
        completions,
        b._deadline,
        b._hold,
        b._correlate,
        types + tuple(b._recorded),
        tuple(_name(r, f"{n}: also_records") for r in b._recorded),
    )
    _one_role_each(defn)
    _failures_undo_everything_before(defn)
    return defn


def _steps(b: Choreography) -> tuple[ChoreoStep, ...]:
    out: list[ChoreoStep] = []
    for i, (name, done, failed) in enumerate(b._steps):
        who = f"{b.name}: step {name!r}"
        if not _NAME.match(name):
            raise DefinitionError(f"{who}: lowercase letters, digits and '-' only")
        if any(s.name == name for s in out):
            raise DefinitionError(f"{who}: step names must be unique")
        after = b._pivot is not None and i > b._pivot
        if after and failed is not None:
            raise DefinitionError(f"{who}: a step after the pivot cannot fail, only go forward")
        fail = _name(failed, who) if failed is not None else None
        out.append(ChoreoStep(name, i, _name(done, who), fail, after))
    return tuple(out)


def _undos(b: Choreography, steps: tuple[ChoreoStep, ...]) -> tuple[Undo, ...]:
    by_name = {s.name: s for s in steps}
    failure_of = {s.failed: s for s in steps if s.failed}
    out: list[Undo] = []
    for step, on, done, failed in b._undos:
        who = f"{b.name}: undo of {step!r}"
        target = by_name.get(step)
        if target is None:
            raise DefinitionError(f"{who}: no such step")
        if target.after_pivot or (b._pivot is not None and target.index == b._pivot):
            raise DefinitionError(f"{who}: only steps before the pivot can be undone")
        if any(u.step == step for u in out):
            raise DefinitionError(f"{who}: one undo per step")
        if not on:
            raise DefinitionError(f"{who}: on= names no failure event")
        names = tuple(_name(e, who) for e in on)
        for name in names:
            failing = failure_of.get(name)
            if failing is None:
                raise DefinitionError(f"{who}: {name!r} is not a step's failure event")
            if failing.index <= target.index:
                raise DefinitionError(
                    f"{who}: {name!r} is the failure of {failing.name!r}, which runs before "
                    "or at this step, so there is nothing done to undo yet"
                )
        fail = _name(failed, who) if failed is not None else None
        out.append(Undo(step, names, _name(done, who), fail))
    return tuple(out)


def _one_role_each(defn: ChoreographyDefinition) -> None:
    seen: set[str] = set()
    for name in defn.events():
        if name in seen:
            raise DefinitionError(f"{defn.name}: event {name!r} has more than one role in the flow")
        seen.add(name)


def _failures_undo_everything_before(defn: ChoreographyDefinition) -> None:
    """A failure of step k owes the undo of every undoable step before k."""
    for s in defn.steps:
        if s.failed is None:
            continue
        for u in defn.undos:
            if defn.step(u.step).index < s.index and s.failed not in u.on:
                raise DefinitionError(
                    f"{defn.name}: {s.failed!r} (failure of {s.name!r}) does not trigger the "
                    f"undo of {u.step!r}, which ran before it: add it to that undo's on="
                )


def _all_types(b: Choreography) -> list[type[Any]]:
    types: list[type[Any]] = [b._start] if b._start is not None else []
    for _, done, failed in b._steps:
        types += [done] + ([failed] if failed else [])
    for _, on, done, failed in b._undos:
        types += [*on, done] + ([failed] if failed else [])
    return types + list(b._completions)
