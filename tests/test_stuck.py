"""Stuck sagas (listed, counted, logged once) and the retention and listing CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sagakit as sk
from sagakit.clock import FakeClock
from sagakit.ops.retention import Pruned
from sagakit.ops.stuck import StuckWatcher
from sagakit.saga.queries import SagaQueries
from sagakit.saga.registry import SagaRegistry
from sagakit.store import SagaRecord, Store, open_store
from sagakit.testing import drop_tables
from tests.helpers import Data, eventually
from tests.saga_harness import Plan, bench, linear
from tests.test_cli import one_error_line, sagakit
from tests.test_retention import HOLD, T0, inbox, saga

pytestmark = pytest.mark.timeout(60)
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    st = open_store(url, prefix=prefix, clock=FakeClock(T0))
    await st.open()
    try:
        yield st
    finally:
        await drop_tables(st)
        await st.close()


async def seed(store: Store) -> None:
    await saga(store, "idle-running", "running", T0 - 2 * HOUR)
    await saga(store, "idle-compensating", "compensating", T0 - 3 * HOUR)
    await saga(store, "busy", "running", T0 - 60)
    await saga(store, "old-failed", "failed", T0 - 5 * HOUR)  # reported as failed, not stuck
    await saga(store, "old-done", "completed", T0 - 5 * HOUR)


async def test_stuck_sagas_are_listed_longest_stuck_first_and_counted(store: Store) -> None:
    await seed(store)
    queries = SagaQueries(store, SagaRegistry())
    stuck = await queries.list(stuck_for=HOUR)
    assert [v.id for v in stuck] == ["idle-compensating", "idle-running"]
    assert await queries.count_stuck(HOUR) == 2
    assert await queries.count_stuck(HOUR, type="other") == 0
    assert [v.id for v in await queries.list(stuck_for=HOUR, state="running")] == ["idle-running"]


async def test_each_stuck_saga_is_logged_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await seed(store)
    watcher = StuckWatcher(SagaQueries(store, SagaRegistry()), HOUR)
    with caplog.at_level(logging.WARNING, logger="sagakit.stuck"):
        assert len(await watcher.check()) == 2
        assert await watcher.check() == []  # already logged
        store.clock.advance(HOUR)  # type: ignore[attr-defined]
        assert [v.id for v in await watcher.check()] == ["busy"]  # newly stuck
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "idle-compensating" in lines[0] and "is stuck" in lines[0]


async def test_a_saga_that_moves_on_and_stalls_again_is_logged_again(store: Store) -> None:
    await saga(store, "s", "running", T0 - 2 * HOUR)
    watcher = StuckWatcher(SagaQueries(store, SagaRegistry()), HOUR)
    assert len(await watcher.check()) == 1
    async with store.transaction() as tx:
        rec = await store.saga_load(tx, "s")
        assert isinstance(rec, SagaRecord)
        await store.saga_update(tx, rec)  # progress: updated_at is now
    assert await watcher.check() == []
    store.clock.advance(2 * HOUR)  # type: ignore[attr-defined]
    assert len(await watcher.check()) == 1


async def test_the_coordinator_process_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plan = Plan()
    plan.refuse_times[("k", "b")] = 10**6  # b waits an hour for each retry: no progress
    settings = sk.Settings(max_poll=0.02, stuck_after=0.2)
    app = sk.App(f"sqlite:///{tmp_path}/w.db", settings=settings)
    bench(app, ["a", "b"], plan)
    defn = app.saga(linear("two", ["a", "b"], retriable={"b": HOLD}))
    with caplog.at_level(logging.WARNING, logger="sagakit.stuck"):
        async with app:
            await app.sagas.start(defn, Data("k"), saga_id="k")

            async def warned() -> bool:
                return any("saga k " in r.getMessage() for r in caplog.records)

            await eventually(warned, timeout=10)
            await asyncio.sleep(0.5)  # several more checks
            assert await app.sagas.count_stuck(0.2) == 1
    warnings = [r for r in caplog.records if "saga k " in r.getMessage()]
    assert len(warnings) == 1 and "step b" in warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
async def db_file(tmp_path: Path) -> str:
    """A migrated SQLite store with old, finished and stuck sagas."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    st = open_store(url, clock=FakeClock(1_000.0))  # the epoch's first hour: everything is old
    await st.open()
    await saga(st, "finished", "completed", 1_000.0)
    await saga(st, "stuck", "running", 1_000.0)
    await inbox(st, "saga:finished:a:forward", "finished")
    await st.close()
    return url


def _count(url: str, table: str) -> int:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        return int(conn.execute(f"SELECT count(*) FROM sagakit_{table}").fetchone()[0])


def test_prune_dry_run_changes_nothing(db_file: str) -> None:
    done = sagakit("db", "prune", "--store", db_file, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {
        "dry_run": True,
        "rows": {**Pruned().as_dict(), "sagas": 1, "saga_log": 3, "inbox": 1},
    }
    assert (_count(db_file, "sagas"), _count(db_file, "inbox")) == (2, 1)
    done = sagakit("db", "prune", "--store", db_file, "--older-than", "1d")
    assert done.returncode == 0, done.stderr
    assert "sagas: deleted 1" in done.stdout and "inbox: deleted 1" in done.stdout
    assert (_count(db_file, "sagas"), _count(db_file, "inbox")) == (1, 0)


def test_prune_refuses_a_horizon_shorter_than_redelivery(db_file: str) -> None:
    done = sagakit("db", "prune", "--store", db_file, "--older-than", "5m")
    assert done.returncode == 2
    assert "redelivered" in one_error_line(done)
    assert _count(db_file, "sagas") == 2


def test_prune_an_unmigrated_store_is_a_configuration_error(tmp_path: Path) -> None:
    done = sagakit("db", "prune", "--store", f"sqlite:///{tmp_path / 'empty.db'}")
    assert done.returncode == 2
    assert "sagakit db migrate" in one_error_line(done)


def test_sagas_list_stuck(db_file: str) -> None:
    done = sagakit("sagas", "list", "--store", db_file, "--stuck", "1h", "--json")
    assert done.returncode == 0, done.stderr
    assert [v["id"] for v in json.loads(done.stdout)] == ["stuck"]
    done = sagakit("sagas", "list", "--store", db_file, "--state", "completed")
    assert done.stdout.split()[0] == "finished"


def test_sagas_list_bad_duration_is_a_usage_error(db_file: str) -> None:
    done = sagakit("sagas", "list", "--store", db_file, "--stuck", "soon")
    assert done.returncode == 2
    assert "not a duration" in one_error_line(done)
