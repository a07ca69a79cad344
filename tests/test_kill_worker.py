"""SIGKILL a worker in the middle of handling; after restart every effect is there once.

Commands are enqueued before the worker starts. The worker is killed twice
while transactions are open, then restarted and allowed to finish. Every
command's ledger row must exist exactly once, the balance must equal the sum
of the amounts, and the queue must be empty: no change lost, none applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from sagakit.messages import Envelope, Headers, new_id
from sagakit.store import Store
from tests.helpers import die_with_parent

pytestmark = pytest.mark.timeout(180)

N = 300
WORKER = Path(__file__).parent / "workers" / "ledger_worker.py"
KILL_AT = (N // 10, N // 2)


async def _prepare(store: Store) -> dict[str, int]:
    """Business tables, and N ``ledger.Post`` commands queued for the worker."""
    p, sent = store.prefix, {}
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {p}ledger (msg_id TEXT NOT NULL, amount INTEGER NOT NULL)")
        await tx.execute(f"CREATE TABLE {p}balance (total INTEGER NOT NULL)")
        await tx.execute(f"INSERT INTO {p}balance (total) VALUES (0)")
        for i in range(N):
            env = Envelope(
                new_id(),
                "ledger.Post",
                "command",
                msgspec.Raw(b'{"amount":%d}' % (i + 1)),
                Headers(),
            )
            await store.queue.put(tx, "ledger", env.id, msgspec.json.encode(env))
            sent[env.id] = i + 1
    return sent


def _start(store: Store, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), store.url, store.prefix],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )


async def _scalar(store: Store, sql: str, *args: object) -> int:
    """Read one number as an outside observer.

    On SQLite a store transaction takes the write lock and would queue behind
    the worker's; a plain reader on the WAL file never waits for writers.
    """
    if store.dialect == "sqlite":
        with contextlib.closing(sqlite3.connect(store.url[len("sqlite:///") :])) as conn:
            return int(conn.execute(sql, args).fetchone()[0])
    async with store.transaction() as tx:
        row = await tx.fetchone(sql, *args)
    return int(row[0])


async def _handled(store: Store) -> int:
    return await _scalar(store, f"SELECT count(DISTINCT msg_id) FROM {store.prefix}ledger")


async def _wait_for(store: Store, target: int, worker: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 60
    while (n := await _handled(store)) < target:
        assert worker.poll() is None, f"worker exited early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"only {n}/{target} handled:\n{log.read_text()}"
        await asyncio.sleep(0.01)
    return n


async def _kill_midway(store: Store, at: int, log: Path) -> int:
    """Run a worker until ``at`` commands are handled, SIGKILL it; return rows left leased."""
    worker = _start(store, log)
    try:
        await _wait_for(store, at, worker, log)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    assert await _handled(store) < N, "the worker finished before it could be killed"
    return await _scalar(
        store, f"SELECT count(*) FROM {store.prefix}messages WHERE available_at > ?", time.time()
    )


async def _finish(store: Store, log: Path) -> None:
    worker = _start(store, log)
    try:
        await _wait_for(store, N, worker, log)
        deadline = time.monotonic() + 30
        while await store.queue.depth() > 0:
            assert time.monotonic() < deadline, "queue did not drain"
            await asyncio.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)


async def test_sigkill_loses_nothing_and_duplicates_nothing(store: Store, tmp_path: Path) -> None:
    sent = await _prepare(store)
    log = tmp_path / "worker.log"
    in_flight = [await _kill_midway(store, at, log) for at in KILL_AT]
    assert any(in_flight), "no kill landed while messages were leased"
    await _finish(store, log)

    p = store.prefix
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT msg_id, count(*), max(amount) FROM {p}ledger GROUP BY msg_id"
        )
        total = (await tx.fetchone(f"SELECT total FROM {p}balance"))[0]
    effects = {r[0]: (int(r[1]), int(r[2])) for r in rows}
    assert set(effects) == set(sent), "a command's effect is missing (or unexpected)"
    assert [m for m, (count, _) in effects.items() if count != 1] == [], "applied twice"
    assert all(effects[m][1] == amount for m, amount in sent.items())
    assert total == sum(sent.values())
    assert await store.queue.depth() == 0
    assert await store.dead_letters() == []
