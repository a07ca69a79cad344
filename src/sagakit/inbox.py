"""The inbox: whether a message may run, in one place.

Every handled message is recorded under a key in the ``inbox`` table of the
store its handler runs in. :meth:`Inbox.admit` is the first statement of a
handler's transaction and returns a typed verdict:

- ``NEW``: run the handler. The key is now held by this transaction, so a
  second copy of the same command (a duplicate delivery, or a retry sent after
  a step timeout while this one still runs) waits until this one commits or
  rolls back, then sees its outcome. Copies of one command never overlap.
- ``DUPLICATE``: an outcome is already stored; answer with the stored reply.
  The first outcome is final: a later copy can never replace it, with one
  exception that the saga asked for — a *failure* is replaced by a later run
  of a strictly higher attempt (the coordinator retrying a failed step; it
  acts only on the reply of its latest attempt, so a stale copy never wins).
- ``REFUSED``: the barrier stopped it: the step was compensated first, so the
  command must have no effect (it is answered with :class:`Cancelled`).

Keys: saga commands dedupe by (saga id, step, phase), so every copy and every
attempt of one step shares a key; everything else dedupes by message id. A
row also records the saga it belongs to, if any: retention
(:mod:`sagakit.ops.retention`) keeps it as long as that saga is unfinished.

A ``db_only`` command's first try bets that it is the first copy
(:class:`Deferred`): where the store begins transactions lazily, the
admission waits until the handler's first statement, and a handler that only
holds its writes is never admitted at all: its outcome is stored
insert-if-absent with its writes (a compensation's with a guard that its
forward step succeeded), so a copy that finds an outcome writes nothing and
is run again, admitted first.

The barrier for compensations (:meth:`Inbox.admit_compensation` passes it
with the admission): :meth:`Inbox.forward_took_effect` records a
``cancelled`` outcome for the forward step unless it succeeded, waiting for a
forward run still in its transaction. A compensation whose forward never took
effect does nothing (null compensation), and that forward can never run later.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .errors import OutcomeExists
from .store.core import InboxRow

if TYPE_CHECKING:
    from .endpoint import Scope
    from .messages import Envelope
    from .store import Store, Tx

RUNNING = "running"
SUCCESS = "success"
FAILURE = "failure"
CANCELLED = "cancelled"


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one message, with the stored outcome for a duplicate."""

    verdict: Verdict
    stored: InboxRow | None = None


def key_of(env: Envelope) -> str:
    """Saga commands dedupe by (saga, step, phase); everything else by message id."""
    h = env.headers
    if env.kind == "command" and h.saga_id and h.step:
        return f"saga:{h.saga_id}:{h.step}:{h.phase or 'forward'}"
    return env.id


def _forward_key(env: Envelope) -> str:
    h = env.headers
    return f"saga:{h.saga_id}:{h.step}:forward"


def _is_retry(env: Envelope, row: InboxRow) -> bool:
    """A saga command retrying a stored failure with a higher attempt."""
    return row.outcome == FAILURE and env.headers.attempt > row.attempt and key_of(env) != env.id


def _verdict(env: Envelope, row: InboxRow) -> Admission:
    if row.outcome == RUNNING or _is_retry(env, row):
        return Admission(Verdict.NEW)
    if row.outcome == CANCELLED:
        return Admission(Verdict.REFUSED, row)
    return Admission(Verdict.DUPLICATE, row)


