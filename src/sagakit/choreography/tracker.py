"""The tracker's decisions: pure, no I/O.

A tracked flow is a :class:`FlowState` keyed by (choreography, correlation
id). :func:`observe` takes the contract, the state (or None for a
correlation id never seen) and one input — an event that arrived, the
flow's deadline passing, the hold on early events running out — and returns
a :class:`Decision`: the new state, the timeline rows to write and the
effects for the shell (timers to set, a stalled event to publish, held
events to apply now that the flow has started).

The state keeps *sets* of what was seen (steps done, failures, compensations
confirmed), never a position, so the final status does not depend on the
order in which the events of a flow reach the tracker. An event that does
not fit — a type outside the contract, a second failure, anything after the
flow finished, a payload that does not decode — is written to the timeline
with its reason and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from ..messages import event
from .contract import ChoreographyDefinition

RUNNING, COMPLETED, COMPENSATING = "running", "completed", "compensating"
COMPENSATED, STUCK, FAILED = "compensated", "stuck", "failed"
#: a correlation id whose start event has not arrived (yet, or within the hold)
HELD, ORPHANED = "held", "orphaned"
STATUSES = (RUNNING, COMPLETED, COMPENSATING, COMPENSATED, STUCK, FAILED, HELD, ORPHANED)
FINAL = frozenset({COMPLETED, COMPENSATED, FAILED})

#: timeline row kinds
APPLIED, HELD_ROW, RELEASED, OUTSIDE, REJECTED, STALLED, EXPIRED = (
    "applied",
    "held",
    "released",
    "outside",
    "rejected",
    "stalled",
    "hold-expired",
)


class FlowState(msgspec.Struct, kw_only=True):
    """What the tracker knows of one flow; stored as JSON."""

    flow: str
    correlation_id: str
    started_at: float | None = None
    deadline_at: float | None = None
    done: list[str] = []
    failures: list[str] = []
    undone: list[str] = []
    undo_failed: list[str] = []
    completion: str | None = None
    stalled: bool = False
    held_until: float | None = None
    orphaned: bool = False
    events: int = 0
    #: the start event's ``traceparent``: the flow's span joins that trace
    trace: str | None = None


@event("sagakit.ChoreographyStalled")
class ChoreographyStalled(msgspec.Struct, frozen=True):
    """Published when a flow passes its deadline unfinished; operators subscribe."""

    flow: str
    correlation_id: str
    status: str
    expects: list[str]
    owed: list[str]
    deadline_at: float


@dataclass(frozen=True, slots=True)
class Arrived:
    """An event of (or sent to) this tracker; ``problem`` when it cannot be applied."""

    type: str
    message_id: str
    at: float
    problem: str | None = None
    released: bool = False
    trace: str | None = None


@dataclass(frozen=True, slots=True)
class TimerDue:
    """The flow's deadline or its early-event hold came due."""

    kind: Literal["deadline", "hold"]
    at: float


Input = Arrived | TimerDue


@dataclass(frozen=True, slots=True)
class Entry:
    """One timeline row."""

    kind: str
    type: str | None
    step: str | None
    message_id: str | None
    reason: str | None = None


@dataclass(slots=True)
class Decision:
    state: FlowState
    entries: list[Entry] = field(default_factory=list)
    #: (kind, seconds from now)
    timers: list[tuple[Literal["deadline", "hold"], float]] = field(default_factory=list)
    stalled: ChoreographyStalled | None = None
    release_held: bool = False
    #: keep the arrived message for a later release
    hold: bool = False


def new_state(defn: ChoreographyDefinition, correlation_id: str) -> FlowState:
    return FlowState(flow=defn.name, correlation_id=correlation_id)


def observe(defn: ChoreographyDefinition, state: FlowState, what: Input) -> Decision:
    """Apply one input to a flow."""
    st = _copy(state)
    if isinstance(what, TimerDue):
        return _deadline(defn, st, what) if what.kind == "deadline" else _hold_over(defn, st)
    if st.started_at is None and defn.role(what.type)[0] != "start":
        return _early(defn, st, what)
    if what.problem is not None:
        return _outside(st, what, REJECTED, what.problem)
    current = status(defn, st)
    if current in FINAL:
        return _outside(st, what, OUTSIDE, f"the flow is already {current}")
    return _apply(defn, st, what)


def _copy(s: FlowState) -> FlowState:
    """A copy whose lists can change without touching the input."""
    return msgspec.structs.replace(
        s,
        done=list(s.done),
        failures=list(s.failures),
        undone=list(s.undone),
        undo_failed=list(s.undo_failed),
    )


