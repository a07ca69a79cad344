"""The saga state machine: where a reply goes next, as a pure function.

:meth:`SagaMachine.apply` takes an instance and one event — the saga started,
a reply came in, a timer fired, an operator acted — and returns a
:class:`Decision`: the new instance and the effects to carry out (commands to
send, local steps to run, timers to start or cancel, history lines). It does
no I/O; :mod:`sagakit.saga.coordinator` loads, applies, persists and sends in
one transaction. So the whole saga logic can be tested, and drawn, without a
database.

The rules, in the words of the original saga paper: the executed sequence is
T1..Tn, or T1..Tj then Cj..C1, plus forward recovery after the pivot.

- A group's steps are sent together; the next group starts when all replied.
- A failure before the pivot compensates the completed steps in reverse
  order; compensations are retried by the definition's compensation policy.
- A retriable step (after the pivot) is retried by its own policy.
- A step with no compensation that times out may have taken effect, so it is
  asked again instead of compensated around: the participant's inbox answers
  a repeat with the stored outcome.
- Only the reply to the latest command of a step counts; any other reply is
  recorded as ignored and changes nothing.
- When a retry policy gives up the instance stops in ``failed`` for an
  operator, who may retry it with a fresh budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from ..errors import InvalidOperatorAction
from ..messages import Failure, new_id, spec_of
from ..ops import Actor
from ..policies import RetryPolicy
from .definition import SagaDefinition, StepDef
from .patch import apply_patch, diff
from .state import Pending, Phase, Progress, SagaState

LOCAL_RESULT = "sagakit.LocalResult"
RUN_LOCAL = "sagakit.RunLocal"
LOCAL_SENDER = "sagakit.local"  #: the sender of a local step's result


@dataclass(slots=True)
class Instance:
    """A saga instance as the machine sees it: plain data."""

    id: str
    type: str
    version: int
    state: SagaState
    data: Any
    progress: Progress
    error: str | None = None

    def copy(self) -> Instance:
        return dataclasses.replace(self, progress=self.progress.copy())


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """A new instance: send its first group."""


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A reply (or a local step's result) for ``step``."""

    step: str
    causation_id: str | None
    message_id: str
    type: str
    outcome: str
    payload: bytes
    sender: str | None = None

    @property
    def failed(self) -> bool:
        return self.outcome == "failure"


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A durable timer: ``timeout`` and ``retry`` carry the awaited message id."""

    kind: Literal["timeout", "retry", "deadline"]
    token: str
    step: str
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class OperatorAction:
    """An operator's decision about a stuck or unwanted instance."""

    action: Literal["retry", "skip", "compensate", "abort", "resume", "edit"]
    actor: Actor
    reason: str
    #: the step a ``skip`` passes over (None: the one the instance is stuck on)
    step: str | None = None
    #: ``edit``: a JSON patch on the saga's data; ``skip``: the output the operator
    #: supplies for the skipped step, as a patch applied before it counts as done
    patch: tuple[dict[str, Any], ...] | None = None


Event = Started | ReplyReceived | TimerFired | OperatorAction


# -- effects -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Send ``command`` to ``participant`` under ``message_id``; the reply comes back."""

    message_id: str
    step: str
    phase: str
    attempt: int
    participant: str
    command: Any


@dataclass(frozen=True, slots=True)
class RunLocalStep:
    """Run the step's local function in a coordinator process."""

    message_id: str
    step: str
    phase: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StartTimer:
    """A durable timer firing :class:`TimerFired` after ``seconds``."""

    message_id: str
    step: str
    kind: Literal["timeout", "retry", "deadline"]
    token: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    message_id: str


@dataclass(frozen=True, slots=True)
class HistoryLine:
    entry: str
    step: str | None = None
    message_id: str | None = None
    detail: str | None = None


Effect = SendCommand | RunLocalStep | StartTimer | CancelTimer | HistoryLine


@dataclass(slots=True)
class Decision:
    """The new instance and what to do; ``changed`` is False if only history grew."""

    instance: Instance
    effects: list[Effect] = field(default_factory=list)
    changed: bool = True

    def of(self, kind: type[Any]) -> list[Any]:
        """The effects of one kind, in order."""
        return [e for e in self.effects if isinstance(e, kind)]


