"""Dead letters in the action model: replay or purge, single or bulk, queued and audited.

The console has no transport to replay onto, so it acts the way it acts on
sagas: :class:`DeadLetterOperations` checks who acts and why (the checks of
:class:`~.actions.Operations`, refusals audited), checks the letter (gone:
:class:`~sagakit.errors.DeadLetterNotFound`; a replay of bytes that are not
the whole envelope: :class:`~sagakit.errors.NotReplayable`), then queues an
:class:`~.commands.OperatorCommand` (``dead-letters.replay`` or
``dead-letters.purge``, target ``dead-letter:<seq>``) on ``sagakit.operator``.
A coordinator process executes it through its ``app.dead_letters`` in one
transaction with its audit line; run twice, it finds the line and does
nothing. A bulk action takes a :class:`~sagakit.ops.DeadLetterFilter`; its dry
run returns the exact count and a sample, and changes and records nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import DeadLetterError, NotReplayable, UnknownAction
from ..messages import new_id
from ..ops.dead_letters import DeadLetters, replayable
from .actions import SAMPLE, ActionRequest, Submitted
from .audit import Audit
from .commands import DEAD_LETTER_ACTIONS, OPERATOR_QUEUE, OperatorCommand, encode, fingerprint

if TYPE_CHECKING:
    from ..ops import Actor
    from ..ops.dead_letters import Action, DeadLetterFilter, DeadLetterOutcome
    from ..store import Store, Tx
    from ..store.core import DeadLetter
    from .actions import Operations

REPLAY, PURGE = DEAD_LETTER_ACTIONS


MAX_SEQ = 2**63 - 1  #: a dead letter's number is a 64-bit row id


def seq_of(value: int | str) -> int:
    """A dead letter's number from a path or a form; ValueError unless 1 to 2**63 - 1."""
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_SEQ:
        raise ValueError("a dead letter's number is a whole number from 1 to 2**63 - 1")
    return int(text)


def target_of(seq: int) -> str:
    """The audit's target for one dead letter."""
    return f"dead-letter:{seq}"


def action_name(verb: str) -> str:
    """``replay`` -> ``dead-letters.replay``; a verb that is neither is refused."""
    name = f"dead-letters.{verb}"
    if name not in DEAD_LETTER_ACTIONS:
        raise UnknownAction(f"no dead-letter action {verb!r} (replay or purge)")
    return name


@dataclass(slots=True)
class DeadLetterPlan:
    """What a bulk dead-letter action takes (dry run) or took."""

    action: str
    dry_run: bool
    count: int
    #: up to ten of the letters it takes, as the API lists them
    sample: list[dict[str, Any]] = field(default_factory=list)
    #: matching letters the action does not fit (a replay of a truncated letter)
    refused: int = 0
    command_id: str | None = None


