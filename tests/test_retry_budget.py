"""Killed workers do not spend a message's retries: the policy counts its handler's failures.

A command's worker is SIGKILLed under its handler three times (each kill is a
delivery that never finished), then its handler fails once with a technical
error. The retry policy allows two tries: counted in deliveries (five by then)
it would give up at that first failure and dead-letter the command; counted in
the handler's failed runs (the database queue keeps them apart from its
claims), it retries, and the command succeeds, once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from sagakit.messages import Envelope, Headers, new_id
from sagakit.store import Store
from tests.helpers import die_with_parent

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent / "workers" / "crash_worker.py"
HANGS = 3
REPLIES = "crash.replies"


def _start(store: Store, runs: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), store.url, store.prefix, str(runs), str(HANGS)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )


async def _until(check: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached:\n{log.read_text()}"
        await asyncio.sleep(0.02)


async def _replies(store: Store) -> list[bytes]:
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {store.prefix}messages WHERE queue = ? ORDER BY seq", REPLIES
        )
    return [bytes(r[0]) for r in rows]


def _runs(runs: Path) -> int:
    return len(runs.read_text().split())


async def test_killed_workers_do_not_spend_the_retries(store: Store, tmp_path: Path) -> None:
    p, runs, log = store.prefix, tmp_path / "runs.txt", tmp_path / "worker.log"
    runs.touch()
    headers = Headers(saga_id="s1", saga_type="t", step="charge", reply_to=REPLIES, attempt=1)
    env = Envelope(new_id(), "crash.Charge", "command", msgspec.Raw(b'{"key":"k"}'), headers)
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {p}charges (k TEXT NOT NULL)")
        await store.queue.put(tx, "crash", env.id, msgspec.json.encode(env))
    for kill in range(1, HANGS + 1):  # a worker dies under the handler, three times
        worker = _start(store, runs, log)
        try:
            await _until(lambda k=kill: _runs(runs) >= k, f"run {kill}", log)  # type: ignore[misc]
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
    worker = _start(store, runs, log)
    try:
        await _until(lambda: _runs(runs) >= HANGS + 2, "the last run", log)
        deadline = time.monotonic() + 30
        while not (replies := await _replies(store)):
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)
    [reply] = [msgspec.json.decode(r) for r in replies]
    assert reply["headers"]["outcome"] == "success", reply
    async with store.transaction() as tx:
        charges = await tx.fetchall(f"SELECT k FROM {p}charges")
    assert [r[0] for r in charges] == ["k"]
    assert _runs(runs) == HANGS + 2  # three killed, one failed, one done
    assert await store.dead_letters() == []
