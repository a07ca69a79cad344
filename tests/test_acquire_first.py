"""The acquire-first saga shape: build-time checks, and a real saga losing its lock."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.locks import CONFIRMED, EXPIRED, RELEASED, Holder


@sk.command("t_af.Reserve")
class Reserve(msgspec.Struct):
    qty: int


@sk.command("t_af.Release")
class Release(msgspec.Struct):
    pass


@sk.command("t_af.Confirm")
class Confirm(msgspec.Struct):
    pass


@sk.command("t_af.Charge")
class Charge(msgspec.Struct):
    pass


@sk.command("t_af.Refund")
class Refund(msgspec.Struct):
    pass


@dataclass
class Data:
    qty: int
    work: float = 0.0  # how long the work between the locks and the confirm takes


def shape(ttl: float = 10.0, deadline: float | None = 5.0) -> Any:
    return (
        sk.Saga("t-af", Data, deadline=deadline)
        .step("reserve")
        .invoke("stock", lambda d: Reserve(d.qty))
        .compensate("stock", lambda d: Release())
        .reserves(ttl=ttl)
    )


def build(saga: Any) -> sk.SagaDefinition[Data]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.LockTimingWarning)
        return saga.build()  # type: ignore[no-any-return]


def test_a_well_formed_acquire_first_saga_builds_silently() -> None:
    defn = build(
        shape()
        .step("charge")
        .invoke("payments", lambda d: Charge())
        .compensate("payments", lambda d: Refund())
        .step("confirm")
        .invoke("stock", lambda d: Confirm())
        .confirms("reserve")
        .pivot()
    )
    assert defn.step("reserve").lock_ttl == 10.0 and defn.step("confirm").confirms == ("reserve",)


@pytest.mark.parametrize(
    ("saga", "rule"),
    [
        (shape().step("pay").invoke("p", lambda d: Charge()).pivot(), "no later step confirms"),
        (
            shape().step("confirm").invoke("stock", lambda d: Confirm()).confirms("nope").pivot(),
            "confirms 'nope', which takes no lock",
        ),
        (
            sk.Saga("t-af", Data)
            .step("reserve")
            .invoke("stock", lambda d: Reserve(d.qty))
            .reserves(ttl=1.0)
            .step("confirm")
            .invoke("stock", lambda d: Confirm())
            .confirms("reserve")
            .pivot(),
            "needs a compensation",
        ),
        (
            shape()
            .step("confirm")
            .invoke("stock", lambda d: Confirm())
            .compensate("stock", lambda d: Release())
            .confirms("reserve")
            .step("pay")
            .invoke("p", lambda d: Charge())
            .pivot(),
            "at the pivot or after it",
        ),
        (
            shape()
            .step("check", parallel=True)
            .invoke("fraud", lambda d: Charge())
            .compensate("fraud", lambda d: Refund()),
            "takes no lock",
        ),
        (
            shape()
            .step("work")
            .invoke("p", lambda d: Charge())
            .compensate("p", lambda d: Refund())
            .step("reserve-2")
            .invoke("stock", lambda d: Reserve(d.qty))
            .compensate("stock", lambda d: Release())
            .reserves(ttl=1.0),
            "must be consecutive",
        ),
    ],
)
def test_the_builder_names_the_rule_a_reserve_phase_breaks(saga: Any, rule: str) -> None:
    with pytest.raises(sk.DefinitionError, match=rule):
        saga.build()


def confirmed_at_pivot(ttl: float, deadline: float | None) -> Any:
    return (
        shape(ttl, deadline)
        .step("confirm")
        .invoke("stock", lambda d: Confirm())
        .confirms("reserve")
        .pivot()
    )


@pytest.mark.parametrize(
    ("saga", "numbers"),
    [
        (confirmed_at_pivot(10.0, None), "no deadline bounds .* lives 10s"),
        (confirmed_at_pivot(10.0, 12.0), "may come 12s after the start .* lives 10s"),
        (
            confirmed_at_pivot(10.0, 4.0)
            .step("ship")
            .invoke("p", lambda d: Charge())
            .retry()
            .timeout(3.0)
            .step("confirm-2")
            .invoke("stock", lambda d: Confirm())
            .confirms("reserve")
            .retry()
            .timeout(3.0),
            "may come 10s after the start",
        ),
        (
            confirmed_at_pivot(10.0, 4.0)
            .step("ship")
            .invoke("p", lambda d: Charge())
            .retry()
            .step("confirm-2")
            .invoke("stock", lambda d: Confirm())
            .confirms("reserve")
            .retry(),
            "step 'ship' runs between the pivot and a confirm with no timeout",
        ),
    ],
)
def test_the_builder_warns_with_the_numbers_when_locks_may_expire(saga: Any, numbers: str) -> None:
    with pytest.warns(sk.LockTimingWarning, match=numbers):
        saga.build()


async def run_saga(tmp_path: Path, datas: list[Data], ttl: float) -> tuple[list[Any], Any]:
    saga = build(
        shape(ttl=ttl * 2, deadline=ttl)  # the definition's promise (the test breaks it below)
        .step("work")
        .local(lambda d: _work(d))
        .step("confirm")
        .invoke("stock", lambda d: Confirm())
        .confirms("reserve")
        .pivot()
    )
    app = sk.App(f"sqlite:///{tmp_path}/af.db", settings=sk.Settings(max_poll=0.02))
    stock = app.participant("stock")
    locks = app.reservations("stock", ttl=ttl, sweep_every=0.05)
    app.saga(saga)

    @stock.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> None:
        await locks.reserve(ctx, "widget", cmd.qty)

    @stock.command(Confirm)
    async def confirm(cmd: Confirm, ctx: sk.Context) -> None:
        await locks.confirm(ctx)

    @stock.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        await locks.release(ctx)

    async with app:
        async with app.store.transaction() as tx:
            await locks.add(tx, "widget", 3)
        ids = [await app.sagas.start(saga, d) for d in datas]
        views = [await app.sagas.wait(i, timeout=30) for i in ids]
        held = [[r.state for r in await locks.held_by(Holder(i))] for i in ids]
        return list(zip(views, held, strict=True)), (await locks.audit())[0]


async def _work(d: Data) -> Data:
    await asyncio.sleep(d.work)
    return d


async def test_a_saga_whose_lock_expires_before_its_confirm_is_compensated(
    tmp_path: Path,
) -> None:
    # Deadline and TTL are both 2 s; the slow saga's work takes 3 s, so the
    # deadline can't stop it (it is running a local step) and its lock is gone.
    runs, books = await run_saga(tmp_path, [Data(2, work=0.0), Data(1, work=3.0)], ttl=2.0)
    (fast, fast_held), (slow, slow_held) = runs
    assert fast.state == "completed" and fast_held == [CONFIRMED]
    assert slow.state == "compensated" and "sagakit.ReservationExpired" in slow.error
    assert slow_held in ([EXPIRED], [RELEASED])  # the sweeper or the compensation, once
    assert books.conserved and (books.available, books.reserved, books.confirmed) == (1, 0, 2)


async def test_the_app_sweeps_a_lock_nobody_confirms(tmp_path: Path) -> None:
    app = sk.App(f"sqlite:///{tmp_path}/sw.db")
    app.participant("stock")
    locks = app.reservations("stock", ttl=0.1, sweep_every=0.05)
    async with app:
        async with app.store.transaction() as tx:
            await locks.add(tx, "widget", 3)
            await locks.take(tx, Holder("abandoned"), {"widget": 2}, now=app.store.clock.now())
        for _ in range(100):
            (books,) = await locks.audit()
            if books.available == 3:
                break
            await asyncio.sleep(0.02)
        assert [r.state for r in await locks.held_by(Holder("abandoned"))] == [EXPIRED]
    assert books.conserved and books.available == 3


def test_reservations_need_a_known_participant() -> None:
    app = sk.App("memory://")
    with pytest.raises(sk.ConfigurationError, match="unknown participant"):
        app.reservations("stock")
