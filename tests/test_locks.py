"""Timeout-based locks (sagakit.locks) on SQLite and PostgreSQL, against the real databases."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.clock import FakeClock
from sagakit.locks import CONFIRMED, EXPIRED, RELEASED, RESERVED, Holder, Reservations
from sagakit.store import Store, open_store
from sagakit.testing import drop_tables

T0 = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'locks.db'}"
    return f"{request.getfixturevalue('postgres_url')}?max_size=2"  # the server is shared


@pytest.fixture
async def store(url: str, prefix: str) -> AsyncIterator[Store]:
    st = open_store(url, prefix=prefix, clock=FakeClock(T0))
    await st.open()
    try:
        yield st
    finally:
        await drop_tables(st)
        await st.close()


def clock(store: Store) -> FakeClock:
    assert isinstance(store.clock, FakeClock)
    return store.clock


async def pool(store: Store, units: int, resource: str = "sku", ttl: float = 10.0) -> Reservations:
    locks = Reservations(store, "stock", ttl=ttl)
    async with store.transaction() as tx:
        await locks.add(tx, resource, units)
    return locks


async def take(locks: Reservations, holder: str, amount: int | None = 1, step: str = "r") -> None:
    async with locks.store.transaction() as tx:
        await locks.take(tx, Holder(holder, step), {"sku": amount}, now=locks.store.clock.now())


async def confirm(locks: Reservations, holder: str) -> None:
    async with locks.store.transaction() as tx:
        await locks.confirm_held(tx, Holder(holder), now=locks.store.clock.now())


async def release(locks: Reservations, holder: str) -> int:
    async with locks.store.transaction() as tx:
        return await locks.release_held(tx, Holder(holder), now=locks.store.clock.now())


async def books(locks: Reservations) -> tuple[int, int, int]:
    (a,) = await locks.audit()
    assert a.conserved, a
    return a.available, a.reserved, a.confirmed


async def states(locks: Reservations, holder: str) -> list[str]:
    return [r.state for r in await locks.held_by(Holder(holder))]


async def test_reserve_confirm_release_move_units_and_keep_the_books(store: Store) -> None:
    locks = await pool(store, 5)
    await take(locks, "s1", 2)
    await take(locks, "s2", 3)
    assert await books(locks) == (0, 5, 0)
    with pytest.raises(sk.ResourceUnavailable, match="1 wanted, 0 of 5 available"):
        await take(locks, "s3", 1)
    await confirm(locks, "s1")
    assert await release(locks, "s2") == 1
    assert await books(locks) == (3, 0, 2)
    assert await states(locks, "s1") == [CONFIRMED] and await states(locks, "s2") == [RELEASED]
    # Confirmed is final: a late release gives nothing back; released can't be confirmed.
    assert await release(locks, "s1") == 0
    with pytest.raises(sk.ReservationExpired, match="was released"):
        await confirm(locks, "s2")
    await confirm(locks, "s1")  # confirming twice is harmless
    assert await books(locks) == (3, 0, 2)


async def test_reserving_again_from_the_same_step_takes_nothing_more(store: Store) -> None:
    locks = await pool(store, 5)
    await take(locks, "s1", 2)
    await take(locks, "s1", 2)
    assert await books(locks) == (3, 2, 0)
    await take(locks, "s1", 2, step="another-step")  # another step is another claim
    assert await books(locks) == (1, 4, 0)


async def test_a_refused_reservation_rolls_back_every_line(store: Store) -> None:
    locks = await pool(store, 5, "a")
    async with store.transaction() as tx:
        await locks.add(tx, "b", 1)
    with pytest.raises(sk.ResourceUnavailable, match="b: 2 wanted"):
        async with store.transaction() as tx:
            await locks.take(tx, Holder("s1"), {"a": 3, "b": 2}, now=T0)
    assert [(a.resource, a.available) for a in await locks.audit()] == [("a", 5), ("b", 1)]
    with pytest.raises(sk.ResourceUnavailable, match="no resource 'c'"):
        async with store.transaction() as tx:
            await locks.take(tx, Holder("s1"), {"c": 1}, now=T0)


async def test_a_confirm_after_the_ttl_is_refused_even_before_any_sweep(store: Store) -> None:
    locks = await pool(store, 3, ttl=5.0)
    await take(locks, "late", 2)
    clock(store).advance(5.0)
    with pytest.raises(sk.ReservationExpired, match=r"expired 0\.000s ago") as refused:
        await confirm(locks, "late")
    assert refused.value.code == "sagakit.ReservationExpired"
    assert await states(locks, "late") == [RESERVED]  # the refusal changed nothing
    assert await locks.sweep() == 1
    assert await locks.sweep() == 0  # sweeping again finds nothing: idempotent
    assert await states(locks, "late") == [EXPIRED] and await books(locks) == (3, 0, 0)
    with pytest.raises(sk.ReservationExpired, match=r"expired 0\.000s ago"):
        await confirm(locks, "late")
    assert await release(locks, "late") == 0  # the compensation finds nothing to give back
    assert await books(locks) == (3, 0, 0)


async def test_a_reservation_reclaims_overdue_units_nobody_swept(store: Store) -> None:
    locks = await pool(store, 2, ttl=5.0)
    await take(locks, "old", 2)
    clock(store).advance(6.0)
    await take(locks, "new", 2)  # finds no free units, expires "old", then takes them
    assert await states(locks, "old") == [EXPIRED] and await books(locks) == (0, 2, 0)
    with pytest.raises(sk.ReservationExpired, match="no reservation"):
        await confirm(locks, "nobody")


async def test_a_whole_item_is_held_by_one_saga_at_a_time(store: Store) -> None:
    locks = await pool(store, 1, "seat-12A")
    async with store.transaction() as tx:
        (r,) = await locks.take(tx, Holder("s1"), {"seat-12A": None}, now=T0)
    assert r.amount == 1
    with pytest.raises(sk.ResourceUnavailable, match="the whole item"):
        async with store.transaction() as tx:
            await locks.take(tx, Holder("s2"), {"seat-12A": None}, now=T0)


async def test_two_sweepers_at_once_expire_each_reservation_once(url: str, prefix: str) -> None:
    stores = [open_store(url, prefix=prefix, clock=FakeClock(T0)) for _ in range(2)]
    for st in stores:
        await st.open()
    try:
        locks = [Reservations(st, "stock", ttl=1.0) for st in stores]
        async with stores[0].transaction() as tx:
            for i in range(20):
                await locks[0].add(tx, f"sku-{i}", 3)
                await locks[0].take(tx, Holder(f"s{i}"), {f"sku-{i}": 2}, now=T0)
        for st in stores:
            clock(st).advance(2.0)
        swept = await asyncio.gather(*(lk.sweep() for lk in locks for _ in range(2)))
        assert sum(swept) == 20  # every reservation once, whoever got it
        audits = await locks[1].audit()
        assert all(a.conserved and a.available == 3 for a in audits), audits
    finally:
        await drop_tables(stores[0])
        for st in stores:
            await st.close()


async def test_many_sagas_racing_for_the_last_units_never_oversell(url: str, prefix: str) -> None:
    """100 holders, 10 units, three connections: exactly 10 win, in any order."""
    stores = [open_store(url, prefix=prefix) for _ in range(3)]
    for st in stores:
        await st.open()
    try:
        locks = [Reservations(st, "stock", ttl=60.0) for st in stores]
        async with stores[0].transaction() as tx:
            await locks[0].add(tx, "last", 10)

        async def race(i: int) -> bool:
            lk = locks[i % 3]
            try:
                async with lk.store.transaction() as tx:
                    await lk.take(tx, Holder(f"saga-{i}"), {"last": 1}, now=lk.store.clock.now())
                async with lk.store.transaction() as tx:
                    await lk.confirm_held(tx, Holder(f"saga-{i}"), now=lk.store.clock.now())
                return True
            except sk.ResourceUnavailable:
                return False

        won = await asyncio.gather(*(race(i) for i in range(100)))
        assert sum(won) == 10
        (a,) = await locks[0].audit()
        assert a.conserved and (a.available, a.reserved, a.confirmed) == (0, 0, 10)
    finally:
        await drop_tables(stores[0])
        for st in stores:
            await st.close()


CRASHER = """
import asyncio, sys, time
from sagakit.locks import Holder, Reservations
from sagakit.store import open_store

