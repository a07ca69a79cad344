"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright).

Log in with a token, find a failed saga by filter, open it, see its timeline,
retry it with a reason, see it complete and its audit line; a viewer's
attempt is refused and audited; a request without the CSRF token is refused;
a dead letter is replayed by number and the rest purged in bulk after a preview.
Screenshots go to the test's tmp directory (and to docs/console/ with
``SAGAKIT_SCREENSHOTS=docs/console``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.web import create_app
from sagakit.messages import Headers
from tests.console_bench import failed_saga, make_app, token
from tests.helpers import Data, Happened, eventually
from tests.saga_harness import Plan

CHROMIUM = shutil.which("chromium")
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if CHROMIUM is None and os.environ.get("SAGAKIT_REQUIRE_SERVICES") != "1":
    pytest.skip("no chromium on PATH (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api")


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
async def app(tmp_path, plan: Plan) -> AsyncIterator[sk.App]:
    async with make_app(f"sqlite:///{tmp_path}/s.db", plan) as app:
        yield app


@pytest.fixture
async def console(app: sk.App) -> AsyncIterator[str]:
    """The console served by uvicorn in this event loop; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = create_app(app.store, definitions=app.sagas.definitions)
    config = uvicorn.Config(web, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        await b.close()


async def log_in(browser: Any, base: str, tok: str) -> Any:
    page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
    await page.goto(f"{base}/login")
    await page.fill("#token", tok)
    await page.click("#login")
    await page.wait_for_url(f"{base}/sagas")
    return page


def shot(tmp_path: Path, name: str) -> str:
    return str(tmp_path / f"{name}.png")


def publish(tmp_path: Path) -> None:
    """Copy the screenshots to the docs when asked to (SAGAKIT_SCREENSHOTS=docs/console)."""
    target = os.environ.get("SAGAKIT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, Path(target) / png.name)


async def test_operator_finds_a_failed_saga_retries_it_and_sees_the_audit(
    app: sk.App, plan: Plan, console: str, browser: Any, tmp_path: Path
) -> None:
    defn = app.sagas.definitions[("piv", 1)]
    for key in ("order-1", "order-2"):
        await app.sagas.start(defn, Data(key), saga_id=key)
        await app.sagas.wait(key)
    await failed_saga(app, plan, "order-42")
    page = await log_in(browser, console, await token(app, "operator"))
    await page.select_option("#state", "failed")
    await page.fill("input[name=step]", "d")
    await page.click("#filter")
    rows = page.locator("#saga-list tbody tr")
    await playwright_api.expect(rows).to_have_count(1)
    await playwright_api.expect(rows.first).to_contain_text("order-42")
    await page.screenshot(path=shot(tmp_path, "saga-list"), full_page=True)
    await page.click("text=order-42")
    await playwright_api.expect(page.locator("#saga-state")).to_have_text("failed")
    timeline = page.locator("#timeline")
    await playwright_api.expect(timeline).to_contain_text("retry-scheduled")
    await playwright_api.expect(page.locator("#diagram .stuck")).to_contain_text("d")
    await playwright_api.expect(page.locator("#diagram .pivot")).to_have_count(1)
    await page.screenshot(path=shot(tmp_path, "saga-detail-failed"), full_page=True)
    await page.fill("#act-retry input[name=reason]", "the shipping API is back")
    await page.click("#act-retry button")
    await playwright_api.expect(page.locator("#flash")).to_contain_text("retry: done")
    await playwright_api.expect(page.locator("#saga-state")).to_have_text(
        "completed", timeout=15_000
    )
    audit = page.locator("#audit tbody tr").first
    await playwright_api.expect(audit).to_contain_text("the shipping API is back")
    await playwright_api.expect(audit).to_contain_text("done")
    await page.screenshot(path=shot(tmp_path, "saga-detail-retried"), full_page=True)
    publish(tmp_path)


async def test_a_viewer_is_refused_and_the_refusal_audited(
    app: sk.App, plan: Plan, console: str, browser: Any
) -> None:
    await failed_saga(app, plan, "order-7")
    page = await log_in(browser, console, await token(app, "viewer"))
    await page.goto(f"{console}/sagas/order-7")
    await page.fill("#act-retry input[name=reason]", "just looking")
    await page.click("#act-retry button")
    await playwright_api.expect(page.locator("#error")).to_contain_text("may not act")
    [line] = await Operations(app.store).audit.list(AuditFilter(target="order-7"))
    assert (line.outcome, line.role, line.reason) == ("denied", "viewer", "")
    assert (await app.sagas.get("order-7")).state == "failed"


async def test_a_request_without_the_csrf_token_is_refused(
    app: sk.App, plan: Plan, console: str, browser: Any
) -> None:
    await failed_saga(app, plan, "order-9")
    page = await log_in(browser, console, await token(app, "operator"))
    await page.goto(f"{console}/sagas/order-9")
    status = await page.evaluate(
        """async () => (await fetch('/sagas/order-9/retry', {method: 'POST',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'},
             body: 'reason=forged'})).status"""
    )
    assert status == 403
    forged = page.locator("#act-retry input[name=csrf]")
    await forged.evaluate("el => el.value = 'forged'")
    await page.fill("#act-retry input[name=reason]", "with a wrong token")
    await page.click("#act-retry button")
    await playwright_api.expect(page.locator("#error")).to_contain_text("CSRF")
    assert (await app.sagas.get("order-9")).state == "failed"
    denied = await Operations(app.store).audit.list(AuditFilter(outcome="denied"))
    assert len(denied) == 2
    await eventually(lambda: _still_failed(app, "order-9"))


async def _still_failed(app: sk.App, key: str) -> bool:
    return (await app.sagas.get(key, history=False)).state == "failed"


async def test_bulk_retry_from_the_list_previews_then_acts(
    app: sk.App, plan: Plan, console: str, browser: Any
) -> None:
    for key in ("bulk-1", "bulk-2"):
        await failed_saga(app, plan, key)
    page = await log_in(browser, console, await token(app, "operator"))
    await page.goto(f"{console}/sagas?state=failed")
    await page.fill("#bulk input[name=reason]", "carrier API fixed")
    await page.click("#bulk button")
    await playwright_api.expect(page.locator("#bulk-count")).to_contain_text("Would retry 2 sagas")
    await page.click("#confirm")
    await playwright_api.expect(page.locator("#bulk-count")).to_contain_text("Queued retry for 2")
    for key in ("bulk-1", "bulk-2"):
        await eventually(lambda key=key: _state_is(app, key, "completed"))
    lines = await Operations(app.store).audit.list()
    assert sorted(x.action for x in lines) == ["bulk-retry", "retry", "retry"]


async def _state_is(app: sk.App, key: str, state: str) -> bool:
    return (await app.sagas.get(key, history=False)).state == state


async def test_an_operator_replays_and_purges_dead_letters_from_the_page(
    app: sk.App, console: str, browser: Any, tmp_path: Path
) -> None:
    app.registry.add(Happened)
    async with app.store.transaction() as tx:
        for key in ("late-1", "late-2"):
            env = app.codec.make(Happened(key), Headers())
            data = app.codec.encode(env)
            await app.store.dead_letter(
                tx, "noise", data, "boom", "RuntimeError", message_id=env.id
            )
    first, second = await app.dead_letters.list()
    page = await log_in(browser, console, await token(app, "operator"))
    await page.goto(f"{console}/dead-letters")
    await playwright_api.expect(page.locator("#dead-letters tbody tr")).to_have_count(2)
    await page.screenshot(path=shot(tmp_path, "dead-letters"), full_page=True)
    await page.fill("#dl-one input[name=seq]", str(first.seq))
    await page.fill("#dl-one input[name=reason]", "the consumer is fixed")
    await page.click("#dl-replay")
    await playwright_api.expect(page.locator("#flash")).to_contain_text(
        f"dead-letters.replay #{first.seq}: done"
    )
    await playwright_api.expect(page.locator("#dead-letters tbody tr")).to_have_count(1)
    await page.fill("#dl-bulk input[name=queue]", "noise")
    await page.fill("#dl-bulk input[name=reason]", "test traffic")
    await page.select_option("#dl-bulk select[name=action]", "purge")
    await page.click("#dl-preview")
    await playwright_api.expect(page.locator("#bulk-count")).to_contain_text("Would purge 1")
    await page.click("#confirm")
    await playwright_api.expect(page.locator("#bulk-count")).to_contain_text("Queued purge for 1")
    await eventually(lambda: _no_dead_letters(app))
    lines = await Operations(app.store).audit.list()
    assert sorted((x.action, x.outcome) for x in lines) == [
        ("bulk-dead-letters.purge", "done"),
        ("dead-letters.purge", "done"),
        ("dead-letters.replay", "done"),
    ]
    assert {x.target for x in lines if x.action == "dead-letters.purge"} == {
        f"dead-letter:{second.seq}"
    }
    publish(tmp_path)


async def _no_dead_letters(app: sk.App) -> bool:
    return await app.dead_letters.list() == []
