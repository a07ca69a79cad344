"""Choreography flows through the console's JSON API: list, filters, one flow's timeline."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

import sagakit as sk
from sagakit.console.web import create_app
from tests.choreo_trip import contract, install, request
from tests.console_bench import token


@pytest.fixture
async def app(tmp_path) -> AsyncIterator[sk.App]:  # type: ignore[no-untyped-def]
    settings = sk.Settings(max_poll=0.02, retry=sk.RetryPolicy(max_attempts=3, initial=0.01))
    app = sk.App(f"sqlite:///{tmp_path}/s.db", settings=settings)
    install(app)
    app.track(contract().build())
    async with app:
        yield app


async def test_flows_by_status_and_correlation_id_and_one_with_its_story(app: sk.App) -> None:
    await request(app, "t-ok")
    await request(app, "t-full", flight_full=True)
    await app.flows.wait("t-ok", timeout=15)
    await app.flows.wait("t-full", timeout=15)
    h = {"Authorization": f"Bearer {await token(app, 'viewer')}"}
    web = create_app(app.store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=web), base_url="http://console"
    ) as http:
        every = (await http.get("/api/flows", headers=h)).json()
        assert every["counts"] == {"completed": 1, "compensated": 1}
        failed = (await http.get("/api/flows?status=compensated", headers=h)).json()
        assert [f["correlation_id"] for f in failed["flows"]] == ["t-full"]
        by_id = (await http.get("/api/flows?correlation_id=t-ok", headers=h)).json()
        assert [(f["flow"], f["status"]) for f in by_id["flows"]] == [("book-trip", "completed")]
        one = (await http.get("/api/flows/t-full", headers=h)).json()
        assert one["compensated"] == ["book-hotel"] and one["finished"] is True
        # the tracker records events as they arrive: these two may come in either order
        assert sorted(t["type"] for t in one["timeline"][-2:]) == [
            "trip.Cancelled",
            "trip.HotelCancelled",
        ]
        assert len(one["story"]) == len(one["timeline"])
        assert (await http.get("/api/flows/nope", headers=h)).status_code == 404
