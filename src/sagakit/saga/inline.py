"""Steps whose commands and replies never travel: hops run inside other hops.

Where a participant runs in the coordinator's process, on the coordinator's
store, with a ``db_only`` handler (:class:`Inline`), a saga's messages to it
need not go through a queue:

- a saga's first command runs inside the start (:meth:`InlineHops.first_hop`);
- a step's reply is decided on in the step's own hop (:meth:`InlineHops.decide_here`);
- a decision that sends one command to such a participant runs that step's
  hop in the same transaction, and decides on its reply there too, up to
  :data:`~sagakit.endpoint.CHAIN_MAX` steps (:meth:`InlineHops.send_or_chain`).

So a saga of ``db_only`` steps in one process moves on in one transaction (on
PostgreSQL, one statement). The messages it did not send are still recorded as
if they had travelled: each step's inbox outcome and the saga's history lines.
The instance's row is written once per transaction, guarded by the revision the
first decision read, like any hop's.

A step that refuses or fails inside another's hop rolls the whole transaction
back (:class:`~sagakit.endpoint._InlineHopFailed`, which says which step); the
hop, or the start, is then run again at once with that step's command sent,
the steps before it still inside. The failure is thus the step's own hop's
(retried, counted, refused or dead-lettered there) and never the carrier's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from ..endpoint import _InlineHopFailed
from ..outbox import Outbox
from .machine import Decision, Instance, ReplyReceived, SagaMachine

if TYPE_CHECKING:
    from ..endpoint import Endpoint, Scope
    from ..messages import Envelope
    from ..store import SagaRecord, Tx
    from .coordinator import Coordinator

log = logging.getLogger("sagakit.saga.inline")


class Inline(NamedTuple):
    """A participant's hop in this process, on the coordinator's store."""

    endpoint: Endpoint
    #: whether the handler of a command type is ``db_only`` (it may run again)
    db_only: Callable[[str], bool]


class Chain:
    """The steps' hops one transaction runs without sending their commands:
    at most ``limit``; ``ran`` so far."""

    __slots__ = ("limit", "ran")

    def __init__(self, limit: int) -> None:
        self.limit, self.ran = limit, 0


class InlineHops:
    """A coordinator's hops inside other hops (see the module's docstring)."""

    def __init__(self, coordinator: Coordinator, queue: str) -> None:
        self.coord = coordinator
        self.queue = queue  #: where the coordinator's replies go
        #: participants whose hops may run inside others, by queue (set by the App)
        self.routes: dict[str, Inline] = {}

    async def first_hop(self, tx: Tx, out: Outbox, chain: Chain, rec: SagaRecord) -> None:
        """Send a new saga's first commands; or run the only one's hop inside the start,
        and the next steps' hops where they can run here too, so the instance is
        inserted as it stands after them. ``chain`` bounds and counts them."""
        await self.send_or_chain(tx, out, rec, chain, fresh=True)

    async def decide_here(self, scope: Scope, reply: Envelope) -> bool:
        """Decide on ``reply`` in the participant's transaction that made it; False: send it.

        A participant hop in a process that runs this coordinator on the same
        store needs no reply message: the coordinator's step (the decision, the
        instance's update, its history and the next commands) joins the
        participant's own transaction, so on PostgreSQL a ``db_only`` step and
        the decision after it are one statement instead of two hops. It is
        done only where the decision costs no read (the instance is one this
        process committed last, or the store reads without a round trip) and
        its saga version is known here. The update is guarded by the
        instance's revision like every hop's: if another hop moved the saga on
        meanwhile, the whole transaction writes nothing
        (:class:`~sagakit.errors.ConcurrencyConflict`) and the endpoint runs the
        participant's hop again with the reply sent the usual way. A
        definition that fails to decide (a bug in a step's command builder)
        also falls back to the reply, so its failure is the coordinator's
        hop's, retried and dead-lettered there, never the participant's.
        """
        saga_id = reply.headers.saga_id
        if scope.env.headers.reply_to != self.queue or not saga_id:
            return False  # not a saga step's reply to this coordinator
        rec = await self._cheap_load(scope.tx, saga_id)
        if rec is None:
            return False
        chain = Chain(scope.chain)
        try:
            return await self.decide_on(scope, reply, rec, chain=chain)
        finally:  # a failure at the commit may be theirs: the hop runs again without them
            scope.inlined = chain.ran > 0

    async def decide_on(
        self,
        scope: Scope,
        reply: Envelope,
        rec: SagaRecord,
        *,
        chain: Chain,
        fresh: bool = False,
        inner: bool = False,
    ) -> bool:
        """:meth:`decide_here` on ``rec``; ``fresh``: the instance is being inserted in
        this transaction (its first step's hop inside the start), so it is not updated;
        ``inner``: a decision after another in this transaction (:meth:`send_or_chain`).

        The instance's row is written once, by the first decision, as the last
        one left it. If a step's hop run after it fails, the record goes back
        to the coordinator's known records as it was (the transaction wrote
        nothing), so the hop's next try needs no read.
        """
        known, event = self.coord.known, reply_event(reply)
        try:
            machine, inst = self.coord.instance(rec)
            decision = machine.apply(inst, event)
        except Exception as exc:  # decided again, the usual way, by the reply's own hop
            log.debug("saga %s: deciding in the participant's hop failed (%r)", rec.id, exc)
            if known is not None and not fresh and not inner:
                known.keep(rec)  # unchanged: still what this process committed last
            return False
        if fresh or inner:
            await self._decide(scope, reply, rec, (machine, inst, decision, event), chain, fresh)
            return True
        committed, before = replace(rec), _stored(rec)
        try:
            await self._decide(scope, reply, rec, (machine, inst, decision, event), chain, fresh)
        except _InlineHopFailed:
            if known is not None:  # still what this process committed last
                known.keep(committed)
            raise
        await self._write_back(scope.tx, rec, changed=_stored(rec) != before)
        return True

    async def _decide(
        self,
        scope: Scope,
        reply: Envelope,
        rec: SagaRecord,
        taken: tuple[SagaMachine, Instance, Decision, ReplyReceived],
        chain: Chain,
        fresh: bool,
    ) -> None:
        """Carry out a decision in the step's hop (the instance's row aside), then send
        its commands or run the next step's hop here."""
        machine, inst, decision, event = taken
        coord, hooks = self.coord, self.coord.hooks
        hooks.sending(Outbox([(reply, self.queue)]))  # sent from the step's hop
        with hooks.processing(reply, self.queue):  # and taken as if it came
            out = Outbox()
            hooks.decided(scope.tx, rec, machine.defn, inst, decision, event)
            await coord.carry_out(scope.tx, out, rec, decision, reply, insert=True)
            await self.send_or_chain(scope.tx, out, rec, chain, fresh=fresh)

    async def send_or_chain(
        self, tx: Tx, out: Outbox, rec: SagaRecord, chain: Chain, *, fresh: bool
    ) -> None:
        """Send a decision's commands; or, if it sent one command that can run here
        (:meth:`hop_for`) and ``chain`` has room, run that step's hop in this
        transaction and decide on its reply too."""
        hop = self.hop_for(out) if chain.ran < chain.limit else None
        if hop is None:
            return await self.coord.writer.flush(tx, out)  # its commands carry this trace
        ((env, _queue),) = out.messages
        chain.ran += 1
        at = chain.ran
        self.coord.hooks.sending(out)  # as if sent: the step's hop is the command's child
        fold = partial(self.decide_on, rec=rec, chain=chain, fresh=fresh, inner=True)
        try:
            await hop.run_in(tx, env, fold)
        except _InlineHopFailed as exc:
            exc.at = exc.at or at  # the innermost hop that failed
            raise

    def hop_for(self, out: Outbox) -> Endpoint | None:
        """The hop the outbox's only command can run in here, if any."""
        if len(out.messages) != 1 or out.scheduled:
            return None
        env, queue = out.messages[0]
        inline = self.routes.get(queue)
        if inline is None or env.kind != "command" or not inline.db_only(env.type):
            return None
        return inline.endpoint

    async def _write_back(self, tx: Tx, rec: SagaRecord, *, changed: bool) -> None:
        """Write the instance a hop's decisions left, guarded by its revision."""
        store = self.coord.store
        if changed:
            await store.saga_update(tx, rec)
        else:
            await store.saga_unchanged(tx, rec)  # decided on this revision: still it?

    async def _cheap_load(self, tx: Tx, saga_id: str) -> SagaRecord | None:
        """The instance, if reading it costs no round trip (else None)."""
        known, store = self.coord.known, self.coord.store
        rec = known.take(saga_id) if known is not None else None
        if rec is None and store.dialect != "postgresql":  # a read is no round trip
            rec = await store.saga_peek(tx, saga_id)
        return rec


def reply_event(env: Envelope) -> ReplyReceived:
    """The machine's event for a step's reply."""
    h = env.headers
    outcome = h.outcome or "success"
    return ReplyReceived(
        h.step or "", h.causation_id, env.id, env.type, outcome, bytes(env.payload), h.sender
    )


def _stored(rec: SagaRecord) -> tuple[str, bytes, bytes, str | None]:
    """What a decision can change in an instance's row."""
    return rec.state, rec.data, rec.progress, rec.error
