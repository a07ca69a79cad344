"""Whether an action fits an instance, decided from its stored state alone (pure).

The console and the CLI check this before they queue a command, so an
operator hears at once that a completed saga cannot be retried, and a bulk
dry run counts only the instances the action would take. The saga machine
stays the authority: it checks again when the command runs, against the
instance as it is then.
"""

from __future__ import annotations

from ..saga.state import Progress, SagaState

#: the saga actions of the action model, in the order the console shows them
SAGA_ACTIONS = ("retry", "skip", "compensate", "abort", "resume", "edit")
FINAL = (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.ABORTED)
UNFINISHED = (SagaState.RUNNING, SagaState.COMPENSATING)


def refusal(action: str, state: SagaState, prog: Progress) -> str | None:
    """Why ``action`` cannot apply to an instance in ``state`` (None: it can)."""
    check = _CHECKS.get(action)
    if check is None:
        return f"unknown action {action!r}"
    return check(state, prog)


def _stuck_or_waiting(state: SagaState, prog: Progress) -> str | None:
    if state == SagaState.FAILED and prog.stuck_step is not None:
        return None
    if state in UNFINISHED and any(p.waiting for p in prog.pending.values()):
        return None
    return f"the instance is {state}, neither failed on a step nor waiting to retry one"


def _compensate(state: SagaState, prog: Progress) -> str | None:
    if state != SagaState.RUNNING or prog.pivoted:
        return "only a running instance before its pivot can be compensated"
    return None


def _abort(state: SagaState, prog: Progress) -> str | None:
    return f"the instance is already {state}" if state in FINAL else None


def _resume(state: SagaState, prog: Progress) -> str | None:
    if state in UNFINISHED and any(not p.waiting for p in prog.pending.values()):
        return None
    return "only a running or compensating instance with a step in flight can be resumed"


def _edit(state: SagaState, prog: Progress) -> str | None:
    return f"the instance is already {state}; its data is final" if state in FINAL else None


_CHECKS = {
    "retry": _stuck_or_waiting,
    "skip": _stuck_or_waiting,
    "compensate": _compensate,
    "abort": _abort,
    "resume": _resume,
    "edit": _edit,
}