def _apply(defn: ChoreographyDefinition, st: FlowState, a: Arrived) -> Decision:
    role, step = defn.role(a.type)
    if role == "outside":
        return _outside(st, a, OUTSIDE, "not an event of this choreography")
    if role == "start":
        return _start(defn, st, a)
    wrong = _misfit(st, role, step)
    if wrong is not None:
        return _outside(st, a, OUTSIDE, wrong)
    if role == "completion":
        st.completion = a.type
    elif role == "failed":
        st.failures.append(a.type)
    else:
        {"done": st.done, "undone": st.undone, "undo-failed": st.undo_failed}[role].append(
            step or ""
        )
    st.events += 1
    note = "held until the start arrived" if a.released else None
    return Decision(st, [Entry(APPLIED, a.type, step, a.message_id, note)])


def _misfit(st: FlowState, role: str, step: str | None) -> str | None:
    """Why an event of the contract does not fit this flow now (None: it fits)."""
    if role == "done" and step in st.done:
        return f"step {step!r} was already reported done"
    if role == "failed" and st.failures:
        return f"the flow already failed ({st.failures[0]})"
    if role == "undone" and step in st.undone:
        return f"the undo of {step!r} was already confirmed"
    if role == "completion" and st.completion is not None:
        return f"the flow already ended with {st.completion}"
    return None


def _start(defn: ChoreographyDefinition, st: FlowState, a: Arrived) -> Decision:
    if st.started_at is not None:
        return _outside(st, a, OUTSIDE, "the flow has already started")
    st.started_at, st.held_until, st.events = a.at, None, st.events + 1
    st.trace = a.trace
    d = Decision(st, [Entry(APPLIED, a.type, None, a.message_id)], release_held=True)
    if defn.deadline is not None:
        st.deadline_at = a.at + defn.deadline
        d.timers.append(("deadline", defn.deadline))
    return d


def _early(defn: ChoreographyDefinition, st: FlowState, a: Arrived) -> Decision:
    """An event before its flow's start: held (kept, applied after the start)."""
    if st.orphaned:
        why = "no start event arrived within the hold time"
        return _outside(st, a, REJECTED, a.problem or why)
    d = Decision(st)
    if st.held_until is None:
        st.held_until = a.at + defn.hold
        d.timers.append(("hold", defn.hold))
    if a.problem is not None:
        d.entries.append(Entry(REJECTED, a.type, defn.role(a.type)[1], a.message_id, a.problem))
        return d
    d.hold = True
    reason = f"waiting for {defn.start} (held up to {defn.hold:g}s)"
    d.entries.append(Entry(HELD_ROW, a.type, defn.role(a.type)[1], a.message_id, reason))
    return d


def _hold_over(defn: ChoreographyDefinition, st: FlowState) -> Decision:
    if st.started_at is not None or st.orphaned:
        return Decision(st)
    st.orphaned = True
    why = f"no {defn.start} for this correlation id within {defn.hold:g}s; held events kept"
    return Decision(st, [Entry(EXPIRED, None, None, None, why)])


def _deadline(defn: ChoreographyDefinition, st: FlowState, t: TimerDue) -> Decision:
    current = status(defn, st)
    if st.started_at is None or current in FINAL or st.stalled:
        return Decision(st)
    st.stalled = True
    stalled = ChoreographyStalled(
        defn.name, st.correlation_id, current, expects(defn, st), owed(defn, st), t.at
    )
    why = f"deadline passed while {current}"
    return Decision(st, [Entry(STALLED, None, None, None, why)], stalled=stalled)


def _outside(st: FlowState, a: Arrived, kind: str, reason: str) -> Decision:
    return Decision(st, [Entry(kind, a.type, None, a.message_id, reason)])


# -- what the state means -----------------------------------------------------


def owed(defn: ChoreographyDefinition, st: FlowState) -> list[str]:
    """Steps whose compensation a failure triggered and no event confirmed yet."""
    seen = set(st.failures)
    return [u.step for u in defn.undos if seen.intersection(u.on) and u.step not in st.undone]


def expects(defn: ChoreographyDefinition, st: FlowState) -> list[str]:
    """The event types the flow still waits for, in the order it needs them."""
    if st.started_at is None:
        return [defn.start]
    if status(defn, st) in FINAL:
        return []
    if st.failures:
        wanted = [u.done for u in defn.undos if u.step in owed(defn, st)]
    else:
        wanted = [s.done for s in defn.steps if s.name not in st.done]
    if st.completion is None:
        wanted += list(defn.completions)
    return wanted


def status(defn: ChoreographyDefinition, st: FlowState) -> str:
    """running, completed, compensating, compensated, stuck or failed (held or
    orphaned while the start has not arrived)."""
    if st.started_at is None:
        return ORPHANED if st.orphaned else HELD
    if st.undo_failed:
        return FAILED
    ended = st.completion is not None or not defn.completions
    if st.failures and ended and not owed(defn, st):
        return COMPENSATED
    if not st.failures and ended and len(st.done) == len(defn.steps):
        return COMPLETED
    if st.stalled:
        return STUCK
    return COMPENSATING if st.failures else RUNNING
