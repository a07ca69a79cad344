"""Operator commands: an action on one saga, queued durably and executed once.

The console, the API and the CLI never change a saga themselves: they write
an :class:`OperatorCommand` to the store's own queue ``sagakit.operator``,
and a coordinator process (which knows the saga definitions) executes it
through the coordinator shell in one transaction with its audit line and the
queue row's deletion. A command on a dead letter (``dead-letters.replay``,
``dead-letters.purge``; its target ``dead-letter:<seq>``) runs through the
coordinator's :class:`~sagakit.ops.DeadLetters`, which has the transport to
replay onto, in one transaction with its audit line and the row's deletion
(a broker queue is published to just before the commit). A command survives
the crash of whoever queued it and of whoever runs it; run twice, it finds
its audit line and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import (
    DeadLetterError,
    DeadLetterNotFound,
    InvalidOperatorAction,
    SagakitError,
    SagaNotFound,
)
from ..messages import new_id
from ..ops import Actor
from ..outbox import Outbox
from ..saga.machine import OperatorAction
from .audit import Audit, AuditEntry, digest

if TYPE_CHECKING:
    from ..ops.dead_letters import Action, DeadLetters
    from ..saga.coordinator import Coordinator
    from ..store import Tx
    from ..store.consumer import QueueDelivery

log = logging.getLogger("sagakit.console.commands")

OPERATOR_QUEUE = "sagakit.operator"
#: the actions on a dead letter, by the name the action model and the audit use
DEAD_LETTER_ACTIONS = ("dead-letters.replay", "dead-letters.purge")


class OperatorCommand(msgspec.Struct, frozen=True):
    """One action on one saga (or one dead letter), as queued."""

    id: str
    action: str
    #: the saga, or ``dead-letter:<seq>`` for an action on a dead letter (the audit's target)
    saga_id: str
    reason: str
    actor: str
    role: str
    via: str
    step: str | None = None
    patch: list[dict[str, Any]] | None = None
    source: str | None = None
    #: the dead letter's number, for the ``dead-letters.*`` actions
    seq: int | None = None

    def actor_of(self) -> Actor:
        return Actor(self.actor, role=self.role, via=self.via)  # type: ignore[arg-type]


_decoder = msgspec.json.Decoder(OperatorCommand)


class CommandExecutor:
    """Runs queued operator commands in a coordinator process."""

    def __init__(self, coordinator: Coordinator, dead_letters: DeadLetters | None = None) -> None:
        self.coordinator = coordinator
        self.dead_letters = dead_letters
        self.store = coordinator.store
        self.audit = Audit(self.store)

    async def handle(self, delivery: QueueDelivery) -> None:
        """Execute one command; a refusal by the machine is audited as ``failed``."""
        try:
            cmd = _decoder.decode(delivery.data)
        except msgspec.MsgspecError as exc:  # not ours to run: drop it, loudly
            log.error("dropping an undecodable operator command: %s", exc)
            return await delivery.ack()
        try:
            await self._execute(cmd, delivery)
        except (InvalidOperatorAction, SagaNotFound, DeadLetterError) as exc:
            await self._failed(cmd, delivery, str(exc))
        except SagakitError as exc:
            if exc.retryable:
                return await delivery.nack(min(30.0, 0.5 * delivery.attempt))
            await self._failed(cmd, delivery, f"{type(exc).__name__}: {exc}")

    async def _execute(self, cmd: OperatorCommand, delivery: QueueDelivery) -> None:
        if cmd.action in DEAD_LETTER_ACTIONS:
            return await self._dead_letter(cmd, delivery)
        store = self.store
        async with store.transaction() as tx:
            if not await self.audit.seen(tx, cmd.id, cmd.saga_id):
                await apply_audited(self.coordinator, tx, cmd)
            await delivery.ack_in(store, tx)
        await delivery.ack()  # a no-op once the transaction has settled it

    async def _dead_letter(self, cmd: OperatorCommand, delivery: QueueDelivery) -> None:
        """Replay or purge through the coordinator's dead letters, audited, in one transaction."""
        if self.dead_letters is None or cmd.seq is None:
            raise InvalidOperatorAction(f"this coordinator cannot run {cmd.action}")
        dead, store = self.dead_letters, self.store
        letter = await store.dead_letter_get(cmd.seq)
        async with store.transaction() as tx:
            if not await self.audit.seen(tx, cmd.id, cmd.saga_id):
                if letter is None:
                    raise DeadLetterNotFound(f"no dead letter {cmd.seq} (replayed or purged?)")
                verb: Action = "replay" if cmd.action == "dead-letters.replay" else "purge"
                await dead.act_in(tx, verb, letter, cmd.actor_of(), cmd.reason)
                line = _line(cmd, store.clock.now(), "done", before=fingerprint(letter.data))
                await self.audit.record(tx, _with_detail(line, f"{verb} {letter.queue}"))
            await delivery.ack_in(store, tx)
        await delivery.ack()

    async def _failed(self, cmd: OperatorCommand, delivery: QueueDelivery, why: str) -> None:
        log.info("operator command %s on %s failed: %s", cmd.action, cmd.saga_id, why)
        await self.audit.append(_line(cmd, self.store.clock.now(), "failed", detail=why))
        await delivery.ack()


