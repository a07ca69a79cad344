"""Coordinators as real processes: two sharing one store, and kill -9 recovery."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sagakit as sk
from sagakit.testing import drop_tables
from tests.helpers import die_with_parent
from tests.workers.saga_worker import Job, build, definition

WORKER = Path(__file__).parent / "workers" / "saga_worker.py"
TERMINAL = ("completed", "compensated", "failed")


@pytest.fixture(params=["sqlite", "postgresql"])
async def target(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[tuple[str, str]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/sagas.db"
    else:
        url = request.getfixturevalue("postgres_url")
    client = build(url, prefix, services=[])  # starts sagas, consumes nothing
    async with client:
        async with client.store.transaction() as tx:
            await tx.execute(
                f"CREATE TABLE IF NOT EXISTS {prefix}effects (saga TEXT, step TEXT, action TEXT)"
            )
        yield url, prefix
        if request.param == "postgresql":
            async with client.store.transaction() as tx:
                await tx.execute(f"DROP TABLE IF EXISTS {prefix}effects")
            await drop_tables(client.store)


def spawn(url: str, prefix: str, *services: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), url, prefix, *services], env=env, preexec_fn=die_with_parent
    )


async def start_sagas(url: str, prefix: str, n: int) -> sk.App:
    client = build(url, prefix, services=[])
    await client.start()
    defn = definition()
    for i in range(n):
        key = f"refuse-{i}" if i % 5 == 0 else f"ok-{i}"
        await client.sagas.start(defn, Job(key), saga_id=key)
    return client


async def all_terminal(client: sk.App, n: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while sum(v for k, v in (await client.sagas.counts()).items() if k in TERMINAL) < n:
        assert loop.time() < end, await client.sagas.counts()
        await asyncio.sleep(0.1)


async def check_exactly_once(client: sk.App, prefix: str, n: int) -> None:
    counts = await client.sagas.counts()
    assert counts == {"completed": n - n // 5, "compensated": n // 5}, counts
    async with client.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT saga, step, action, count(*) FROM {prefix}effects GROUP BY saga, step, action"
        )
    assert all(r[3] == 1 for r in rows), [tuple(r) for r in rows if r[3] != 1]
    effects = {(r[0], r[1], r[2]) for r in rows}
    for i in range(n):
        if i % 5 == 0:
            expected = {(f"refuse-{i}", s, a) for s in ("a", "b") for a in ("do", "undo")}
        else:
            expected = {(f"ok-{i}", s, "do") for s in ("a", "b", "c")}
        assert {e for e in effects if e[0].endswith(f"-{i}")} == expected, i


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


async def test_two_coordinator_processes_complete_every_saga_once(
    target: tuple[str, str],
) -> None:
    url, prefix = target
    n = 60
    workers = [
        spawn(url, prefix, "coordinator"),
        spawn(url, prefix, "coordinator"),
        spawn(url, prefix, "a", "b", "c"),
    ]
    client = await start_sagas(url, prefix, n)
    try:
        await all_terminal(client, n, timeout=90)
        await check_exactly_once(client, prefix, n)
    finally:
        stop(*workers)
        await client.stop()


async def test_coordinator_killed_at_random_points_resumes_every_saga(
    target: tuple[str, str],
) -> None:
    url, prefix = target
    n, rng = 60, random.Random(7)
    participants = spawn(url, prefix, "a", "b", "c")
    coordinator = spawn(url, prefix, "coordinator")
    client = await start_sagas(url, prefix, n)
    kills = 0
    try:
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            coordinator.send_signal(signal.SIGKILL)
            coordinator.wait(timeout=10)
            kills += 1
            coordinator = spawn(url, prefix, "coordinator")
        await all_terminal(client, n, timeout=120)
        await check_exactly_once(client, prefix, n)
        assert kills == 3
    finally:
        stop(participants, coordinator)
        await client.stop()
