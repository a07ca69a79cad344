"""``sagakit console``, ``console token``, ``sagas <action>``, ``audit list``: subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import sagakit as sk
from tests.console_bench import failed_saga, make_app
from tests.helpers import eventually
from tests.saga_harness import Plan


async def sagakit(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess (off the event loop, so the app here keeps running)."""
    env = {**os.environ, "SAGAKIT_ACTOR": "cli-tester"}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sagakit.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
async def app(tmp_path, plan: Plan) -> AsyncIterator[sk.App]:
    async with make_app(f"sqlite:///{tmp_path}/s.db", plan) as app:
        yield app


async def test_retry_from_the_cli_is_executed_by_the_running_coordinator(
    app: sk.App, plan: Plan, tmp_path
) -> None:
    await failed_saga(app, plan, "k")
    url = f"sqlite:///{tmp_path}/s.db"
    listed = ok_json(await sagakit("sagas", "list", "--store", url, "--step", "d", "--json"))
    assert [s["id"] for s in listed] == ["k"]
    dry = ok_json(
        await sagakit("sagas", "retry", "k", "--reason", "x", "--dry-run", "--store", url, "--json")
    )
    assert dry["outcome"] == "would run"
    done = ok_json(
        await sagakit("sagas", "retry", "k", "--reason", "fixed", "--store", url, "--json")
    )
    assert done["outcome"] == "done"
    await eventually(lambda: _state_is(app, "k", "completed"))
    failed = await sagakit("sagas", "abort", "k", "--reason", "too late", "--store", url)
    assert failed.returncode == 1 and "already completed" in failed.stderr
    shown = ok_json(await sagakit("sagas", "show", "k", "--store", url, "--json"))
    assert shown["state"] == "completed"
    audit = ok_json(await sagakit("audit", "list", "--store", url, "--json"))
    assert [(a["action"], a["outcome"], a["actor"]) for a in audit] == [
        ("abort", "failed", "cli-tester"),
        ("retry", "done", "cli-tester"),
    ]


async def _state_is(app: sk.App, key: str, state: str) -> bool:
    return (await app.sagas.get(key, history=False)).state == state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_console_serves_the_api_with_tokens_from_the_cli(app: sk.App, tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    created = await sagakit("console", "token", "create", "--role", "viewer", "--store", url)
    assert created.returncode == 0, created.stderr
    tok = created.stdout.strip().splitlines()[-1].split()[-1]  # the contract: last word
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sagakit.cli", "console", "--store", url, "--port", str(port)],
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await eventually(lambda: _up(http), timeout=30, every=0.2)
            assert (await http.get("/api/sagas")).status_code == 401
            r = await http.get("/api/sagas", headers={"Authorization": f"Bearer {tok}"})
            assert r.status_code == 200 and r.json()["sagas"] == []
            r = await http.post(
                "/api/sagas/x/retry",
                headers={"Authorization": f"Bearer {tok}"},
                json={"reason": "x"},
            )
            assert r.status_code == 403
        listed = await sagakit("console", "token", "list", "--store", url, "--json")
        [info] = ok_json(listed)
        assert info["role"] == "viewer" and tok not in listed.stdout
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=20)


async def _up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/api/health")).status_code == 401
    except httpx.TransportError:
        return False


async def test_console_over_the_demos_store_shows_its_sagas(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    ran = await sagakit("demo", "--orders", "3", "--store", url, "--json")
    assert ran.returncode == 0, ran.stderr
    made = await sagakit("console", "token", "create", "--role", "viewer", "--store", url)
    tok = made.stdout.split()[-1]
    port = _free_port()
    app = "sagakit.examples.order_fulfillment.worker:create"
    argv = [sys.executable, "-m", "sagakit.cli", "console", "--store", url, "--port", str(port)]
    server = subprocess.Popen([*argv, "--app", app], cwd=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await eventually(lambda: _up(http), timeout=30, every=0.2)
            http.cookies.set("sagakit_session", tok)
            listed = (await http.get("/api/sagas")).json()
            assert sum(listed["counts"].values()) == 3 and len(listed["sagas"]) == 3
            page = await http.get(f"/sagas/{listed['sagas'][0]['id']}")
            assert page.status_code == 200 and "◆ pivot" in page.text
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=20)
