"""Dead letters for operators: list, show, replay and purge, each action logged.

A dead letter is a message the hop or the relay gave up on, kept with its
reason (:meth:`~sagakit.store.Store.dead_letter`). Once the cause is fixed an
operator *replays* it: the stored bytes go back onto the queue they were
taken from, exactly as a redelivery would put them there, and the hop
handles them like any other delivery. That is what makes a replay safe: the
inbox still decides, so a command whose outcome is already recorded (every
dead-lettered command was answered with a failure) gets its stored reply and
does not run again; to run a failed saga step again, retry the saga instead.

Where the bytes go:

- the store's own queues (timers, local steps, the relay's ``sagakit.outbox``)
  and, on the database transport, every queue: a row on that queue, written
  in the transaction that deletes the dead letter;
- a broker queue: a publish through the transport to that one queue (an event
  goes back to the subscriber that dead-lettered it, not to every
  subscriber), then the dead letter is deleted. A crash between the two
  leaves the letter to be replayed again; the inbox answers the copy.

A truncated letter (an oversize message keeps only a prefix) or bytes that
are not an envelope cannot be replayed: :class:`~sagakit.errors.NotReplayable`
says why. Replays and purges take an :class:`~sagakit.ops.Actor` and a
reason, recorded in the ``dead_letter_actions`` table and — given a
:class:`DeadLetterAudit` (``app.dead_letters`` and the CLI have the
console's) — in the operator audit too: each replay or purge in its own
transaction, a bulk action's line, and refusals (``denied``, ``failed``). A
dry run changes nothing and records nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..errors import DeadLetterError, DeadLetterNotFound, InvalidOperatorAction, NotReplayable
from ..messages import Envelope, Kind, peek
from ..outbox import OUTBOX_QUEUE
from ..saga.coordinator import LOCAL_QUEUE, TIMER_QUEUE
from ..store.core import DeadLetter, DeadLetterAction
from ..transport import Outgoing

if TYPE_CHECKING:
    from ..store import Store, Tx
    from ..transport import Transport
    from .actor import Actor

log = logging.getLogger("sagakit.dead_letters")

#: queues that live in the store whatever the transport
STORE_QUEUES = frozenset({OUTBOX_QUEUE, TIMER_QUEUE, LOCAL_QUEUE})

Action = Literal["replay", "purge"]


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a bulk action takes; every given field must match."""

    queue: str | None = None
    error_type: str | None = None
    saga_id: str | None = None
    #: seconds since the message was dead-lettered
    older_than: float | None = None
    limit: int = 100


@dataclass(slots=True)
class DeadLetterOutcome:
    """What a replay or purge did (or, on a dry run, would do)."""

    action: Action
    dry_run: bool
    done: list[DeadLetter] = field(default_factory=list)
    #: letters the action left alone, each with the reason
    refused: list[tuple[DeadLetter, str]] = field(default_factory=list)


class DeadLetterAudit(Protocol):
    """Where replays and purges are also recorded (:class:`sagakit.console.DeadLetterAuditLog`)."""

    async def done(
        self, tx: Tx, action: Action, letter: DeadLetter, actor: Actor, reason: str
    ) -> None:
        """One letter replayed or purged, in the transaction that did it."""

    async def refused(
        self, action: Action, which: int | DeadLetterFilter, actor: Actor, reason: str, why: str
    ) -> None:
        """An action refused before it ran (who may not act, no reason, no letter)."""

    async def bulk(
        self, out: DeadLetterOutcome, which: DeadLetterFilter, actor: Actor, reason: str
    ) -> None:
        """A bulk action that ran: its own line, besides each letter's."""