class SagaMachine:
    """The decisions of one saga definition."""

    def __init__(self, defn: SagaDefinition[Any], *, ids: Callable[[], str] = new_id) -> None:
        self.defn = defn
        self.ids = ids
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    def apply(self, instance: Instance, event: Event) -> Decision:
        """The decision for ``event``; ``instance`` itself is left unchanged."""
        run = _Run(self, Decision(instance.copy()))
        if isinstance(event, Started):
            run.started()
        elif isinstance(event, ReplyReceived):
            run.reply(event)
        elif isinstance(event, TimerFired):
            run.timer(event)
        else:
            run.operator(event)
        return run.decision

    def decode(self, cls: type[Any], raw: bytes) -> Any:
        dec = self._decoders.get(cls)
        if dec is None:
            dec = self._decoders[cls] = msgspec.json.Decoder(cls)
        return dec.decode(raw)


class _Unexpected(Exception):
    """Internal: a reply type the step did not declare (never leaves the machine)."""


MAX_KEPT = 16 * 1024  #: bytes of an unapplied reply kept in the progress record
HISTORY_FULL = 10  #: attempts of a step whose every line goes into the history
HISTORY_EVERY = 100  #: after that, the lines of one attempt in this many


def noted(attempt: int) -> bool:
    """Whether an attempt's lines go into the history.

    A step retried for ever would otherwise add lines for every attempt; the
    attempt count itself is always in the progress record.
    """
    return attempt <= HISTORY_FULL or attempt % HISTORY_EVERY == 0


