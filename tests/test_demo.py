"""The order-fulfillment example: every path of the create-order saga, stock
expiry, the demo's plan, and ``sagakit demo`` itself."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import pytest
import redis.asyncio as aioredis

import sagakit as sk
from sagakit.examples.order_fulfillment import demo, demo_namespace
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build
from sagakit.examples.order_fulfillment.messages import (
    ConfirmStock,
    Line,
    NothingToRefund,
    RefundPayment,
    ReservationExpired,
    ReserveStock,
)
from sagakit.examples.order_fulfillment.payments import CARD_DECLINED, CARD_OK, FakeCardGateway
from sagakit.examples.order_fulfillment.shipping import FakeCarrier
from sagakit.testing import drop_tables
from sagakit.transport._url import with_option
from sagakit.transport.nats import NatsTransport
from sagakit.transport.rabbitmq import RabbitMQTransport
from sagakit.transport.redis import RedisTransport
from tests.test_nats import nats_leftovers
from tests.test_rabbitmq import rabbitmq_has

pytestmark = pytest.mark.timeout(60)

ADDRESS = "1 Test Street"


async def seeded(of: OrderFulfillment) -> OrderFulfillment:
    await of.start()
    await of.customers.add_customer("rich", "Rich", 1_000_000)
    await of.customers.add_customer("poor", "Poor", 5_000)
    await of.inventory.add_product("KB-01", "keyboard", 10)
    await of.inventory.add_product("MS-02", "mouse", 10)
    await of.inventory.add_product("LE-06", "desk mat", 1)
    return of


@pytest.fixture
async def of(tmp_path: Path) -> AsyncIterator[OrderFulfillment]:
    carrier = FakeCarrier(outages={"flaky-order": 2})
    app = await seeded(build(f"sqlite:///{tmp_path}/sagakit.db", carrier=carrier))
    try:
        yield app
    finally:
        await app.stop()


async def place(
    of: OrderFulfillment, order_id: str, customer: str, items: Any, card: str = CARD_OK
):
    _, saga_id = await of.place_order(
        customer, items, card_token=card, address=ADDRESS, order_id=order_id
    )
    return await of.app.sagas.wait(saga_id, timeout=20, history=True)


async def credit_of(of: OrderFulfillment, customer: str) -> tuple[int, int]:
    audit = {c.customer_id: c for c in await of.customers.audit()}[customer]
    assert audit.balanced
    return audit.available, audit.reserved


async def stock_of(of: OrderFulfillment, sku: str) -> tuple[int, int, int]:
    audit = {s.sku: s for s in await of.inventory.audit()}[sku]
    assert audit.conserved
    return audit.available, audit.reserved, audit.confirmed


# -- the saga's paths ---------------------------------------------------------


async def test_completed_order_goes_through_every_service(of: OrderFulfillment) -> None:
    view = await place(of, "o-1", "rich", [("KB-01", 2), ("MS-02", 1)])
    assert view.state == "completed", view.error
    assert view.done == [
        "create-order",
        "reserve-credit",
        "reserve-stock",
        "charge-card",
        "confirm-stock",
        "ship",
        "award-points",
        "approve",
    ]
    assert view.compensated == []
    total = 2 * 8900 + 2900
    order = await of.orders.get("o-1")
    assert order is not None
    assert (order.status, order.total, order.reason) == ("approved", total, None)
    assert order.shipment_id == view.data.shipment_id
    assert order.points == total // 100
    assert await credit_of(of, "rich") == (1_000_000 - total, total)
    assert await stock_of(of, "KB-01") == (8, 0, 2)
    assert await of.payments.net_by_order() == {"o-1": total}
    assert await of.shipping.shipped_orders() == {"o-1": 1}
    assert await of.loyalty.awards() == {"o-1": total // 100}


async def test_credit_limit_rejects_and_undoes_the_order_only(of: OrderFulfillment) -> None:
    view = await place(of, "o-credit", "poor", [("KB-01", 1)])
    assert view.state == "compensated"
    assert view.compensated == ["create-order"]
    assert view.data.reason_code == "customers.CreditLimitExceeded"
    order = await of.orders.get("o-credit")
    assert order is not None and order.status == "rejected"
    assert order.reason_code == "customers.CreditLimitExceeded"
    assert order.reason is not None and "credit left" in order.reason
    assert await credit_of(of, "poor") == (5_000, 0)
    assert await stock_of(of, "KB-01") == (10, 0, 0)
    assert await of.payments.net_by_order() == {}


async def test_out_of_stock_releases_credit(of: OrderFulfillment) -> None:
    view = await place(of, "o-stock", "rich", [("KB-01", 1), ("LE-06", 2)])
    assert view.state == "compensated"
    assert view.compensated == ["reserve-credit", "create-order"]
    order = await of.orders.get("o-stock")
    assert order is not None and order.status == "rejected"
    assert order.reason_code == "inventory.OutOfStock"
    assert order.reason == "LE-06: 2 wanted, 1 of 1 available"
    assert await credit_of(of, "rich") == (1_000_000, 0)
    # all lines or none: the keyboard taken before the shortfall is back
    assert await stock_of(of, "KB-01") == (10, 0, 0)
    assert await stock_of(of, "LE-06") == (1, 0, 0)


async def test_declined_card_releases_stock_and_credit(of: OrderFulfillment) -> None:
    view = await place(of, "o-card", "rich", [("MS-02", 3)], card=CARD_DECLINED)
    assert view.state == "compensated"
    assert view.compensated == ["reserve-stock", "reserve-credit", "create-order"]
    order = await of.orders.get("o-card")
    assert order is not None and order.status == "rejected"
    assert order.reason_code == "payments.CardDeclined"
    assert await credit_of(of, "rich") == (1_000_000, 0)
    assert await stock_of(of, "MS-02") == (10, 0, 0)
    assert await of.inventory.reservation_states("o-card") == {"MS-02": "released"}
    assert await of.payments.net_by_order() == {}
    assert await of.shipping.shipped_orders() == {}
    entries = [(e.entry, e.step) for e in view.history]
    assert entries[-8:] == [
        ("compensating", None),
        ("compensation-sent", "reserve-stock"),
        ("reply", "reserve-stock"),
        ("compensation-sent", "reserve-credit"),
        ("reply", "reserve-credit"),
        ("compensation-sent", "create-order"),
        ("reply", "create-order"),
        ("compensated", None),
    ]


async def test_shipping_outage_is_retried_forward(of: OrderFulfillment) -> None:
    view = await place(of, "flaky-order", "rich", [("KB-01", 1)])
    assert view.state == "completed", view.error
    assert view.data.retries == {"ship": 2}
    retries = [e for e in view.history if e.entry == "retry-scheduled"]
    assert [e.step for e in retries] == ["ship", "ship"]
    assert all("shipping.CarrierUnavailable" in (e.detail or "") for e in retries)
    assert await of.shipping.shipped_orders() == {"flaky-order": 3}
    order = await of.orders.get("flaky-order")
    assert order is not None and order.status == "approved"


async def test_unknown_customer_is_rejected_with_its_reason(of: OrderFulfillment) -> None:
    view = await place(of, "o-ghost", "nobody", [("KB-01", 1)])
    assert view.state == "compensated"
    order = await of.orders.get("o-ghost")
    assert order is not None and order.reason_code == "customers.UnknownCustomer"


async def test_concurrent_orders_never_oversell(of: OrderFulfillment) -> None:
    ids = [
        (await of.place_order("rich", [("LE-06", 1)], card_token=CARD_OK, address=ADDRESS))[1]
        for _ in range(5)
    ]
    views = [await of.app.sagas.wait(i, timeout=20) for i in ids]
    assert sorted(v.state for v in views) == ["compensated"] * 4 + ["completed"]
    assert await stock_of(of, "LE-06") == (0, 0, 1)


# -- stock reservations expire ------------------------------------------------


def ctx_for(tx: Any, now: float) -> Any:
    """Enough of a handler context for calling a service's handler directly."""
    return SimpleNamespace(db=tx, now=now)


