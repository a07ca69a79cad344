"""Process-manager timers through the console's action model, on real stores.

The checkout process manager arms ``payment-timeout`` when it starts; nobody
answers its charge, so the instance waits on that timer. An operator fires it
early (the process manager reacts: cancelled), or cancels it (it never
fires), through the HTTP API, the Python API and in bulk; each action leaves
its audit line, a viewer is refused and the refusal audited.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.processes import ProcessQuery, bulk_timers
from sagakit.console.timers import TimerActions, TimerRef
from sagakit.console.web import create_app
from sagakit.examples.checkout import CheckoutStarted, checkout
from sagakit.process.processes import ProcessView
from sagakit.process.runtime import timer_queue
from sagakit.store import open_store
from sagakit.testing import drop_tables
from sagakit.testing._support import eventually
from tests.console_bench import token

pytestmark = pytest.mark.timeout(90)
FIRE = "/api/processes/checkout/{key}/timers/payment-timeout/fire"
CANCEL = "/api/processes/checkout/{key}/timers/payment-timeout/cancel"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pm.db'}"
    return str(request.getfixturevalue("postgres_url")) + "?max_size=3"


@pytest.fixture
async def app(url: str, prefix: str) -> AsyncIterator[sk.App]:
    settings = sk.Settings(prefix=prefix, max_poll=0.05, retry=sk.RetryPolicy(initial=0.01))
    app = sk.App(url, settings=settings)
    app.process(checkout)  # no payments participant: the charge is never answered
    async with app:
        yield app
    st = open_store(url, prefix=prefix)
    await st.open(migrate=False, listen=False)
    await drop_tables(st)
    await st.close()


def client(app: sk.App) -> httpx.AsyncClient:
    web = create_app(app.store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://console")


async def waiting(app: sk.App, key: str, pay_within: float = 3600.0) -> ProcessView:
    await app.processes.send(checkout, CheckoutStarted(key, 10, ["visa"], pay_within=pay_within))

    async def armed() -> bool:
        try:
            return bool((await app.processes.get(checkout, key)).timers)
        except sk.SagaNotFound:
            return False

    await eventually(armed, 20, f"{key} waits on its payment timeout")
    return await app.processes.get(checkout, key)


async def test_an_operator_fires_a_timer_early_and_the_process_manager_reacts(
    app: sk.App,
) -> None:
    await waiting(app, "o-fire")
    tok = await token(app, "operator")
    async with client(app) as http:
        r = await http.post(
            FIRE.format(key="o-fire"),
            json={"reason": "the customer asked to give up"},
            headers={"Authorization": f"Bearer {tok}"},
        )
        assert r.status_code == 200, r.text
        view = await app.processes.wait(checkout, "o-fire", timeout=20)
        assert view.status == "cancelled" and view.state.reason == "no payment within 3600s"
        assert view.history[-1].message_type == "timer:payment-timeout"
        again = await http.post(
            FIRE.format(key="o-fire"),
            json={"reason": "twice"},
            headers={"Authorization": f"Bearer {tok}"},
        )
        assert again.status_code == 409 and "not armed" in again.json()["error"]
    lines = await Operations(app.store).audit.list(AuditFilter(action="timer.fire"))
    assert [(a.outcome, a.target) for a in lines] == [
        ("failed", "timer:checkout/o-fire/payment-timeout"),
        ("done", "timer:checkout/o-fire/payment-timeout"),
    ]
    assert lines[1].reason == "the customer asked to give up" and lines[1].role == "operator"


async def test_a_cancelled_timer_never_fires(app: sk.App) -> None:
    await waiting(app, "o-cancel", pay_within=1.5)
    tok = await token(app, "operator")
    async with client(app) as http:
        r = await http.post(
            CANCEL.format(key="o-cancel"),
            json={"reason": "the payment is being handled by phone"},
            headers={"Authorization": f"Bearer {tok}"},
        )
        assert r.status_code == 200, r.text
    await asyncio.sleep(3.0)  # well past the 1.5 s it was due at
    view = await app.processes.get(checkout, "o-cancel")
    assert view.status == "awaiting_payment" and view.timers == {}
    assert await app.store.queue.depth(timer_queue(checkout)) == 0
    assert [e.verdict for e in view.history] == ["started", "operator"]
    assert view.history[-1].detail["cancelled"] == ["payment-timeout"]
    (line,) = await Operations(app.store).audit.list(AuditFilter(action="timer.cancel"))
    assert line.outcome == "done" and line.reason == "the payment is being handled by phone"


async def test_a_viewer_is_refused_and_the_timer_left_armed(app: sk.App) -> None:
    await waiting(app, "o-view")
    tok = await token(app, "viewer")
    async with client(app) as http:
        r = await http.post(
            FIRE.format(key="o-view"),
            json={"reason": "curious"},
            headers={"Authorization": f"Bearer {tok}"},
        )
    assert r.status_code == 403
    assert "payment-timeout" in (await app.processes.get(checkout, "o-view")).timers
    (line,) = await Operations(app.store).audit.list(AuditFilter(action="timer.fire"))
    assert line.outcome == "denied" and line.role == "viewer"


async def test_the_python_api_needs_a_reason_and_an_armed_timer(app: sk.App) -> None:
    await waiting(app, "o-py")
    ops = Operations(app.store)
    TimerActions(app.store).register(ops)
    ref, actor = TimerRef("checkout", "o-py", "payment-timeout"), sk.Actor("ana")
    with pytest.raises(sk.InvalidOperatorAction):
        await ops.perform("timer.cancel", ref.target, " ", ref.params(), actor=actor)
    missing = TimerRef("checkout", "nobody", "payment-timeout")
    with pytest.raises(sk.InvalidOperatorAction, match="no checkout instance"):
        await ops.perform("timer.fire", missing.target, "why", missing.params(), actor=actor)
    await ops.perform("timer.cancel", ref.target, "by phone", ref.params(), actor=actor)
    assert (await app.processes.get(checkout, "o-py")).timers == {}
    outcomes = [a.outcome for a in await ops.audit.list(AuditFilter(actor="ana"))]
    assert outcomes == ["done", "failed", "failed"]


async def test_bulk_cancel_previews_the_exact_count_then_cancels_each(app: sk.App) -> None:
    for key in ("b-1", "b-2", "b-3"):
        await waiting(app, key)
    ops = Operations(app.store)
    TimerActions(app.store).register(ops)
    actor, q = sk.Actor("ana"), ProcessQuery(process="checkout")
    plan = await bulk_timers(ops, q, "payment-timeout", "timer.cancel", "sale over", actor=actor)
    assert (
        plan.dry_run
        and plan.count == 3
        and sorted(plan.sample)
        == [
            "checkout/b-1",
            "checkout/b-2",
            "checkout/b-3",
        ]
    )
    assert await app.store.queue.depth(timer_queue(checkout)) == 3  # the preview changed nothing
    plan = await bulk_timers(
        ops, q, "payment-timeout", "timer.cancel", "sale over", actor=actor, dry_run=False
    )
    assert (plan.count, plan.failed) == (3, 0)
    assert await app.store.queue.depth(timer_queue(checkout)) == 0
    lines = await ops.audit.list(AuditFilter(actor="ana"))
    assert sorted(a.action for a in lines) == ["bulk-timer.cancel", *["timer.cancel"] * 3]


def sagakit(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAGAKIT_STORE": url, "SAGAKIT_ACTOR": "ops"}
    return subprocess.run(
        [sys.executable, "-m", "sagakit.cli", "processes", *args, "--prefix", prefix, "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_the_cli_lists_previews_and_fires(app: sk.App, url: str, prefix: str) -> None:
    if not url.startswith("sqlite"):
        pytest.skip("the CLI is the same on both stores; once is enough")
    for key in ("c-1", "c-2"):
        await waiting(app, key)
    listed = sagakit(url, prefix, "list", "--pending-timers")
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["key"] for r in json.loads(listed.stdout)) == ["c-1", "c-2"]
    preview = sagakit(url, prefix, "fire", "checkout", "--timer", "payment-timeout",
                      "--reason", "end of sale", "--dry-run")  # fmt: skip
    assert json.loads(preview.stdout)["count"] == 2, preview.stderr
    fired = sagakit(url, prefix, "fire", "checkout", "c-1", "--timer", "payment-timeout",
                    "--reason", "the customer called")  # fmt: skip
    assert fired.returncode == 0, fired.stderr
    assert (await app.processes.wait(checkout, "c-1", timeout=20)).status == "cancelled"
    assert "payment-timeout" in (await app.processes.get(checkout, "c-2")).timers
    (line,) = await Operations(app.store).audit.list(AuditFilter(actor="ops"))
    assert (line.action, line.via, line.outcome) == ("timer.fire", "cli", "done")


async def test_the_api_lists_instances_by_filter_and_shows_one_with_its_audit(
    app: sk.App,
) -> None:
    await waiting(app, "l-1")
    await waiting(app, "l-2")
    tok = await token(app, "operator")
    h = {"Authorization": f"Bearer {tok}"}
    async with client(app) as http:
        await http.post(CANCEL.format(key="l-2"), json={"reason": "by phone"}, headers=h)
        pending = (await http.get("/api/processes?timers=pending", headers=h)).json()
        assert [p["key"] for p in pending["processes"]] == ["l-1"]
        running = (await http.get("/api/processes?process=checkout&done=false", headers=h)).json()
        assert sorted(p["key"] for p in running["processes"]) == ["l-1", "l-2"]
        one = (await http.get("/api/processes/checkout/l-2", headers=h)).json()
        assert one["status"] == "awaiting_payment" and one["timers"] == []
        assert one["state"]["order_id"] == "l-2"
        assert [h["verdict"] for h in one["history"]] == ["started", "operator"]
        assert [(a["action"], a["outcome"]) for a in one["audit"]] == [("timer.cancel", "done")]
        assert (await http.get("/api/processes/checkout/nobody", headers=h)).status_code == 404
        assert (await http.get("/api/processes?done=maybe", headers=h)).status_code == 422


async def test_firing_a_timer_whose_message_is_gone_is_refused_and_audited(app: sk.App) -> None:
    """The instance still lists the timer, but its queue row was deleted by hand."""
    view = await waiting(app, "o-gone")
    async with app.store.transaction() as tx:
        await app.store.queue.cancel(tx, view.timers["payment-timeout"].message_id)
    ops = Operations(app.store)
    TimerActions(app.store).register(ops)
    ref = TimerRef("checkout", "o-gone", "payment-timeout")
    with pytest.raises(sk.InvalidOperatorAction, match="message is gone"):
        await ops.perform("timer.fire", ref.target, "now", ref.params(), actor=sk.Actor("ana"))
    (line,) = await ops.audit.list(AuditFilter(target=ref.target))
    assert line.outcome == "failed" and "message is gone" in (line.detail or "")
    assert (await app.processes.get(checkout, "o-gone")).status == "awaiting_payment"