class _Run:
    """One application of the machine: the instance being changed and the effects."""

    def __init__(self, machine: SagaMachine, decision: Decision) -> None:
        self.m = machine
        self.defn = machine.defn
        self.decision = decision
        self.inst = decision.instance
        self.prog = decision.instance.progress

    def emit(self, effect: Effect) -> None:
        self.decision.effects.append(effect)

    def log(
        self,
        entry: str,
        step: str | None = None,
        mid: str | None = None,
        detail: str | None = None,
        *,
        attempt: int = 1,
    ) -> None:
        if noted(attempt):
            self.emit(HistoryLine(entry, step, mid, detail))

    # -- events ---------------------------------------------------------------

    def started(self) -> None:
        self.log("started", detail=f"{self.defn.name} v{self.defn.version}")
        self.advance()
        if self.defn.deadline:
            tid = self.prog.deadline_timer = self.m.ids()
            self.emit(StartTimer(tid, "", "deadline", self.inst.id, self.defn.deadline))

    def reply(self, r: ReplyReceived) -> None:
        p = self.prog.pending.get(r.step)
        if p is None or p.waiting or p.message_id != r.causation_id:
            return self.ignore(r, "not awaited")
        expected = self.sender_of(r.step, p.phase)
        if r.sender != expected:
            return self.ignore(r, f"sent by {r.sender!r}, but the command went to {expected!r}")
        self.settle(r.step, p)
        self.log("reply", r.step, r.message_id, f"{r.type} ({r.outcome})", attempt=p.attempt)
        if r.failed:
            failure = _failure_of(r.payload)
            text = f"{failure.code}: {failure.message}"
            self.failed(r.step, p, text, maybe_applied=False, failure=failure)
        elif p.phase == Phase.COMPENSATE:
            self.compensated(r.step)
        else:
            self.succeeded(r.step, p, r)

    def ignore(self, r: ReplyReceived, why: str) -> None:
        """Record a reply that must not count; the instance stays as it was."""
        self.log("reply-ignored", r.step, r.message_id, f"{r.type} ({r.outcome}): {why}")
        self.decision.changed = False

    def sender_of(self, step: str, phase: str) -> str:
        """Who must answer the command of ``step`` in ``phase``."""
        sdef = self.defn.step(step)
        if sdef.local is not None:
            return LOCAL_SENDER
        action = sdef.action if phase == Phase.FORWARD else sdef.compensation
        return action.participant if action is not None else ""

    def timer(self, t: TimerFired) -> None:
        if t.kind == "deadline":
            return self.deadline()
        p = self.prog.pending.get(t.step)
        if p is None or p.message_id != t.token:
            self.decision.changed = False  # the step moved on; a stale timer changes nothing
            return
        del self.prog.pending[t.step]
        if t.kind == "retry":
            return self.send(self.defn.step(t.step), p.phase, p.attempt + 1, base=p.base)
        detail = f"no reply within {t.seconds}s"
        self.log("timeout", t.step, p.message_id, detail, attempt=p.attempt)
        self.timed_out(t.step, p, f"timeout after {t.seconds}s")

    def operator(self, op: OperatorAction) -> None:
        self.log(f"operator-{op.action}", detail=f"by {op.actor}: {op.reason}")
        actions = {
            "retry": op_retry,
            "skip": op_skip,
            "compensate": op_compensate,
            "resume": op_resume,
            "edit": op_edit,
        }
        actions.get(op.action, op_abort)(self, op)

    # -- forward ----------------------------------------------------------------

    def advance(self) -> None:
        """Send the next group's steps, or complete the saga."""
        done = set(self.prog.done)
        for group in self.defn.groups:
            todo = [s for s in group if s.name not in done]
            if todo:
                for s in todo:
                    self.send(s, Phase.FORWARD, 1)
                return
        self.finish(SagaState.COMPLETED)

    def succeeded(self, step: str, p: Pending, r: ReplyReceived) -> None:
        sdef = self.defn.step(step)
        try:
            self.inst.data = self.fold(sdef, r)
        except Exception as exc:  # a bad reply, or a bug in the user's on_reply
            return self.unapplied(step, p, r, f"{type(exc).__name__}: {exc}")
        self.mark_done(step)

    def mark_done(self, step: str) -> None:
        """A forward step is done (or an operator passed over it): carry on."""
        self.prog.done.append(step)
        if self.defn.step(step).kind in ("pivot", "retriable"):
            self.prog.pivoted = True
        if not self.prog.pending and self.inst.state == SagaState.RUNNING:
            self.advance()

    def unapplied(self, step: str, p: Pending, r: ReplyReceived, reason: str) -> None:
        """A success reply that cannot be folded into the data: stop for an operator.

        The step took effect (its participant said so), so compensating around
        it could leave that effect behind; carrying on without its output could
        be wrong too. The reply is kept, and an operator retry asks again (the
        participant answers with the stored reply) once the cause is fixed.
        """
        self.prog.unapplied[step] = f"{r.type}: {r.payload[:MAX_KEPT].decode(errors='replace')}"
        self.prog.stuck = Pending("", p.attempt, Phase.FORWARD, base=p.base)
        self.prog.stuck_step = step
        self.inst.error = f"step {step!r} succeeded but its reply could not be applied: {reason}"
        self.log("reply-unapplied", step, r.message_id, reason)
        self.finish(SagaState.FAILED)

    def fold(self, sdef: StepDef, r: ReplyReceived) -> Any:
        if r.type == LOCAL_RESULT:
            return self.m.decode(self.defn.data_type, r.payload)
        if not sdef.on_reply:
            return self.inst.data
        handler = sdef.on_reply.get(r.type)
        if handler is None:
            raise _Unexpected(f"unexpected reply type {r.type!r} for step {sdef.name!r}")
        cls, fn = handler
        new = fn(self.inst.data, self.m.decode(cls, r.payload))
        return self.inst.data if new is None else new

    # -- failure ----------------------------------------------------------------

    def failed(
        self,
        step: str,
        p: Pending | None,
        reason: str,
        *,
        maybe_applied: bool,
        failure: Failure | None = None,
    ) -> None:
        """A step failed: retry it, compensate, or stop for an operator."""
        sdef = self.defn.step(step)
        p = p or Pending("", 1, Phase.FORWARD)
        if p.phase == Phase.FORWARD and sdef.on_failure is not None:
            self.fold_failure(sdef, failure or Failure("sagakit.StepFailed", reason, True))
        if p.phase == Phase.COMPENSATE:
            return self.retry_or_stop(sdef, p, self.defn.compensation_retry, reason)
        if sdef.kind == "retriable" and sdef.retry is not None:
            return self.retry_or_stop(sdef, p, sdef.retry, reason)
        also = [step] if maybe_applied else []
        self.begin_compensation(f"step {step!r} failed: {reason}", also)

    def fold_failure(self, sdef: StepDef, failure: Failure) -> None:
        """Let the step's ``on_failure`` record the failure in the data."""
        assert sdef.on_failure is not None
        try:
            new = sdef.on_failure(self.inst.data, failure)
        except Exception as exc:  # a bug in user code must not wedge the instance
            self.log("on-failure-raised", sdef.name, detail=f"{type(exc).__name__}: {exc}")
            return
        if new is not None:
            self.inst.data = new

    def timed_out(self, step: str, p: Pending, reason: str) -> None:
        """A reply is missing: compensate if the step can be undone, else ask again.

        A step with no compensation (the pivot, say) may have taken effect, and
        nothing could undo it, so its command is sent again: the participant's
        inbox answers a repeat with the stored outcome instead of acting twice.
        """
        sdef = self.defn.step(step)
        if p.phase == Phase.FORWARD and sdef.may_leave_an_effect and sdef.kind != "retriable":
            return self.retry_or_stop(sdef, p, self.defn.compensation_retry, reason)
        self.failed(step, p, reason, maybe_applied=True)

    def retry_or_stop(self, sdef: StepDef, p: Pending, policy: RetryPolicy, reason: str) -> None:
        """Schedule the next attempt, or stop in ``failed`` when the policy gives up."""
        tries = p.attempt - p.base
        if policy.gives_up_after(tries):
            self.prog.stuck = Pending("", p.attempt, p.phase)
            self.prog.stuck_step = sdef.name
            self.inst.error = (
                f"step {sdef.name!r} ({p.phase}) gave up after {tries} attempts: {reason}"
            )
            return self.finish(SagaState.FAILED)
        delay, token = policy.delay(tries), self.m.ids()
        self.emit(StartTimer(token, sdef.name, "retry", token, delay))
        self.prog.pending[sdef.name] = Pending(token, p.attempt, p.phase, True, base=p.base)
        detail = f"attempt {p.attempt} failed: {reason}"
        self.log("retry-scheduled", sdef.name, token, detail, attempt=p.attempt)

    # -- backward ---------------------------------------------------------------

    def begin_compensation(self, reason: str, also: list[str]) -> None:
        prog = self.prog
        in_flight = [n for n, p in prog.pending.items() if p.phase == Phase.FORWARD]
        for p in prog.pending.values():
            if p.timer:
                self.emit(CancelTimer(p.timer))
        prog.pending.clear()
        candidates = also + in_flight + list(reversed(prog.done))
        order = [n for n in dict.fromkeys(candidates) if self.defn.step(n).compensatable]
        prog.compensations = order
        self.inst.state, self.inst.error = SagaState.COMPENSATING, reason
        self.log("compensating", detail=reason)
        self.compensate_next()

    def compensate_next(self) -> None:
        if not self.prog.compensations:
            return self.finish(SagaState.COMPENSATED)
        head = self.prog.compensations[0]
        self.send(self.defn.step(head), Phase.COMPENSATE, 1)

    def compensated(self, step: str) -> None:
        prog = self.prog
        if prog.compensations and prog.compensations[0] == step:
            prog.compensations.pop(0)
        prog.compensated.append(step)
        if self.inst.state == SagaState.COMPENSATING:
            self.compensate_next()

    def deadline(self) -> None:
        """Compensate a saga that ran out of time, unless it is past the point of no return.

        A step that cannot be undone still in flight (the pivot) also stops the
        deadline: compensating around it could leave its effect in place.
        """
        prog = self.prog
        if self.inst.state == SagaState.RUNNING and not prog.pivoted and not in_doubt(self):
            return self.begin_compensation("deadline passed", [])
        detail = f"state {self.inst.state}; past the point of no return"
        self.log("deadline-passed", detail=detail)

    # -- shared -----------------------------------------------------------------

    def finish(self, state: SagaState) -> None:
        self.inst.state = state
        if state != SagaState.FAILED:
            self.prog.stuck, self.prog.stuck_step = None, None
            if self.prog.deadline_timer:  # done for good: the deadline has nothing to do
                self.emit(CancelTimer(self.prog.deadline_timer))
                self.prog.deadline_timer = None
        self.log(state.value, detail=self.inst.error if state != SagaState.COMPLETED else None)

    def send(self, sdef: StepDef, phase: str, attempt: int, base: int = 0) -> None:
        """Send a step's command (or its compensation) and await the reply."""
        mid = self.m.ids()
        if sdef.local is not None:
            self.emit(RunLocalStep(mid, sdef.name, phase, attempt))
            type_name = RUN_LOCAL
        else:
            action = sdef.action if phase == Phase.FORWARD else sdef.compensation
            assert action is not None
            cmd = action.factory(self.inst.data)
            self.emit(SendCommand(mid, sdef.name, phase, attempt, action.participant, cmd))
            type_name = spec_of(type(cmd)).name
        timer = None
        if sdef.timeout is not None:
            timer = self.m.ids()
            self.emit(StartTimer(timer, sdef.name, "timeout", mid, sdef.timeout))
        self.prog.pending[sdef.name] = Pending(mid, attempt, phase, timer=timer, base=base)
        verb = "compensation-sent" if phase == Phase.COMPENSATE else "command-sent"
        self.log(verb, sdef.name, mid, f"{type_name} attempt {attempt}", attempt=attempt)

    def settle(self, step: str, p: Pending) -> None:
        del self.prog.pending[step]
        if p.timer:
            self.emit(CancelTimer(p.timer))


