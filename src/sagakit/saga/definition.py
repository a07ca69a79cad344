"""Saga definitions: a fluent builder validated at build time.

::

    create_order = (
        Saga("create-order", OrderData, version=1)
        .step("reserve-credit")
            .invoke("customers", lambda d: ReserveCredit(d.customer_id, d.total))
            .on_reply(CreditReserved, lambda d, r: replace(d, credit_id=r.reservation_id))
            .compensate("customers", lambda d: ReleaseCredit(d.customer_id, d.order_id))
        .step("charge-card").invoke("payments", charge).pivot()
        .step("ship").invoke("shipping", ship).retry(RetryPolicy.forever())
        .step("approve").local(approve)
        .build()
    )

A step either sends a command to a participant and waits for its reply, or
runs a local async function in the coordinator. Steps before the pivot may
have compensations; the pivot is the point of no return; steps after it must
be retriable (forward recovery). ``step(..., parallel=True)`` runs a step
together with the one before it; the group is joined when all have replied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

from ..errors import DefinitionError
from ..messages import spec_of
from ..policies import RetryPolicy
from ..twophase.step import AtomicStep
from .acquire_first import check_locks

if TYPE_CHECKING:
    from ..twophase.protocol import AtomicTx

D = TypeVar("D")
StepKind = Literal["compensatable", "pivot", "retriable"]
Announcement = tuple[type[Any], Callable[[Any], Any]]

DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=12, initial=0.05, max_delay=30.0)


@dataclass(frozen=True, slots=True)
class Action:
    """A command for ``participant`` built from the saga data by ``factory``."""

    participant: str
    factory: Callable[[Any], Any]


@dataclass(frozen=True)
class StepDef:
    """One validated step of a saga definition."""

    name: str
    group: int
    kind: StepKind
    action: Action | None = None
    local: Callable[[Any], Awaitable[Any]] | None = None
    compensation: Action | None = None
    on_reply: dict[str, tuple[type[Any], Callable[[Any, Any], Any]]] = field(default_factory=dict)
    retry: RetryPolicy | None = None
    timeout: float | None = None
    # Folds a forward failure (a Failure payload) into the data before the
    # saga retries or compensates, e.g. to keep the reason for a rejection.
    on_failure: Callable[[Any, Any], Any] | None = None
    #: declared to change nothing that would need undoing (a check, a read)
    nothing_to_undo: bool = False
    #: in the reserve phase: the step only takes locks that live this long (seconds)
    lock_ttl: float | None = None
    #: the reserve steps whose locks this step confirms
    confirms: tuple[str, ...] = ()

    @property
    def compensatable(self) -> bool:
        return self.compensation is not None

    @property
    def may_leave_an_effect(self) -> bool:
        """Whether a forward command whose outcome is unknown may have changed something
        that no compensation can undo (so backward recovery must not run around it)."""
        return self.compensation is None and not self.nothing_to_undo


@dataclass(frozen=True)
class SagaDefinition(Generic[D]):
    """A built saga: immutable, identified by (name, version)."""

    name: str
    version: int
    data_type: type[D]
    steps: tuple[StepDef, ...]
    deadline: float | None
    compensation_retry: RetryPolicy
    #: (event type, factory from the data) published when an instance ends
    #: completed / compensated (mixing styles)
    on_completed: Announcement | None = None
    on_compensated: Announcement | None = None

    groups: tuple[tuple[StepDef, ...], ...] = field(init=False, repr=False)
    by_name: dict[str, StepDef] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {s.name: s for s in self.steps})
        groups: dict[int, list[StepDef]] = {}
        for s in self.steps:
            groups.setdefault(s.group, []).append(s)
        object.__setattr__(self, "groups", tuple(tuple(g) for _, g in sorted(groups.items())))

    def step(self, name: str) -> StepDef:
        """The step called ``name``."""
        return self.by_name[name]

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def announces(self) -> list[str]:
        """The event type names it publishes as it ends."""
        return [spec_of(a[0]).name for a in (self.on_completed, self.on_compensated) if a]


@dataclass
class _Draft:
    name: str
    parallel: bool
    action: Action | None = None
    local: Callable[[Any], Awaitable[Any]] | None = None
    compensation: Action | None = None
    on_reply: dict[str, tuple[type[Any], Callable[[Any, Any], Any]]] = field(default_factory=dict)
    pivot: bool = False
    retry: RetryPolicy | None = None
    timeout: float | None = None
    on_failure: Callable[[Any, Any], Any] | None = None
    nothing_to_undo: bool = False
    lock_ttl: float | None = None
    confirms: tuple[str, ...] = ()
    waits: bool = False  #: a wait_for step: nothing to undo unless pivot or retriable


class Saga(Generic[D]):
    """Start a definition: ``Saga(name, DataType, version=1)``."""

    def __init__(
        self,
        name: str,
        data_type: type[D],
        *,
        version: int = 1,
        deadline: float | None = None,
        compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
        on_completed: tuple[type[Any], Callable[[D], Any]] | None = None,
        on_compensated: tuple[type[Any], Callable[[D], Any]] | None = None,
    ) -> None:
        """``on_completed=(EventType, factory)`` (and ``on_compensated``): the
        coordinator publishes ``factory(data)`` with the saga's correlation id
        when an instance ends that way, so a choreography can continue on it."""
        for a in (on_completed, on_compensated):
            if a is not None and spec_of(a[0]).kind != "event":
                raise DefinitionError(f"saga {name!r}: {spec_of(a[0]).name!r} is not an event")
        self.name, self.data_type, self.version = name, data_type, version
        self.deadline, self.compensation_retry = deadline, compensation_retry
        self.on_completed, self.on_compensated = on_completed, on_compensated
        self._drafts: list[_Draft] = []

    def step(self, name: str, *, parallel: bool = False) -> StepBuilder[D]:
        """Add a step; ``parallel=True`` joins the previous step's group."""
        draft = _Draft(name, parallel)
        self._drafts.append(draft)
        return StepBuilder(self, draft)

    def build(self) -> SagaDefinition[D]:
        """Validate and freeze; an invalid definition raises DefinitionError."""
        _check_header(self)
        steps = _freeze(self, self._drafts)
        _check_order(self.name, steps)
        check_locks(self.name, steps, self.deadline)
        return SagaDefinition(
            self.name,
            self.version,
            self.data_type,
            tuple(steps),
            self.deadline,
            self.compensation_retry,
            self.on_completed,
            self.on_compensated,
        )


