"""Finding saga instances for the console, the CLI and bulk actions.

:class:`SagaQuery` is the one filter the saga list page, ``sagakit sagas
list`` and every bulk action take: type, state, step (the one an instance is
stuck on or waiting for), age, stuck, correlation id, definition version.
Type, state and age are selected in SQL; the rest is read from each
instance's progress record, over at most :data:`SCAN` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import InvalidOperatorAction
from ..saga.state import SagaState, progress_decoder

if TYPE_CHECKING:
    from ..store import LogEntry, SagaRecord, Store

SCAN = 10_000  #: instances one query reads at most (and a bulk action takes at most)
STATES = tuple(s.value for s in SagaState)


@dataclass(frozen=True, slots=True)
class SagaQuery:
    """Which instances: every given field must match."""

    type: str | None = None
    state: str | None = None
    step: str | None = None
    #: seconds since the instance was created
    older_than: float | None = None
    #: running or compensating, and unchanged for that many seconds
    stuck_for: float | None = None
    correlation_id: str | None = None
    version: int | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise InvalidOperatorAction(f"unknown state {self.state!r}: one of {', '.join(STATES)}")
        if not 1 <= self.limit <= SCAN:
            raise InvalidOperatorAction(f"limit must be between 1 and {SCAN}")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}


async def select(store: Store, q: SagaQuery) -> list[SagaRecord]:
    """The matching instances, oldest first (longest stuck first with ``stuck_for``)."""
    now = store.clock.now()
    recs = await store.saga_list(
        type=q.type,
        state=q.state,
        created_before=None if q.older_than is None else now - q.older_than,
        stuck_before=None if q.stuck_for is None else now - q.stuck_for,
        limit=SCAN,
    )
    return [r for r in recs if matches(r, q)][: q.limit]


def matches(rec: SagaRecord, q: SagaQuery) -> bool:
    """The filters SQL does not apply: version, correlation id and step."""
    if q.version is not None and rec.version != q.version:
        return False
    if q.correlation_id is None and q.step is None:
        return True
    prog = progress_decoder.decode(rec.progress)
    if q.correlation_id is not None and prog.correlation_id != q.correlation_id:
        return False
    return q.step is None or q.step == prog.stuck_step or q.step in prog.pending


def summary(rec: SagaRecord) -> dict[str, Any]:
    """An instance as the list shows it."""
    prog = progress_decoder.decode(rec.progress)
    return {
        "id": rec.id,
        "type": rec.type,
        "version": rec.version,
        "state": rec.state,
        "step": prog.stuck_step or next(iter(sorted(prog.pending)), None),
        "pending": sorted(prog.pending),
        "correlation_id": prog.correlation_id,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "error": rec.error,
    }


def detail(rec: SagaRecord, history: list[LogEntry]) -> dict[str, Any]:
    """An instance with its data, progress and timeline, as the detail page shows it."""
    prog = progress_decoder.decode(rec.progress)
    return {
        **summary(rec),
        "data": msgspec.json.decode(rec.data),
        "done": list(prog.done),
        "compensated": list(prog.compensated),
        "pending": {n: msgspec.to_builtins(p) for n, p in sorted(prog.pending.items())},
        "stuck_step": prog.stuck_step,
        "pivoted": prog.pivoted,
        "deadline": rec.deadline,
        "timeline": timeline(history),
    }


#: history entries of the backward lane once a saga compensates
_STEP_ENTRIES = {"reply", "timeout", "retry-scheduled", "reply-unapplied", "command-resent"}


def timeline(history: list[LogEntry]) -> list[dict[str, Any]]:
    """The history as lanes: ``forward``, ``compensation`` or ``saga`` (whole-instance)."""
    lanes, backward = [], False
    for e in history:
        if e.entry == "compensating":
            backward = True
        elif e.entry == "operator-retry":
            backward = False  # set again by the compensation it re-sends, if any
        lane = _lane(e.entry, e.step, backward)
        backward = backward or e.entry == "compensation-sent"
        lanes.append(
            {
                "at": e.at,
                "lane": lane,
                "entry": e.entry,
                "step": e.step,
                "message_id": e.message_id,
                "detail": e.detail,
            }
        )
    return lanes


def _lane(entry: str, step: str | None, backward: bool) -> str:
    if entry == "compensation-sent":
        return "compensation"
    if entry == "command-sent":
        return "forward"
    if step is not None and entry in _STEP_ENTRIES | {"step-skipped"}:
        return "compensation" if backward else "forward"
    return "saga"
