"""The Saga Execution Coordinator.

Where a reply goes next, in one place: :meth:`Coordinator.on_reply` loads the
instance (row-locked), checks the reply is the one awaited, folds it into the
saga data, and decides: next group of steps, compensation of completed steps
in reverse order, a retry after backoff, or a final state. The instance, its
history and the next commands commit in one transaction.

Timers (step timeouts, retries, the saga deadline) and local steps are
messages on the store's own queues, so they are durable and claimed with
``SKIP LOCKED`` by whichever coordinator process is free.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .endpoint import Outbox
from .errors import (
    BusinessError,
    DuplicateRegistration,
    InvalidOperatorAction,
    SagaNotFound,
    SagaVersionUnknown,
    UnknownSaga,
)
from .messages import Done, Envelope, Failure, Headers, caused_by, command, encode_json, new_id
from .policies import RetryPolicy
from .saga import SagaDefinition, StepDef
from .store.core import LogEntry, SagaRecord

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .store import Store, Tx
    from .transport import Delivery

log = logging.getLogger("sagakit.coordinator")

COORDINATOR_QUEUE = "sagakit.coordinator"
TIMER_QUEUE = "sagakit.timers"
LOCAL_QUEUE = "sagakit.local"
LOCAL_RESULT = "sagakit.LocalResult"
TERMINAL = frozenset({"completed", "compensated", "failed", "aborted"})


@command("sagakit.Timer")
class Timer(msgspec.Struct, frozen=True):
    """A durable timer: ``timeout`` and ``retry`` carry the awaited message id."""

    kind: str
    token: str
    seconds: float = 0.0


@command("sagakit.RunLocal")
class RunLocal(msgspec.Struct, frozen=True):
    """Asks a coordinator process to run a local step."""


class Pending(msgspec.Struct):
    """A step awaiting its reply (or, if ``waiting``, its retry timer)."""

    message_id: str
    attempt: int
    phase: str
    waiting: bool = False
    timer: str | None = None
    base: int = 0  # attempts made before the last operator retry


class Progress(msgspec.Struct):
    """Where an instance stands; steps are named, never indexed."""

    correlation_id: str = ""
    done: list[str] = []
    pending: dict[str, Pending] = {}
    compensations: list[str] = []
    compensated: list[str] = []
    pivoted: bool = False
    stuck: Pending | None = None
    stuck_step: str | None = None


_progress_decoder = msgspec.json.Decoder(Progress)


@dataclass
class SagaView:
    """A saga instance as the query API returns it."""

    id: str
    type: str
    version: int
    state: str
    data: Any
    error: str | None
    created_at: float
    updated_at: float
    done: list[str]
    compensated: list[str]
    pending: list[str]
    history: list[LogEntry] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass
class Instance:
    """A loaded instance being worked on inside one transaction."""

    rec: SagaRecord
    defn: SagaDefinition[Any]
    data: Any
    progress: Progress
    cause: Envelope | None
    now: float
    entries: list[LogEntry] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)

    def log(
        self,
        entry: str,
        step: str | None = None,
        message_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.entries.append(LogEntry(self.rec.id, self.now, entry, step, message_id, detail))


class Coordinator:
    """Runs saga definitions; one per App, any number of processes per store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.definitions: dict[tuple[str, int], SagaDefinition[Any]] = {}
        self.endpoint: Endpoint | None = None  # set by the App: codec and sending
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    # -- registration --------------------------------------------------------

    def register(self, defn: SagaDefinition[Any]) -> None:
        if defn.key in self.definitions:
            raise DuplicateRegistration(
                f"saga {defn.name!r} version {defn.version} registered twice"
            )
        self.definitions[defn.key] = defn

    def _definition(self, rec: SagaRecord) -> SagaDefinition[Any]:
        defn = self.definitions.get((rec.type, rec.version))
        if defn is None:
            raise SagaVersionUnknown(
                f"saga {rec.type!r} version {rec.version} is not registered here",
                saga_id=rec.id,
            )
        return defn

    @property
    def ep(self) -> Endpoint:
        if self.endpoint is None:
            raise RuntimeError("the coordinator is not attached to a running App")
        return self.endpoint

    # -- the public API ------------------------------------------------------

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
        registered = self.definitions.get(defn.key)
        if registered is None:
            raise SagaVersionUnknown(f"saga {defn.name!r} v{defn.version} is not registered")
        defn = registered  # steps run as registered under this name and version
        saga_id = saga_id or new_id()
        now = self.store.clock.now()
        deadline = now + defn.deadline if defn.deadline else None
        rec = SagaRecord(
            saga_id, defn.name, defn.version, "running", b"", b"", 0, now, now, deadline
        )
        inst = Instance(
            rec, defn, data, Progress(correlation_id=correlation_id or saga_id), None, now
        )
        inst.log("started", detail=f"{defn.name} v{defn.version}")
        ep, out = self.ep, Outbox()
        self._advance(inst, out)
        if deadline is not None:
            self._schedule(inst, out, "", Timer("deadline", saga_id), defn.deadline or 0.0)
        self._encode(inst)
        async with self.store.transaction() as tx:
            if await self.store.saga_insert(tx, rec):
                await self.store.log(tx, inst.entries)
                await ep.flush(tx, out)
        return saga_id

    async def get(self, saga_id: str, *, history: bool = True) -> SagaView:
        rec = await self.store.saga_get(saga_id)
        if rec is None:
            raise SagaNotFound(f"no saga {saga_id!r}", saga_id=saga_id)
        return await self._view(rec, history)

    async def _view(self, rec: SagaRecord, history: bool) -> SagaView:
        progress = _progress_decoder.decode(rec.progress)
        defn = self.definitions.get((rec.type, rec.version))
        data = self._decode_data(defn, rec.data) if defn else msgspec.json.decode(rec.data)
        return SagaView(
            rec.id,
            rec.type,
            rec.version,
            rec.state,
            data,
            rec.error,
            rec.created_at,
            rec.updated_at,
            list(progress.done),
            list(progress.compensated),
            sorted(progress.pending),
            await self.store.history(rec.id) if history else [],
        )

    async def list(
        self,
        *,
        type: str | None = None,
        state: str | None = None,
        older_than: float | None = None,
        limit: int = 100,
    ) -> list[SagaView]:
        """Instances by type, state and age (seconds since creation)."""
        before = self.store.clock.now() - older_than if older_than is not None else None
        recs = await self.store.saga_list(
            type=type, state=state, created_before=before, limit=limit
        )
        return [await self._view(r, history=False) for r in recs]

    async def counts(self, *, type: str | None = None) -> dict[str, int]:
        return await self.store.saga_counts(type=type)

    async def wait(self, saga_id: str, timeout: float = 30.0, poll: float = 0.01) -> SagaView:
        """Wait until the instance reaches a final state; TimeoutError if not."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            rec = await self.store.saga_get(saga_id)
            if rec is not None and rec.state in TERMINAL:
                return await self._view(rec, history=True)
            if loop.time() > end:
                raise TimeoutError(f"saga {saga_id} not final after {timeout}s")
            await asyncio.sleep(poll)

    async def retry(self, saga_id: str, *, by: str, reason: str) -> None:
        """Operator: re-send the step a ``failed`` instance is stuck on."""
        await self._operate(saga_id, by, reason, "retry", self._op_retry)

    async def compensate(self, saga_id: str, *, by: str, reason: str) -> None:
        """Operator: force compensation of a running instance before its pivot."""
        await self._operate(saga_id, by, reason, "compensate", self._op_compensate)

    async def abort(self, saga_id: str, *, by: str, reason: str) -> None:
        """Operator: stop an unfinished instance where it is, without compensating."""
        await self._operate(saga_id, by, reason, "abort", self._op_abort)

    # -- routes (run inside the endpoint's transaction) ----------------------

    async def on_reply(self, env: Envelope, tx: Tx, out: Outbox, ep: Endpoint) -> None:
        inst = await self._load(tx, env.headers.saga_id, env)
        step, p = env.headers.step or "", inst.progress.pending.get(env.headers.step or "")
        if p is None or p.waiting or p.message_id != env.headers.causation_id:
            outcome = env.headers.outcome or "success"
            inst.log("reply-ignored", step, env.id, f"{env.type} ({outcome}): not awaited")
            return await self.store.log(tx, inst.entries)  # the instance is unchanged
        self._settle(inst, step, p)
        inst.log("reply", step, env.id, f"{env.type} ({env.headers.outcome})")
        if env.failed:
            failure = _failure_of(env)
            self._failed(inst, step, p, _failure_text(env), out, False, failure)
        elif p.phase == "compensate":
            self._compensated(inst, step, out)
        else:
            self._succeeded(inst, step, env, out)
        await self._save(tx, inst)

    async def on_timer(self, env: Envelope, tx: Tx, out: Outbox, ep: Endpoint) -> None:
        timer = ep.codec.payload(env, Timer)
        inst = await self._load(tx, env.headers.saga_id, env)
        if timer.kind == "deadline":
            return await self._deadline(inst, tx, out)
        step = env.headers.step or ""
        p = inst.progress.pending.get(step)
        if p is None or p.message_id != timer.token:
            return  # the step moved on; a stale timer changes nothing
        del inst.progress.pending[step]
        if timer.kind == "retry":
            self._send(inst, inst.defn.step(step), p.phase, p.attempt + 1, out, base=p.base)
        else:
            inst.log("timeout", step, p.message_id, f"no reply within {timer.seconds}s")
            self._timed_out(inst, step, p, f"timeout after {timer.seconds}s", out)
        await self._save(tx, inst)

    def _timed_out(self, inst: Instance, step: str, p: Pending, reason: str, out: Outbox) -> None:
        """A reply is missing: compensate if the step can be undone, else ask again.

        A step with no compensation (the pivot, say) may have taken effect, and
        nothing could undo it, so its command is sent again: the participant's
        barrier answers a repeat with the stored outcome instead of acting twice.
        """
        sdef = inst.defn.step(step)
        if p.phase == "forward" and sdef.compensation is None and sdef.kind != "retriable":
            return self._retry_or_stop(inst, sdef, p, inst.defn.compensation_retry, reason, out)
        self._failed(inst, step, p, reason, out, maybe_applied=True)

    async def run_local(self, delivery: Delivery, ep: Endpoint) -> None:
        """Run a local step outside any transaction, then apply its outcome."""
        env = ep.codec.decode(delivery.data)
        rec = await self.store.saga_get(env.headers.saga_id or "")
        pending = _progress_decoder.decode(rec.progress).pending if rec else {}
        p = pending.get(env.headers.step or "")
        if rec is None or p is None or p.message_id != env.id:
            return await delivery.ack()
        defn = self._definition(rec)
        fn = defn.step(env.headers.step or "").local
        assert fn is not None
        try:
            result = await fn(self._decode_data(defn, rec.data))
            reply = _local_reply(env, result, ep)
        except BusinessError as exc:
            reply = ep.make_reply(env, Failure(exc.code, str(exc)), outcome="failure")
        except Exception as exc:
            if not ep.retry.gives_up_after(delivery.attempt):
                return await delivery.nack(ep.retry.delay(delivery.attempt))
            reply = ep.make_reply(
                env, Failure(type(exc).__name__, str(exc), True), outcome="failure"
            )
        await ep.in_transaction(delivery, lambda tx, out: self.on_reply(reply, tx, out, ep))

    # -- the state machine ---------------------------------------------------

    def _advance(self, inst: Instance, out: Outbox) -> None:
        """Send the next group's steps, or complete the saga."""
        done = set(inst.progress.done)
        for group in inst.defn.groups:
            todo = [s for s in group if s.name not in done]
            if todo:
                for s in todo:
                    self._send(inst, s, "forward", 1, out)
                return
        self._finish(inst, "completed")

    def _succeeded(self, inst: Instance, step: str, env: Envelope, out: Outbox) -> None:
        sdef = inst.defn.step(step)
        try:
            inst.data = self._fold(inst, sdef, env)
        except msgspec.ValidationError as exc:
            return self._failed(inst, step, None, f"bad reply {env.type}: {exc}", out, False)
        except _Unexpected as exc:
            return self._failed(inst, step, None, str(exc), out, maybe_applied=True)
        inst.progress.done.append(step)
        if sdef.kind in ("pivot", "retriable"):
            inst.progress.pivoted = True
        if not inst.progress.pending:
            self._advance(inst, out)

    def _fold(self, inst: Instance, sdef: StepDef, env: Envelope) -> Any:
        if env.type == LOCAL_RESULT:
            return self._decode_data(inst.defn, env.payload)
        if not sdef.on_reply:
            return inst.data
        handler = sdef.on_reply.get(env.type)
        if handler is None:
            raise _Unexpected(f"unexpected reply type {env.type!r} for step {sdef.name!r}")
        cls, fn = handler
        new = fn(inst.data, self._decoder(cls).decode(env.payload))
        return inst.data if new is None else new

    def _failed(
        self,
        inst: Instance,
        step: str,
        p: Pending | None,
        reason: str,
        out: Outbox,
        maybe_applied: bool,
        failure: Failure | None = None,
    ) -> None:
        """A step failed: retry it, compensate, or stop for an operator."""
        sdef = inst.defn.step(step)
        p = p or Pending("", 1, "forward")
        if p.phase == "forward" and sdef.on_failure is not None:
            self._fold_failure(inst, sdef, failure or Failure("sagakit.StepFailed", reason, True))
        if p.phase == "compensate":
            return self._retry_or_stop(inst, sdef, p, inst.defn.compensation_retry, reason, out)
        if sdef.kind == "retriable" and sdef.retry is not None:
            return self._retry_or_stop(inst, sdef, p, sdef.retry, reason, out)
        self._begin_compensation(
            inst, f"step {step!r} failed: {reason}", out, also=[step] if maybe_applied else []
        )

    def _fold_failure(self, inst: Instance, sdef: StepDef, failure: Failure) -> None:
        """Let the step's ``on_failure`` record the failure in the data."""
        assert sdef.on_failure is not None
        try:
            new = sdef.on_failure(inst.data, failure)
        except Exception:  # a bug in user code must not wedge the instance
            log.exception("on_failure of step %r raised; data unchanged", sdef.name)
            return
        if new is not None:
            inst.data = new

    def _retry_or_stop(
        self,
        inst: Instance,
        sdef: StepDef,
        p: Pending,
        policy: RetryPolicy,
        reason: str,
        out: Outbox,
    ) -> None:
        """Schedule the next attempt, or stop in ``failed`` when the policy gives up."""
        tries = p.attempt - p.base
        if policy.gives_up_after(tries):
            inst.progress.stuck = Pending("", p.attempt, p.phase)
            inst.progress.stuck_step = sdef.name
            inst.rec.error = (
                f"step {sdef.name!r} ({p.phase}) gave up after {tries} attempts: {reason}"
            )
            return self._finish(inst, "failed")
        delay, token = policy.delay(tries), new_id()
        self._schedule(inst, out, sdef.name, Timer("retry", token, delay), delay)
        inst.progress.pending[sdef.name] = Pending(token, p.attempt, p.phase, True, base=p.base)
        inst.log("retry-scheduled", sdef.name, token, f"attempt {p.attempt} failed: {reason}")

    def _begin_compensation(
        self, inst: Instance, reason: str, out: Outbox, also: builtins.list[str]
    ) -> None:
        prog = inst.progress
        in_flight = [n for n, p in prog.pending.items() if p.phase == "forward"]
        prog.pending.clear()
        candidates = also + in_flight + list(reversed(prog.done))
        order = [n for n in dict.fromkeys(candidates) if inst.defn.step(n).compensatable]
        prog.compensations = order
        inst.rec.state, inst.rec.error = "compensating", reason
        inst.log("compensating", detail=reason)
        self._compensate_next(inst, out)

    def _compensate_next(self, inst: Instance, out: Outbox) -> None:
        if not inst.progress.compensations:
            return self._finish(inst, "compensated")
        head = inst.progress.compensations[0]
        self._send(inst, inst.defn.step(head), "compensate", 1, out)

    def _compensated(self, inst: Instance, step: str, out: Outbox) -> None:
        prog = inst.progress
        if prog.compensations and prog.compensations[0] == step:
            prog.compensations.pop(0)
        prog.compensated.append(step)
        self._compensate_next(inst, out)

    def _finish(self, inst: Instance, state: str) -> None:
        inst.rec.state = state
        if state != "failed":
            inst.progress.stuck, inst.progress.stuck_step = None, None
        inst.log(state, detail=inst.rec.error if state != "completed" else None)

    def _send(
        self, inst: Instance, sdef: StepDef, phase: str, attempt: int, out: Outbox, base: int = 0
    ) -> None:
        """Send a step's command (or its compensation) and await the reply."""
        headers = self._headers(inst, sdef.name, phase, attempt)
        ep = self.ep
        if sdef.local is not None:
            env = ep.codec.make(RunLocal(), headers)
            out.schedule(env, LOCAL_QUEUE, 0.0)
        else:
            action = sdef.action if phase == "forward" else sdef.compensation
            assert action is not None
            env = ep.codec.make(action.factory(inst.data), headers)
            out.send(env, action.participant)
        pending = Pending(env.id, attempt, phase, base=base)
        if sdef.timeout is not None:
            timer = Timer("timeout", env.id, sdef.timeout)
            pending.timer = self._schedule(inst, out, sdef.name, timer, sdef.timeout)
        inst.progress.pending[sdef.name] = pending
        verb = "compensation-sent" if phase == "compensate" else "command-sent"
        inst.log(verb, sdef.name, env.id, f"{env.type} attempt {attempt}")

    def _headers(self, inst: Instance, step: str, phase: str, attempt: int) -> Headers:
        fields = dict(
            saga_id=inst.rec.id,
            saga_type=inst.rec.type,
            step=step,
            phase=phase,
            reply_to=COORDINATOR_QUEUE,
            attempt=attempt,
        )
        if inst.cause is None:
            return Headers(correlation_id=inst.progress.correlation_id, **fields)  # type: ignore[arg-type]
        return caused_by(inst.cause, correlation_id=inst.progress.correlation_id, **fields)

    def _schedule(self, inst: Instance, out: Outbox, step: str, timer: Timer, delay: float) -> str:
        """Put a durable timer on the store's timer queue; returns its message id."""
        env = self.ep.codec.make(timer, self._headers(inst, step, "timer", 1))
        out.schedule(env, TIMER_QUEUE, delay)
        return env.id

    def _settle(self, inst: Instance, step: str, p: Pending) -> None:
        del inst.progress.pending[step]
        if p.timer:
            inst.cancel.append(p.timer)

    async def _deadline(self, inst: Instance, tx: Tx, out: Outbox) -> None:
        """Compensate a saga that ran out of time, unless it is past the point of no return.

        A step that cannot be undone still in flight (the pivot) also stops the
        deadline: compensating around it could leave its effect in place.
        """
        prog = inst.progress
        undoable = all(
            inst.defn.step(n).compensation is not None or p.phase != "forward"
            for n, p in prog.pending.items()
        )
        if inst.rec.state == "running" and not prog.pivoted and undoable:
            self._begin_compensation(inst, "deadline passed", out, also=[])
        else:
            inst.log(
                "deadline-passed", detail=f"state {inst.rec.state}; past the point of no return"
            )
        await self._save(tx, inst)

    # -- operator actions ----------------------------------------------------

    async def _operate(
        self,
        saga_id: str,
        by: str,
        reason: str,
        action: str,
        fn: Callable[[Instance, Outbox], None],
    ) -> None:
        if not by or not reason:
            raise InvalidOperatorAction("operator actions need 'by' and 'reason'", saga_id=saga_id)
        ep, out = self.ep, Outbox()
        async with self.store.transaction() as tx:
            inst = await self._load(tx, saga_id, None, missing=SagaNotFound)
            inst.log(f"operator-{action}", detail=f"by {by}: {reason}")
            fn(inst, out)
            await self._save(tx, inst)
            await ep.flush(tx, out)

    def _op_retry(self, inst: Instance, out: Outbox) -> None:
        prog = inst.progress
        if inst.rec.state != "failed" or prog.stuck is None or prog.stuck_step is None:
            raise InvalidOperatorAction(
                "only a failed instance can be retried", saga_id=inst.rec.id
            )
        stuck, step = prog.stuck, prog.stuck_step
        prog.stuck, prog.stuck_step = None, None
        inst.rec.state = "compensating" if stuck.phase == "compensate" else "running"
        self._send(
            inst, inst.defn.step(step), stuck.phase, stuck.attempt + 1, out, base=stuck.attempt
        )

    def _op_compensate(self, inst: Instance, out: Outbox) -> None:
        if inst.rec.state != "running" or inst.progress.pivoted:
            raise InvalidOperatorAction(
                "only a running instance before its pivot can be compensated", saga_id=inst.rec.id
            )
        self._begin_compensation(inst, "forced by operator", out, also=[])

    def _op_abort(self, inst: Instance, out: Outbox) -> None:
        if inst.rec.state in ("completed", "compensated", "aborted"):
            raise InvalidOperatorAction(
                f"instance is already {inst.rec.state}", saga_id=inst.rec.id
            )
        inst.progress.pending.clear()
        inst.rec.error = "aborted by operator"
        self._finish(inst, "aborted")

    # -- persistence ---------------------------------------------------------

    async def _load(
        self,
        tx: Tx,
        saga_id: str | None,
        cause: Envelope | None,
        missing: type[Exception] = UnknownSaga,
    ) -> Instance:
        rec = await self.store.saga_load(tx, saga_id or "")
        if rec is None:
            raise missing(f"no saga instance {saga_id!r}", saga_id=saga_id)  # type: ignore[call-arg]
        defn = self._definition(rec)
        progress = _progress_decoder.decode(rec.progress)
        data = self._decode_data(defn, rec.data)
        return Instance(rec, defn, data, progress, cause, self.store.clock.now())

    async def _save(self, tx: Tx, inst: Instance) -> None:
        for timer_id in inst.cancel:
            await self.store.delete_message(tx, timer_id)
        self._encode(inst)
        await self.store.saga_update(tx, inst.rec)
        await self.store.log(tx, inst.entries)

    def _encode(self, inst: Instance) -> None:
        inst.rec.data = encode_json(inst.data)
        inst.rec.progress = encode_json(inst.progress)

    def _decode_data(self, defn: SagaDefinition[Any], raw: bytes) -> Any:
        return self._decoder(defn.data_type).decode(raw)

    def _decoder(self, cls: type[Any]) -> msgspec.json.Decoder[Any]:
        dec = self._decoders.get(cls)
        if dec is None:
            dec = self._decoders[cls] = msgspec.json.Decoder(cls)
        return dec


class _Unexpected(Exception):
    pass


def _failure_of(env: Envelope) -> Failure:
    try:
        return msgspec.json.decode(env.payload, type=Failure)
    except msgspec.MsgspecError:
        return Failure("sagakit.StepFailed", f"failure reply {env.type}", True)


def _failure_text(env: Envelope) -> str:
    try:
        f = msgspec.json.decode(env.payload, type=Failure)
        return f"{f.code}: {f.message}"
    except msgspec.MsgspecError:
        return f"failure reply {env.type}"


def _local_reply(env: Envelope, result: Any, ep: Endpoint) -> Envelope:
    reply = ep.make_reply(env, Done(), outcome="success")
    if result is not None:
        reply.type, reply.payload = LOCAL_RESULT, msgspec.Raw(encode_json(result))
    return reply
