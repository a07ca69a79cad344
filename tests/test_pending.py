"""The semantic lock (sagakit.Pending) on SQLite and PostgreSQL, and inside a real saga."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.store import Store


async def test_one_saga_at_a_time_holds_an_aggregate(store: Store) -> None:
    pending = sk.Pending(store, "orders")
    async with store.transaction() as tx:
        first = await pending.mark_for(tx, "o-1", "saga-a", "created", now=1.0)
        again = await pending.mark_for(tx, "o-1", "saga-a", "created", now=2.0)
    assert first == again  # marking again from the same saga changes nothing
    with pytest.raises(sk.PendingElsewhere, match="o-1: pending \\(created\\), by saga saga-a"):
        async with store.transaction() as tx:
            await pending.mark_for(tx, "o-1", "saga-b", "cancelled", now=3.0)
    status = await pending.status("o-1")
    assert status is not None and (status.holder, status.change, status.since) == (
        "saga-a",
        "created",
        1.0,
    )
    async with store.transaction() as tx:
        assert not await pending.clear_for(tx, "o-1", "saga-b")  # not its marker
        assert await pending.clear_for(tx, "o-1", "saga-a")
        assert not await pending.clear_for(tx, "o-1", "saga-a")  # idempotent
    assert await pending.status("o-1") is None
    async with store.transaction() as tx:
        await pending.mark_for(tx, "o-1", "saga-b", "cancelled", now=4.0)  # free again
    assert await sk.Pending(store, "customers").status("o-1") is None  # spaces are apart


@sk.command("t_pending.Create")
class Create(msgspec.Struct):
    order_id: str


@sk.command("t_pending.Reject")
class Reject(msgspec.Struct):
    order_id: str


@sk.command("t_pending.Approve")
class Approve(msgspec.Struct):
    order_id: str


@dataclass
class Order:
    order_id: str
    fail: bool = False


async def test_readers_see_pending_by_saga_until_it_finalizes_or_cancels(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def work(d: Order) -> Order:
        await gate.wait()  # the saga is in the middle of it
        if d.fail:
            raise Refused("no")
        return d

    class Refused(sk.BusinessError):
        code = "t.Refused"

    saga = (
        sk.Saga("t-pending", Order)
        .step("create")
        .invoke("orders", lambda d: Create(d.order_id))
        .compensate("orders", lambda d: Reject(d.order_id))
        .step("work")
        .local(work)
        .pivot()
        .step("approve")
        .invoke("orders", lambda d: Approve(d.order_id))
        .retry()
        .build()
    )
    app = sk.App(f"sqlite:///{tmp_path}/s.db", settings=sk.Settings(max_poll=0.02))
    orders = app.participant("orders")
    pending = sk.Pending(app.store, "orders")
    app.saga(saga)

    @orders.command(Create)
    async def create(cmd: Create, ctx: sk.Context) -> None:
        await pending.mark(ctx, cmd.order_id, "created")

    @orders.command(Approve)
    async def approve(cmd: Approve, ctx: sk.Context) -> None:
        await pending.finalize(ctx, cmd.order_id)

    @orders.command(Reject)
    async def reject(cmd: Reject, ctx: sk.Context) -> None:
        await pending.cancel(ctx, cmd.order_id)

    async with app:
        ok = await app.sagas.start(saga, Order("o-ok"))
        no = await app.sagas.start(saga, Order("o-no", fail=True))
        for _ in range(200):
            if await pending.status("o-ok") and await pending.status("o-no"):
                break
            await asyncio.sleep(0.02)
        seen = await pending.status("o-ok")
        assert seen is not None and seen.holder == ok and str(seen).endswith(f"by saga {ok}")
        gate.set()
        assert (await app.sagas.wait(ok, timeout=20)).state == "completed"
        assert (await app.sagas.wait(no, timeout=20)).state == "compensated"
        assert await pending.status("o-ok") is None and await pending.status("o-no") is None