async def test_stock_reservation_expires_and_is_released(tmp_path: Path) -> None:
    clock = sk.FakeClock()
    of = build(f"sqlite:///{tmp_path}/s.db", clock=clock, stock_ttl=60, sweep_interval=0)
    await seeded(of)
    inv = of.inventory
    assert inv.store is not None
    try:
        async with inv.store.transaction() as tx:
            cmd = ReserveStock("o-x", [Line("MS-02", 4, 2900)])
            reserved = await inv.reserve(cmd, ctx_for(tx, clock.now()))
        assert reserved.expires_at == clock.now() + 60
        assert await stock_of(of, "MS-02") == (6, 4, 0)

        clock.advance(59)
        assert await inv.sweep() == 0  # not yet
        clock.advance(2)
        assert await inv.sweep() == 1
        assert await stock_of(of, "MS-02") == (10, 0, 0)
        assert await inv.reservation_states("o-x") == {"MS-02": "expired"}
        assert await inv.sweep() == 0  # released once only

        # Confirming late is refused, even with the stock still on the shelf: the
        # confirm is the saga's pivot, so the order is compensated instead.
        with pytest.raises(ReservationExpired, match=r"expired 1\.000s ago"):
            async with inv.store.transaction() as tx:
                await inv.confirm(ConfirmStock("o-x"), ctx_for(tx, clock.now()))
        assert await stock_of(of, "MS-02") == (10, 0, 0)
        assert await inv.reservation_states("o-x") == {"MS-02": "expired"}

        # An expired reservation nobody swept yet gives its units to the next order.
        async with inv.store.transaction() as tx:
            await inv.reserve(ReserveStock("o-y", [Line("LE-06", 1, 4900)]), ctx_for(tx, 0.0))
        clock.advance(61)
        async with inv.store.transaction() as tx:
            await inv.reserve(
                ReserveStock("o-z", [Line("LE-06", 1, 4900)]), ctx_for(tx, clock.now())
            )
        assert await inv.reservation_states("o-y") == {"LE-06": "expired"}
        with pytest.raises(ReservationExpired):
            async with inv.store.transaction() as tx:
                await inv.confirm(ConfirmStock("o-y"), ctx_for(tx, clock.now()))
        assert await stock_of(of, "LE-06") == (0, 1, 0)
    finally:
        await of.stop()


