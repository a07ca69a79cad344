"""Where a saga instance stands: its typed state and its progress record.

The progress record is stored as JSON beside the instance; steps are named,
never indexed, so a definition can gain steps in a new version without
breaking instances of the old one.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class SagaState(StrEnum):
    """The lifecycle of a saga instance."""

    RUNNING = "running"  #: forward steps in flight
    COMPENSATING = "compensating"  #: undoing completed steps in reverse order
    COMPLETED = "completed"  #: every step done (final)
    COMPENSATED = "compensated"  #: every completed step undone (final)
    FAILED = "failed"  #: a retry policy gave up; waits for an operator (final until retried)
    ABORTED = "aborted"  #: stopped by an operator without compensating (final)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED, SagaState.ABORTED}
)


class Phase(StrEnum):
    FORWARD = "forward"
    COMPENSATE = "compensate"


class Pending(msgspec.Struct, frozen=True):
    """A step awaiting its reply (or, if ``waiting``, its retry timer)."""

    message_id: str
    attempt: int
    phase: str
    waiting: bool = False
    timer: str | None = None
    base: int = 0  # attempts made before the last operator retry


class Progress(msgspec.Struct):
    """Which steps are done, in flight, owed a compensation, or stuck."""

    correlation_id: str = ""
    done: list[str] = []
    pending: dict[str, Pending] = {}
    compensations: list[str] = []
    compensated: list[str] = []
    pivoted: bool = False
    stuck: Pending | None = None
    stuck_step: str | None = None
    #: success replies that could not be applied, kept for the operator (type: payload)
    unapplied: dict[str, str] = {}
    #: the message id of the deadline timer, cancelled when the saga finishes
    deadline_timer: str | None = None
    #: W3C traceparent of the saga's start span: every step span joins its trace
    trace: str | None = None

    def copy(self) -> Progress:
        """A copy safe to change (pending entries are immutable)."""
        return Progress(
            self.correlation_id,
            list(self.done),
            dict(self.pending),
            list(self.compensations),
            list(self.compensated),
            self.pivoted,
            self.stuck,
            self.stuck_step,
            dict(self.unapplied),
            self.deadline_timer,
            self.trace,
        )


progress_decoder = msgspec.json.Decoder(Progress)
