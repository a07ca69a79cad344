"""Property: whatever the delivery order, duplicates, late timers and crashes,
an instance's persisted state is that of applying each distinct message once,
in arrival order; a stale timer changes nothing; no message is lost.

Deliveries go through the real hop (``Endpoint.transact``) into a real store.
A *crash* runs the handler and then fails before the commit, so its
transaction is rolled back. Timers and held messages are read straight off
the store's queue and delivered at any later point, however early or late, and
as often as the draw says. At the end everything is delivered once more and
the queue drained, as a restarted worker would.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sagakit as sk
from sagakit.endpoint import Endpoint, HopPolicy, Scope
from sagakit.messages import Codec, Envelope, Headers, TypeRegistry
from sagakit.outbox import OutboxWriter
from sagakit.process import Hold, ProcessManager, TimerFired, decide, evolve
from sagakit.process.records import ProcessTable
from sagakit.process.runtime import ProcessRuntime, ProcessTimer, timer_queue
from sagakit.saga import SagaRegistry
from sagakit.saga.coordinator import Coordinator
from sagakit.store import open_store
from sagakit.transport import open_transport


@sk.event("prop.Open")
class Open(msgspec.Struct, frozen=True):
    key: str


@sk.event("prop.Add")
class Add(msgspec.Struct, frozen=True):
    key: str
    n: int


@sk.event("prop.Close")
class Close(msgspec.Struct, frozen=True):
    key: str


class Tally(msgspec.Struct, frozen=True):
    key: str
    status: Literal["open", "closed"] = "open"
    seen: list[int] = []
    nudges: int = 0


tally = ProcessManager(
    "tally", Tally, key=lambda m: m.key, final=["closed"], missing=Hold(seconds=1e9, every=0.01)
)


@tally.starts(Open, to="open")
def opened(e: Open) -> sk.Decision:
    return decide(Tally(e.key))


@tally.on(Add, when="open")
def added(e: Add, s: Tally) -> sk.Decision:
    return evolve(s, seen=[*s.seen, e.n]).after("nudge", 10.0)


@tally.on(Close, when="open", to="closed")
def closed(e: Close, s: Tally) -> sk.Decision:
    return evolve(s, status="closed")


@tally.timer("nudge", when="open")
def nudged(t: TimerFired, s: Tally) -> sk.Decision:
    return evolve(s, nudges=s.nudges + 1)


class Crash(Exception):
    """Raised after the handler ran, before the commit."""


@dataclass
class Model:
    """What should have happened, computed from the deliveries alone."""

    opened: bool = False
    closed: bool = False
    seen: list[int] = field(default_factory=list)
    armed_by: str | None = None  # the message whose Add armed the running timer
    nudges: int = 0

    def deliver(self, env: Envelope, payload: Any) -> None:
        if isinstance(payload, ProcessTimer):
            if not self.closed and self.armed_by == env.headers.causation_id:
                self.nudges, self.armed_by = self.nudges + 1, None
        elif not self.opened:
            self.opened = isinstance(payload, Open)  # anything else is held
        elif self.closed:
            pass
        elif isinstance(payload, Add) and payload.n not in self.seen:
            self.seen.append(payload.n)
            self.armed_by = env.id
        elif isinstance(payload, Close):
            self.closed, self.armed_by = True, None


class Harness:
    def __init__(self) -> None:
        self.store = open_store("memory://", prefix="prop_")
        registry = TypeRegistry()
        for cls in (Open, Add, Close, ProcessTimer):
            registry.add(cls)
        self.codec = Codec(registry)
        writer = OutboxWriter(self.store, open_transport("database", self.store), self.codec)
        coord = Coordinator(SagaRegistry(), writer, sk.RetryPolicy())
        self.runtime = ProcessRuntime(tally, ProcessTable(self.store), coord)
        self.endpoint = Endpoint(tally.queue, writer, self.runtime.route, policy=HopPolicy())
        self.model = Model()
        self.seen_rows: set[int] = set()
        self.pool: list[bytes] = []  # timers and held copies seen on the queue

    async def deliver(self, data: bytes, crash: bool = False) -> None:
        env = self.codec.decode(data, trusted=True)
        route = self.runtime.route(env)
        assert route is not None

        async def body(scope: Scope) -> None:
            await route.run(scope)
            if crash:
                raise Crash()

        try:
            await self.endpoint.transact(env, body)
        except Crash:
            return
        self.model.deliver(env, self.codec.payload(env))
        await self._collect()

    async def _collect(self) -> None:
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(
                f"SELECT seq, data FROM {self.store.prefix}messages WHERE queue = ?",
                timer_queue(tally),
            )
        for seq, data in rows:
            if seq not in self.seen_rows:
                self.seen_rows.add(seq)
                self.pool.append(bytes(data))

    async def drain(self, originals: list[bytes]) -> None:
        """A restarted worker: every message again, then the queue until empty."""
        for data in originals:
            await self.deliver(data)
        for _ in range(50):
            async with self.store.transaction() as tx:
                rows = await tx.fetchall(
                    f"DELETE FROM {self.store.prefix}messages WHERE queue = ? RETURNING data",
                    timer_queue(tally),
                )
            if not rows:
                return
            for (data,) in rows:
                await self.deliver(bytes(data))
        raise AssertionError("the timer queue never drained")


def envelopes(codec: Codec, adds: int) -> list[bytes]:
    msgs = [Open("k"), *(Add("k", n) for n in range(adds)), Close("k")]
    return [codec.encode(codec.make(m, Headers())) for m in msgs]


#: one step of a run: (kind, index, crash) — kind 0 a message, 1 a queued timer/held copy
steps = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 99), st.booleans()), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adds=st.integers(0, 5), order=st.randoms(use_true_random=False), run=steps)
def test_state_is_each_distinct_message_once_in_arrival_order(
    adds: int, order: Any, run: list[tuple[int, int, bool]]
) -> None:
    asyncio.run(_property(adds, order, run))


async def _property(adds: int, order: Any, run: list[tuple[int, int, bool]]) -> None:
    h = Harness()
    await h.store.open()
    try:
        originals = envelopes(h.codec, adds)
        shuffled = originals[:]
        order.shuffle(shuffled)
        for kind, i, crash in run:
            source = shuffled if kind == 0 or not h.pool else h.pool
            await h.deliver(source[i % len(source)], crash)
        await h.drain(shuffled)
        rec = await h.runtime.table.get("tally", "k")
        assert rec is not None
        state = msgspec.json.decode(rec.state, type=Tally)
        m = h.model
        assert (state.seen, state.nudges, state.status) == (m.seen, m.nudges, "closed")
        history = await h.runtime.table.history("tally", "k")
        ids = {h.codec.decode(d).id for d in originals}
        assert ids <= {e.message_id for e in history}, "a message left no trace"
        ignored = {e.message_id for e in history if e.verdict == "ignored"}
        for data in originals:  # an Add not in the state came after the Close
            env = h.codec.decode(data)
            if env.type == "prop.Add" and h.codec.payload(env).n not in state.seen:
                assert env.id in ignored
        assert await h.store.dead_letters() == []
    finally:
        await h.store.close()


@pytest.mark.parametrize("late", [True, False])
async def test_a_timer_armed_before_a_restart_is_stale(late: bool) -> None:
    """The concrete case: two Adds restart the timer; the first timer row,
    delivered after the second Add (however late), changes nothing."""
    h = Harness()
    await h.store.open()
    try:
        o, a0, a1, c = envelopes(h.codec, 2)
        await h.deliver(o)
        await h.deliver(a0)
        first_timer = h.pool[-1]
        await h.deliver(a1)
        if late:
            await h.deliver(c)
        await h.deliver(first_timer)
        rec = await h.runtime.table.get("tally", "k")
        assert rec is not None and msgspec.json.decode(rec.state, type=Tally).nudges == 0
        verdicts = [e.verdict for e in await h.runtime.table.history("tally", "k")]
        assert verdicts[-1] == "stale-timer"
    finally:
        await h.store.close()
