"""Process-manager timers in the action model: fire one now, or cancel it.

A process manager's timer is a row of the instance's ``meta`` (its token, its
queue message id, when it was started and is due) and a message waiting on
the store's queue ``sagakit.process.NAME.timers`` (:mod:`sagakit.process.runtime`).

- ``timer.fire`` makes that message due now: the process manager's worker
  takes it at once and reacts exactly as it would have at the due time (the
  token still matches), so the decision is the definition's, not the
  console's. No definition is needed here.
- ``timer.cancel`` deletes the message and drops the timer from the
  instance (its revision checked), with a line in the decision history: the
  timer never fires, and a later one of the same name gets a new token.

Each runs in one store transaction with its ``done`` audit line (the
instance row is locked, as the runtime locks it); a timer that is not armed
(fired already, cancelled, no such instance) is refused and audited
``failed``. Both are idempotent in effect: the second of two identical
commands finds the timer gone and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import InvalidOperatorAction
from ..messages import encode_json
from ..process.records import HistoryEntry, Meta, ProcessRecord, ProcessTable

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import Store, Tx
    from .actions import Operations

FIRE, CANCEL = TIMER_ACTIONS = ("timer.fire", "timer.cancel")
MAX_PART = 200


@dataclass(frozen=True, slots=True)
class TimerRef:
    """One timer of one instance."""

    process: str
    key: str
    timer: str

    def __post_init__(self) -> None:
        for part in (self.process, self.key, self.timer):
            if not isinstance(part, str) or not part or len(part) > MAX_PART:
                raise ValueError(f"process, key and timer are 1 to {MAX_PART} characters")

    @property
    def target(self) -> str:
        """The audit's target."""
        return f"timer:{self.process}/{self.key}/{self.timer}"

    @property
    def queue(self) -> str:
        return f"sagakit.process.{self.process}.timers"

    def params(self) -> dict[str, Any]:
        return {"process": self.process, "key": self.key, "timer": self.timer}


def ref_of(params: dict[str, Any]) -> TimerRef:
    """The timer ``params`` names; ValueError if they do not."""
    try:
        return TimerRef(params["process"], params["key"], params["timer"])
    except KeyError as exc:
        raise ValueError(f"a timer action needs {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class PendingTimer:
    """An armed timer, as the pages and the API list it."""

    name: str
    token: int
    started_at: float
    due_at: float


def armed_timers(rec: ProcessRecord) -> list[PendingTimer]:
    """The instance's armed timers, soonest first."""
    meta = msgspec.json.decode(rec.meta, type=Meta)
    timers = [PendingTimer(n, t[0], t[2], t[3]) for n, t in meta.timers.items()]
    return sorted(timers, key=lambda t: t.due_at)


class TimerActions:
    """The two handlers, over one store's process tables."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table = ProcessTable(store)

    def register(self, ops: Operations) -> None:
        ops.extend(FIRE, self.fire)
        ops.extend(CANCEL, self.cancel)

    async def fire(
        self, tx: Tx | None, actor: Actor, target: str, reason: str, params: dict[str, Any]
    ) -> str:
        assert tx is not None
        ref = ref_of(params)
        _, meta = await self._armed(tx, ref)
        message_id, due_at = meta.timers[ref.timer][1], meta.timers[ref.timer][3]
        now = self.store.clock.now()
        n = await tx.execute(
            f"UPDATE {self.store.prefix}messages SET available_at = ? "
            "WHERE id = ? AND queue = ? AND available_at > ?",
            now,
            message_id,
            ref.queue,
            now,
        )
        if n != 1 and not await self._queued(tx, message_id):
            raise InvalidOperatorAction(f"{ref.target}: its message is gone (it has fired)")
        tx.notify(ref.queue)
        early = f"{due_at - now:.0f}s early" if due_at > now else f"{now - due_at:.0f}s late"
        return f"fired {early} (token {meta.timers[ref.timer][0]})"

    async def cancel(
        self, tx: Tx | None, actor: Actor, target: str, reason: str, params: dict[str, Any]
    ) -> str:
        assert tx is not None
        ref = ref_of(params)
        rec, meta = await self._armed(tx, ref)
        token, message_id, _, due_at = meta.timers.pop(ref.timer)
        now = self.store.clock.now()
        rec.meta, rec.updated_at = encode_json(meta), now
        await self.table.update(tx, rec)
        await self.store.queue.cancel(tx, message_id)
        detail = {"cancelled": [ref.timer], "by": actor.id, "reason": reason}
        await self.table.log(tx, _history(rec, now, detail))
        return f"cancelled (token {token}, was due in {due_at - now:.0f}s)"

    async def _armed(self, tx: Tx, ref: TimerRef) -> tuple[ProcessRecord, Meta]:
        rec = await self.table.load(tx, ref.process, ref.key)
        if rec is None:
            raise InvalidOperatorAction(f"no {ref.process} instance {ref.key!r}")
        meta = msgspec.json.decode(rec.meta, type=Meta)
        if ref.timer not in meta.timers:
            raise InvalidOperatorAction(f"{ref.target} is not armed (fired or cancelled?)")
        return rec, meta

    async def _queued(self, tx: Tx, message_id: str) -> bool:
        row = await tx.fetchone(
            f"SELECT 1 FROM {self.store.prefix}messages WHERE id = ?", message_id
        )
        return row is not None


def _history(rec: ProcessRecord, now: float, detail: dict[str, Any]) -> HistoryEntry:
    return HistoryEntry(
        0, rec.process, rec.key, now, None, "operator:timer.cancel", "operator",
        rec.status, rec.status, detail, rec.correlation_id,
    )  # fmt: skip