class DeadLetterOperations:
    """Acting on one store's dead letters through the action model of ``ops``."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.store = ops.store
        self.letters = DeadLetters(ops.store)

    async def submit(
        self, seq: int, action: str, reason: str, *, actor: Actor, source: str | None = None
    ) -> Submitted:
        """Check and queue ``action`` (a name of :data:`DEAD_LETTER_ACTIONS`) on letter ``seq``."""
        req, target = ActionRequest(action, reason), target_of(seq)
        await self.ops.allowed(actor, req, target, source)
        try:
            letter = await self.letters.get(seq)
            if action == REPLAY:
                replayable(letter)
        except DeadLetterError as exc:
            await self.ops.failed(actor, req, target, source, str(exc))
            raise
        cmd = _command(new_id(), letter.seq, req, actor, source)
        async with self.store.transaction() as tx:
            await self.store.queue.put(tx, OPERATOR_QUEUE, f"{cmd.id}/{target}", encode(cmd))
        return Submitted(cmd.id, target, action)

    async def bulk(
        self,
        which: DeadLetterFilter,
        action: str,
        reason: str,
        *,
        actor: Actor,
        source: str | None = None,
        dry_run: bool = False,
    ) -> DeadLetterPlan:
        """Act on every letter ``which`` selects that the action fits (a replay:
        the replayable ones); the dry run and the audit as in ``Operations.bulk``."""
        req = ActionRequest(action, reason)
        target = "dead-letters:" + msgspec.json.encode(which).decode()
        await self.ops.allowed(actor, req, target, source, action=f"bulk-{action}")
        matching = await self.letters.list(
            queue=which.queue,
            error_type=which.error_type,
            saga_id=which.saga_id,
            older_than=which.older_than,
            limit=which.limit,
        )
        fit = [d for d in matching if action == PURGE or _replayable(d)]
        sample = [letter_json(d) for d in fit[:SAMPLE]]
        plan = DeadLetterPlan(action, dry_run, len(fit), sample, len(matching) - len(fit))
        if dry_run or not fit:
            return plan
        plan.command_id = cmd_id = new_id()
        line = self.ops.audit.line(actor, f"bulk-{action}", target, reason, "done", source)
        cmds = {target_of(d.seq): _command(cmd_id, d.seq, req, actor, source) for d in fit}
        await self.ops.queue_bulk(line, cmd_id, [d.seq for d in fit[:SAMPLE]], cmds)
        return plan


class DeadLetterAuditLog:
    """The operator audit of ``app.dead_letters`` and ``sagakit dead-letters``.

    :class:`~sagakit.ops.DeadLetters` acts at once (it has the transport);
    this writes the lines the console's queued commands write: ``done`` in
    the transaction of each replay or purge, a line for a bulk action, and
    refusals — ``denied`` for a role that may not act, ``failed`` otherwise.
    """

    def __init__(self, store: Store, *, source: str | None = None) -> None:
        self.audit = Audit(store)
        self.source = source

    async def done(
        self, tx: Tx, action: Action, letter: DeadLetter, actor: Actor, reason: str
    ) -> None:
        name, target = f"dead-letters.{action}", target_of(letter.seq)
        line = self.audit.line(actor, name, target, reason, "done", self.source)
        detail = f"{action} {letter.queue}"
        line = dataclasses.replace(line, before=fingerprint(letter.data), detail=detail)
        await self.audit.record(tx, line)

    async def refused(
        self, action: Action, which: int | DeadLetterFilter, actor: Actor, reason: str, why: str
    ) -> None:
        name, target = self._named(action, which)
        await self.audit.refusal(actor, name, target, reason, why, self.source)

    async def bulk(
        self, out: DeadLetterOutcome, which: DeadLetterFilter, actor: Actor, reason: str
    ) -> None:
        name, target = self._named(out.action, which)
        seqs = [d.seq for d in out.done]
        detail = {"count": len(seqs), "refused": len(out.refused), "sample": seqs[:SAMPLE]}
        text = msgspec.json.encode(detail).decode()
        await self.audit.append(
            self.audit.line(actor, name, target, reason, "done", self.source, text)
        )

    def _named(self, action: str, which: int | DeadLetterFilter) -> tuple[str, str]:
        if isinstance(which, int):
            return f"dead-letters.{action}", target_of(which)
        return f"bulk-dead-letters.{action}", "dead-letters:" + msgspec.json.encode(which).decode()


def letter_json(d: DeadLetter) -> dict[str, Any]:
    """One dead letter as the API and the pages show it (not its bytes)."""
    return {
        "seq": d.seq,
        "id": d.id,
        "queue": d.queue,
        "error_type": d.error_type,
        "reason": d.reason,
        "saga_id": d.saga_id,
        "created_at": d.created_at,
        "replayable": _replayable(d),
    }


def _replayable(d: DeadLetter) -> bool:
    try:
        replayable(d)
    except NotReplayable:
        return False
    return True


def _command(
    cmd_id: str, seq: int, req: ActionRequest, actor: Actor, source: str | None
) -> OperatorCommand:
    return OperatorCommand(
        cmd_id,
        req.action,
        target_of(seq),
        req.reason,
        actor.id,
        actor.role,
        actor.via,
        source=source,
        seq=seq,
    )
