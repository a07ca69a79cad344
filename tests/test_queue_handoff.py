"""A message put for a consumer in this process is handed to it at commit, no claim.

The row is written already leased to the local consumer (as a claim would
have left it) and the committed item goes straight to the consumer. Claims
are observed through a wrapper on the store's driver: which messages the
claim statements really returned. Also: a rollback hands nothing and frees
the slot, a full prefetch and a savepoint take the ordinary path, a stopping
consumer releases what it is handed at once, a process killed after the
commit leaves its row to another consumer once the lease runs out, and two
processes sharing a queue never run one message at the same time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sagakit.clock import FakeClock
from sagakit.store import Store, open_store
from sagakit.store.consumer import QueueConsumer, QueueDelivery
from tests.helpers import die_with_parent, eventually

pytestmark = pytest.mark.timeout(90)

WORKER = Path(__file__).parent / "workers" / "handoff_worker.py"
LONG_LEASE = 30.0


class Claims:
    """Wraps the driver's single statements: the ids every claim returned."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        #: PostgreSQL: the store's looks for due rows (sagakit.store.due), which replace polls
        self.looks = 0
        self.ids: list[str] = []
        real = store.driver.fetch_single

        async def counted(sql: str, *args: Any) -> list[Any]:
            rows = await real(sql, *args)
            if "attempts = attempts + 1" in sql:
                self.count += 1
                self.ids.extend(r[1] for r in rows)
            elif ("unnest(" in sql or "json_each(" in sql) and "available_at <=" in sql:
                self.looks += 1
            return rows

        store.driver.fetch_single = counted  # type: ignore[method-assign]


