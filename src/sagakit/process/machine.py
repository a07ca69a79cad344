"""The pure process-manager machine: instance + input -> outcome, no I/O.

:func:`apply` decides everything the runtime then carries out in one
transaction: which handler runs (by the instance's status), the new state,
the commands and events, which timers start and which are cancelled, and the
line of the decision history. The same function runs under the runtime
(:mod:`.runtime`) and under the given/when/then helpers
(:mod:`sagakit.testing.process`), so what is tested is what runs.

Timers are bound to the instance by a *token*: every timer started gets the
next number of the instance's sequence, and the instance remembers the token
of each armed timer. A timer that fires with any other token — cancelled,
restarted, or its instance finished — changes nothing, whatever the order in
which the queue delivers it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import msgspec

from ..errors import IllegalTransition, ProcessError
from .decision import Decision, Send, StartSaga
from .definition import Handler, Hold, Ignore, ProcessManager, Replied, TimerFired


class Verdict(StrEnum):
    """What became of one input, as written in the decision history."""

    STARTED = "started"
    APPLIED = "applied"
    IGNORED = "ignored"
    STALE_TIMER = "stale-timer"
    HELD = "held"


@dataclass(frozen=True, slots=True)
class Armed:
    """A running timer: its token, its queue message and when it is due."""

    token: int
    message_id: str
    started_at: float
    due_at: float


@dataclass(frozen=True, slots=True)
class Instance:
    """One process-manager instance as the machine sees it."""

    key: str
    state: Any
    status: str | None = None
    done: bool = False
    timers: Mapping[str, Armed] = field(default_factory=dict)
    seq: int = 0
    correlation_id: str | None = None
    #: the step headers of commands sent and not answered yet
    awaiting: frozenset[str] = frozenset()
    #: the ``traceparent`` of the message that created it (its span joins that trace)
    trace: str | None = None


@dataclass(frozen=True, slots=True)
class Input:
    """A message, a reply or a timer, decoded, with the key it belongs to."""

    kind: Literal["message", "reply", "timer"]
    trigger: str
    payload: Any
    message_id: str
    key: str
    token: int | None = None
    correlation_id: str | None = None
    #: a reply's step header: which command it answers
    step: str | None = None


@dataclass(frozen=True, slots=True)
class OutgoingCommand:
    to: str
    command: Any
    step: str
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class StartedTimer:
    name: str
    seconds: float
    armed: Armed


@dataclass(frozen=True, slots=True)
class Outcome:
    """The whole decision for one input; the runtime persists it as it is."""

    verdict: Verdict
    before: Instance | None
    after: Instance | None
    reason: str = ""
    commands: tuple[OutgoingCommand, ...] = ()
    events: tuple[Any, ...] = ()
    sagas: tuple[StartSaga, ...] = ()
    started: tuple[StartedTimer, ...] = ()
    cancelled: tuple[str, ...] = ()  # queue message ids of timers to delete
    hold: Hold | None = None
    note: str | None = None

    @property
    def changed(self) -> bool:
        return self.after is not None and self.after != self.before

    def detail(self) -> dict[str, Any]:
        """The decision-history line's detail: what went out, what changed."""
        d: dict[str, Any] = {}
        for name, value in (
            ("reason", self.reason),
            ("note", self.note),
            ("sent", [[c.to, _type(c.command)] for c in self.commands]),
            ("published", [_type(e) for e in self.events]),
            ("sagas", [[s.saga.name, s.saga_id] for s in self.sagas]),
            ("timers", {t.name: t.seconds for t in self.started}),
            ("cancelled", len(self.cancelled)),
            ("changed", state_diff(self.before, self.after)),
        ):
            if value:
                d[name] = value
        return d


def timer_id(pm: str, key: str, name: str, token: int) -> str:
    """The queue message id of one timer: deterministic, so a decision stays pure."""
    return f"pm-timer:{pm}:{token}:{name}:{key}"


