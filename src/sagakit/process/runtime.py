"""The thin shell around the pure machine: load, apply, persist and send.

For each input the runtime runs inside the hop's transaction (see
:mod:`sagakit.endpoint`): the inbox admits the message (a duplicate stops
here), the instance row is loaded — row-locked on PostgreSQL, behind SQLite's
single writer otherwise, so one key handles one message at a time — the
machine decides, and the new state, the commands and events, the timer rows,
the cancelled timers' deletion and the decision-history row commit together,
with the acknowledgement of the message on the database transport.

Timers and held messages wait on the store's own queue
``sagakit.process.NAME.timers``; a timer's queue row carries the token the
instance armed it with, so one that fires late is recorded and changes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import msgspec

from ..endpoint import Route
from ..errors import NoProcessInstance
from ..inbox import SUCCESS
from ..messages import Envelope, Failure, caused_by, command, encode_json
from ..observe.hooks import Finished
from .definition import Hold, ProcessManager, Replied
from .machine import Input, Instance, Outcome, Verdict, apply, command_of_step
from .records import HistoryEntry, ProcessRecord, ProcessTable, meta_of, to_instance

if TYPE_CHECKING:
    from ..endpoint import Scope
    from ..saga.coordinator import Coordinator
    from ..store import Tx

HELD_SINCE = "sagakit-held-since"


@command("sagakit.ProcessTimer")
class ProcessTimer(msgspec.Struct, frozen=True):
    """A process manager's timer on the store's queue."""

    process: str
    key: str
    name: str
    token: int


def done_name(process: str, key: str) -> str:
    """The wake-up a commit sends when an instance completes."""
    return f"sagakit.process.done:{process}:{key}"


def timer_queue(pm: ProcessManager[Any]) -> str:
    return f"{pm.queue}.timers"


class ProcessRuntime:
    """Runs one process manager's inputs through the machine, in the hop's transaction."""

    def __init__(self, pm: ProcessManager[Any], table: ProcessTable, sagas: Coordinator) -> None:
        self.pm = pm
        self.table = table
        self.sagas = sagas
        self.clock = table.store.clock
        self._state = msgspec.json.Decoder(pm.state_type) if pm.state_type else None

    # -- routes -------------------------------------------------------------------

    def route(self, env: Envelope) -> Route | None:
        """The hop route of a message this process manager takes, else None."""
        if env.kind == "reply":
            return Route(self.on_reply) if env.headers.saga_type == self.reply_tag else None
        if env.type == "sagakit.ProcessTimer":
            return Route(self.on_timer)
        if ("start", env.type) in self.pm.handlers or ("message", env.type) in self.pm.handlers:
            return Route(self.on_message)
        return None

    @property
    def reply_tag(self) -> str:
        return f"process:{self.pm.name}"

    async def on_message(self, scope: Scope) -> None:
        env = scope.env
        payload: Any = scope.codec.payload(env)
        key = self._key(env, payload)
        inp = Input("message", env.type, payload, env.id, key, None, env.headers.correlation_id)
        await self._admitted(scope, inp)

    async def on_reply(self, scope: Scope) -> None:
        env, h = scope.env, scope.env.headers
        cmd = command_of_step(h.step) or ""
        value: Any
        if env.failed or env.type in scope.codec.registry:
            value = scope.codec.payload(env, Failure if env.failed else None)
        else:  # a reply type nobody declared (replied(..., returns=...)): plain JSON
            value = scope.codec.payload(env, Any)
        replied = Replied(cmd, not env.failed, value)
        key = h.saga_id or ""
        inp = Input("reply", cmd, replied, env.id, key, None, h.correlation_id, h.step)
        await self._admitted(scope, inp)

    async def on_timer(self, scope: Scope) -> None:
        env = scope.env
        t = scope.codec.payload(env, ProcessTimer)
        inp = Input("timer", t.name, None, env.id, t.key, t.token, env.headers.correlation_id)
        await self._admitted(scope, inp)

    def _key(self, env: Envelope, payload: Any) -> str:
        if self.pm.stateless:
            return env.headers.correlation_id or env.id
        key = self.pm.key_of(env.type, payload)
        if key is None:  # check.problems() reports this at definition time
            raise NoProcessInstance(f"{self.pm.name}: no key mapping for {env.type!r}")
        return key

    # -- the shell -------------------------------------------------------------------

    async def _admitted(self, scope: Scope, inp: Input) -> None:
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, scope.env)):
            return
        rec, outcome = await self.decide(scope.tx, inp)
        if outcome.verdict is Verdict.HELD:
            assert outcome.hold is not None
            self._hold(scope, outcome.hold)
        else:
            await self.persist(scope, inp, outcome, rec)
            await scope.inbox.record(scope.tx, scope.env, SUCCESS, None)
        await self._log(scope.tx, inp, outcome, scope.env.type)

    async def decide(self, tx: Tx, inp: Input) -> tuple[ProcessRecord | None, Outcome]:
        """Load the instance (locked) and ask the machine; nothing written yet."""
        rec = inst = None
        if not self.pm.stateless:
            rec = await self.table.load(tx, self.pm.name, inp.key)
            inst = self.instance(rec) if rec is not None else None
        return rec, apply(self.pm, inst, inp, self.clock.now())

    def instance(self, rec: ProcessRecord) -> Instance:
        """Decode a row into the machine's instance (upgrading an older state version)."""
        assert self._state is not None and self.pm.state_type is not None
        if rec.version != self.pm.version and self.pm.upgrade is not None:
            raw = self.pm.upgrade(rec.version, msgspec.json.decode(rec.state))
            state = msgspec.convert(raw, self.pm.state_type)
        else:
            state = self._state.decode(rec.state)
        return to_instance(rec, state)

    async def persist(
        self, scope: Scope, inp: Input, o: Outcome, rec: ProcessRecord | None
    ) -> None:
        """Write the outcome: instance row, messages, timers, cancellations, sagas."""
        tx = scope.tx
        if o.after is not None and o.changed:
            after = o.after
            if rec is None and after.trace is None:  # the trace it began in, kept
                after = dataclasses.replace(after, trace=scope.env.headers.traceparent)
            await self._save(tx, after, rec)
            if after.done:
                tx.notify(done_name(self.pm.name, after.key))
                if o.before is None or not o.before.done:
                    self._ended(scope, after, rec)
        inst = o.after or o.before
        corr = (inst.correlation_id if inst else None) or inp.correlation_id
        self._messages(scope, inp, o, corr)
        for message_id in o.cancelled:
            await self.table.store.queue.cancel(tx, message_id)
        for s in o.sagas:
            await self.sagas.start_in(tx, scope.out, s.saga, s.data, saga_id=s.saga_id,
                                      correlation_id=corr, cause=scope.env)  # fmt: skip

    def _ended(self, scope: Scope, inst: Instance, rec: ProcessRecord | None) -> None:
        now = self.clock.now()
        started = rec.created_at if rec is not None else now
        ended = Finished("process", self.pm.name, inst.key, inst.correlation_id, inst.status,
                         False, inst.trace, started, now)  # fmt: skip
        scope.hooks.finished(scope.tx, ended)

    async def _save(self, tx: Tx, inst: Instance, rec: ProcessRecord | None) -> None:
        now = self.clock.now()
        state, meta = encode_json(inst.state), meta_of(inst)
        if rec is None:
            rec = ProcessRecord(self.pm.name, inst.key, self.pm.version, inst.status, state, meta,
                                inst.done, 0, inst.correlation_id, now, now)  # fmt: skip
            await self.table.insert(tx, rec)
            return
        rec.version, rec.status, rec.state, rec.meta = self.pm.version, inst.status, state, meta
        rec.done, rec.updated_at = inst.done, now
        await self.table.update(tx, rec)

    def _messages(self, scope: Scope, inp: Input, o: Outcome, corr: str | None) -> None:
        make, env = scope.codec.make, scope.env
        for c in o.commands:
            h = caused_by(env, saga_id=inp.key, saga_type=self.reply_tag, step=c.step,
                          phase=None, reply_to=self.pm.queue, correlation_id=corr,
                          attempt=c.attempt)  # fmt: skip
            scope.out.send(make(c.command, h), c.to)
        for e in o.events:
            h = caused_by(env, saga_id=None, saga_type=None, step=None, correlation_id=corr)
            scope.out.publish(make(e, h))
        for t in o.started:
            timer = ProcessTimer(self.pm.name, inp.key, t.name, t.armed.token)
            h = caused_by(env, saga_id=None, saga_type=None, step=None, correlation_id=corr)
            msg = make(timer, h, id=t.armed.message_id)
            scope.out.schedule(
                msg, timer_queue(self.pm), max(0.0, t.armed.due_at - self.clock.now())
            )

    def _hold(self, scope: Scope, hold: Hold) -> None:
        """Put a copy of the message back on the timer queue, or give up on it."""
        env, now = scope.env, self.clock.now()
        since = float(env.headers.extra.get(HELD_SINCE, now))
        if now - since >= hold.seconds:
            raise NoProcessInstance(
                f"{self.pm.name}: no instance for {env.type!r} after {now - since:.0f}s held"
            )
        extra = {**env.headers.extra, HELD_SINCE: repr(since)}
        headers = msgspec.structs.replace(env.headers, extra=extra)
        copy = msgspec.structs.replace(env, headers=headers, auth=None)
        scope.out.schedule(copy, timer_queue(self.pm), hold.every)

    async def _log(self, tx: Tx, inp: Input, o: Outcome, type_name: str) -> None:
        before, after = o.before, o.after or o.before
        corr = (after.correlation_id if after else None) or inp.correlation_id
        trigger = f"timer:{inp.trigger}" if inp.kind == "timer" else type_name
        entry = HistoryEntry(
            0, self.pm.name, inp.key, self.clock.now(), inp.message_id, trigger, o.verdict.value,
            before.status if before else None, after.status if after else None, o.detail(), corr,
        )  # fmt: skip
        await self.table.log(tx, entry)
