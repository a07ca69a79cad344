"""Build-time checks of the acquire-first saga shape (timeout-based locks).

The shape: take every lock the work needs first (the *reserve phase*: steps
that only reserve), then do the work, then confirm the locks at the pivot or
after it, before they expire::

    reserve-stock   .reserves(ttl=120)      ┐ reserve phase, compensated by a release
    reserve-seat    .reserves(ttl=300)      ┘
    charge-card     (compensatable: refund)   the work
    confirm         .confirms("reserve-stock", "reserve-seat").pivot()

A confirm that finds a lock expired is refused with a business error; at the
pivot that compensates the saga, after it the saga can only retry. So the
time a saga may take to reach its last confirm must stay under the shortest
lock's TTL. It is bounded by the saga's ``deadline`` (which compensates a
saga that has not passed the pivot in time) plus the timeouts of the steps
after the pivot up to the last confirm; ``build()`` warns with those numbers
when the bound is missing or not below the TTL.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import DefinitionError, LockTimingWarning

if TYPE_CHECKING:
    from .definition import StepDef


def check_locks(name: str, steps: Sequence[StepDef], deadline: float | None) -> None:
    """Reject a malformed reserve phase; warn when the timing cannot be guaranteed."""
    reserving = [s for s in steps if s.lock_ttl is not None]
    confirming = [s for s in steps if s.confirms]
    if not reserving and not confirming:
        return
    _check_phase(name, steps, reserving)
    _check_confirms(name, steps, reserving, confirming)
    _check_timing(name, steps, reserving, confirming, deadline)


def _check_phase(name: str, steps: Sequence[StepDef], reserving: list[StepDef]) -> None:
    groups = sorted({s.group for s in reserving})
    if groups != list(range(groups[0], groups[-1] + 1)):
        raise DefinitionError(f"saga {name!r}: the reserve phase must be consecutive steps")
    pivot = _pivot_group(steps)
    for s in steps:
        if s.group in groups and s.lock_ttl is None:
            raise DefinitionError(
                f"saga {name!r}, step {s.name!r}: runs in the reserve phase but takes no lock"
            )
    for s in reserving:
        where = f"saga {name!r}, step {s.name!r}"
        if s.compensation is None or s.kind != "compensatable":
            raise DefinitionError(f"{where}: a reserve step needs a compensation (a release)")
        if pivot is not None and s.group >= pivot:
            raise DefinitionError(f"{where}: the reserve phase must come before the pivot")


def _check_confirms(
    name: str, steps: Sequence[StepDef], reserving: list[StepDef], confirming: list[StepDef]
) -> None:
    pivot = _pivot_group(steps)
    phase_end = max(s.group for s in reserving) if reserving else -1
    by_name = {s.name: s for s in reserving}
    for c in confirming:
        where = f"saga {name!r}, step {c.name!r}"
        unknown = [n for n in c.confirms if n not in by_name]
        if unknown:
            raise DefinitionError(f"{where}: confirms {unknown[0]!r}, which takes no lock")
        if c.group <= phase_end or (pivot is not None and c.group < pivot):
            raise DefinitionError(
                f"{where}: locks are confirmed after the reserve phase, at the pivot or after it"
            )
    confirmed = {n for c in confirming for n in c.confirms}
    for s in reserving:
        if s.name not in confirmed:
            raise DefinitionError(
                f"saga {name!r}, step {s.name!r}: no later step confirms its lock"
            )


def _check_timing(
    name: str,
    steps: Sequence[StepDef],
    reserving: list[StepDef],
    confirming: list[StepDef],
    deadline: float | None,
) -> None:
    shortest = min(reserving, key=lambda s: s.lock_ttl or 0.0)
    ttl = shortest.lock_ttl or 0.0
    lock = f"the lock of step {shortest.name!r} lives {ttl:g}s"
    if deadline is None:
        return _warn(f"saga {name!r}: no deadline bounds the time to its confirms, but {lock}")
    reach, after = confirm_bound(steps, confirming, deadline)
    if reach is None:
        return _warn(
            f"saga {name!r}: step {after!r} runs between the pivot and a confirm with no "
            f"timeout, so nothing bounds the time to the confirms, but {lock}"
        )
    if reach >= ttl:
        _warn(
            f"saga {name!r}: the confirms may come {reach:g}s after the start (deadline "
            f"{deadline:g}s + step timeouts after the pivot), but {lock}"
        )


def confirm_bound(
    steps: Sequence[StepDef], confirming: list[StepDef], deadline: float
) -> tuple[float | None, str | None]:
    """The latest a saga reaches its last confirm, in seconds after its start.

    (None, step) when a step between the pivot and the last confirm has no
    timeout. The deadline covers everything up to the pivot.
    """
    pivot = _pivot_group(steps)
    last = max(c.group for c in confirming)
    reach = deadline
    for s in steps:
        if pivot is not None and pivot < s.group <= last:
            if s.timeout is None:
                return None, s.name
            reach += s.timeout
    return reach, None


def _pivot_group(steps: Sequence[StepDef]) -> int | None:
    return next((s.group for s in steps if s.kind == "pivot"), None)


def _warn(message: str) -> None:
    warnings.warn(message, LockTimingWarning, stacklevel=5)
