"""Schemathesis fuzzes the console's OpenAPI document against a served console: no 5xx.

The console runs as ``sagakit console`` in a subprocess over a SQLite store;
every operation of the document gets a bounded number of generated requests
(a few hundred in all), with an admin token so that every endpoint is reached.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings

from sagakit.console.web.openapi import document

schemathesis = pytest.importorskip("schemathesis")
SCHEMA = schemathesis.openapi.from_dict(document())
EXAMPLES = 30  #: per operation; 20 operations


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sagakit.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 's.db'}"
    _cli("db", "migrate", "--store", url)
    token = _cli("console", "token", "create", "--role", "admin", "--store", url).split()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "sagakit.cli", "console", "--store", url, "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base)
        yield base, token
    finally:
        server.terminate()
        server.wait(timeout=20)


def _wait_up(base: str) -> None:
    for _ in range(200):
        try:
            httpx.get(f"{base}/api/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the console did not start")


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_5xx(case, console: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    base, token = console
    response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])
