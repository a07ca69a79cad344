"""The Saga Execution Coordinator: a thin shell around the pure machine.

For every event — a start, a reply, a timer, a local step's result, an
operator's action — the shell loads the instance (without a lock; every
write is guarded by its revision), asks :class:`~sagakit.saga.machine.SagaMachine`
for a decision, and in the same transaction persists the new instance and its
history, writes the commands to the outbox, and starts or cancels durable
timers. A saga that reaches a final state wakes its waiters at commit, in this
process directly and in others through the store's notifications.

A reply may never travel: where this coordinator runs in a participant's
process on that participant's store, a ``db_only`` step's reply is decided on
in the step's own transaction (:meth:`Coordinator.decide_here`).

Timers and local steps are messages on the store's own queues
(``sagakit.timers``, ``sagakit.local``), so they are durable and claimed by
whichever coordinator process is free.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from ..errors import (
    BusinessError,
    InvalidOperatorAction,
    SagaIdInUse,
    SagaNotFound,
    UnknownSaga,
)
from ..messages import (
    Done,
    Envelope,
    Failure,
    Headers,
    caused_by,
    command,
    encode_json,
    event,
    new_id,
)
from ..observe.hooks import BASE, Hooks
from ..outbox import Outbox
from ..store.core import LogEntry, SagaRecord
from ..transport import attempt_of
from ..twophase.step import AtomicStep
from .known import KnownSagas
from .machine import (
    LOCAL_RESULT,
    LOCAL_SENDER,
    CancelTimer,
    Decision,
    Event,
    HistoryLine,
    Instance,
    OperatorAction,
    ReplyReceived,
    RunLocalStep,
    SagaMachine,
    SendCommand,
    Started,
    StartTimer,
    TimerFired,
)
from .state import Progress, SagaState, progress_decoder

if TYPE_CHECKING:
    from ..endpoint import Endpoint, Scope
    from ..outbox import OutboxWriter
    from ..policies import RetryPolicy
    from ..store import Store, Tx
    from ..transport import Delivery
    from ..twophase.coordinator import TwoPhase
    from .definition import SagaDefinition
    from .registry import SagaRegistry

log = logging.getLogger("sagakit.saga.coordinator")

COORDINATOR_QUEUE = "sagakit.coordinator"
TIMER_QUEUE = "sagakit.timers"
LOCAL_QUEUE = LOCAL_SENDER
FINISHED = "sagakit.finished:"


def finished(saga_id: str) -> str:
    """The wake-up name a saga's commit sends when it reaches a final state."""
    return FINISHED + saga_id


@command("sagakit.Timer")
class Timer(msgspec.Struct, frozen=True):
    """A durable timer on the wire: ``timeout`` and ``retry`` carry the awaited id."""

    kind: str
    token: str
    seconds: float = 0.0


@command("sagakit.StartSaga")
class StartSaga(msgspec.Struct, frozen=True):
    """Start an instance: sent by a handler (``ctx.start_saga``) through its outbox."""

    saga_type: str
    version: int
    data: msgspec.Raw
    saga_id: str
    correlation_id: str


@event("sagakit.SagaEnded")
class SagaEnded(msgspec.Struct, frozen=True):
    """Published when a saga reaches a final state (completed, compensated,
    failed or aborted), if the App asked for it (``Coordinator.announce_ends``,
    set when a process manager reacts to it)."""

    saga_id: str
    saga_type: str
    state: str
    correlation_id: str | None = None
    error: str | None = None


@command("sagakit.RunLocal")
class RunLocal(msgspec.Struct, frozen=True):
    """Asks a coordinator process to run a local step."""


class Inline(NamedTuple):
    """A participant's hop in this process, on the coordinator's store: a saga's first
    command may run in it inside the start (:meth:`Coordinator._first_hop`)."""

    endpoint: Endpoint
    #: whether the handler of a command type is ``db_only`` (it may run again)
    db_only: Callable[[str], bool]


