"""``/metrics`` on the console: the store's gauges, consistent with the store; a token needed
unless made public, and public only on a loopback address."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

import sagakit as sk
from sagakit.console.web import ConsoleOptions, create_app
from sagakit.examples.checkout import CheckoutStarted, checkout
from sagakit.testing._support import eventually
from tests.console_bench import failed_saga, make_app, token
from tests.helpers import Data
from tests.saga_harness import Plan

pytest.importorskip("prometheus_client")


@pytest.fixture
async def app(tmp_path) -> AsyncIterator[sk.App]:  # type: ignore[no-untyped-def]
    plan = Plan()
    async with make_app(f"sqlite:///{tmp_path}/s.db", plan) as app:
        app.plan = plan  # type: ignore[attr-defined]
        yield app


def client(app: sk.App, **options: object) -> httpx.AsyncClient:
    web = create_app(app.store, ConsoleOptions(**options))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://console")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_a_scrape_gives_the_store_gauges_as_the_store_has_them(app: sk.App) -> None:
    plan: Plan = app.plan  # type: ignore[attr-defined]
    for key in ("f-1", "f-2"):
        await failed_saga(app, plan, key)
    defn = app.sagas.definitions[("piv", 1)]
    await app.sagas.wait(await app.sagas.start(defn, Data("ok"), saga_id="ok"))
    async with app.store.transaction() as tx:
        for n in range(3):
            await app.store.dead_letter(tx, "orders", b"{}", f"boom {n}", "RuntimeError")
    viewer = await token(app, "viewer")
    async with client(app) as http:
        r = await http.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    counts = await app.store.saga_counts()
    assert counts.get("failed") == 2
    assert got['sagakit_sagas_failed{saga_type="piv"}'] == 2.0
    assert got['sagakit_dead_letters{queue="orders",store="main"}'] == 3.0
    assert got['sagakit_outbox_pending{store="main"}'] == float(
        await app.store.queue.depth("sagakit.outbox")
    )
    assert "sagakit_sagas_started_total" not in r.text  # the console sees no events


async def test_timers_pending_counts_the_saga_engines_timers_not_process_managers(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    app = sk.App(f"sqlite:///{tmp_path}/pm.db", settings=sk.Settings(max_poll=0.02))
    app.process(checkout)
    async with app:
        await app.processes.send(checkout, CheckoutStarted("o-1", 10, ["visa"], pay_within=60))

        async def armed() -> bool:
            return await app.store.queue.depth("sagakit.process.checkout.timers") == 1

        await eventually(armed, 15, "the payment timer armed")
        viewer = await token(app, "viewer")
        async with client(app) as http:
            got = samples(
                (await http.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})).text
            )
    assert got["sagakit_timers_pending"] == 0.0  # the saga engine's timers only


async def test_metrics_need_a_token_unless_public_and_public_only_on_loopback(
    app: sk.App,
) -> None:
    async with client(app) as http:
        assert (await http.get("/metrics")).status_code == 401
        bad = await http.get("/metrics", headers={"Authorization": "Bearer sgk_0_nope"})
        assert bad.status_code == 401
    async with client(app, public_metrics=True) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200 and "sagakit_sagas_failed" in r.text
        assert (await http.get("/api/sagas")).status_code == 401  # only /metrics is public
    with pytest.raises(sk.ConfigurationError, match="loopback"):
        ConsoleOptions(host="0.0.0.0", public_metrics=True)
