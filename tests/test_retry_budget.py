"""Killed workers do not spend a message's retries: the policy counts its handler's failures.

A command's worker is SIGKILLed under its handler three times (each kill is a
delivery that never finished), then its handler fails once with a technical
error. The retry policy allows two tries: counted in deliveries (five by then)
it would give up at that first failure and dead-letter the command; counted in
the handler's failed runs, it retries, and the command succeeds, once. The
database queue keeps those apart from its claims; over RabbitMQ, NATS and
Redis, which count deliveries, the store counts them (``{prefix}failures``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import StoreUnavailable
from sagakit.messages import Envelope, Headers, new_id
from sagakit.store import DeadLetter, Store
from sagakit.testing import drop_tables
from sagakit.transport import Outgoing
from sagakit.transport._url import with_option
from tests.broker_net import noted_namespace
from tests.helpers import Happened, die_with_parent, eventually
from tests.test_namespaces import CLEANUPS
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, used by name through CLEANUPS

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent / "workers" / "crash_worker.py"
HANGS = 3
REPLIES = "crash.replies"


def _start(
    store: Store, runs: Path, log: Path, transport: str | None = None
) -> subprocess.Popen[bytes]:
    args = [store.url, store.prefix, str(runs), str(HANGS), *([transport] if transport else [])]
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args],
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


def _ready(log: Path, workers: int) -> bool:
    return log.read_text().count("ready") >= workers


def _runs(runs: Path) -> int:
    return len(runs.read_text().split())


def _ran(runs: Path, n: int) -> bool:
    return _runs(runs) >= n


def _command() -> Envelope:
    headers = Headers(saga_id="s1", saga_type="t", step="charge", reply_to=REPLIES, attempt=1)
    return Envelope(new_id(), "crash.Charge", "command", msgspec.Raw(b'{"key":"k"}'), headers)


async def _crash_three_times(
    store: Store, tmp_path: Path, put: Callable[[Envelope], Awaitable[None]], transport: str | None
) -> subprocess.Popen[bytes]:
    """Kill a worker under the handler three times; return the fourth worker, running."""
    runs, log = tmp_path / "runs.txt", tmp_path / "worker.log"
    runs.touch()
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {store.prefix}charges (k TEXT NOT NULL)")
    for kill in range(1, HANGS + 2):
        worker = _start(store, runs, log, transport)
        ready = partial(_ready, log, kill)
        await _until(ready, f"worker {kill}", log)
        if kill == 1:
            await put(_command())  # once a consumer is there to take it
        if kill == HANGS + 1:
            break
        try:
            await _until(partial(_ran, runs, kill), f"run {kill}", log)
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
    try:
        await _until(partial(_ran, runs, HANGS + 2), "the last run", log)
    except BaseException:
        _stop(worker)
        raise
    return worker


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(15)
    except subprocess.TimeoutExpired:
        worker.kill()


async def _charged_once(store: Store, tmp_path: Path) -> None:
    async with store.transaction() as tx:
        charges = await tx.fetchall(f"SELECT k FROM {store.prefix}charges")
    assert [r[0] for r in charges] == ["k"]
    assert _runs(tmp_path / "runs.txt") == HANGS + 2  # three killed, one failed, one done
    assert await store.dead_letters() == []


async def test_killed_workers_do_not_spend_the_retries(store: Store, tmp_path: Path) -> None:
    async def put(env: Envelope) -> None:
        async with store.transaction() as tx:
            await store.queue.put(tx, "crash", env.id, msgspec.json.encode(env))

    worker = await _crash_three_times(store, tmp_path, put, None)
    try:
        deadline = time.monotonic() + 30
        while not (replies := await _replies(store)):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.02)
    finally:
        _stop(worker)
    [reply] = [msgspec.json.decode(r) for r in replies]
    assert reply["headers"]["outcome"] == "success", reply
    await _charged_once(store, tmp_path)


#: a short lease, so a killed worker's message comes back soon (RabbitMQ: at once)
LEASES = {"nats": "2", "redis": "1"}


@pytest.mark.parametrize("broker", sorted(CLEANUPS))
async def test_killed_workers_do_not_spend_the_retries_over_a_broker(
    broker: str, request: pytest.FixtureRequest, postgres_url: str, prefix: str, tmp_path: Path
) -> None:
    """The brokers count deliveries (five by the end): the store counts the failed run."""
    fixture, cleanup = CLEANUPS[broker]
    url = with_option(str(request.getfixturevalue(fixture)), "namespace", noted_namespace("rb"))
    if broker in LEASES:
        url = with_option(url, "lease", LEASES[broker])
    app = sk.App(postgres_url, url, settings=sk.Settings(prefix=prefix), run=[])
    codec = app.codec

    async def put(env: Envelope) -> None:
        await app.transport.publish([Outgoing(env.id, "command", "crash", codec.encode(env))])

    try:
        async with app:
            worker = await _crash_three_times(app.store, tmp_path, put, url)
            _stop(worker)
            await _charged_once(app.store, tmp_path)
            async with app.store.transaction() as tx:
                counted = await tx.fetchall(f"SELECT consumer, failures FROM {prefix}failures")
            assert counted == [], "the count went with the command's outcome"
    finally:
        await cleanup(app)
        await app.store.open()
        await drop_tables(app.store)
        await app.store.close()


async def test_a_replayed_letter_starts_with_every_retry(tmp_path: Path) -> None:
    """Over a transport that counts deliveries only (``memory://``, as the brokers),
    an event dead-lettered after its two tries and replayed gets both again: the
    dead letter took its counted failures along, and its success leaves none."""
    retry = sk.RetryPolicy(max_attempts=2, initial=0.01)
    settings = sk.Settings(retry=retry, max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/replay.db", "memory://", settings=settings)
    runs: list[str] = []
    failing = [2]  # runs that fail: the first two, then (for the replay) one more

    @app.participant("audit").event(Happened)
    async def on_happened(evt: Happened, ctx: sk.Context) -> None:
        runs.append(evt.key)
        if len(runs) <= failing[0]:
            raise RuntimeError("audit log unavailable")

    async def letters() -> list[DeadLetter]:
        return await app.dead_letters.list()

    async with app:
        env = app.codec.make(Happened("k"), Headers())
        await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])
        await eventually(lambda: _has(letters(), 1))
        [letter] = await letters()
        failing[0] = 3
        await app.dead_letters.replay(letter.seq, actor=sk.Actor("ann"), reason="fixed")
        await eventually(lambda: _true(len(runs) == 4))
        assert await letters() == []
        async with app.store.transaction() as tx:
            left = await tx.fetchall(f"SELECT * FROM {app.store.prefix}failures")
        assert left == []


async def _has(letters: Awaitable[list[DeadLetter]], n: int) -> bool:
    return len(await letters) >= n


async def _true(value: bool) -> bool:
    return value


async def test_a_letter_given_up_at_once_leaves_no_count_behind(tmp_path: Path) -> None:
    """One try only: the message is dead-lettered at its first delivery, and its
    counted failure goes with it (a replay would otherwise start one down)."""
    settings = sk.Settings(retry=sk.RetryPolicy(max_attempts=1), max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/once.db", "memory://", settings=settings)

    @app.participant("audit").event(Happened)
    async def on_happened(evt: Happened, ctx: sk.Context) -> None:
        raise RuntimeError("audit log unavailable")

    async with app:
        env = app.codec.make(Happened("k"), Headers())
        await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])
        await eventually(lambda: _has(app.dead_letters.list(), 1))
        async with app.store.transaction() as tx:
            left = await tx.fetchall(f"SELECT * FROM {app.store.prefix}failures")
        assert left == []


async def test_a_failure_the_store_cannot_count_is_not_counted_in_deliveries(
    tmp_path: Path,
) -> None:
    """The store is away just when a failure is to be counted (the fault injected
    at ``count_failure``): the failure goes uncounted, as a first one, and the
    message is retried, not given up on by its delivery count."""
    retry = sk.RetryPolicy(max_attempts=2, initial=0.01)
    settings = sk.Settings(retry=retry, max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/away.db", "memory://", settings=settings)
    runs: list[str] = []

    async def away(consumer: str, message_id: str) -> int:
        raise StoreUnavailable("the store is away")

    app.store.count_failure = away  # type: ignore[method-assign]

    @app.participant("audit").event(Happened)
    async def on_happened(evt: Happened, ctx: sk.Context) -> None:
        runs.append(evt.key)
        if len(runs) <= 3:  # three deliveries fail: counted in deliveries, the policy gives up
            raise RuntimeError("audit log unavailable")

    async with app:
        env = app.codec.make(Happened("k"), Headers())
        await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])
        await eventually(lambda: _true(len(runs) == 4))
        assert await app.dead_letters.list() == []
