"""The console's JSON API: authentication, roles, CSRF, bodies, and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.web import ConsoleOptions, create_app
from sagakit.console.web.openapi import document
from tests.console_bench import failed_saga, make_app, token
from tests.saga_harness import Plan

ENDPOINTS = [
    ("GET", "/api/sagas"),
    ("GET", "/api/sagas/k"),
    ("POST", "/api/sagas/k/retry"),
    ("POST", "/api/bulk/retry"),
    ("GET", "/api/audit"),
    ("GET", "/api/dead-letters"),
    ("POST", "/api/dead-letters/1/replay"),
    ("POST", "/api/dead-letters/bulk/purge"),
    ("GET", "/api/health"),
    ("GET", "/api/tokens"),
    ("POST", "/api/tokens"),
    ("DELETE", "/api/tokens/abc"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/flows"),
    ("GET", "/api/flows/c"),
    ("GET", "/api/processes"),
    ("GET", "/api/processes/p/k"),
    ("POST", "/api/processes/p/k/timers/t/fire"),
    ("POST", "/api/timers/bulk/cancel"),
    ("GET", "/api/2pc"),
    ("POST", "/api/2pc/sk_main_g_r/resolve"),
]
ADMIN_ONLY = {"/api/tokens", "/api/tokens/abc"}
ACTING = {
    "/api/sagas/k/retry",
    "/api/bulk/retry",
    "/api/dead-letters/1/replay",
    "/api/dead-letters/bulk/purge",
    "/api/processes/p/k/timers/t/fire",
    "/api/timers/bulk/cancel",
    "/api/2pc/sk_main_g_r/resolve",
}


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
async def app(tmp_path, plan: Plan) -> AsyncIterator[sk.App]:
    async with make_app(f"sqlite:///{tmp_path}/s.db", plan) as app:
        yield app


def client(app: sk.App, **options: object) -> httpx.AsyncClient:
    web = create_app(app.store, ConsoleOptions(**options))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://console")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def test_every_endpoint_is_401_without_a_token_and_403_for_a_role_that_may_not(
    app: sk.App,
) -> None:
    viewer, operator = await token(app, "viewer"), await token(app, "operator")
    async with client(app) as http:
        for method, path in ENDPOINTS:
            r = await http.request(method, path, json={"reason": "x", "role": "viewer"})
            assert r.status_code == 401, (method, path, r.text)
            r = await http.request(method, path, headers=bearer("sgk_000000000000_" + "x" * 40))
            assert r.status_code == 401, (method, path)
            if path in ADMIN_ONLY:
                r = await http.request(
                    method, path, headers=bearer(operator), json={"role": "viewer"}
                )
                assert r.status_code == 403, (method, path)
            if path in ACTING:
                r = await http.request(method, path, headers=bearer(viewer), json={"reason": "x"})
                assert r.status_code == 403, (method, path)
    denied = await Operations(app.store).audit.list(AuditFilter(outcome="denied"))
    assert {(d.actor.split(":")[0], d.action) for d in denied} >= {
        ("anonymous", "retry"),
        ("token", "retry"),
        ("token", "bulk-retry"),
        ("token", "token-create"),
        ("token", "dead-letters.replay"),
        ("token", "bulk-dead-letters.purge"),
        ("token", "timer.fire"),
        ("token", "bulk-timer.cancel"),
        ("token", "2pc.resolve"),
    }


async def test_retry_through_the_api_runs_and_is_audited(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "k")
    operator = await token(app, "operator")
    async with client(app) as http:
        listed = (await http.get("/api/sagas?state=failed&step=d", headers=bearer(operator))).json()
        assert [s["id"] for s in listed["sagas"]] == ["k"] and listed["counts"] == {"failed": 1}
        r = await http.post(
            "/api/sagas/k/retry", headers=bearer(operator), json={"reason": "fixed", "wait": 10}
        )
        assert r.status_code == 200 and r.json()["outcome"] == "done"
        again = await http.post(
            "/api/sagas/k/retry", headers=bearer(operator), json={"reason": "x"}
        )
        assert again.status_code == 409  # no longer failed
        shown = (await http.get("/api/sagas/k", headers=bearer(operator))).json()
    assert [a["outcome"] for a in shown["audit"]][-1] == "done"
    assert any(e["entry"] == "operator-retry" for e in shown["timeline"])


async def test_bad_bodies_get_a_clear_4xx(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "k")
    h = bearer(await token(app, "operator"))
    async with client(app, max_body=1024) as http:
        cases = [
            (b"{not json", "application/json", 400),
            (b'{"reason": 5}', "application/json", 422),
            (b'{"why": "no reason"}', "application/json", 422),
            (b"reason=x", "application/x-www-form-urlencoded", 415),
            (b'{"reason": "' + b"x" * 5000 + b'"}', "application/json", 413),
            (b'{"reason": "   "}', "application/json", 409),
        ]
        for body, ctype, status in cases:
            r = await http.post(
                "/api/sagas/k/retry", content=body, headers={**h, "Content-Type": ctype}
            )
            assert r.status_code == status, (body[:20], r.text)
            assert r.json()["error"]
        assert (
            await http.post("/api/sagas/k/explode", headers=h, json={"reason": "x"})
        ).status_code == 404
        assert (await http.get("/api/sagas?limit=0", headers=h)).status_code == 422
        assert (await http.get("/api/sagas?state=nope", headers=h)).status_code == 422


async def test_a_cookie_session_must_send_the_csrf_token(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "k")
    operator = await token(app, "operator")
    async with client(app) as http:
        http.cookies.set("sagakit_session", operator)
        r = await http.post("/api/sagas/k/retry", json={"reason": "no csrf"})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        r = await http.post("/sagas/k/retry", data={"reason": "no csrf"})
        assert r.status_code == 403
    assert (await app.sagas.get("k")).state == "failed"
    denied = await Operations(app.store).audit.list(AuditFilter(outcome="denied"))
    assert len(denied) == 2 and all("CSRF" in (d.detail or "") for d in denied)


async def test_read_only_refuses_every_action(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "k")
    h = bearer(await token(app, "admin"))
    async with client(app, read_only=True) as http:
        r = await http.post("/api/sagas/k/retry", headers=h, json={"reason": "x"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert (await http.get("/api/sagas/k", headers=h)).status_code == 200


async def test_trusted_proxy_header_only_from_the_allow_list(app: sk.App) -> None:
    web = create_app(
        app.store, ConsoleOptions(proxy_header="X-User", trusted_proxies=("10.0.0.1",))
    )
    for client_ip, status in (("10.0.0.1", 200), ("10.0.0.2", 401)):
        transport = httpx.ASGITransport(app=web, client=(client_ip, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as http:
            r = await http.get("/api/sagas", headers={"X-User": "alice@example.com"})
            assert r.status_code == status


async def test_admin_creates_and_revokes_tokens(app: sk.App) -> None:
    admin = await token(app, "admin")
    async with client(app) as http:
        r = await http.post(
            "/api/tokens", headers=bearer(admin), json={"role": "viewer", "name": "bob"}
        )
        assert r.status_code == 201
        new = r.json()
        assert (await http.get("/api/sagas", headers=bearer(new["token"]))).status_code == 200
        assert (
            await http.delete(f"/api/tokens/{new['id']}", headers=bearer(admin))
        ).status_code == 200
        assert (await http.get("/api/sagas", headers=bearer(new["token"]))).status_code == 401
    rows = await app.store.driver.read(f"SELECT hash FROM {app.store.prefix}console_tokens")
    assert all(new["token"].split("_", 2)[2] not in r[0] for r in rows)  # only hashes stored


def test_the_openapi_document_names_every_endpoint() -> None:
    doc = document()
    named = {
        "{seq}/{action}": "1/replay",
        "dead-letters/bulk/{action}": "dead-letters/bulk/purge",
        "timers/bulk/{action}": "timers/bulk/cancel",
        "{timer}/{action}": "t/fire",
        "{process}/{key}": "p/k",
        "{correlation_id}": "c",
        "{gid}": "sk_main_g_r",
        "{saga_id}": "k",
        "{action}": "retry",
        "{token_id}": "abc",
    }
    paths = set()
    for p in doc["paths"]:
        for template, value in named.items():
            p = p.replace(template, value)
        paths.add(p)
    assert {p for _, p in ENDPOINTS} - {"/api/openapi.json"} == paths


async def test_a_failed_login_is_refused_and_audited(app: sk.App) -> None:
    async with client(app) as http:
        form = await http.get("/login")
        nonce = http.cookies.get("sagakit_login")
        assert form.status_code == 200 and nonce
        r = await http.post("/login", data={"csrf": nonce, "token": "sgk_nope"})
        assert r.status_code == 401
        r = await http.post("/login", data={"csrf": "stale", "token": await token(app, "viewer")})
        assert r.status_code == 403 and "sagakit_session" not in http.cookies
    [line] = await Operations(app.store).audit.list(AuditFilter(action="login"))
    assert (line.actor, line.outcome) == ("anonymous", "denied")