async def main():
    store = open_store(sys.argv[1], prefix=sys.argv[2])
    await store.open()
    locks = Reservations(store, "stock", ttl=60.0)
    async with store.transaction() as tx:
        await locks.take(tx, Holder("committed"), {"sku": 2}, now=time.time())
    async with store.transaction() as tx:
        await locks.take(tx, Holder("in-flight"), {"sku": 3}, now=time.time())
        print("holding", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_process_killed_mid_reservation_holds_nothing(url: str, prefix: str) -> None:
    store = open_store(url, prefix=prefix, clock=FakeClock(T0))
    await store.open()
    try:
        locks = await pool(store, 5, ttl=1.0)
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CRASHER), url, prefix],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.strip() == "holding"
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        # The open transaction died with its process; the committed reservation
        # stays until its TTL, and then the sweeper gives it back.
        assert await books(locks) == (3, 2, 0)
        assert await states(locks, "in-flight") == []
        clock(store).advance(T0)  # far past the child's wall-clock expiry
        assert await locks.sweep() == 1
        assert await books(locks) == (5, 0, 0)
    finally:
        await drop_tables(store)
        await store.close()


@sk.command("t_locks.Reserve")
class ReserveOne(msgspec.Struct):
    pass


@sk.command("t_locks.Confirm")
class ConfirmAll(msgspec.Struct):
    pass


