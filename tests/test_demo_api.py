"""The order-fulfillment HTTP API, over httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sagakit.examples.order_fulfillment.api import create_api
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build
from sagakit.examples.order_fulfillment.payments import CARD_DECLINED

pytestmark = pytest.mark.timeout(60)

GOOD = {
    "customer_id": "c-1",
    "items": [{"sku": "KB-01", "quantity": 2}, {"sku": "CB-04", "quantity": 1}],
    "address": "1 Test Street",
}


@pytest.fixture
async def of(tmp_path: Path) -> AsyncIterator[OrderFulfillment]:
    app = build(f"sqlite:///{tmp_path}/sagakit.db")
    await app.start()
    await app.customers.add_customer("c-1", "Ada", 100_000)
    await app.inventory.add_product("KB-01", "keyboard", 5)
    await app.inventory.add_product("CB-04", "cable", 5)
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
async def client(of: OrderFulfillment) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(of))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_place_an_order_then_read_it_and_its_saga(
    client: httpx.AsyncClient, of: OrderFulfillment
) -> None:
    r = await client.post("/orders", json=GOOD)
    assert r.status_code == 202, r.text
    body = r.json()
    order_id, saga_id = body["order_id"], body["saga_id"]
    assert body["status"] == "pending"
    assert r.headers["location"] == f"/orders/{order_id}"
    assert body["links"] == {"order": f"/orders/{order_id}", "saga": f"/sagas/{saga_id}"}

    await of.app.sagas.wait(saga_id, timeout=20)
    r = await client.get(f"/orders/{order_id}")
    assert r.status_code == 200
    order = r.json()
    assert order["status"] == "approved"
    assert order["total"] == 2 * 8900 + 900
    assert order["lines"][0] == {"sku": "KB-01", "quantity": 2, "unit_price": 8900}
    assert order["points"] == 187 and order["shipment_id"]

    r = await client.get(f"/sagas/{saga_id}")
    assert r.status_code == 200
    saga = r.json()
    assert saga["state"] == "completed" and saga["type"] == "create-order"
    assert saga["data"]["order_id"] == order_id
    assert saga["data"]["tracking"].startswith("TRK")
    assert saga["done"][-1] == "approve" and saga["pending"] == []
    entries = [h["entry"] for h in saga["history"]]
    assert entries[0] == "started" and entries[-1] == "completed"

    r = await client.get("/")
    assert r.json()["sagas"] == {"completed": 1}


async def test_a_declined_order_shows_its_reason(
    client: httpx.AsyncClient, of: OrderFulfillment
) -> None:
    r = await client.post("/orders", json={**GOOD, "card_token": CARD_DECLINED})
    assert r.status_code == 202
    body = r.json()
    await of.app.sagas.wait(body["saga_id"], timeout=20)
    order = (await client.get(f"/orders/{body['order_id']}")).json()
    assert order["status"] == "rejected"
    assert order["reason_code"] == "payments.CardDeclined"
    assert "declined" in order["reason"]
    saga = (await client.get(f"/sagas/{body['saga_id']}")).json()
    assert saga["state"] == "compensated"
    assert saga["compensated"] == ["reserve-stock", "reserve-credit", "create-order"]
    assert "payments.CardDeclined" in saga["error"]


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[]", "Expected `object`, got `array`"),
        ({k: v for k, v in GOOD.items() if k != "customer_id"}, "`customer_id`"),
        ({**GOOD, "items": []}, "$.items"),
        ({**GOOD, "items": [{"sku": "KB-01", "quantity": 0}]}, "$.items[0].quantity"),
        ({**GOOD, "items": [{"sku": "KB-01", "quantity": "2"}]}, "Expected `int`, got `str`"),
        ({**GOOD, "items": [{"sku": "NOPE", "quantity": 1}]}, "unknown sku 'NOPE'"),
        ({**GOOD, "address": ""}, "$.address"),
        ({**GOOD, "coupon": "FREE"}, "unknown field `coupon`"),
    ],
)
async def test_invalid_bodies_get_422_with_a_clear_message(
    client: httpx.AsyncClient, of: OrderFulfillment, body: Any, expect: str
) -> None:
    if isinstance(body, bytes):
        r = await client.post("/orders", content=body)
    else:
        r = await client.post("/orders", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid order"
    assert expect in r.json()["detail"]
    assert await of.app.sagas.counts() == {}  # nothing was started


async def test_unknown_ids_are_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/orders/no-such-order")
    assert r.status_code == 404 and r.json() == {"error": "order not found"}
    r = await client.get("/sagas/no-such-saga")
    assert r.status_code == 404 and r.json() == {"error": "saga not found"}
    assert (await client.get("/orders")).status_code == 405


async def test_an_oversize_body_is_413(client: httpx.AsyncClient, of: OrderFulfillment) -> None:
    r = await client.post("/orders", content=b"x" * 70_000)
    assert r.status_code == 413
    assert r.json() == {"error": "body too large", "detail": "body larger than 65536 bytes"}
    assert await of.app.sagas.counts() == {}


async def test_a_200_mb_stream_is_refused_after_64_kib(client: httpx.AsyncClient) -> None:
    """Chunked (no Content-Length): the API stops reading just past its limit."""
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * 65536
        for _ in range(200 * 16):  # 200 MiB
            sent += len(chunk)
            yield chunk

    r = await client.post("/orders", content=body())
    assert r.status_code == 413
    assert sent <= 4 * 65536, f"the API read {sent} bytes before refusing"


async def test_a_declared_oversize_length_is_refused_before_reading(
    client: httpx.AsyncClient,
) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        sent += 1
        yield b"x"

    headers = {"content-length": str(200 * 1024 * 1024)}
    r = await client.post("/orders", content=body(), headers=headers)
    assert r.status_code == 413 and sent == 0


@pytest.mark.parametrize("card", ["tok_secret_4242", CARD_DECLINED])
async def test_the_saga_never_shows_the_card_token(
    client: httpx.AsyncClient, of: OrderFulfillment, card: str
) -> None:
    body = (await client.post("/orders", json={**GOOD, "card_token": card})).json()
    await of.app.sagas.wait(body["saga_id"], timeout=20)
    for url in (f"/sagas/{body['saga_id']}", f"/orders/{body['order_id']}", "/"):
        r = await client.get(url)
        assert r.status_code == 200 and card not in r.text, url
    saga = (await client.get(f"/sagas/{body['saga_id']}")).json()
    assert "card_token" not in saga["data"] and saga["data"]["order_id"] == body["order_id"]