class StepBuilder(Generic[D]):
    """Configures the step just added; ``.step()``/``.build()`` continue the saga."""

    def __init__(self, saga: Saga[D], draft: _Draft) -> None:
        self._saga, self._d = saga, draft

    def invoke(self, participant: str, factory: Callable[[D], Any]) -> StepBuilder[D]:
        """Send the command ``factory(data)`` to ``participant`` and await its reply."""
        self._d.action = Action(participant, factory)
        return self

    def local(self, fn: Callable[[D], Awaitable[D | None]]) -> StepBuilder[D]:
        """Run ``await fn(data)`` in the coordinator; its result becomes the data."""
        self._d.local = fn
        return self

    def atomic(
        self, resources: Sequence[str], fn: Callable[[D, AtomicTx], Awaitable[D | None]]
    ) -> StepBuilder[D]:
        """Run ``await fn(data, tx)`` as one atomic group over ``resources`` (2PC).

        A local step of the coordinator: the group commits on every database
        or on none, and the result becomes the data; see :mod:`sagakit.twophase`.
        Like any local step it has no compensation: a later step's failure
        does not undo it, so make it the pivot or put it after the pivot.
        """
        self._d.local = AtomicStep(tuple(resources), fn)
        return self

    def wait_for(
        self,
        event: type[Any],
        *,
        key: Callable[[D], str],
        fold: Callable[[D, Any], D | None] | None = None,
    ) -> StepBuilder[D]:
        """Wait for an event instead of sending a command (mixing with choreography).

        The step succeeds when an event of type ``event`` arrives whose
        correlation key equals ``key(data)`` — the ``correlation_id`` header,
        or the payload field given by ``App.await_key(event, field)``; one that
        arrived before the step started counts too. ``fold(data, event)``
        keeps what the saga needs from it. Bound the wait with ``.timeout()``:
        before the pivot a timeout compensates, after it ``.retry()`` waits again.
        Waiting changes nothing, so there is nothing to undo.
        """
        from .awaits import AWAITS, AwaitEvent

        name = spec_of(event).name
        self._d.action = Action(AWAITS, lambda d: AwaitEvent(name, key(d)))
        self._d.on_reply[name] = (event, fold or (lambda d, e: None))
        self._d.waits = True
        return self

    def on_reply(self, reply_type: type[Any], fn: Callable[[D, Any], D | None]) -> StepBuilder[D]:
        """Fold a success reply of ``reply_type`` into the data: ``fn(data, reply)``."""
        self._d.on_reply[spec_of(reply_type).name] = (reply_type, fn)
        return self

    def on_failure(self, fn: Callable[[D, Any], D | None]) -> StepBuilder[D]:
        """Fold a failure of this step into the data: ``fn(data, failure)``.

        ``failure`` is a :class:`~sagakit.Failure` (code, message, technical);
        timeouts and other technical failures arrive as technical failures.
        It runs before the saga retries the step or starts compensating, so
        compensation commands can carry the reason.
        """
        self._d.on_failure = fn
        return self

    def compensate(self, participant: str, factory: Callable[[D], Any]) -> StepBuilder[D]:
        """The command that semantically undoes this step."""
        self._d.compensation = Action(participant, factory)
        return self

    def nothing_to_undo(self) -> StepBuilder[D]:
        """Declare that this step changes nothing that would need undoing.

        A step before the pivot without a compensation may have taken effect
        when its reply goes missing, so by default a timeout asks it again and
        then stops the saga for an operator rather than compensating around it.
        A step declared here (a validation, a read, a quote) lets the saga
        compensate the earlier steps instead.
        """
        self._d.nothing_to_undo = True
        return self

    def reserves(self, ttl: float) -> StepBuilder[D]:
        """Put this step in the saga's reserve phase: it only takes timeout-based locks.

        ``ttl`` is how long the participant keeps them (see
        :class:`sagakit.Reservations`). ``build()`` checks that the phase comes
        before the pivot, that a later step ``.confirms()`` this one, and warns
        (:class:`~sagakit.LockTimingWarning`) if the saga may reach that
        confirm only after ``ttl``. Compensate the step with a release.
        """
        if not ttl > 0:
            raise DefinitionError(f"step {self._d.name!r}: a lock ttl must be positive")
        self._d.lock_ttl = ttl
        return self

    def confirms(self, *reserve_steps: str) -> StepBuilder[D]:
        """This step makes the locks of ``reserve_steps`` permanent (at or after the pivot)."""
        self._d.confirms = tuple(reserve_steps)
        return self

    def pivot(self) -> StepBuilder[D]:
        """Mark the point of no return: once it succeeds the saga only goes forward."""
        self._d.pivot = True
        return self

    def retry(self, policy: RetryPolicy | None = None) -> StepBuilder[D]:
        """Make the step retriable (after the pivot): failures are retried per policy."""
        self._d.retry = policy or RetryPolicy.forever()
        return self

    def timeout(self, seconds: float) -> StepBuilder[D]:
        """A reply not received within ``seconds`` counts as a failure of the step."""
        if seconds <= 0:
            raise DefinitionError(f"step {self._d.name!r}: timeout must be positive")
        self._d.timeout = seconds
        return self

    def step(self, name: str, *, parallel: bool = False) -> StepBuilder[D]:
        return self._saga.step(name, parallel=parallel)

    def build(self) -> SagaDefinition[D]:
        return self._saga.build()