@sk.command("t_locks.Release")
class ReleaseAll(msgspec.Struct):
    pass


@dataclass
class Buy:
    n: int


BUY = (
    sk.Saga("t-locks-buy", Buy, deadline=60.0)
    .step("reserve")
    .invoke("stock", lambda d: ReserveOne())
    .compensate("stock", lambda d: ReleaseAll())
    .reserves(ttl=120.0)
    .step("confirm")
    .invoke("stock", lambda d: ConfirmAll())
    .confirms("reserve")
    .pivot()
    .build()
)


async def test_sagas_racing_for_the_last_units_sell_each_once(url: str, prefix: str) -> None:
    """40 real sagas, 5 units: 5 complete, 35 are refused and compensated, nothing held."""
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.02))
    stock = app.participant("stock")
    locks = app.reservations("stock", ttl=120.0)
    app.saga(BUY)

    @stock.command(ReserveOne)
    async def reserve(cmd: ReserveOne, ctx: sk.Context) -> None:
        await locks.reserve(ctx, "last", 1)

    @stock.command(ConfirmAll)
    async def confirm(cmd: ConfirmAll, ctx: sk.Context) -> None:
        await locks.confirm(ctx)

    @stock.command(ReleaseAll)
    async def release(cmd: ReleaseAll, ctx: sk.Context) -> None:
        await locks.release(ctx)

    try:
        async with app:
            async with app.store.transaction() as tx:
                await locks.add(tx, "last", 5)
            ids = await asyncio.gather(*(app.sagas.start(BUY, Buy(i)) for i in range(40)))
            views = await asyncio.gather(*(app.sagas.wait(i, timeout=60) for i in ids))
            (books,) = await locks.audit()
            held = [await locks.held_by(Holder(i)) for i in ids]
    finally:
        async with open_store(url, prefix=prefix) as leftovers:
            await drop_tables(leftovers)
    states = sorted(str(v.state) for v in views)
    assert states == ["compensated"] * 35 + ["completed"] * 5
    assert all("sagakit.ResourceUnavailable" in (v.error or "") for v in views if v.error)
    assert books.conserved and (books.available, books.reserved, books.confirmed) == (0, 0, 5)
    assert sorted(len(h) for h in held) == [0] * 35 + [1] * 5  # the losers never held any


async def test_malformed_requests_are_configuration_errors(store: Store) -> None:
    with pytest.raises(sk.ConfigurationError, match="space name and a positive ttl"):
        Reservations(store, "", ttl=1.0)
    locks = await pool(store, 1)
    for wanted, rule in [({"sku": 0}, "amount must be positive"), ({"": 1}, "resource id")]:
        with pytest.raises(sk.ConfigurationError, match=rule):
            async with store.transaction() as tx:
                await locks.take(tx, Holder("h"), wanted, now=T0)
    with pytest.raises(sk.ConfigurationError, match="ttl must be positive"):
        async with store.transaction() as tx:
            await locks.take(tx, Holder("h"), {"sku": 1}, ttl=0.0, now=T0)