def step_of(pm: str, command: Any, seq: int) -> str:
    """The step header of a command: its type (to route the reply) and a number."""
    return f"{pm}/{_type(command)}#{seq}"


def command_of_step(step: str | None) -> str | None:
    """The command type named in a step header written by :func:`step_of`."""
    if not step or "/" not in step or "#" not in step:
        return None
    return step.split("/", 1)[1].rsplit("#", 1)[0]


def apply(pm: ProcessManager[Any], inst: Instance | None, msg: Input, now: float) -> Outcome:
    """Decide what ``msg`` does to ``inst`` (None: no instance with its key yet)."""
    if msg.kind == "timer":
        return _timer(pm, inst, msg, now)
    if pm.stateless:
        return _stateless(pm, msg)
    if inst is None:
        return _no_instance(pm, msg, now)
    before = inst
    if msg.kind == "reply":  # each command's reply counts once, whatever its copies
        if msg.step not in inst.awaiting:
            return Outcome(Verdict.IGNORED, inst, None, "reply to no command awaited (a copy?)")
        inst = dataclasses.replace(inst, awaiting=inst.awaiting - {msg.step})
    kept = inst if inst is not before else None  # a reply consumed is saved even if ignored
    h = pm.handler(msg.kind, msg.trigger, inst.status)
    if inst.done and (h is None or h.when is None):
        return Outcome(Verdict.IGNORED, before, kept, f"instance finished ({inst.status})")
    if h is None:
        return Outcome(Verdict.IGNORED, before, kept, _unhandled(pm, msg, inst))
    return _run(pm, inst, h, msg, now, before=before)


def _unhandled(pm: ProcessManager[Any], msg: Input, inst: Instance) -> str:
    if pm.handler("start", msg.trigger, None) is not None:
        return "already started"
    return f"no handler of {msg.trigger!r} in state {inst.status!r}"


def _no_instance(pm: ProcessManager[Any], msg: Input, now: float) -> Outcome:
    h = pm.handler("start", msg.trigger, None) if msg.kind == "message" else None
    if h is not None:
        return _run(pm, None, h, msg, now)
    policy = pm.policy(msg.trigger)
    if isinstance(policy, Ignore):
        return Outcome(Verdict.IGNORED, None, None, "no instance; ignored by policy")
    return Outcome(Verdict.HELD, None, None, "no instance yet; held", hold=policy)


def _timer(pm: ProcessManager[Any], inst: Instance | None, msg: Input, now: float) -> Outcome:
    armed = inst.timers.get(msg.trigger) if inst is not None else None
    if inst is None or inst.done or armed is None or armed.token != msg.token:
        return Outcome(Verdict.STALE_TIMER, inst, None, "timer no longer armed")
    timers = {n: a for n, a in inst.timers.items() if n != msg.trigger}
    inst2 = dataclasses.replace(inst, timers=timers)
    fired = TimerFired(msg.trigger, armed.started_at, armed.due_at)
    h = pm.handler("timer", msg.trigger, inst.status)
    if h is None:
        return Outcome(Verdict.IGNORED, inst, inst2, f"no handler of timer in {inst.status!r}")
    return _run(pm, inst2, h, dataclasses.replace(msg, payload=fired), now, before=inst)


def _stateless(pm: ProcessManager[Any], msg: Input) -> Outcome:
    h = pm.handler(msg.kind, msg.trigger, None)
    if h is None:
        return Outcome(Verdict.IGNORED, None, None, f"no handler of {msg.trigger!r}")
    d = _call(h, msg.payload, None, start=True)
    if d.changed or d.timers or d.completed:
        raise ProcessError(f"{pm.name}: a stateless saga's handler may only send and publish")
    commands = tuple(
        OutgoingCommand(s.to, s.command, step_of(pm.name, s.command, 0), s.attempt) for s in d.sends
    )
    return Outcome(Verdict.APPLIED, None, None, "", commands, d.events, d.sagas, note=d.note)


