"""The flows, process-manager and 2PC pages in a real headless Chromium.

A choreographed trip (one confirmed, one compensated) is found by filter and
its timeline seen; a checkout process manager waiting on its payment timer
is opened and the timer fired with a reason — the instance goes cancelled
and the audit line appears; a real in-doubt 2PC branch (a private PostgreSQL
cluster) is rolled back from the page with a reason and its audit line
appears. Screenshots as in tests/test_console_browser.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import sagakit as sk
from sagakit.console.web import create_app
from sagakit.examples import onboarding as ob
from sagakit.examples.checkout import CheckoutStarted, checkout
from sagakit.testing._support import eventually
from tests.choreo_trip import contract, install, request
from tests.console_bench import token
from tests.test_console_browser import (  # noqa: F401 (fixtures)
    browser,
    log_in,
    playwright_api,
    publish,
    shot,
)
from tests.test_twophase import app_for, dbs, stop_at, store_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)
expect = playwright_api.expect


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[sk.App]:
    settings = sk.Settings(max_poll=0.02, retry=sk.RetryPolicy(max_attempts=3, initial=0.01))
    app = sk.App(f"sqlite:///{tmp_path}/s.db", settings=settings)
    install(app)
    app.track(contract().build())
    app.process(checkout)  # nobody answers its charge: it waits on its payment timer
    async with app:
        yield app


async def serve(app: sk.App, **kw: Any) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = create_app(app.store, **kw)
    server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture
async def console(app: sk.App) -> AsyncIterator[str]:
    server, task, base = await serve(app)
    yield base
    server.should_exit = True
    await task


async def test_flows_are_found_by_filter_and_show_their_timeline(
    app: sk.App,
    console: str,
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    await request(app, "trip-ok")
    await request(app, "trip-full", flight_full=True)
    assert (await app.flows.wait("trip-full", timeout=15)).status == "compensated"
    await app.flows.wait("trip-ok", timeout=15)
    page = await log_in(browser, console, await token(app, "viewer"))
    await page.goto(f"{console}/flows")
    await expect(page.locator("#flow-list tbody tr")).to_have_count(2)
    await page.fill("input[name=status]", "compensated")
    await page.click("#filter")
    rows = page.locator("#flow-list tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("trip-full")
    await page.screenshot(path=shot(tmp_path, "flow-list"), full_page=True)
    await page.click("text=trip-full")
    await expect(page.locator("#flow-status")).to_have_text("compensated")
    await expect(page.locator("#timeline")).to_contain_text("trip.FlightFull")
    await expect(page.locator("#timeline")).to_contain_text("trip.HotelCancelled")
    await page.screenshot(path=shot(tmp_path, "flow-detail"), full_page=True)
    publish(tmp_path)


async def test_an_operator_fires_a_process_managers_timer_from_the_page(
    app: sk.App,
    console: str,
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    for key in ("order-5", "order-6"):
        await app.processes.send(checkout, CheckoutStarted(key, 10, ["visa"], pay_within=3600))

    async def armed() -> bool:
        rows = await app.store.driver.read(
            f"SELECT count(*) FROM {app.store.prefix}messages WHERE queue = ?",
            "sagakit.process.checkout.timers",
        )
        return int(rows[0][0]) == 2

    await eventually(armed, 15, "both checkouts wait on their payment timer")
    page = await log_in(browser, console, await token(app, "operator"))
    await page.goto(f"{console}/processes")
    await page.check("input[name=timers]")
    await page.click("#filter")
    await expect(page.locator("#process-list tbody tr")).to_have_count(2)
    await expect(page.locator("#process-list")).to_contain_text("payment-timeout")
    await page.screenshot(path=shot(tmp_path, "process-list"), full_page=True)
    await page.click("text=order-5")
    await expect(page.locator("#pm-status")).to_have_text("awaiting_payment")
    await page.screenshot(path=shot(tmp_path, "process-detail"), full_page=True)
    form = page.locator("#timer-payment-timeout")
    await form.locator("input[name=reason]").fill("the customer gave up on the phone")
    await form.locator("button.fire").click()
    await expect(page.locator("#flash")).to_contain_text("timer.fire payment-timeout: done")
    await expect(page.locator("#pm-status")).to_have_text("cancelled", timeout=15_000)
    audit = page.locator("#audit tbody tr").first
    await expect(audit).to_contain_text("the customer gave up on the phone")
    await expect(audit).to_contain_text("done")
    await expect(page.locator("#history")).to_contain_text("timer:payment-timeout")
    await expect(page.locator("#pending")).to_have_text("Pending timers: none")
    await page.screenshot(path=shot(tmp_path, "process-timer-fired"), full_page=True)
    await page.goto(f"{console}/processes?process=checkout")
    bulk = page.locator("#timer-bulk")
    await bulk.locator("select[name=action]").select_option("cancel")
    await bulk.locator("input[name=timer]").fill("payment-timeout")
    await bulk.locator("input[name=reason]").fill("sale extended by phone")
    await bulk.locator("#timer-preview").click()
    await expect(page.locator("#bulk-count")).to_contain_text("Would cancel payment-timeout on 1")
    await expect(page.locator("text=checkout/order-6")).to_have_count(1)
    await page.click("#confirm")
    await expect(page.locator("#bulk-count")).to_contain_text("Did cancel payment-timeout on 1")
    six = await app.processes.get(checkout, "order-6")
    assert six.status == "awaiting_payment" and six.timers == {}
    publish(tmp_path)


async def test_an_operator_rolls_back_a_branch_in_doubt_from_the_page(
    dbs: tuple[str, str],  # noqa: F811
    store_url: str,  # noqa: F811
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["ivy"])
        await stop_at(app, "prepared", "ivy")
        server, task, base = await serve(app, twophase=app.twophase)
        try:
            page = await log_in(browser, base, await token(app, "operator"))
            await page.goto(f"{base}/2pc")
            rows = page.locator("#in-doubt tbody tr")
            await expect(rows).to_have_count(2)
            await expect(rows.first).to_contain_text("none: roll it back")
            await page.screenshot(path=shot(tmp_path, "twophase-in-doubt"), full_page=True)
            for _ in range(2):
                form = page.locator("#resolve-1")
                await form.locator("input[name=reason]").fill("abandoned at prepare")
                await form.locator("button.rollback").click()
                await expect(page.locator("#flash")).to_contain_text("rollback: done")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_contain_text("no branch in doubt")
            lines = page.locator("#audit tbody tr")
            await expect(lines).to_have_count(2)
            await expect(lines.first).to_contain_text("abandoned at prepare")
            await page.screenshot(path=shot(tmp_path, "twophase-resolved"), full_page=True)
        finally:
            server.should_exit = True
            await task
        assert await ob.state(app, "ivy") == ("PENDING", 0, True)
    publish(tmp_path)
