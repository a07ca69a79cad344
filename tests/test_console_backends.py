"""The action model and the API on both backends (SQLite and PostgreSQL), over a local step."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations, Tokens
from sagakit.console.commands import OPERATOR_QUEUE, OperatorCommand, encode
from sagakit.console.web import create_app
from sagakit.testing import drop_tables
from tests.helpers import eventually


class Order(msgspec.Struct):
    id: str
    shipped: bool = False


@dataclass
class Warehouse:
    up: bool = False
    shipped: int = 0

    async def ship(self, order: Order) -> Order:
        if not self.up:
            raise RuntimeError("warehouse down")
        self.shipped += 1
        return Order(order.id, True)


@pytest.fixture(params=["sqlite", "postgres"])
async def app(
    request: pytest.FixtureRequest, tmp_path, prefix: str
) -> AsyncIterator[tuple[sk.App, Warehouse]]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = request.getfixturevalue("postgres_url") + "?max_size=3"  # a shared server
    settings = sk.Settings(max_poll=0.02, prefix=prefix)
    app, wh = sk.App(url, settings=settings), Warehouse()
    twice = sk.RetryPolicy(max_attempts=2, initial=0.01)
    app.saga(sk.Saga("ship", Order).step("ship").local(wh.ship).retry(twice).build())
    async with app:
        yield app, wh
        if request.param == "postgres":
            await drop_tables(app.store)


async def test_retry_over_the_api_then_a_duplicate_command_is_a_no_op(
    app: tuple[sk.App, Warehouse],
) -> None:
    sk_app, wh = app
    defn = sk_app.sagas.definitions[("ship", 1)]
    await sk_app.sagas.start(defn, Order("o-1"), saga_id="o-1")
    assert (await sk_app.sagas.wait("o-1", timeout=10)).state == "failed"
    _, tok = await Tokens(sk_app.store).create("operator", name="alice")
    web = create_app(sk_app.store)
    transport = httpx.ASGITransport(app=web)
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as http:
        h = {"Authorization": f"Bearer {tok}"}
        listed = (await http.get("/api/sagas?state=failed&step=ship", headers=h)).json()
        assert [s["id"] for s in listed["sagas"]] == ["o-1"]
        wh.up = True
        r = await http.post("/api/sagas/o-1/retry", headers=h, json={"reason": "up", "wait": 10})
        assert r.status_code == 200 and r.json()["outcome"] == "done", r.text
    assert (await sk_app.sagas.wait("o-1", timeout=10)).data.shipped
    ops = Operations(sk_app.store)
    [line] = await ops.audit.list(AuditFilter(target="o-1"))
    cmd = OperatorCommand(
        r.json()["command_id"], "retry", "o-1", "up", "token:alice", "operator", "api"
    )
    async with sk_app.store.transaction() as tx:  # the same command delivered again
        await sk_app.store.queue.put(tx, OPERATOR_QUEUE, "again", encode(cmd))
    await eventually(lambda: _drained(sk_app))
    assert await ops.audit.list(AuditFilter(target="o-1")) == [line] and wh.shipped == 1


async def _drained(app: sk.App) -> bool:
    return await app.store.queue.depth(OPERATOR_QUEUE) == 0