class Recorder:
    """A handler that records (id, attempt) and acks, or waits for ``gate`` first."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.got: list[tuple[str, int]] = []
        self.started: list[str] = []
        self.gate = gate

    async def __call__(self, d: QueueDelivery) -> None:
        self.started.append(d.item.id)
        if self.gate is not None:
            await self.gate.wait()
        self.got.append((d.item.id, d.attempt))
        await d.ack()


async def until(check: Any, timeout: float = 10.0) -> None:
    async def ok() -> bool:
        return bool(check())

    await eventually(ok, timeout=timeout)


async def put(store: Store, message_id: str, queue: str = "q") -> None:
    async with store.transaction() as tx:
        await store.queue.put(tx, queue, message_id, b"x")


async def test_a_message_for_a_local_consumer_is_handed_over_without_a_claim(
    store: Store,
) -> None:
    claims, rec = Claims(store), Recorder()
    consumer = QueueConsumer(store, "q", rec, prefetch=4, lease=LONG_LEASE, max_poll=0.05)
    try:
        await until(lambda: claims.count > 0)  # the consumer polls meanwhile
        await put(store, "m1")
        await until(lambda: rec.got)
        polls = claims.count + claims.looks
        await until(lambda: claims.count + claims.looks > polls + 2)  # polling went on after it
    finally:
        await consumer.stop()
    assert rec.got == [("m1", 1)]  # leased once, as by a claim
    assert claims.ids == []  # no claim ever returned it
    assert await store.queue.depth("q") == 0  # acknowledged with the lease it was written with


async def test_a_rollback_hands_nothing_and_frees_the_slot(store: Store) -> None:
    claims, rec = Claims(store), Recorder()
    consumer = QueueConsumer(store, "q", rec, prefetch=1, lease=LONG_LEASE, max_poll=0.05)
    try:
        with pytest.raises(RuntimeError):
            async with store.transaction() as tx:
                await store.queue.put(tx, "q", "m1", b"x")
                assert consumer._reserved == 1
                raise RuntimeError("rolled back")
        assert consumer._reserved == 0
        await put(store, "m2")  # the one slot is free again: handed over too
        await until(lambda: rec.got)
    finally:
        await consumer.stop()
    assert rec.got == [("m2", 1)]
    assert claims.ids == []
    assert await store.queue.depth("q") == 0


async def test_a_full_prefetch_takes_the_ordinary_path(store: Store) -> None:
    claims, gate = Claims(store), asyncio.Event()
    rec = Recorder(gate)
    consumer = QueueConsumer(store, "q", rec, prefetch=1, lease=LONG_LEASE, max_poll=0.05)
    try:
        await put(store, "m1")
        await until(lambda: rec.started)
        await put(store, "m2")  # no slot free: written due, for whoever claims it
        assert consumer._reserved == 0
        gate.set()
        await until(lambda: len(rec.got) == 2)
    finally:
        await consumer.stop()
    assert rec.got == [("m1", 1), ("m2", 1)]
    assert claims.ids == ["m2"]


async def test_a_put_inside_a_savepoint_takes_the_ordinary_path(store: Store) -> None:
    claims, rec = Claims(store), Recorder()
    consumer = QueueConsumer(store, "q", rec, prefetch=4, lease=LONG_LEASE, max_poll=0.05)
    try:
        async with store.transaction() as tx:
            with pytest.raises(RuntimeError):
                async with tx.savepoint():
                    await store.queue.put(tx, "q", "undone", b"x")
                    raise RuntimeError("savepoint rolled back")
            async with tx.savepoint():
                await store.queue.put(tx, "q", "kept", b"x")
        await until(lambda: rec.got)
        await asyncio.sleep(0.2)  # a ghost of "undone" would run by now
    finally:
        await consumer.stop()
    assert rec.got == [("kept", 1)]
    assert claims.ids == ["kept"]


async def test_a_consumer_that_stops_releases_what_it_is_handed_at_once(store: Store) -> None:
    rec = Recorder()
    consumer = QueueConsumer(store, "q", rec, prefetch=2, lease=LONG_LEASE, max_poll=0.05)
    inside, gate = asyncio.Event(), asyncio.Event()

    async def producer() -> None:
        async with store.transaction() as tx:
            await store.queue.put(tx, "q", "m1", b"x")
            inside.set()
            await gate.wait()

    task = asyncio.create_task(producer())
    await inside.wait()
    assert consumer._reserved == 1  # the slot is held while the transaction is open
    stopping = asyncio.create_task(consumer.stop(grace=10.0))
    await until(lambda: consumer._stopping)
    gate.set()
    await task
    await stopping
    assert rec.started == []
    # released, not leased for LONG_LEASE: due right now for anyone
    items = await store.queue.claim("q", 10, LONG_LEASE)
    assert [i.id for i in items] == ["m1"]
    # and a stopped consumer is handed nothing more
    await put(store, "m2")
    assert [i.id for i in await store.queue.claim("q", 10, LONG_LEASE)] == ["m2"]


@pytest.mark.parametrize("relayed", [False, True], ids=["consumer", "relay"])
async def test_a_stop_during_the_first_claim_is_not_slept_through(
    store: Store, relayed: bool
) -> None:
    """Stopped while its first claim is out: it must not then sleep a whole poll interval.

    The poll interval is a minute; the stop has to be noticed at once. (Before,
    the wake-up of the stop reached no one and the loop slept the minute out.)
    """
    from sagakit.outbox import Relay

    taker: Any
    if relayed:
        taker = Relay(store, object(), max_poll=60.0)  # type: ignore[arg-type]
        taker.start()
    else:
        taker = QueueConsumer(store, "q", Recorder(), prefetch=1, lease=LONG_LEASE, max_poll=60.0)
    await asyncio.sleep(0)  # its loop has sent the first claim
    await asyncio.wait_for(taker.stop(), 10.0)


@pytest.fixture
async def fake_clock_store(tmp_path: Path, prefix: str) -> AsyncIterator[tuple[Store, FakeClock]]:
    clock = FakeClock()
    st = open_store(f"sqlite:///{tmp_path / 'fake.db'}", prefix=prefix, clock=clock)
    await st.open()
    try:
        yield st, clock
    finally:
        await st.close()


async def test_the_handed_lease_follows_the_stores_clock(
    fake_clock_store: tuple[Store, FakeClock],
) -> None:
    store, clock = fake_clock_store
    gate = asyncio.Event()
    rec = Recorder(gate)
    consumer = QueueConsumer(store, "q", rec, prefetch=2, lease=LONG_LEASE, max_poll=0.05)
    try:
        await put(store, "m1")
        await until(lambda: rec.started)
        rows = await store.driver.read(
            f"SELECT available_at, attempts FROM {store.prefix}messages WHERE id = 'm1'"
        )
        assert [tuple(r) for r in rows] == [(clock.now() + LONG_LEASE, 1)]
        assert await store.queue.claim("q", 10, LONG_LEASE) == []  # leased
        clock.advance(LONG_LEASE + 1)  # the lease ran out (the handler did not extend it yet)
        assert [i.id for i in await store.queue.claim("q", 10, LONG_LEASE)] == ["m1"]
        gate.set()
        await until(lambda: rec.got)
    finally:
        await consumer.stop()
    assert await store.queue.depth("q") == 1  # its ack lost the lease: the claim holds it


# -- processes -----------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=die_with_parent,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")},
    )


async def test_a_process_killed_after_the_commit_leaves_the_message_to_another(
    store: Store,
) -> None:
    child = _spawn("kill", store.url, store.prefix, "q")
    out, _ = await asyncio.to_thread(child.communicate, timeout=60)
    assert child.returncode == -signal.SIGKILL, out
    assert out.strip() == "handed", out  # handed over, the handler never ran
    # the row is leased to the dead process: nobody gets it before the lease ends
    assert await store.queue.claim("q", 10, LONG_LEASE) == []
    rec = Recorder()
    consumer = QueueConsumer(store, "q", rec, prefetch=4, lease=LONG_LEASE, max_poll=0.05)
    try:
        await until(lambda: rec.got, timeout=30)
    finally:
        await consumer.stop()
    assert rec.got == [("doomed", 2)]  # the second lease: claimed after the first ran out
    assert await store.queue.depth("q") == 0


SHARED_N = 30


async def test_two_processes_sharing_a_queue_never_run_one_message_at_once(
    store: Store,
) -> None:
    p = store.prefix
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {p}running (id TEXT PRIMARY KEY)")
        await tx.execute(f"CREATE TABLE {p}overlaps (id TEXT, pid INTEGER)")
        await tx.execute(f"CREATE TABLE {p}runs (id TEXT, pid INTEGER)")
    children = [_spawn("share", store.url, p, "q", str(SHARED_N)) for _ in range(2)]
    try:

        async def all_ran() -> bool:
            rows = await store.driver.read(f"SELECT count(DISTINCT id) FROM {p}runs")
            return int(rows[0][0]) == 2 * SHARED_N and await store.queue.depth("q") == 0

        await eventually(all_ran, timeout=60, every=0.1)
    finally:
        for child in children:
            child.kill()
            child.communicate()
    overlaps = await store.driver.read(f"SELECT id, pid FROM {p}overlaps")
    assert [tuple(r) for r in overlaps] == []
    runs = await store.driver.read(f"SELECT pid, count(*) FROM {p}runs GROUP BY pid")
    assert len(runs) == 2  # both processes ran messages (their own, handed, and claimed)
