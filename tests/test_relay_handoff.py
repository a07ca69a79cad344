"""Outbox rows handed to this process's relay at their commit: no NOTIFY, no claim.

A running relay takes the rows its own process writes to the outbox,
written already leased to it, straight after their commit. Each case is
forced for real on SQLite and PostgreSQL: a rollback hands nothing, a relay
that dies holding rows lets another relay publish them once the lease runs
out, a failing broker sends new rows the claim way until it recovers, and a
stopping relay publishes what it was handed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sagakit.errors import TransportError
from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.outbox import OUTBOX_QUEUE, OutboxTable, Relay
from sagakit.store import Store, open_store
from sagakit.testing import drop_tables
from sagakit.transport import Outgoing
from tests.helpers import Do, eventually

pytestmark = pytest.mark.timeout(60)


class Broker:
    """A transport that records what it was given; it can fail, or hang."""

    url = "recording://"

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False
        self.hang = asyncio.Event()

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if self.down:
            raise TransportError("connection lost")
        self.sent += [m.id for m in messages]


class Hanging(Broker):
    async def publish(self, messages: Sequence[Outgoing]) -> None:
        self.hang.set()
        await asyncio.Event().wait()  # never returns: the process "dies" here


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/r.db"
    else:
        url = f"{request.getfixturevalue('postgres_url')}?max_size=3"
    s = open_store(url, prefix=prefix)
    await s.open()
    try:
        yield s
    finally:
        if s.dialect == "postgresql":
            await drop_tables(s)
        await s.close()


@pytest.fixture
def claims(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows each claim on the outbox returned."""
    seen: list[int] = []
    claim = store.queue.claim

    async def counted(queue: str, limit: int, lease: float) -> list:  # type: ignore[type-arg]
        got = await claim(queue, limit, lease)
        if queue == OUTBOX_QUEUE:
            seen.append(len(got))
        return got

    monkeypatch.setattr(store.queue, "claim", counted)
    return seen


async def write(store: Store, ids: list[str], *, fail: bool = False) -> None:
    codec = Codec(TypeRegistry())
    envs = [codec.make(Do(i), Headers(saga_id=f"s-{i}"), id=i) for i in ids]
    out = [Outgoing(e.id, "command", "stock", codec.encode(e)) for e in envs]
    async with store.transaction() as tx:
        await OutboxTable(store).write(tx, out)
        if fail:
            raise RuntimeError("rolled back")


def relay(store: Store, broker: Broker, *, max_poll: float = 30.0, **kw: float) -> Relay:
    """A started relay; by default it looks for rows due without a wake-up only every 30 s."""
    r = Relay(store, broker, max_poll=max_poll, backoff=0.05, **kw)  # type: ignore[arg-type]
    r.start()
    return r


async def test_rows_written_here_are_published_without_a_claim(
    store: Store, claims: list[int]
) -> None:
    broker = Broker()
    r = relay(store, broker)
    try:
        await eventually(lambda: _true(len(claims) >= 1))  # the start's look at the outbox
        await write(store, ["a", "b"])
        await write(store, ["c"])
        await eventually(lambda: _true(sorted(broker.sent) == ["a", "b", "c"]))
        await eventually(lambda: _depth_is(store, 0))
        assert sum(claims) == 0  # nothing came the claim way
    finally:
        await r.stop()


async def test_a_rolled_back_write_hands_nothing_and_frees_its_room(store: Store) -> None:
    broker = Broker()
    r = relay(store, broker)
    try:
        with pytest.raises(RuntimeError):
            await write(store, ["gone"], fail=True)
        assert r.reserve()  # the rolled-back row's room was given back
        r.unreserve()
        await write(store, ["kept"])
        await eventually(lambda: _true(broker.sent == ["kept"]))
    finally:
        await r.stop()


async def test_rows_of_a_relay_that_died_are_published_by_another_after_the_lease(
    store: Store,
) -> None:
    stuck = Hanging()
    dead = relay(store, stuck, lease=0.5)
    await write(store, ["orphan"])
    await asyncio.wait_for(stuck.hang.wait(), 10)
    assert dead._task is not None
    dead._task.cancel()  # the process dies mid-publish: no stop, no release
    store.queue.detach(OUTBOX_QUEUE, dead)
    broker = Broker()
    alive = relay(store, broker, lease=0.5, max_poll=0.1)  # a lease running out wakes nobody
    try:
        await eventually(lambda: _true(broker.sent == ["orphan"]), timeout=15)
        await eventually(lambda: _depth_is(store, 0))
    finally:
        await alive.stop()


async def test_while_the_broker_fails_new_rows_wait_in_the_outbox_and_none_is_lost(
    store: Store,
) -> None:
    broker = Broker()
    broker.down = True
    r = relay(store, broker, max_poll=0.1)  # rows coming due after their backoff wake nobody
    try:
        await write(store, ["m1"])  # handed, fails to publish, released with backoff
        await eventually(lambda: _true(r._shy_until > 0))
        assert not r.reserve(), "no handoffs while the broker fails"
        await write(store, ["m2"])  # the claim way
        broker.down = False
        await eventually(lambda: _true(sorted(broker.sent) == ["m1", "m2"]), timeout=15)
        await eventually(lambda: _depth_is(store, 0))
    finally:
        await r.stop()


async def test_a_stopping_relay_publishes_what_it_was_handed(store: Store) -> None:
    broker = Broker()
    r = relay(store, broker)
    await write(store, ["last"])
    await r.stop()
    assert broker.sent == ["last"]
    assert await store.queue.depth(OUTBOX_QUEUE) == 0
    assert not r.reserve()  # stopped: later rows are left for another relay


async def _depth_is(store: Store, n: int) -> bool:
    return await store.queue.depth(OUTBOX_QUEUE) == n


async def _true(value: bool) -> bool:
    return value
