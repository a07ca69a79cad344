"""The Saga Execution Coordinator: a thin shell around the pure machine.

For every event — a start, a reply, a timer, a local step's result, an
operator's action — the shell loads the instance (without a lock; every
write is guarded by its revision), asks :class:`~sagakit.saga.machine.SagaMachine`
for a decision, and in the same transaction persists the new instance and its
history, writes the commands to the outbox, and starts or cancels durable
timers. A saga that reaches a final state wakes its waiters at commit, in this
process directly and in others through the store's notifications.

A step's command and reply may never travel: where this coordinator runs in
a participant's process on that participant's store, a ``db_only`` step's
reply is decided on in the step's own transaction, and the next such step's
hop runs in it too (:mod:`sagakit.saga.inline`).

Timers and local steps are messages on the store's own queues
(``sagakit.timers``, ``sagakit.local``), so they are durable and claimed by
whichever coordinator process is free.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from ..endpoint import CHAIN_MAX, RACE_RETRIES, _InlineHopFailed
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
from .inline import Chain, InlineHops, reply_event
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
        #: participants' hops a saga's commands may run in, inside others (set by the App)
        self.hops = InlineHops(self, COORDINATOR_QUEUE)

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
            with waker.starting(finished(saga_id)):  # it may end inside the start
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
        """The start's transaction, with its first steps' hops inside it where they can
        run here (:meth:`InlineHops.first_hop`). If one of them failed, the start again with
        that step's command sent (the hops before it inside again): the step's own
        hop then retries or refuses it. Any other failure after a hop ran inside:
        the start again with none inside."""
        limit = CHAIN_MAX + 1
        for _ in range(RACE_RETRIES):
            chain = Chain(limit)
            try:
                return await self._start_tx(defn, data, saga_id, correlation_id, chain)
            except SagaIdInUse:
                raise
            except _InlineHopFailed as exc:
                limit = exc.before
                log.debug("saga %s: %s inside the start; sending its command", saga_id, exc)
            except Exception as exc:
                if not chain.ran:
                    raise
                limit = 0
                log.debug("saga %s: the start failed (%r); sending its commands", saga_id, exc)
        await self._start_tx(defn, data, saga_id, correlation_id, Chain(0))

    async def _start_tx(
        self,
        defn: SagaDefinition[Any],
        data: Any,
        saga_id: str,
        correlation_id: str | None,
        chain: Chain,
    ) -> None:
        out = Outbox()
        async with self.store.transaction() as tx:  # on PostgreSQL: one statement
            then = partial(self.hops.first_hop, tx, out, chain)  # in the saga's trace context
            await self.start_within(
                tx, out, defn, data, saga_id, correlation_id, None, then, held=True
            )

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
            await self.carry_out(tx, out, rec, decision, cause, insert=True)
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
        await self.apply(scope.tx, scope.out, env.headers.saga_id, reply_event(env), env)

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
        machine, inst = self.instance(rec)
        decision = machine.apply(inst, event)
        self.hooks.decided(tx, rec, machine.defn, inst, decision, event)
        await self.carry_out(tx, out, rec, decision, cause)
        return decision

    def instance(self, rec: SagaRecord) -> tuple[SagaMachine, Instance]:
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

    async def carry_out(
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
        moved = d.changed and inst.state.value != rec.state
        rerun = moved and rec.state in _ENDED  # an ended saga runs again (an operator's retry)
        if moved:
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
            if rerun:  # the final record a start kept for its waiter is stale
                tx.on_commit(partial(self.store.queue.waker.withdraw, finished(rec.id)))
        elif d.changed:
            name, waker = finished(rec.id), self.store.queue.waker
            tx.on_commit(lambda: waker.offer(name, replace(rec)))  # as committed
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


_ENDED = frozenset(s.value for s in SagaState if s.terminal)


def _keep(known: KnownSagas, rec: SagaRecord) -> None:
    """Keep ``rec`` as committed, unless it ended in the same transaction (a first
    step decided inside the start: see :mod:`sagakit.saga.inline`)."""
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