def _run(
    pm: ProcessManager[Any],
    inst: Instance | None,
    h: Handler,
    msg: Input,
    now: float,
    *,
    before: Instance | None = None,
) -> Outcome:
    before = before if before is not None else inst
    d = _call(h, msg.payload, inst.state if inst else None, start=inst is None)
    if inst is None and not d.changed:
        raise ProcessError(f"{pm.name}: starting handler of {msg.trigger!r} must decide a state")
    state = d.state if d.changed else inst.state  # type: ignore[union-attr]
    status = pm.status_of(state)
    _check_transition(pm, h, inst, status)
    base = inst or Instance(msg.key, state, correlation_id=msg.correlation_id or msg.key)
    done = d.completed or (status is not None and status in pm.final)
    return _effects(pm, base, d, state, status, done, now, before)


def _effects(
    pm: ProcessManager[Any],
    base: Instance,
    d: Decision,
    state: Any,
    status: str | None,
    done: bool,
    now: float,
    before: Instance | None,
) -> Outcome:
    seq, timers, cancelled = base.seq, dict(base.timers), []
    for name in (*d.cancels, *(t.name for t in d.timers)):
        if name in timers:
            cancelled.append(timers.pop(name).message_id)
    started = []
    for t in () if done else d.timers:
        seq += 1
        armed = Armed(seq, timer_id(pm.name, base.key, t.name, seq), now, now + t.seconds)
        timers[t.name] = armed
        started.append(StartedTimer(t.name, t.seconds, armed))
    if done:
        cancelled += [a.message_id for a in timers.values()]
        timers = {}
    commands = []
    for s in d.sends:
        seq += 1
        step = step_of(pm.name, s.command, seq)
        commands.append(OutgoingCommand(s.to, s.command, step, s.attempt))
    awaiting = base.awaiting | {c.step for c in commands}
    after = dataclasses.replace(
        base, state=state, status=status, done=done, timers=timers, seq=seq, awaiting=awaiting
    )
    verdict = Verdict.STARTED if before is None else Verdict.APPLIED
    return Outcome(
        verdict, before, after, "", tuple(commands), d.events, d.sagas,
        tuple(started), tuple(cancelled), note=d.note,
    )  # fmt: skip


def _call(h: Handler, payload: Any, state: Any, *, start: bool) -> Decision:
    d = h.fn(payload) if start else h.fn(payload, state)
    if not isinstance(d, Decision):
        raise ProcessError(f"handler of {h.trigger!r} returned {type(d).__name__}, not a Decision")
    return d


def _check_transition(
    pm: ProcessManager[Any], h: Handler, inst: Instance | None, status: str | None
) -> None:
    if not pm.states or (inst is not None and status == inst.status):
        return
    if status not in pm.states:
        raise IllegalTransition(f"{pm.name}: {h.trigger!r} moved to undeclared state {status!r}")
    allowed = h.to if h.to is not None else (None if inst is None else frozenset())
    if allowed is not None and status not in allowed:
        raise IllegalTransition(
            f"{pm.name}: {h.kind} handler of {h.trigger!r} moved "
            f"{inst.status if inst else None!r} -> {status!r}, allowed: {sorted(allowed)}"
        )


def state_diff(before: Instance | None, after: Instance | None) -> dict[str, Any]:
    """The fields of the state that changed: ``{field: [old, new]}``."""
    if after is None:
        return {}
    old = _fields(before.state) if before is not None else {}
    new = _fields(after.state)
    return {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}


def _fields(state: Any) -> dict[str, Any]:
    value = msgspec.to_builtins(state) if state is not None else {}
    return value if isinstance(value, dict) else {"value": value}


def _type(payload: Any) -> str:
    spec = getattr(type(payload), "__sagakit_message__", None)
    return spec.name if spec is not None else type(payload).__name__


def replied(command: str, ok: bool, value: Any) -> Replied:
    return Replied(command, ok, value)


__all__ = ["Armed", "Input", "Instance", "Outcome", "Send", "Verdict", "apply"]