# -- operator actions (on a run of the machine) -------------------------------------


def op_retry(run: _Run, op: OperatorAction) -> None:
    """Re-send the step a failed instance is stuck on, or a step waiting for its next
    retry (at once: the cause is fixed), with a fresh retry budget."""
    prog, inst = run.prog, run.inst
    if waiting := retry_waiting(run):
        step, p = waiting
        run.settle(step, p)
        run.emit(CancelTimer(p.message_id))  # the retry timer's token is its message id
        return run.send(run.defn.step(step), p.phase, p.attempt + 1, base=p.attempt)
    if inst.state != SagaState.FAILED or prog.stuck is None or prog.stuck_step is None:
        raise InvalidOperatorAction(
            "only a failed instance, or one waiting to retry a step, can be retried",
            saga_id=inst.id,
        )
    stuck, step = prog.stuck, prog.stuck_step
    prog.stuck, prog.stuck_step = None, None
    prog.unapplied.pop(step, None)
    compensating = stuck.phase == Phase.COMPENSATE
    inst.state = SagaState.COMPENSATING if compensating else SagaState.RUNNING
    run.send(run.defn.step(step), stuck.phase, stuck.attempt + 1, base=stuck.attempt)


def retry_waiting(run: _Run) -> tuple[str, Pending] | None:
    """The step of an unfinished instance that waits for a retry timer, if any."""
    if run.inst.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
        return None
    return next(((n, p) for n, p in run.prog.pending.items() if p.waiting), None)