def _check_header(saga: Saga[Any]) -> None:
    if not saga.name or not isinstance(saga.version, int) or saga.version < 1:
        raise DefinitionError(f"saga {saga.name!r}: needs a name and a version >= 1")
    dt = saga.data_type
    if not (
        isinstance(dt, type) and (issubclass(dt, msgspec.Struct) or dataclasses.is_dataclass(dt))
    ):
        raise DefinitionError(
            f"saga {saga.name!r}: data type must be a msgspec Struct or dataclass"
        )
    if not saga._drafts:
        raise DefinitionError(f"saga {saga.name!r}: has no steps")


def _freeze(saga: Saga[Any], drafts: list[_Draft]) -> list[StepDef]:
    seen: set[str] = set()
    steps, group = [], -1
    for i, d in enumerate(drafts):
        where = f"saga {saga.name!r}, step {d.name!r}"
        if not d.name or d.name in seen:
            raise DefinitionError(f"{where}: step names must be unique and non-empty")
        seen.add(d.name)
        if (d.action is None) == (d.local is None):
            raise DefinitionError(f"{where}: needs exactly one of .invoke() or .local()")
        if d.local is not None and (d.compensation or d.on_reply):
            raise DefinitionError(f"{where}: a local step has no compensation or reply handlers")
        if d.pivot and d.retry:
            raise DefinitionError(f"{where}: the pivot cannot also be retriable")
        if d.nothing_to_undo and (d.compensation or d.pivot or d.retry):
            raise DefinitionError(
                f"{where}: nothing_to_undo is for a step with no compensation before the pivot"
            )
        if d.parallel and i == 0:
            raise DefinitionError(f"{where}: the first step cannot be parallel")
        if d.waits and not (d.pivot or d.retry or d.compensation):
            d.nothing_to_undo = True
        group = group if d.parallel else group + 1
        kind: StepKind = "pivot" if d.pivot else "retriable" if d.retry else "compensatable"
        steps.append(
            StepDef(
                d.name,
                group,
                kind,
                d.action,
                d.local,
                d.compensation,
                dict(d.on_reply),
                d.retry,
                d.timeout,
                on_failure=d.on_failure,
                nothing_to_undo=d.nothing_to_undo,
                lock_ttl=d.lock_ttl,
                confirms=d.confirms,
            )
        )
    return steps


def _check_order(name: str, steps: list[StepDef]) -> None:
    pivots = [s for s in steps if s.kind == "pivot"]
    if len(pivots) > 1:
        raise DefinitionError(f"saga {name!r}: more than one pivot ({pivots[1].name!r})")
    forward_only = False
    for s in steps:
        where = f"saga {name!r}, step {s.name!r}"
        if s.kind == "pivot" and s.compensation:
            raise DefinitionError(f"{where}: the pivot cannot have a compensation")
        if s.kind == "pivot" and any(o.group == s.group and o is not s for o in steps):
            raise DefinitionError(f"{where}: the pivot cannot be in a parallel group")
        if forward_only and s.kind != "retriable":
            raise DefinitionError(f"{where}: only retriable steps may follow the pivot")
        if s.kind == "retriable" and s.compensation:
            raise DefinitionError(f"{where}: a retriable step cannot have a compensation")
        forward_only = forward_only or s.kind in ("pivot", "retriable")
