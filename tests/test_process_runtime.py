"""Process managers on real stores (SQLite file, PostgreSQL): the checkout example,
duplicates, messages with no instance, stale timers, and sagas started from a decision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import pytest

import sagakit as sk
from sagakit.examples.checkout import (
    CancelRequested,
    CheckoutStarted,
    checkout,
    install_payments,
)
from sagakit.messages import Headers
from sagakit.process import (
    Hold,
    Ignore,
    ProcessManager,
    SagaEnded,
    TimerFired,
    decide,
    evolve,
    react,
)
from sagakit.process.runtime import ProcessTimer, timer_queue
from sagakit.store import open_store
from sagakit.testing import drop_tables
from sagakit.testing._support import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pm.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def cleanup(url: str, prefix: str) -> AsyncIterator[None]:
    yield
    st = open_store(url, prefix=prefix)
    await st.open(migrate=False, listen=False)
    await drop_tables(st)
    await st.close()


def make_app(url: str, prefix: str, *pms: ProcessManager) -> sk.App:  # type: ignore[type-arg]
    settings = sk.Settings(prefix=prefix, max_poll=0.05, retry=sk.RetryPolicy(initial=0.01))
    app = sk.App(url, settings=settings)
    for pm in pms:
        app.process(pm)
    return app


async def verdicts(app: sk.App, key: str) -> list[tuple[str, str]]:
    return [(e.message_type, e.verdict) for e in await app.processes.history(checkout, key)]


@pytest.mark.usefixtures("cleanup")
async def test_checkout_paths_on_a_real_store(url: str, prefix: str) -> None:
    app = make_app(url, prefix, checkout)
    books = install_payments(app)
    async with app:
        await app.processes.send(checkout, CheckoutStarted("a", 10, ["visa"]))
        await app.processes.send(checkout, CheckoutStarted("b", 10, ["declined-1", "visa"]))
        await app.processes.send(checkout, CheckoutStarted("c", 10, ["declined-1"]))
        a, b, c = [await app.processes.wait(checkout, k, timeout=20) for k in "abc"]
        assert (a.status, b.status, c.status) == ("paid", "paid", "failed")
        assert b.state.tried == 2 and books["charged"].count("b") == 1
        assert [(e.message_type, e.verdict, e.status_after) for e in b.history] == [
            ("checkout.CheckoutStarted", "started", "awaiting_payment"),
            ("sagakit.Failure", "applied", "awaiting_payment"),
            ("payments.Charged", "applied", "paid"),
        ]
        assert b.history[1].detail["sent"] == [["payments", "payments.Charge"]]
        assert b.history[2].detail["changed"]["status"] == ["awaiting_payment", "paid"]
        assert a.timers == {} and await app.store.queue.depth(timer_queue(checkout)) == 0


@pytest.mark.usefixtures("cleanup")
async def test_a_duplicated_message_is_applied_once(url: str, prefix: str) -> None:
    app = make_app(url, prefix, checkout)
    books = install_payments(app)
    async with app:
        env = app.codec.make(CheckoutStarted("d", 10, ["visa"]), Headers())
        data = app.codec.encode(env)
        async with app.store.transaction() as tx:
            for _ in range(3):
                await app.store.queue.put(tx, checkout.queue, env.id, data, kind="event")
        await app.processes.wait(checkout, "d", timeout=20)

        async def drained() -> bool:
            return await app.store.queue.depth(checkout.queue) == 0

        await eventually(drained, 10, "queue drained")
        assert books["charged"] == ["d"]
        assert await verdicts(app, "d") == [
            ("checkout.CheckoutStarted", "started"),
            ("payments.Charged", "applied"),
        ]


@pytest.mark.usefixtures("cleanup")
async def test_a_message_before_its_instance_is_held_then_applied(url: str, prefix: str) -> None:
    app = make_app(url, prefix, checkout)
    install_payments(app)
    async with app:
        await app.processes.send(checkout, CancelRequested("e"))

        async def held() -> bool:
            return ("checkout.CancelRequested", "held") in await verdicts(app, "e")

        await eventually(held, 10, "the cancel request held")
        await app.processes.send(checkout, CheckoutStarted("e", 10, ["slow-1"]))
        view = await app.processes.wait(checkout, "e", timeout=20)
        assert view.status in ("cancelled", "paid")  # whichever came first, nothing lost
        assert ("checkout.CancelRequested", "held") in await verdicts(app, "e")
        assert await app.store.dead_letters() == []


@sk.event("t.Nudge")
class Nudge(msgspec.Struct, frozen=True):
    id: str


@sk.event("t.Open")
class Open(msgspec.Struct, frozen=True):
    id: str


@dataclass
class Box:
    id: str
    status: Literal["open", "closed"] = "open"
    nudges: int = 0


def box_manager(policy: Hold | Ignore) -> ProcessManager[Box]:
    pm = ProcessManager("box", Box, key=lambda m: m.id, final=["closed"], missing=policy)

    @pm.starts(Open, to="open")
    def opened(e: Open) -> sk.Decision:
        return decide(Box(e.id)).after("close", 3600)

    @pm.on(Nudge, when="open")
    def nudged(e: Nudge, s: Box) -> sk.Decision:
        return evolve(s, nudges=s.nudges + 1)

    @pm.timer("close", when="open", to="closed")
    def close(t: TimerFired, s: Box) -> sk.Decision:
        return evolve(s, status="closed")

    return pm


@pytest.mark.usefixtures("cleanup")
async def test_held_past_its_policy_a_message_is_dead_lettered(url: str, prefix: str) -> None:
    pm = box_manager(Hold(seconds=0.3, every=0.1))
    app = make_app(url, prefix, pm)
    async with app:
        await app.processes.send(pm, Nudge("nobody"))

        async def dead() -> bool:
            return bool(await app.store.dead_letters())

        await eventually(dead, 15, "the held message dead-lettered")
        (letter,) = await app.store.dead_letters()
        assert letter.error_type == "NoProcessInstance" and "t.Nudge" in letter.reason
        held = [e.verdict for e in await app.processes.history(pm, "nobody")]
        assert held and set(held) == {"held"}


@pytest.mark.usefixtures("cleanup")
async def test_ignored_by_policy_is_recorded(url: str, prefix: str) -> None:
    pm = box_manager(Ignore())
    app = make_app(url, prefix, pm)
    async with app:
        await app.processes.send(pm, Nudge("nobody"))

        async def recorded() -> bool:
            return bool(await app.processes.history(pm, "nobody"))

        await eventually(recorded, 10, "the ignored message recorded")
        (entry,) = await app.processes.history(pm, "nobody")
        assert entry.verdict == "ignored" and "policy" in entry.detail["reason"]


@pytest.mark.usefixtures("cleanup")
async def test_a_stale_timer_changes_nothing(url: str, prefix: str) -> None:
    pm = box_manager(Ignore())
    app = make_app(url, prefix, pm)
    async with app:
        await app.processes.send(pm, Open("x"))

        async def started() -> bool:
            return bool(await app.processes.history(pm, "x"))

        await eventually(started, 10, "the box opened")
        armed = (await app.processes.get(pm, "x")).timers["close"]
        for token in (armed.token + 7, armed.token - 1):  # a future and a past token
            timer = ProcessTimer("box", "x", "close", token)
            env = app.codec.make(timer, Headers())
            async with app.store.transaction() as tx:
                await app.store.queue.put(tx, timer_queue(pm), env.id, app.codec.encode(env))

        async def both_seen() -> bool:
            return len(await app.processes.history(pm, "x")) == 3

        await eventually(both_seen, 10, "both stale timers handled")
        view = await app.processes.get(pm, "x")
        assert view.status == "open" and view.timers["close"] == armed
        assert [e.verdict for e in view.history] == ["started", "stale-timer", "stale-timer"]


# -- interop with orchestrated sagas ---------------------------------------------------


@sk.command("t.Book")
class Book(msgspec.Struct, frozen=True):
    id: str


@dataclass
class Shipment:
    id: str


ship = sk.Saga("ship", Shipment).step("book").invoke("carrier", lambda d: Book(d.id)).build()


@dataclass
class Order:
    id: str
    status: Literal["shipping", "shipped", "stuck"] = "shipping"


def order_manager() -> ProcessManager[Order]:
    pm = ProcessManager("order", Order, key=lambda m: m.id, final=["shipped", "stuck"])

    @pm.starts(Open, to="shipping")
    def opened(e: Open) -> sk.Decision:
        return decide(Order(e.id)).start_saga(ship, Shipment(e.id), saga_id=f"ship-{e.id}")

    @pm.on(SagaEnded, when="shipping", to=("shipped", "stuck"), key=lambda e: e.correlation_id,
           missing=Ignore())  # fmt: skip
    def ended(e: SagaEnded, s: Order) -> sk.Decision:
        return evolve(s, status="shipped" if e.state == "completed" else "stuck")

    return pm


@pytest.mark.usefixtures("cleanup")
async def test_a_process_manager_starts_a_saga_and_reacts_to_its_end(url: str, prefix: str) -> None:
    pm = order_manager()
    app = make_app(url, prefix, pm)
    app.saga(ship)
    carrier = app.participant("carrier")

    @carrier.command(Book)
    async def book(cmd: Book, ctx: sk.Context) -> None:
        if cmd.id == "bad":
            raise sk.BusinessError("no carrier")

    async with app:
        await app.processes.send(pm, Open("good"))
        await app.processes.send(pm, Open("bad"))
        good = await app.processes.wait(pm, "good", timeout=20)
        bad = await app.processes.wait(pm, "bad", timeout=20)
        assert (good.status, bad.status) == ("shipped", "stuck")
        assert (await app.sagas.get("ship-good")).state == "completed"
        tree = await app.processes.tree("good")
        assert tree[0].startswith("order[good] t.Open started")
        assert tree[1] == "    saga ship ship-good"
        assert any("book" in line for line in tree[2:-1])
        assert tree[-1].startswith("order[good] sagakit.SagaEnded applied shipping -> shipped")


async def test_react_keeps_the_state() -> None:
    assert react().state is None and not react().changed


def test_a_worker_can_run_a_process_manager_by_name() -> None:
    from sagakit.cli import _check_services
    from sagakit.errors import ConfigurationError, DuplicateRegistration

    app = sk.App("memory://")
    app.process(box_manager(Ignore()))
    assert _check_services(app, ["box"]) == ["box"]
    with pytest.raises(ConfigurationError, match="unknown service"):
        _check_services(app, ["boxes"])
    with pytest.raises(DuplicateRegistration):
        app.participant("box")
    with pytest.raises(DuplicateRegistration):
        app.process(box_manager(Ignore()))


@pytest.mark.usefixtures("cleanup")
async def test_starts_racing_for_one_key_make_one_instance(url: str, prefix: str) -> None:
    pm = box_manager(Ignore())
    app = make_app(url, prefix, pm)
    async with app:
        async with app.store.transaction() as tx:  # one batch: consumed concurrently
            for _ in range(20):
                env = app.codec.make(Open("same"), Headers())
                await app.store.queue.put(tx, pm.queue, env.id, app.codec.encode(env))

        async def all_seen() -> bool:
            return len(await app.processes.history(pm, "same")) == 20

        await eventually(all_seen, 20, "every start handled")
        verdicts = [e.verdict for e in await app.processes.history(pm, "same")]
        assert verdicts.count("started") == 1 and verdicts.count("ignored") == 19
        assert await app.store.dead_letters() == []


def test_declared_reply_types_are_known_before_any_reply_is_made() -> None:
    """A process restarted mid-run meets replies made by the process it replaced."""
    from sagakit.examples.checkout import checkout as pm

    app = sk.App("memory://")
    app.process(pm)
    assert "payments.Charged" in app.registry
