"""Mixing styles: a saga waits for an event, a handler starts a saga, one id throughout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import msgspec
import pytest

import sagakit as sk
from sagakit.choreography.check import problems
from tests.helpers import eventually

FAST = sk.Settings(max_poll=0.01, retry=sk.RetryPolicy(max_attempts=3, initial=0.01))


@sk.event("mix.Paid")
class Paid(msgspec.Struct):
    order: str
    amount: int


@sk.event("mix.Placed")
class Placed(msgspec.Struct):
    order: str


@sk.event("mix.Fulfilled")
class Fulfilled(msgspec.Struct):
    order: str
    amount: int


@sk.event("mix.Abandoned")
class Abandoned(msgspec.Struct):
    order: str


@sk.command("mix.Hold")
class Hold(msgspec.Struct):
    order: str


@sk.command("mix.Unhold")
class Unhold(msgspec.Struct):
    order: str


@dataclass
class Order:
    order: str
    amount: int = 0


def saga(timeout: float = 5.0) -> sk.SagaDefinition[Order]:
    return (
        sk.Saga(
            "pay-order",
            Order,
            on_completed=(Fulfilled, lambda d: Fulfilled(d.order, d.amount)),
            on_compensated=(Abandoned, lambda d: Abandoned(d.order)),
        )
        .step("hold")
        .invoke("stock", lambda d: Hold(d.order))
        .compensate("stock", lambda d: Unhold(d.order))
        .step("await-payment")
        .wait_for(Paid, key=lambda d: d.order, fold=lambda d, e: replace(d, amount=e.amount))
        .timeout(timeout)
        .build()
    )


def wire(app: sk.App, defn: sk.SagaDefinition[Order]) -> list[str]:
    stock, shop = app.participant("stock"), app.participant("shop")
    app.participant("bank")
    log: list[str] = []

    @stock.command(Hold)
    async def hold(cmd: Hold, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: log.append(f"hold {cmd.order}"))

    @stock.command(Unhold)
    async def unhold(cmd: Unhold, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: log.append(f"unhold {cmd.order}"))

    @shop.event(Placed, publishes=(), starts=(defn,))
    async def placed(e: Placed, ctx: sk.Context) -> None:
        ctx.start_saga(defn, Order(e.order))

    @shop.event(Fulfilled, publishes=())
    async def fulfilled(e: Fulfilled, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: log.append(f"fulfilled {e.order} {e.amount} {ctx.correlation_id}"))

    @shop.event(Abandoned, publishes=())
    async def abandoned(e: Abandoned, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: log.append(f"abandoned {e.order}"))

    app.saga(defn)
    return log


@pytest.fixture
async def mixed() -> AsyncIterator[tuple[sk.App, list[str]]]:
    app = sk.App("memory://", settings=FAST)
    log = wire(app, saga())
    async with app:
        yield app, log


async def emit(app: sk.App, who: str, cid: str, event: object) -> None:
    async with app.begin(who, correlation_id=cid) as ctx:
        ctx.publish(event)


async def _true(value: bool) -> bool:
    return value


async def test_a_handler_starts_a_saga_that_waits_for_an_event(
    mixed: tuple[sk.App, list[str]],
) -> None:
    app, log = mixed
    await emit(app, "shop", "o-1", Placed("o-1"))
    await eventually(lambda: _true("hold o-1" in log))
    view = await app.sagas.get("o-1")  # the saga id is the correlation id
    assert view.state == "running" and "await-payment" in str(view.history[-1].step)
    await emit(app, "bank", "o-1", Paid("o-1", 42))
    done = await app.sagas.wait("o-1", timeout=10)
    assert done.state == "completed" and done.data.amount == 42
    await eventually(lambda: _true("fulfilled o-1 42 o-1" in log))
    story = await app.flows.history("o-1")
    assert any(line.entry == "completed" for line in story)


async def test_an_event_that_came_before_the_wait_counts(mixed: tuple[sk.App, list[str]]) -> None:
    app, _ = mixed
    await emit(app, "bank", "o-2", Paid("o-2", 7))  # nobody waits yet

    async def kept() -> bool:
        rows = await app.store.driver.read(
            "SELECT arrived, waiting FROM sagakit_awaits WHERE key = 'o-2'"
        )
        return bool(rows) and rows[0][0] is not None and rows[0][1] is None

    await eventually(kept)
    await emit(app, "shop", "o-2", Placed("o-2"))
    done = await app.sagas.wait(await _saga(app, "o-2"), timeout=10)
    assert done.state == "completed" and done.data.amount == 7


async def _saga(app: sk.App, saga_id: str) -> str:
    async def exists() -> bool:
        return await app.store.saga_get(saga_id) is not None

    await eventually(exists)
    return saga_id


async def test_a_wait_past_its_timeout_compensates_and_announces_it() -> None:
    app = sk.App("memory://", settings=FAST)
    log = wire(app, saga(timeout=0.2))
    async with app:
        await emit(app, "shop", "o-3", Placed("o-3"))
        done = await app.sagas.wait(await _saga(app, "o-3"), timeout=10)
        assert done.state == "compensated" and "timeout" in (done.error or "")
        await eventually(lambda: _true("abandoned o-3" in log))
        assert log.index("hold o-3") < log.index("unhold o-3")


async def test_a_repeated_trigger_starts_the_saga_once(mixed: tuple[sk.App, list[str]]) -> None:
    app, log = mixed
    env = app.codec.make(Placed("o-4"), sk.messages.Headers(correlation_id="o-4"))
    async with app.store.transaction() as tx:  # the same event delivered twice
        for _ in range(2):
            await app.store.queue.put(tx, "shop", env.id, app.codec.encode(env))
    await emit(app, "bank", "o-4", Paid("o-4", 1))
    await app.sagas.wait(await _saga(app, "o-4"), timeout=10)
    await eventually(lambda: _true(any(x.startswith("fulfilled o-4") for x in log)))
    assert log.count("hold o-4") == 1
    assert [x for x in log if x.startswith("fulfilled o-4")] == ["fulfilled o-4 1 o-4"]


def test_check_counts_a_started_sagas_events_as_published() -> None:
    from sagakit.choreography import Choreography

    app = sk.App("memory://")
    wire(app, saga())
    app.track(
        Choreography("shop")
        .starts_on(Placed)
        .step("pay", done=Fulfilled, failed=Abandoned)
        .completes_on()
        .build()
    )
    assert problems(app) == []


def test_a_wait_before_the_pivot_has_nothing_to_undo() -> None:
    step = saga().step("await-payment")
    assert step.nothing_to_undo and step.action is not None
    assert step.action.participant == "sagakit.awaits"