class StallingGateway(FakeCardGateway):
    """The card network times out (a technical error) the first time."""

    def charge(self, token: str, amount: int) -> str:
        if not getattr(self, "stalled", False):
            self.stalled = True
            raise ConnectionError("card network timed out")
        return super().charge(token, amount)


async def stalled_order(tmp_path: Path, stock_ttl: float, stall_for: float) -> Any:
    """An order whose charge fails once, then is retried after ``stall_for`` seconds."""
    clock = sk.FakeClock()
    gateway = StallingGateway()
    of = build(
        f"sqlite:///{tmp_path}/s.db",
        clock=clock,
        gateway=gateway,
        stock_ttl=stock_ttl,
        sweep_interval=0,
    )
    await seeded(of)
    try:
        _, saga_id = await of.place_order(
            "rich", [("MS-02", 2)], card_token=CARD_OK, address=ADDRESS
        )
        for _ in range(500):  # until the charge failed once (the clock is frozen)
            if getattr(gateway, "stalled", False):
                break
            await asyncio.sleep(0.01)
        assert (await of.app.sagas.get(saga_id)).state == "running"
        assert await stock_of(of, "MS-02") == (8, 2, 0)
        clock.advance(stall_for)
        view = await of.app.sagas.wait(saga_id, timeout=20)
        return view, await stock_of(of, "MS-02"), await of.payments.books(), gateway.charges
    finally:
        await of.stop()


async def test_a_charge_stalled_past_the_lock_is_refunded_and_the_order_rejected(
    tmp_path: Path,
) -> None:
    """The stock lock (30 s) expires while the charge is retried; the card is charged,
    the confirm at the pivot is refused, and the saga refunds the card."""
    view, stock, books, charges = await stalled_order(tmp_path, stock_ttl=30, stall_for=40)
    assert view.state == "compensated", view.error
    assert view.data.reason_code == "inventory.ReservationExpired"
    assert view.compensated[:2] == ["charge-card", "reserve-stock"]
    assert stock == (10, 0, 0)
    assert charges == 1 and books.charged == books.refunded == 5800


# -- payments: refunds keep the books -----------------------------------------