def op_skip(run: _Run, op: OperatorAction) -> None:
    """Pass over a step the operator has dealt with by hand, and carry on.

    Allowed for the step a failed instance is stuck on, or one waiting for its
    next retry. A forward step counts as done (its output stays as the data
    is); a compensation counts as compensated. The reason goes into the history.
    """
    prog, inst = run.prog, run.inst
    waiting = retry_waiting(run)
    if waiting is not None and op.step in (None, waiting[0]):
        step, phase = waiting[0], waiting[1].phase
        run.settle(step, waiting[1])
        run.emit(CancelTimer(waiting[1].message_id))
    elif inst.state == SagaState.FAILED and prog.stuck is not None and prog.stuck_step:
        if op.step not in (None, prog.stuck_step):
            raise InvalidOperatorAction(
                f"the instance is stuck on {prog.stuck_step!r}, not {op.step!r}", saga_id=inst.id
            )
        step, phase = prog.stuck_step, prog.stuck.phase
        prog.stuck, prog.stuck_step = None, None
        prog.unapplied.pop(step, None)
        inst.state = SagaState.COMPENSATING if phase == Phase.COMPENSATE else SagaState.RUNNING
    else:
        raise InvalidOperatorAction(
            "only the step a failed instance is stuck on, or one waiting to retry, can be skipped",
            saga_id=inst.id,
        )
    run.log("step-skipped", step, detail=f"{phase}: {op.reason}")
    if op.patch:
        edit_data(run, op.patch)
    if phase == Phase.COMPENSATE:
        return run.compensated(step)
    run.mark_done(step)