class Coordinator:
    """Runs saga definitions; one per App, any number of processes per store."""

    hooks: Hooks = BASE  #: set by the App (sagakit.observe)

    def __init__(self, registry: SagaRegistry, writer: OutboxWriter, retry: RetryPolicy) -> None:
        self.registry = registry
        self.writer = writer
        self.store: Store = writer.store
        self.codec = writer.codec
        self.retry = retry
        #: the App's two-phase coordinator, for atomic steps (set by the App)
        self.twophase: TwoPhase | None = None
        #: publish SagaEnded when a saga finishes (a process manager listens)
        self.announce_ends = False
        #: records this process committed last (saves each hop's read; None: always read)
        self.known: KnownSagas | None = KnownSagas()
        #: participants' hops a first command may run in, inside its start (set by the App)
        self.inline: dict[str, Inline] = {}

    # -- entry points ---------------------------------------------------------

    async def start(
        self,
        defn: SagaDefinition[Any],
        data: Any,
        *,
        saga_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Persist a new instance and send its first commands, in one transaction.

        Starting twice with the same ``saga_id`` is a no-op returning that id.
        """
        defn = self.registry.registered(defn)  # steps run as registered
        saga_id = saga_id or new_id()
        waker = self.store.queue.waker
        waker.expect(finished(saga_id))  # a waiter here need not read it until it ends
        try:
            await self._begin(defn, data, saga_id, correlation_id)
            return saga_id
        except SagaIdInUse:
            waker.forget(finished(saga_id))  # an existing saga: it may have ended already
            existing = await self.store.saga_get(saga_id)
        except BaseException:
            waker.forget(finished(saga_id))
            raise
        if existing is not None and (existing.type, existing.version) != defn.key:
            raise SagaIdInUse(
                f"saga id {saga_id!r} already names an instance of {existing.type!r} "
                f"v{existing.version}, not {defn.name!r} v{defn.version}",
                saga_id=saga_id,
            )
        return saga_id

    async def _begin(
        self, defn: SagaDefinition[Any], data: Any, saga_id: str, correlation_id: str | None
    ) -> None:
        """The start's transaction, with its first step's hop inside it where that can
        run here (:meth:`_first_hop`); if it was and anything failed, the start again
        with the command sent: the step's own hop then retries or refuses it."""
        inlined: list[bool] = []
        try:
            await self._start_tx(defn, data, saga_id, correlation_id, inlined)
        except SagaIdInUse:
            raise
        except Exception as exc:
            if not inlined:
                raise
            log.debug(
                "saga %s: its first step failed inside the start (%r); sending it", saga_id, exc
            )
            await self._start_tx(defn, data, saga_id, correlation_id, None)

    async def _start_tx(
        self,
        defn: SagaDefinition[Any],
        data: Any,
        saga_id: str,
        correlation_id: str | None,
        inlined: list[bool] | None,
    ) -> None:
        out = Outbox()
        async with self.store.transaction() as tx:  # on PostgreSQL: one statement
            then = partial(self._first_hop, tx, out, inlined)  # in the saga's trace context
            await self.start_within(
                tx, out, defn, data, saga_id, correlation_id, None, then, held=True
            )

    async def _first_hop(
        self, tx: Tx, out: Outbox, inlined: list[bool] | None, rec: SagaRecord
    ) -> None:
        """Send the first commands; or run the only one's hop here, in the start.

        Where the first command's participant runs in this process on this
        store and its handler is ``db_only``, the command need not travel: its
        hop (inbox, handler, the decision on its reply) joins the start's
        transaction, so the instance is inserted as it stands after its first
        step (on PostgreSQL, one statement for both). ``inlined`` (None: never)
        records that it was, for :meth:`_begin`'s fallback.
        """
        hop = self._inline_hop(out) if inlined is not None else None
        if hop is None:
            return await self.writer.flush(tx, out)
        assert inlined is not None
        inlined.append(True)
        ((env, _queue),) = out.messages
        self.hooks.sending(out)  # as if sent: the participant's hop is the command's child
        await hop.run_in(tx, env, partial(self._decide_on, rec=rec, fresh=True))

    def _inline_hop(self, out: Outbox) -> Endpoint | None:
        if len(out.messages) != 1 or out.scheduled:
            return None
        env, queue = out.messages[0]
        inline = self.inline.get(queue)
        if inline is None or env.kind != "command" or not inline.db_only(env.type):
            return None
        return inline.endpoint

    async def start_within(
        self,
        tx: Tx,
        out: Outbox,
        defn: SagaDefinition[Any],
        data: Any,
        saga_id: str,
        correlation_id: str | None,
        cause: Envelope | None,
        then: Callable[[SagaRecord], Awaitable[None]] | None = None,
        *,
        held: bool = False,
    ) -> bool:
        """Insert a new instance and its first effects in ``tx``; False if the id exists.

        ``then`` runs last, still inside the new saga's trace context (the start
        flushes its outbox there, so the first commands carry the saga's trace),
        with the instance's record. ``held``: the insert is one of ``tx``'s held
        writes (one batch with the rest on PostgreSQL), made after ``then`` (with
        the record as ``then`` left it), and a taken id raises
        :class:`SagaIdInUse` at the batch, rolling the whole transaction back;
        for a transaction of its own.
        """
        now = self.store.clock.now()
        deadline = now + defn.deadline if defn.deadline else None
        progress = Progress(correlation_id=correlation_id or saga_id)
        with self.hooks.saga_starting(defn, saga_id, progress):
            inst = Instance(saga_id, defn.name, defn.version, SagaState.RUNNING, data, progress)
            decision = self.registry.machine(defn.name, defn.version).apply(inst, Started())
            rec = SagaRecord(saga_id, defn.name, defn.version, "", b"", b"", 0, now, now, deadline)
            if not held:  # written now, before its effects (held: recorded by _carry_out)
                _record(rec, decision.instance)
                if not await self.store.saga_insert(tx, rec):
                    return False
            self.hooks.decided(tx, rec, defn, inst, decision, Started())
            await self._carry_out(tx, out, rec, decision, cause, insert=True)
            if then is not None:
                await then(rec)
            if held:
                await self.store.saga_insert_later(tx, rec)
        return True

    async def on_start(self, scope: Scope) -> None:
        """Route: a handler asked for a saga to start (``ctx.start_saga``), once."""
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        req = scope.codec.payload(env, StartSaga)
        machine = self.registry.machine(req.saga_type, req.version, req.saga_id)
        data = machine.decode(machine.defn.data_type, bytes(req.data))
        await self.start_within(
            scope.tx, scope.out, machine.defn, data, req.saga_id, req.correlation_id, env
        )
        await scope.inbox.record(scope.tx, env, "success", None)

    async def start_in(
        self,
        tx: Tx,
        out: Outbox,
        defn: SagaDefinition[Any],
        data: Any,
        *,
        saga_id: str,
        correlation_id: str | None = None,
        cause: Envelope | None = None,
    ) -> bool:
        """Insert an instance and queue its first commands in ``tx`` (False: id taken).

        For callers that start a saga as part of their own transaction (a
        process manager's decision); :meth:`start` is this in a transaction of its own.
        """
        defn = self.registry.registered(defn)
        return await self.start_within(tx, out, defn, data, saga_id, correlation_id, cause)

    async def on_reply(self, scope: Scope) -> None:
        """Route: a reply (or a local step's result) for a saga step."""
        env = scope.env
        await self.apply(scope.tx, scope.out, env.headers.saga_id, _reply_event(env), env)

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
        if scope.env.headers.reply_to != COORDINATOR_QUEUE or not saga_id:
            return False  # not a saga step's reply to this coordinator
        rec = await self._cheap_load(scope.tx, saga_id)
        if rec is None:
            return False
        return await self._decide_on(scope, reply, rec)

    async def _decide_on(
        self, scope: Scope, reply: Envelope, rec: SagaRecord, *, fresh: bool = False
    ) -> bool:
        """:meth:`decide_here` on ``rec``; ``fresh``: the instance is being inserted in
        this transaction (its first step's hop inside the start), so it is not updated."""
        event = _reply_event(reply)
        try:
            machine, inst = self._instance(rec)
            decision = machine.apply(inst, event)
        except Exception as exc:  # decided again, the usual way, by the reply's own hop
            log.debug("saga %s: deciding in the participant's hop failed (%r)", rec.id, exc)
            if self.known is not None and not fresh:
                self.known.keep(rec)  # unchanged: still what this process committed last
            return False
        self.hooks.sending(Outbox([(reply, COORDINATOR_QUEUE)]))  # sent from the step's hop
        with self.hooks.processing(reply, COORDINATOR_QUEUE):  # and taken as if it came
            out = Outbox()
            self.hooks.decided(scope.tx, rec, machine.defn, inst, decision, event)
            await self._carry_out(scope.tx, out, rec, decision, reply, insert=fresh)
            await self.writer.flush(scope.tx, out)  # its commands carry this hop's trace
        return True

    async def _cheap_load(self, tx: Tx, saga_id: str) -> SagaRecord | None:
        """The instance, if reading it costs no round trip (else None)."""
        rec = self.known.take(saga_id) if self.known is not None else None
        if rec is None and self.store.dialect != "postgresql":  # a read is no round trip
            rec = await self.store.saga_peek(tx, saga_id)
        return rec

    async def on_timer(self, scope: Scope) -> None:
        """Route: a durable timer came due."""
        env = scope.env
        timer = scope.codec.payload(env, Timer)
        event = TimerFired(timer.kind, timer.token, env.headers.step or "", timer.seconds)  # type: ignore[arg-type]
        await self.apply(scope.tx, scope.out, env.headers.saga_id, event, env)

    async def operate(self, saga_id: str, action: OperatorAction) -> None:
        """Apply an operator's action to one instance, in one transaction."""
        if not action.actor.may_act():
            raise InvalidOperatorAction(f"{action.actor} may not act on sagas", saga_id=saga_id)
        if not action.reason.strip():
            raise InvalidOperatorAction("operator actions need a reason", saga_id=saga_id)
        out = Outbox()
        async with self.store.transaction() as tx:
            await self.apply(tx, out, saga_id, action, None, missing=SagaNotFound)
            await self.writer.flush(tx, out)

    async def run_local(self, delivery: Delivery, endpoint: Endpoint) -> None:
        """Run a local step outside any transaction, then apply its outcome."""
        env = self.codec.decode(delivery.data, trusted=True)  # the store's own queue
        rec = await self.store.saga_get(env.headers.saga_id or "")
        pending = progress_decoder.decode(rec.progress).pending if rec else {}
        p = pending.get(env.headers.step or "")
        if rec is None or p is None or p.message_id != env.id:
            return await delivery.ack()  # the step moved on
        reply = await self._local_outcome(rec, env, delivery)
        if reply is not None:
            await endpoint.transact(reply, self.on_reply, delivery)

    # -- the shell --------------------------------------------------------------

    async def apply(
        self,
        tx: Tx,
        out: Outbox,
        saga_id: str | None,
        event: Event,
        cause: Envelope | None,
        *,
        missing: type[Exception] = UnknownSaga,
    ) -> Decision:
        """Load, decide, persist and send: the whole step of the coordinator.

        The load takes no lock (on PostgreSQL it is a statement of its own
        before the transaction begins): what the hop writes is guarded by the
        instance's revision, so a hop that decided on a state another hop has
        changed since fails with :class:`ConcurrencyConflict`, writing
        nothing, and the endpoint runs it again on the new state.
        """
        rec = self.known.take(saga_id or "") if self.known is not None else None
        if rec is None:
            rec = await self.store.saga_peek(tx, saga_id or "")
        if rec is None:
            raise missing(f"no saga instance {saga_id!r}", saga_id=saga_id)  # type: ignore[call-arg]
        machine, inst = self._instance(rec)
        decision = machine.apply(inst, event)
        self.hooks.decided(tx, rec, machine.defn, inst, decision, event)
        await self._carry_out(tx, out, rec, decision, cause)
        return decision

    def _instance(self, rec: SagaRecord) -> tuple[SagaMachine, Instance]:
        """The machine of ``rec``'s saga version and the instance ``rec`` holds."""
        machine = self.registry.machine(rec.type, rec.version, rec.id)
        inst = Instance(
            rec.id,
            rec.type,
            rec.version,
            SagaState(rec.state),
            machine.decode(machine.defn.data_type, rec.data),
            progress_decoder.decode(rec.progress),
            rec.error,
        )
        return machine, inst

    async def _carry_out(
        self,
        tx: Tx,
        out: Outbox,
        rec: SagaRecord,
        d: Decision,
        cause: Envelope | None,
        *,
        insert: bool = False,
    ) -> None:
        """Persist a decision and turn its effects into messages, in ``tx``."""
        inst = d.instance
        if d.changed and inst.state.value != rec.state:
            self._announce(out, rec, inst, cause)
        for effect in d.effects:
            await self._effect(tx, out, inst, effect, cause)
        if d.changed:
            _record(rec, inst)  # ``insert``: the caller writes the record after this
            if not insert:
                await self.store.saga_update(tx, rec)
        elif not insert:
            await self.store.saga_unchanged(tx, rec)  # decided on this revision: still it?
        now = self.store.clock.now()
        lines = [
            LogEntry(rec.id, now, e.entry, e.step, e.message_id, e.detail)
            for e in d.of(HistoryLine)
        ]
        await self.store.log(tx, lines)
        if not inst.state.terminal:
            if self.known is not None:
                tx.on_commit(partial(_keep, self.known, rec))
        elif d.changed:
            name, final = finished(rec.id), replace(rec)
            tx.on_commit(lambda: self.store.queue.waker.offer(name, final))  # before the wake
            tx.notify(name)
            if self.announce_ends:
                self._announce_end(out, inst, cause)

    def _announce(
        self, out: Outbox, rec: SagaRecord, inst: Instance, cause: Envelope | None
    ) -> None:
        """Publish the definition's completed/compensated event as the instance ends."""
        defn = self.registry.machine(rec.type, rec.version, rec.id).defn
        announcement = {
            SagaState.COMPLETED: defn.on_completed,
            SagaState.COMPENSATED: defn.on_compensated,
        }.get(inst.state)
        if announcement is None:
            return
        fields: dict[str, Any] = {
            "correlation_id": inst.progress.correlation_id,
            "saga_id": inst.id,
            "saga_type": inst.type,
        }
        headers = caused_by(cause, **fields) if cause is not None else Headers(**fields)
        out.publish(self.codec.make(announcement[1](inst.data), headers))

    def _announce_end(self, out: Outbox, inst: Instance, cause: Envelope | None) -> None:
        """Publish :class:`SagaEnded` (only when a process manager listens for it)."""
        corr = inst.progress.correlation_id
        ended = SagaEnded(inst.id, inst.type, inst.state.value, corr, inst.error)
        headers = caused_by(cause, saga_id=inst.id, saga_type=inst.type, correlation_id=corr)
        out.publish(self.codec.make(ended, headers))

    async def _effect(
        self, tx: Tx, out: Outbox, inst: Instance, effect: Any, cause: Envelope | None
    ) -> None:
        make = self.codec.make
        if isinstance(effect, SendCommand):
            headers = _headers(inst, effect.step, effect.phase, effect.attempt, cause)
            out.send(make(effect.command, headers, id=effect.message_id), effect.participant)
        elif isinstance(effect, RunLocalStep):
            headers = _headers(inst, effect.step, effect.phase, effect.attempt, cause)
            out.schedule(make(RunLocal(), headers, id=effect.message_id), LOCAL_QUEUE, 0.0)
        elif isinstance(effect, StartTimer):
            timer = Timer(effect.kind, effect.token, effect.seconds)
            headers = _headers(inst, effect.step, "timer", 1, cause)
            env = make(timer, headers, id=effect.message_id)
            out.schedule(env, TIMER_QUEUE, effect.seconds)
        elif isinstance(effect, CancelTimer) and (cause is None or cause.id != effect.message_id):
            # (the timer being handled is deleted by this hop's own acknowledgement: deleting it
            # twice in one batch could leave the acknowledgement a row short, a lost lease)
            await self.store.queue.cancel(tx, effect.message_id)

    async def _local_outcome(
        self, rec: SagaRecord, env: Envelope, delivery: Delivery
    ) -> Envelope | None:
        """Run the local function; its result or failure as a reply (None: retry later)."""
        machine = self.registry.machine(rec.type, rec.version, rec.id)
        fn = machine.defn.step(env.headers.step or "").local
        assert fn is not None
        if isinstance(fn, AtomicStep):
            fn = fn.bind(self.twophase, f"{rec.id}:{env.headers.step}")
        try:
            result = await fn(machine.decode(machine.defn.data_type, rec.data))
        except BusinessError as exc:
            return self._reply(env, Failure(exc.code, str(exc)), "failure")
        except Exception as exc:
            attempt = attempt_of(delivery)
            if not self.retry.gives_up_after(attempt):
                await delivery.nack(self.retry.delay(attempt), failed=True)
                return None
            return self._reply(env, Failure(type(exc).__name__, str(exc), True), "failure")
        reply = self._reply(env, Done(), "success")
        if result is not None:
            reply.type, reply.payload = LOCAL_RESULT, msgspec.Raw(encode_json(result))
        return reply

    def _reply(self, env: Envelope, payload: Any, outcome: str) -> Envelope:
        return self.codec.reply(env, payload, outcome=outcome, sender=LOCAL_SENDER)


def _reply_event(env: Envelope) -> ReplyReceived:
    h = env.headers
    outcome = h.outcome or "success"
    return ReplyReceived(
        h.step or "", h.causation_id, env.id, env.type, outcome, bytes(env.payload), h.sender
    )


def _keep(known: KnownSagas, rec: SagaRecord) -> None:
    """Keep ``rec`` as committed, unless it ended in the same transaction (a first
    step decided inside the start: see :meth:`Coordinator._first_hop`)."""
    if not SagaState(rec.state).terminal:
        known.keep(rec)


def _record(rec: SagaRecord, inst: Instance) -> None:
    rec.state = inst.state.value
    rec.data = encode_json(inst.data)
    rec.progress = encode_json(inst.progress)
    rec.error = inst.error


def _headers(
    inst: Instance, step: str, phase: str, attempt: int, cause: Envelope | None
) -> Headers:
    fields: dict[str, Any] = {
        "saga_id": inst.id,
        "saga_type": inst.type,
        "step": step,
        "phase": phase,
        "reply_to": COORDINATOR_QUEUE,
        "attempt": attempt,
        "correlation_id": inst.progress.correlation_id,
    }
    if cause is None:
        return Headers(**fields)
    return caused_by(cause, **fields)