async def test_refunds_are_bounded_by_the_charge(of: OrderFulfillment) -> None:
    view = await place(of, "o-refund", "rich", [("MS-02", 1)])
    assert view.state == "completed"
    pay = of.payments
    assert pay.store is not None
    async with pay.store.transaction() as tx:
        await pay.refund(RefundPayment("o-refund", 900, "scratched"), ctx_for(tx, 1.0))
    for amount in (2001, 0):
        with pytest.raises(NothingToRefund):
            async with pay.store.transaction() as tx:
                await pay.refund(RefundPayment("o-refund", amount, "again"), ctx_for(tx, 2.0))
    with pytest.raises(NothingToRefund):
        async with pay.store.transaction() as tx:
            await pay.refund(RefundPayment("o-none", 1, "?"), ctx_for(tx, 2.0))
    books = await pay.books()
    assert (books.charged, books.refunded) == (2900, 900)
    assert await pay.net_by_order() == {"o-refund": 2000}


# -- the demo -----------------------------------------------------------------


def test_plan_is_deterministic_and_has_every_outcome() -> None:
    a, b = demo.make_plan(40, seed=3), demo.make_plan(40, seed=3)
    assert [o.expect for o in a.orders] == [o.expect for o in b.orders]
    assert [o.items for o in a.orders] == [o.items for o in b.orders]
    expected = a.expected
    assert sum(expected.values()) == 40
    for kind in (demo.COMPLETED, demo.SHIPPING_RETRIED, demo.CREDIT, demo.STOCK, demo.CARD):
        assert expected[kind] >= 1, kind
    assert demo.make_plan(3, seed=1).expected.total() == 3