def op_compensate(run: _Run, op: OperatorAction) -> None:
    """Force backward recovery of a running instance, unless something could stay done."""
    if run.inst.state != SagaState.RUNNING or run.prog.pivoted:
        raise InvalidOperatorAction(
            "only a running instance before its pivot can be compensated",
            saga_id=run.inst.id,
        )
    if doubt := in_doubt(run):
        raise InvalidOperatorAction(
            f"step {doubt[0]!r} is in flight and cannot be undone; "
            "compensate once its outcome is known",
            saga_id=run.inst.id,
        )
    run.begin_compensation("forced by operator", [])


def in_doubt(run: _Run) -> list[str]:
    """Forward steps in flight whose effect, if they took one, nothing could undo."""
    return [
        n
        for n, p in run.prog.pending.items()
        if p.phase == Phase.FORWARD and run.defn.step(n).may_leave_an_effect
    ]


def op_abort(run: _Run, op: OperatorAction) -> None:
    """Stop an unfinished instance where it is, without compensating."""
    state = run.inst.state
    if state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.ABORTED):
        raise InvalidOperatorAction(f"instance is already {state}", saga_id=run.inst.id)
    for p in run.prog.pending.values():
        if p.timer:
            run.emit(CancelTimer(p.timer))
    run.prog.pending.clear()
    run.inst.error = "aborted by operator"
    run.finish(SagaState.ABORTED)


def op_resume(run: _Run, op: OperatorAction) -> None:
    """Re-send every in-flight step of an unfinished instance under its own message id.

    For an instance that waits on a reply that will not come (a command lost
    outside sagakit's guarantees, a participant's queue purged by hand): the
    participant's inbox answers a command it already handled with its stored
    reply, so a resend never runs a step twice.
    """
    inflight = [(n, p) for n, p in run.prog.pending.items() if not p.waiting]
    if run.inst.state not in (SagaState.RUNNING, SagaState.COMPENSATING) or not inflight:
        raise InvalidOperatorAction(
            "only a running or compensating instance with a step in flight can be resumed",
            saga_id=run.inst.id,
        )
    for name, p in inflight:
        resend(run, run.defn.step(name), p)


def resend(run: _Run, sdef: StepDef, p: Pending) -> None:
    """The in-flight command of ``sdef`` again, same message id and attempt."""
    if sdef.local is not None:
        run.emit(RunLocalStep(p.message_id, sdef.name, p.phase, p.attempt))
    else:
        action = sdef.action if p.phase == Phase.FORWARD else sdef.compensation
        assert action is not None
        cmd = action.factory(run.inst.data)
        run.emit(SendCommand(p.message_id, sdef.name, p.phase, p.attempt, action.participant, cmd))
    run.log("command-resent", sdef.name, p.message_id, f"attempt {p.attempt}")


def op_edit(run: _Run, op: OperatorAction) -> None:
    """Change an unfinished (or failed) instance's data with a JSON patch; the diff is kept."""
    if run.inst.state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.ABORTED):
        raise InvalidOperatorAction(
            f"instance is already {run.inst.state}; its data is final", saga_id=run.inst.id
        )
    if not op.patch:
        raise InvalidOperatorAction("edit needs a JSON patch", saga_id=run.inst.id)
    edit_data(run, op.patch)


def edit_data(run: _Run, patch: tuple[dict[str, Any], ...]) -> None:
    """Apply ``patch`` to the data, which must still fit the definition's data type."""
    before = msgspec.to_builtins(run.inst.data)
    after = apply_patch(before, list(patch))
    try:
        run.inst.data = msgspec.convert(after, run.defn.data_type)
    except msgspec.ValidationError as exc:
        raise InvalidOperatorAction(
            f"the patched data is not a valid {run.defn.data_type.__name__}: {exc}",
            saga_id=run.inst.id,
        ) from None
    changes = diff(before, after, list(patch))
    run.log("data-edited", detail=msgspec.json.encode(changes).decode())


def _failure_of(payload: bytes) -> Failure:
    try:
        return msgspec.json.decode(payload, type=Failure)
    except msgspec.MsgspecError:
        return Failure("sagakit.StepFailed", "failure reply without a Failure payload", True)
