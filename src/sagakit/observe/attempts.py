"""Which step attempts a coordinator decision ended, and how: pure, no I/O.

A step attempt starts when its command (or compensation, or local step) is
sent and ends when the coordinator stops waiting for it: its reply came, its
timeout fired, or the saga moved on without it (compensation began, an
operator aborted). Both ends are in the stored instance: the attempt's
message id is a time-ordered UUID written in the progress record when it was
sent, and the decision that removes it from ``pending`` is the end. So spans
and durations can be computed from any coordinator process, after any
restart, with nothing kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..messages import Failure
from ..saga.machine import ReplyReceived, TimerFired

if TYPE_CHECKING:
    from ..saga.definition import SagaDefinition
    from ..saga.machine import Decision, Event, Instance
    from ..saga.state import Pending

SUCCESS, FAILURE, TIMEOUT, CANCELLED = "success", "failure", "timeout", "cancelled"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One finished attempt of a step, with what the span and metrics need."""

    step: str
    phase: str  # forward | compensate
    kind: str  # compensatable | pivot | retriable
    attempt: int
    message_id: str
    started: float  # seconds since the epoch
    outcome: str  # success | failure | timeout | cancelled
    error_type: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.outcome != SUCCESS


def ended(
    defn: SagaDefinition[Any], before: Instance, decision: Decision, event: Event, now: float
) -> list[Attempt]:
    """The attempts awaited before ``event`` and no longer awaited after it."""
    after = decision.instance.progress.pending
    gone = [
        (step, p)
        for step, p in before.progress.pending.items()
        if not p.waiting and (step not in after or after[step].message_id != p.message_id)
    ]
    return [_attempt(defn, step, p, event, now) for step, p in gone]


def decided_at(before: Instance, decision: Decision, now: float) -> float:
    """When the decision was taken: the creation time of the first command it sent.

    Message ids carry milliseconds, so taking an attempt's end from the same
    clock as the next attempt's start keeps the spans of a sequence in order.
    """
    old = before.progress.pending
    times = [
        t
        for step, p in decision.instance.progress.pending.items()
        if (step not in old or old[step].message_id != p.message_id)
        and (t := sent_at(p.message_id)) is not None
    ]
    return min([now, *times])


def _attempt(defn: SagaDefinition[Any], step: str, p: Pending, event: Event, now: float) -> Attempt:
    outcome, error_type, error = _outcome(step, p, event)
    sdef = defn.by_name.get(step)
    kind = sdef.kind if sdef is not None else "unknown"
    started = min(sent_at(p.message_id) or now, now)
    return Attempt(
        step, p.phase, kind, p.attempt, p.message_id, started, outcome, error_type, error
    )


def _outcome(step: str, p: Pending, event: Event) -> tuple[str, str | None, str | None]:
    if isinstance(event, ReplyReceived) and event.step == step:
        if not event.failed:
            return SUCCESS, None, None
        failure = failure_of(event.payload)
        return FAILURE, failure.code, failure.message
    if isinstance(event, TimerFired) and event.kind == "timeout" and event.token == p.message_id:
        return TIMEOUT, "timeout", f"no reply within {event.seconds}s"
    return CANCELLED, None, None


def failure_of(payload: bytes) -> Failure:
    try:
        return msgspec.json.decode(payload, type=Failure)
    except msgspec.MsgspecError:
        return Failure("sagakit.StepFailed", "failure reply without a Failure payload", True)


def sent_at(message_id: str) -> float | None:
    """The creation time inside a version-7 UUID (None for any other id)."""
    hexa = message_id.replace("-", "")
    if len(hexa) != 32 or hexa[12] != "7":
        return None
    try:
        return int(hexa[:12], 16) / 1000.0
    except ValueError:
        return None
