"""Branches of two-phase commit in doubt, resolved through the console's API.

Real in-doubt branches: the onboarding group (a private PostgreSQL cluster
with prepared transactions on, two databases) is stopped dead after its
commit record (to be committed) or after prepare (to be rolled back), as in
tests/test_twophase.py. The console lists them and an operator resolves each
with a reason: the data is committed or rolled back, each resolution leaves
its audit line, a split of a recorded group is refused (audited ``failed``),
a viewer is refused (audited ``denied``), and ``sagakit 2pc resolve`` goes
through the same action model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.web import create_app
from sagakit.examples import onboarding as ob
from sagakit.transport._url import with_option
from tests.console_bench import token
from tests.test_observe_ready import Forwarder, through
from tests.test_twophase import app_for, dbs, stop_at, store_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)


def served_in_doubt(env: dict[str, str], res: list[str], tok: str) -> Any:
    """``GET /api/2pc`` of ``sagakit console --resource ...`` run as a subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sagakit.cli", "console", "--port", str(port), *res]
    server = subprocess.Popen(cmd, env=env)
    try:
        for _ in range(200):
            try:
                got = httpx.get(f"http://127.0.0.1:{port}/api/2pc",
                                headers={"Authorization": f"Bearer {tok}"}, timeout=5)  # fmt: skip
                return got.json()
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("the console did not start")
    finally:
        server.terminate()
        server.wait(timeout=20)


def client(app: sk.App) -> httpx.AsyncClient:
    web = create_app(app.store, twophase=app.twophase)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://console")


async def test_an_operator_resolves_branches_in_doubt_through_the_api(
    dbs: tuple[str, str],  # noqa: F811
    store_url: str,  # noqa: F811
) -> None:
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["hal", "ivy"])
        kept = await stop_at(app, "recorded", "hal")
        dropped = await stop_at(app, "prepared", "ivy")
        op, viewer = await token(app, "operator"), await token(app, "viewer")
        auth = {"Authorization": f"Bearer {op}"}
        async with client(app) as http:
            listed = (await http.get("/api/2pc", headers=auth)).json()
            assert listed["configured"] is True
            branches = {(b["group"], b["resource"]): b for b in listed["branches"]}
            assert {(g, b["recorded"]) for (g, _), b in branches.items()} == {
                (kept.group_id, True),
                (dropped.group_id, False),
            }
            hal = branches[(kept.group_id, "customers")]["gid"]
            split = await http.post(
                f"/api/2pc/{hal}/resolve",
                json={"reason": "undo it", "outcome": "rollback"},
                headers=auth,
            )
            assert split.status_code == 409 and "would split it" in split.json()["error"]
            refused = await http.post(
                f"/api/2pc/{hal}/resolve",
                json={"reason": "curious", "outcome": "commit"},
                headers={"Authorization": f"Bearer {viewer}"},
            )
            assert refused.status_code == 403
            for (group, _), b in branches.items():
                outcome = "commit" if group == kept.group_id else "rollback"
                r = await http.post(
                    f"/api/2pc/{b['gid']}/resolve",
                    json={"reason": f"{outcome} after the crash", "outcome": outcome},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                assert r.json()["detail"] == f"{outcome}: done"
            again = await http.post(
                f"/api/2pc/{hal}/resolve",
                json={"reason": "twice", "outcome": "commit"},
                headers=auth,
            )
            assert again.json()["detail"] == "commit: already finished"
            assert (await http.get("/api/2pc", headers=auth)).json()["branches"] == []
        assert await ob.state(app, "hal") == ("VERIFIED", 1, False)
        assert await ob.state(app, "ivy") == ("PENDING", 0, True)
        lines = await Operations(app.store).audit.list(AuditFilter(action="2pc.resolve"))
        outcomes = sorted((a.outcome, a.role) for a in lines)
        assert outcomes == [
            ("denied", "viewer"),
            *[("done", "operator")] * 5,
            ("failed", "operator"),
        ]
        assert {a.target for a in lines if a.outcome == "done"} == {
            f"2pc:{b['gid']}" for b in branches.values()
        }
        await app.twophase.recover()  # forgets the commit record


async def test_the_cli_resolves_through_the_action_model(
    dbs: tuple[str, str],  # noqa: F811
    store_url: str,  # noqa: F811
) -> None:
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["lou"])
        await stop_at(app, "prepared", "lou")
        gids = [d.gid for d in await app.twophase.in_doubt()]
        tok = await token(app, "viewer")
    env = {**os.environ, "SAGAKIT_STORE": store_url, "SAGAKIT_ACTOR": "ops"}
    res = [f"--resource=customers={dbs[0]}", f"--resource=enrollments={dbs[1]}"]
    listed = served_in_doubt(env, res, tok)
    assert sorted(b["gid"] for b in listed["branches"]) == sorted(gids)
    for gid in gids:
        done = subprocess.run(
            [sys.executable, "-m", "sagakit.cli", "2pc", "resolve", gid, "--rollback",
             "--reason", "abandoned", "--json", *res],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    async with app:
        lines = await Operations(app.store).audit.list(AuditFilter(action="2pc.resolve"))
    assert sorted((a.actor, a.via, a.outcome, a.target) for a in lines) == sorted(
        ("ops", "cli", "done", f"2pc:{gid}") for gid in gids
    )


async def test_the_console_starts_with_a_2pc_database_down_and_retries_it(
    tmp_path: Path, postgres_url: str
) -> None:
    """A resource on a closed port: the console still serves, lists it as unreachable
    with its typed error (API and page), and finds it once the port answers again."""
    store = f"sqlite:///{tmp_path}/console.db"
    async with sk.App(store, "memory://") as app:
        tok = await token(app, "viewer")
    fwd = Forwarder("127.0.0.1", urlsplit(postgres_url).port or 5432)
    await fwd.start()
    await fwd.cut()  # the port is closed now; start() opens the same one again
    down = with_option(through(postgres_url, fwd.port), "max_size", "1")
    up = with_option(postgres_url, "max_size", "1")
    res = [f"--resource=down={down}", f"--resource=up={up}"]
    async with served(store, res) as http:
        auth = {"Authorization": f"Bearer {tok}"}
        listed = (await http.get("/api/2pc", headers=auth)).json()
        assert listed["configured"] is True and isinstance(listed["branches"], list)
        assert set(listed["unreachable"]) == {"down"}, listed
        assert listed["unreachable"]["down"]["error"] == "StoreUnavailable"
        page = await http.get("/2pc", headers=auth)
        assert page.status_code == 200 and 'id="unreachable"' in page.text
        assert "<b>down</b>" in page.text and "StoreUnavailable" in page.text
        await fwd.start()
        try:
            again = (await http.get("/api/2pc", headers=auth)).json()
            assert again["unreachable"] == {}, again  # tried again, and reached
        finally:
            await fwd.cut()


@contextlib.asynccontextmanager
async def served(store: str, res: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    """``sagakit console --resource ...`` as a subprocess, once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sagakit.cli", "console", "--port", str(port), "--store", store]
    server = subprocess.Popen([*cmd, *res])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(300):
                try:
                    await http.get("/api/2pc")
                    break
                except httpx.TransportError:
                    assert server.poll() is None, "the console exited"
                    await asyncio.sleep(0.1)
            yield http
    finally:
        server.terminate()
        server.wait(timeout=20)