def test_demo_json_with_all_invariants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:///{tmp_path}/demo/sagakit.db"
    code = demo.main(["--orders", "40", "--json", "--store", store, "--seed", "11"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert code == 0, result
    for key in ("orders", "completed", "compensated", "failed", "pending", "elapsed_s"):
        assert key in result
    assert result["orders"] == 40
    assert result["pending"] == 0 and result["failed"] == 0
    assert result["completed"] + result["compensated"] == 40
    assert result["sagas_per_s"] > 0
    assert result["invariants"] and all(result["invariants"].values()), result["invariants"]
    assert result["as_planned"], result["outcomes"]
    assert all(
        result["outcomes"][k] >= 1
        for k in (
            "completed_first_time",
            "completed_after_shipping_retries",
            "rejected_credit_limit",
            "rejected_out_of_stock",
            "rejected_card_declined",
        )
    )
    # each service kept its own database file next to the coordinator's
    names = {p.name for p in (tmp_path / "demo").glob("*.db")}
    assert names == {
        "sagakit.db",
        "orders.db",
        "customers.db",
        "inventory.db",
        "payments.db",
        "shipping.db",
        "loyalty.db",
    }


def test_demo_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:///{tmp_path}/sagakit.db"
    assert demo.main(["--orders", "12", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "invariants" in out and "all invariants hold" in out
    assert "rejected: card declined" in out


def test_sagakit_cli_runs_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sagakit.cli import main

    store = f"sqlite:///{tmp_path}/sagakit.db"
    assert main(["demo", "--orders", "8", "--json", "--store", store]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["orders"] == 8


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--orders", "0"]) == 2
    with pytest.raises(SystemExit):
        demo.main(["--orders", "many"])


def test_the_diagram_is_generated_from_the_definition() -> None:
    import xml.dom.minidom

    from sagakit.examples.order_fulfillment.diagram import render
    from sagakit.examples.order_fulfillment.saga import create_order

    svg = render(create_order)
    xml.dom.minidom.parseString(svg)  # well-formed
    for step in create_order.steps:
        assert f". {step.name}<" in svg
    for name in ("orders.RejectOrder", "customers.ReleaseCredit", "inventory.ReleaseStock"):
        assert name in svg
    assert "PIVOT" in svg
    committed = Path(__file__).parent.parent / "docs" / "create-order.svg"
    if committed.exists():
        assert committed.read_text() == svg, "regenerate docs/create-order.svg"


def test_demo_on_postgres(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each service in its own schema of one PostgreSQL database."""
    code = demo.main(["--orders", "20", "--json", "--store", postgres_url])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result
    assert all(result["invariants"].values()) and result["as_planned"], result


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_rejection_that_overtakes_its_create_leaves_the_order_rejected(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str
) -> None:
    """The compensation of a timed-out create-order can reach the orders service
    before the CreateOrder it undoes (found by a chaos run): the order must still
    be on the books, rejected, and the late create must not revive it."""
    from types import SimpleNamespace

    from sagakit.examples.order_fulfillment.app import build
    from sagakit.examples.order_fulfillment.messages import CreateOrder, Line, RejectOrder
    from sagakit.examples.order_fulfillment.orders import REJECTED

    url = (
        f"sqlite:///{tmp_path}/d.db"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    of = build(url, run=[], settings=sk.Settings(prefix=prefix))
    async with of:
        oid, lines = f"o-{uuid.uuid4().hex[:8]}", [Line("sku", 1, 5)]
        store = of.orders.store
        for cmd in (
            RejectOrder(oid, "sagakit.Timeout", "no reply", "c1", 5, lines),
            CreateOrder(oid, "c1", lines, 5),  # a late copy, had the barrier let it in
            RejectOrder(oid, "sagakit.Timeout", "no reply", "c1", 5, lines),  # a duplicate
        ):
            async with store.transaction() as tx:
                ctx = SimpleNamespace(db=tx, now=1.0)
                handler = of.orders.reject if isinstance(cmd, RejectOrder) else of.orders.create
                await handler(cmd, ctx)  # type: ignore[arg-type]
        order = await of.orders.get(oid)
        assert order is not None and order.status == REJECTED and order.total == 5
        if backend == "postgresql":
            await drop_tables(of.app.store)


def _lock_ttl_run(store: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = demo.main(["--lock-ttl", "0.05", "--json", "--store", store])  # the contract
    result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and all(result["invariants"].values()), result
    assert result["expired"] > 0, result  # some orders lost their locks...
    assert result["compensated"] >= result["expired"]  # ...and were compensated
    assert result["failed"] == result["pending"] == 0
    return result


def test_demo_with_short_locks_compensates_the_orders_that_lost_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lock_ttl_run(f"sqlite:///{tmp_path}/sagakit.db", capsys)
    assert demo.main(["--lock-ttl", "0"]) == 2
    assert "--lock-ttl must be positive" in capsys.readouterr().err


def test_demo_with_short_locks_on_postgres(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _lock_ttl_run(postgres_url, capsys)


BROKER_URLS = {"redis": "redis_url", "nats": "nats_url", "rabbitmq": "rabbitmq_url"}


async def namespace_left(url: str) -> bool:
    """Whether the broker still has the namespace of ``url``, asked of its own API."""
    t = sk.open_transport(url, sk.open_store("memory://"))
    if isinstance(t, RedisTransport):
        raw = aioredis.Redis.from_url(t.redis_url)
        try:
            return bool([k async for k in raw.scan_iter(match=f"{t.namespace}:*")])
        finally:
            await raw.aclose()
    if isinstance(t, NatsTransport):
        return bool(await nats_leftovers(t, [], []))
    assert isinstance(t, RabbitMQTransport)
    conn = await aio_pika.connect(t.broker_url)
    try:
        return await rabbitmq_has(conn, t.registry_queue, "queue") or await rabbitmq_has(
            conn, t.events_exchange, "exchange"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("keep", [False, True], ids=["removed", "kept"])
@pytest.mark.parametrize("broker", sorted(BROKER_URLS))
def test_demo_over_a_broker_removes_its_own_namespace_unless_keep(
    broker: str, keep: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    url = str(request.getfixturevalue(BROKER_URLS[broker]))
    store = f"sqlite:///{tmp_path}/sagakit.db"
    argv = ["--orders", "20", "--json", "--store", store, "--transport", url]
    code = demo.main(argv + (["--keep"] if keep else []))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result
    namespace = parse_qs(urlsplit(result["transport"]).query)["namespace"][0]
    assert namespace.startswith("demo-")
    own = with_option(url, "namespace", namespace)
    try:
        assert asyncio.run(namespace_left(own)) is keep
    finally:
        asyncio.run(demo_namespace._remove_namespace(own))
    assert asyncio.run(namespace_left(own)) is False