async def apply_audited(coordinator: Coordinator, tx: Tx, cmd: OperatorCommand) -> None:
    """Apply ``cmd`` through the coordinator shell and record its ``done`` line, in ``tx``."""
    store, out = coordinator.store, Outbox()
    patch = tuple(cmd.patch) if cmd.patch else None
    action = OperatorAction(cmd.action, cmd.actor_of(), cmd.reason, cmd.step, patch)  # type: ignore[arg-type]
    before = digest(await store.saga_load(tx, cmd.saga_id))
    await coordinator.apply(tx, out, cmd.saga_id, action, None, missing=SagaNotFound)
    after = digest(await store.saga_load(tx, cmd.saga_id, lock=False))
    await Audit(store).record(tx, _line(cmd, store.clock.now(), "done", before, after))
    await coordinator.writer.flush(tx, out)


async def run_inline(coordinator: Coordinator, saga_id: str, action: OperatorAction) -> None:
    """An action from Python (``app.sagas.retry(...)``): run now, in this process, audited
    like a queued command — done with it in one transaction; refused or failed apart."""
    cmd = OperatorCommand(
        new_id(),
        action.action,
        saga_id,
        action.reason,
        action.actor.id,
        action.actor.role,
        action.actor.via,
        action.step,
        list(action.patch) if action.patch else None,
    )
    audit, now = Audit(coordinator.store), coordinator.store.clock.now()
    if not action.actor.may_act():
        await audit.append(
            _line(cmd, now, "denied", detail=f"role {action.actor.role} may not act")
        )
    try:
        if not action.actor.may_act() or not action.reason.strip():
            return await coordinator.operate(saga_id, action)  # raises, with the reason why
        async with coordinator.store.transaction() as tx:
            await apply_audited(coordinator, tx, cmd)
    except (InvalidOperatorAction, SagaNotFound) as exc:
        if action.actor.may_act():
            await audit.append(_line(cmd, now, "failed", detail=str(exc)))
        raise


def _line(
    cmd: OperatorCommand,
    at: float,
    outcome: str,
    before: str | None = None,
    after: str | None = None,
    detail: str | None = None,
) -> AuditEntry:
    if detail is None and cmd.patch:
        detail = msgspec.json.encode(cmd.patch).decode()
    return AuditEntry(
        at=at,
        actor=cmd.actor,
        role=cmd.role,
        via=cmd.via,
        action=cmd.action,
        target=cmd.saga_id,
        reason=cmd.reason,
        outcome=outcome,  # type: ignore[arg-type]
        source=cmd.source,
        before=before,
        after=after,
        detail=detail,
        command_id=cmd.id,
    )


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _with_detail(line: AuditEntry, detail: str) -> AuditEntry:
    return dataclasses.replace(line, detail=detail)


def encode(cmd: OperatorCommand) -> bytes:
    return msgspec.json.encode(cmd)