class DeadLetters:
    """``app.dead_letters``: one store's dead letters, and the transport to replay onto.

    Without a transport (the CLI without ``--transport``) every queue is taken
    to live in the store, as on the database transport.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport | None = None,
        *,
        audit: DeadLetterAudit | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.audit = audit

    async def get(self, seq: int) -> DeadLetter:
        """One dead letter by its number; :class:`DeadLetterNotFound` if it is gone."""
        letter = await self.store.dead_letter_get(seq)
        if letter is None:
            raise DeadLetterNotFound(f"no dead letter {seq} (replayed or purged already?)")
        return letter

    async def actions(self, limit: int = 100) -> list[DeadLetterAction]:
        """The latest replays and purges, newest first: who, what and why."""
        return await self.store.dead_letter_actions(limit)

    async def replay(
        self, which: int | DeadLetterFilter, *, actor: Actor, reason: str, dry_run: bool = False
    ) -> DeadLetterOutcome:
        """Put one letter (or every matching one) back on its queue, as a redelivery.

        A single letter that cannot be replayed raises :class:`NotReplayable`;
        in a bulk replay it is reported in ``refused`` and the rest go on.
        """
        targets = await self._checked("replay", which, actor, reason, dry_run)
        out = DeadLetterOutcome("replay", dry_run)
        for letter in targets:
            try:
                env = replayable(letter)
            except NotReplayable as exc:
                if isinstance(which, int):
                    if not dry_run:
                        await self._refused("replay", which, actor, reason, str(exc))
                    raise
                out.refused.append((letter, str(exc)))
                continue
            if dry_run or await self._replay(letter, env, actor, reason):
                out.done.append(letter)
        return await self._bulk_line(out, which, actor, reason)

    async def purge(
        self, which: int | DeadLetterFilter, *, actor: Actor, reason: str, dry_run: bool = False
    ) -> DeadLetterOutcome:
        """Delete one letter (or every matching one) for good, recording who and why."""
        targets = await self._checked("purge", which, actor, reason, dry_run)
        out = DeadLetterOutcome("purge", dry_run)
        for letter in targets:
            if dry_run or await self._purge(letter, actor, reason):
                out.done.append(letter)
        return await self._bulk_line(out, which, actor, reason)

    # -- internals -----------------------------------------------------------

    async def _checked(
        self, action: Action, which: int | DeadLetterFilter, actor: Actor, reason: str,
        dry_run: bool,
    ) -> list[DeadLetter]:  # fmt: skip
        """The letters to act on, once the actor and the reason pass (refusals audited)."""
        try:
            _check(actor, reason, dry_run)
            return await self._targets(which)
        except (InvalidOperatorAction, DeadLetterError) as exc:
            if not dry_run:
                await self._refused(action, which, actor, reason, str(exc))
            raise

    async def _refused(
        self, action: Action, which: int | DeadLetterFilter, actor: Actor, reason: str, why: str
    ) -> None:
        if self.audit is not None:
            await self.audit.refused(action, which, actor, reason, why)

    async def _bulk_line(
        self, out: DeadLetterOutcome, which: int | DeadLetterFilter, actor: Actor, reason: str
    ) -> DeadLetterOutcome:
        if self.audit is not None and not out.dry_run and isinstance(which, DeadLetterFilter):
            await self.audit.bulk(out, which, actor, reason)
        return out

    async def _matching(self, f: DeadLetterFilter) -> list[DeadLetter]:
        now = self.store.clock.now()
        before = now - f.older_than if f.older_than is not None else None
        return await self.store.dead_letters(
            f.limit,
            queue=f.queue,
            error_type=f.error_type,
            saga_id=f.saga_id,
            created_before=before,
        )

    async def _targets(self, which: int | DeadLetterFilter) -> list[DeadLetter]:
        if isinstance(which, int):
            return [await self.get(which)]
        return await self._matching(which)

    def in_store(self, letter: DeadLetter) -> bool:
        """Whether the letter's queue is a table of the store (else a broker queue)."""
        t = self.transport
        return letter.queue in STORE_QUEUES or t is None or t.direct_writer(self.store) is not None

    async def _replay(self, letter: DeadLetter, env: Envelope, actor: Actor, reason: str) -> bool:
        """Put the letter back; False if another operator replayed or purged it first.

        On a broker the publish comes first; losing the race after it leaves one
        extra copy on the queue, which the inbox answers as a duplicate.
        """
        if not self.in_store(letter):
            await self._publish(letter, env)
        async with self.store.transaction() as tx:
            if not await self.store.dead_letter_delete(tx, letter.seq):
                return False
            if self.in_store(letter):
                await self._put_back(letter, env, tx)
            await self.store.dead_letter_log(
                tx, _action("replay", letter, actor, reason, self.store)
            )
            if self.audit is not None:
                await self.audit.done(tx, "replay", letter, actor, reason)
        log.info(
            "dead letter %d replayed onto %s by %s: %s", letter.seq, letter.queue, actor, reason
        )
        return True

    async def act_in(
        self, tx: Tx, action: Action, letter: DeadLetter, actor: Actor, reason: str
    ) -> None:
        """Replay or purge ``letter`` inside ``tx``, which commits it with the caller's
        own rows (the console's queued commands: their audit line and queue row).

        :class:`DeadLetterNotFound` if another operator took it first (roll back);
        a replay of a letter that cannot be replayed raises :class:`NotReplayable`.
        A replay onto a broker queue publishes before the commit, as :meth:`replay`
        does: a rollback after it leaves one copy the inbox answers as a duplicate.
        """
        _check(actor, reason, dry_run=False)
        env = replayable(letter) if action == "replay" else None
        if env is not None and not self.in_store(letter):
            await self._publish(letter, env)
        if not await self.store.dead_letter_delete(tx, letter.seq):
            raise DeadLetterNotFound(f"dead letter {letter.seq} was replayed or purged already")
        if env is not None and self.in_store(letter):
            await self._put_back(letter, env, tx)
        await self.store.dead_letter_log(tx, _action(action, letter, actor, reason, self.store))

    async def _put_back(self, letter: DeadLetter, env: Envelope, tx: Tx) -> None:
        """A row on the store's queue, as the hop or the relay would have found it."""
        queue = self.store.queue
        if letter.queue == OUTBOX_QUEUE:  # the relay will try to publish it again
            await queue.put(
                tx,
                OUTBOX_QUEUE,
                env.id,
                letter.data,
                destination=letter.destination,
                kind=letter.kind,
            )
        else:
            await queue.put(tx, letter.queue, env.id, letter.data, kind=env.kind)

    async def _publish(self, letter: DeadLetter, env: Envelope) -> None:
        """Publish to the one queue that dead-lettered it; an event is not fanned out again."""
        assert self.transport is not None
        kind: Kind = "command" if env.kind == "event" else env.kind
        await self.transport.publish([Outgoing(env.id, kind, letter.queue, letter.data)])

    async def _purge(self, letter: DeadLetter, actor: Actor, reason: str) -> bool:
        async with self.store.transaction() as tx:
            if not await self.store.dead_letter_delete(tx, letter.seq):
                return False
            await self.store.dead_letter_log(
                tx, _action("purge", letter, actor, reason, self.store)
            )
            if self.audit is not None:
                await self.audit.done(tx, "purge", letter, actor, reason)
        log.info("dead letter %d purged by %s: %s", letter.seq, actor, reason)
        return True

    # ``list`` last: defined earlier, it would shadow the builtin in the annotations above
    async def list(
        self,
        *,
        queue: str | None = None,
        error_type: str | None = None,
        saga_id: str | None = None,
        older_than: float | None = None,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """Dead letters matching every given filter, oldest first."""
        f = DeadLetterFilter(queue, error_type, saga_id, older_than, limit)
        return await self._matching(f)


def replayable(letter: DeadLetter) -> Envelope:
    """The envelope a replay would deliver; :class:`NotReplayable` if there is none."""
    if letter.truncated:
        raise NotReplayable(
            f"dead letter {letter.seq} keeps only the first {len(letter.data)} bytes of "
            f"{letter.size or 'more'}: the whole message is gone, so it cannot be replayed"
        )
    env = peek(letter.data)
    if env is None:
        raise NotReplayable(
            f"dead letter {letter.seq} is not a sagakit envelope ({letter.error_type}): "
            "replayed, it would only be dead-lettered again"
        )
    if letter.queue == OUTBOX_QUEUE and not letter.destination:
        raise NotReplayable(f"dead letter {letter.seq} from the outbox has no destination")
    return env


def _check(actor: Actor, reason: str, dry_run: bool) -> None:
    """Viewers may look (a dry run) but not act; every action says why."""
    if not dry_run and not actor.may_act():
        raise InvalidOperatorAction(f"{actor} may not act on dead letters")
    if not reason.strip():
        raise InvalidOperatorAction("dead-letter actions need a reason")


def _action(
    action: Action, letter: DeadLetter, actor: Actor, reason: str, store: Store
) -> DeadLetterAction:
    return DeadLetterAction(
        store.clock.now(),
        action,
        letter.seq,
        letter.id,
        letter.queue,
        actor.id,
        actor.role,
        actor.via,
        reason,
    )