class Inbox:
    """One consumer's inbox in one store."""

    def __init__(self, store: Store, consumer: str) -> None:
        self.store = store
        self.consumer = consumer

    async def admit(self, tx: Tx, env: Envelope) -> Admission:
        """Hold the message's key in ``tx`` and say whether its handler may run."""
        h = env.headers
        row = await self.store.inbox_admit(tx, self.consumer, key_of(env), h.attempt, h.saga_id)
        return _verdict(env, row)

    async def record(self, tx: Tx, env: Envelope, outcome: str, reply: bytes | None) -> None:
        """Store the outcome of a run that :meth:`admit` let through."""
        row = InboxRow(outcome, reply, env.headers.reply_to, env.headers.attempt)
        await self.store.inbox_record(tx, self.consumer, key_of(env), row)

    async def record_first(self, tx: Tx, env: Envelope, outcome: str, reply: bytes | None) -> None:
        """Store an outcome for a message never admitted, in the transaction's write batch.

        For a failure recorded after the handler's transaction rolled back: the
        usual case (no other copy has an outcome) costs no admission round trip.
        If a row exists, ``tx`` fails with :class:`~sagakit.errors.OutcomeExists` and nothing of
        it is written; the caller then admits the message as usual.
        """
        h = env.headers
        row = InboxRow(outcome, reply, h.reply_to, h.attempt)
        await self.store.inbox_record_first(tx, self.consumer, key_of(env), row, h.saga_id)

    async def admit_compensation(self, tx: Tx, env: Envelope) -> tuple[Admission, bool]:
        """:meth:`admit` a compensation and pass the barrier, in one statement where it can.

        The second value is :meth:`forward_took_effect`'s. The barrier is passed
        even for a copy that turns out a duplicate: by then the first copy has
        barred the forward step, so barring it again changes nothing.
        """
        h = env.headers
        row, forward = await self.store.inbox_admit_barring(
            tx, self.consumer, key_of(env), _forward_key(env), h.attempt, h.saga_id
        )
        return _verdict(env, row), forward == SUCCESS

    async def forward_took_effect(self, tx: Tx, env: Envelope) -> bool:
        """For a compensation: True if its forward step succeeded; else bar the forward."""
        h = env.headers
        outcome = await self.store.inbox_bar(
            tx, self.consumer, _forward_key(env), h.attempt, h.saga_id
        )
        return outcome == SUCCESS


class Deferred:
    """An admission made only if the handler's transaction begins: a bet on the first copy.

    Most commands arrive once. On a store whose transactions begin with their
    first statement (PostgreSQL), a handler that only holds its writes
    (``ctx.db.later``) needs no admission: its outcome goes in with its
    writes, reply and acknowledgement as one autocommit statement that stores
    nothing if the key already holds a row (:meth:`Inbox.record_first`). A
    handler that runs a statement is admitted right after BEGIN, before that
    statement, as usual. On SQLite, where write transactions run one at a
    time, no copy can run alongside: the handler always runs first and its
    outcome is stored insert-if-absent, one statement instead of an
    admission and an update. Either way a copy that meets another's outcome (or
    the barrier of a compensation) raises
    :class:`~sagakit.errors.OutcomeExists` with nothing written, and the
    endpoint runs the hop again, admitted first. The price of a lost bet is
    the handler's Python run twice; its effects are never applied twice.

    A compensation also bets that its forward step took effect: stored
    without admission, it holds a guard that fails unless the forward step's
    outcome is a success (:meth:`~sagakit.store.Store.inbox_require_success`).
    Otherwise it is admitted and barred the usual way (a forward step that
    never took effect means a null compensation: the hop runs again, admitted
    first, and answers without running the handler).
    """

    __slots__ = ("compensation", "scope", "verdict")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.compensation = scope.env.headers.phase == "compensate"
        #: the admission's verdict, once it was made (None: not made)
        self.verdict: Verdict | None = None

    def placed(self) -> bool:
        """True if the admission now waits for BEGIN, or needs no place before the
        handler (SQLite: no copy can run alongside); False: admit the usual way."""
        scope = self.scope
        scope.bet = scope.optimistic and (scope.tx.on_begin(self._admit) or scope.tx.serial)
        return scope.bet

    async def _admit(self) -> None:
        inbox, tx, env = self.scope.inbox, self.scope.tx, self.scope.env
        self.scope.bet = False  # admitted after all: a failure from here on is the handler's
        if not self.compensation:
            self.verdict = (await inbox.admit(tx, env)).verdict
        else:
            admission, took_effect = await inbox.admit_compensation(tx, env)
            self.verdict = admission.verdict if took_effect else Verdict.REFUSED
        self._check()

    def _check(self) -> None:
        if self.verdict is not None and self.verdict is not Verdict.NEW:
            key = key_of(self.scope.env)
            raise OutcomeExists(f"{key!r} was settled by another copy ({self.verdict.value})")

    async def answer(self, payload: object, outcome: str) -> None:
        """Record the outcome: with the admission made, or insert-if-absent without one."""
        self._check()  # again, for a handler that swallowed it
        unadmitted = self.verdict is None
        if unadmitted:
            self.scope.tx.on_begin(None)
        await self.scope.answer(payload, outcome, unadmitted=unadmitted, fold=True)
        if unadmitted and self.compensation:  # locked after the compensation's key, as admitted
            inbox = self.scope.inbox
            await inbox.store.inbox_require_success(
                self.scope.tx, inbox.consumer, _forward_key(self.scope.env)
            )
