"""SIGKILL a worker running a process manager mid-run; after restart every
instance finishes and no step is applied twice (SQLite and PostgreSQL).

``N`` relay instances are opened before the worker starts; each posts
``STEPS`` ledger entries one after another, pausing on a durable timer
halfway. The worker is killed twice while it works, then restarted. Every
instance must be done with its posts in order, every (key, step) ledger row
must exist exactly once, each instance's history must hold one start and one
applied decision per reply and timer, and the queues must be empty.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.store import Store
from tests.helpers import die_with_parent
from tests.test_kill_worker import _scalar
from tests.workers.process_worker import STEPS, Open, Relay

pytestmark = pytest.mark.timeout(420)

N = 120
WORKER = Path(__file__).parent / "workers" / "process_worker.py"
KILL_AT = (N * STEPS // 10, N * STEPS // 2)
QUEUE = "sagakit.process.relay"


async def _prepare(store: Store) -> None:
    registry = TypeRegistry()
    registry.add(Open)
    codec = Codec(registry)
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {store.prefix}ledger (key TEXT NOT NULL, step INTEGER)")
        for i in range(N):
            env = codec.make(Open(f"k{i}"), Headers())
            await store.queue.put(tx, QUEUE, env.id, codec.encode(env), kind="command")


def _start(store: Store, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.workers.process_worker", store.url, store.prefix],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=Path(__file__).parent.parent,
            preexec_fn=die_with_parent,
        )


async def _posts(store: Store) -> int:
    return await _scalar(
        store, f"SELECT count(DISTINCT key || ':' || step) FROM {store.prefix}ledger"
    )


async def _done(store: Store) -> int:
    return await _scalar(store, f"SELECT count(*) FROM {store.prefix}processes WHERE done = 1")


async def _run_until(store: Store, at: int, log: Path, *, finish: bool) -> None:
    """Run a worker until ``at`` posts (then SIGKILL it), or to the end (then SIGTERM)."""
    worker = _start(store, log)
    deadline, progress = time.monotonic() + 300, (-1, -1, -1)
    quiet_since = time.monotonic()
    try:
        while (await _done(store) < N) if finish else (await _posts(store) < at):
            assert worker.poll() is None, f"worker exited early:\n{log.read_text()}"
            now_at = (await _posts(store), await _done(store), await store.queue.depth())
            if now_at != progress:
                progress, quiet_since = now_at, time.monotonic()
            if time.monotonic() > deadline or time.monotonic() - quiet_since > 90:
                raise AssertionError(f"stalled at (posts, done, queued) {progress}:\n"
                                     f"{await _stuck(store)}\n{log.read_text()}")  # fmt: skip
            await asyncio.sleep(0.05)
        if finish:
            while await store.queue.depth() > 0:
                assert time.monotonic() < deadline, "queues did not drain"
                await asyncio.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGTERM if finish else signal.SIGKILL)
        worker.wait(15)


async def _stuck(store: Store) -> str:
    """What the unfinished instances look like, for the failure message."""
    p, lines = store.prefix, []
    async with store.transaction() as tx:
        for key, status, meta in await tx.fetchall(
            f"SELECT key, status, meta FROM {p}processes WHERE done = 0"
        ):
            lines.append(f"{key} {status} {bytes(meta).decode()}")
            for row in await tx.fetchall(
                f"SELECT message_type, verdict, detail FROM {p}process_log WHERE key = ? "
                "ORDER BY seq",
                key,
            ):
                lines.append(f"    {row}")
        for d in await store.dead_letters():
            lines.append(f"dead letter: {d.reason} {d.queue}")
    return "\n".join(lines)


async def test_sigkill_mid_run_every_instance_resumes_once(store: Store, tmp_path: Path) -> None:
    await _prepare(store)
    log = tmp_path / "worker.log"
    for at in KILL_AT:
        await _run_until(store, at, log, finish=False)
    assert await _done(store) < N, "the worker finished before it could be killed"
    await _run_until(store, 0, log, finish=True)

    p = store.prefix
    async with store.transaction() as tx:
        rows = await tx.fetchall(f"SELECT key, step, count(*) FROM {p}ledger GROUP BY key, step")
        states = await tx.fetchall(f"SELECT key, state FROM {p}processes WHERE process = 'relay'")
        log_rows = await tx.fetchall(
            f"SELECT key, verdict, count(*) FROM {p}process_log GROUP BY key, verdict"
        )
    assert {(k, int(s)) for k, s, _ in rows} == {
        (f"k{i}", s) for i in range(N) for s in range(1, STEPS + 1)
    }
    assert [r for r in rows if int(r[2]) != 1] == [], "a ledger post applied twice"
    for key, data in states:
        relay = msgspec.json.decode(data, type=Relay)
        assert (relay.status, relay.posted, relay.paused) == (
            "done",
            list(range(1, STEPS + 1)),
            1,
        ), key
    verdicts = Counter({(k, v): int(n) for k, v, n in log_rows})
    assert len(states) == N
    for i in range(N):
        assert verdicts[(f"k{i}", "started")] == 1
        assert verdicts[(f"k{i}", "applied")] == STEPS + 1  # every reply, and the timer
    assert await store.queue.depth() == 0
    assert await store.dead_letters() == []
