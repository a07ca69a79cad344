"""Schema migrations under a rolling upgrade: older processes keep running.

The "older release" is this code with the newest migration withheld
(``tests/workers/saga_worker.py``, ``SAGAKIT_TEST_SCHEMA_BEHIND=1``): its
workers create the schema one version short and run sagas; the new release
migrates the database underneath them while sagas are in flight; an old
coordinator restarted afterwards still starts (the migration only added),
unless the database says a migration broke older code.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sagakit as sk
from sagakit.store.schema import SCHEMA_VERSION
from sagakit.testing import drop_tables
from tests.helpers import die_with_parent
from tests.test_coordinator_processes import all_terminal, check_exactly_once, stop
from tests.workers.saga_worker import BEHIND_ENV, Job, definition

WORKER = Path(__file__).parent / "workers" / "saga_worker.py"

pytestmark = pytest.mark.timeout(180)


def spawn_old(url: str, prefix: str, *services: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), BEHIND_ENV: "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), url, prefix, *services],
            env=env,
            stderr=out,
            preexec_fn=die_with_parent,
        )


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sagas.db"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    async with sk.open_store(url, prefix=prefix) as store:
        async with store.transaction() as tx:
            await tx.execute(f"DROP TABLE IF EXISTS {prefix}effects")
        await drop_tables(store)


async def wait_for_version(url: str, prefix: str, version: int) -> None:
    store = sk.open_store(url, prefix=prefix)
    await store.open(migrate=False)
    try:
        for _ in range(300):
            if await store.schema_version() == version:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"schema not at {version}: {await store.schema_version()}")
    finally:
        await store.close()


async def start(client: sk.App, first: int, n: int) -> None:
    defn = definition()
    for i in range(first, first + n):
        key = f"refuse-{i}" if i % 5 == 0 else f"ok-{i}"
        await client.sagas.start(defn, Job(key), saga_id=key)


EFFECTS = "CREATE TABLE IF NOT EXISTS {}effects (saga TEXT, step TEXT, action TEXT)"


async def test_a_migration_under_running_older_processes_loses_nothing(
    url: str, prefix: str, tmp_path: Path
) -> None:
    log = tmp_path / "old.log"
    old = [
        spawn_old(url, prefix, "coordinator", log=log),
        spawn_old(url, prefix, "a", "b", "c", log=log),
    ]
    try:
        await wait_for_version(url, prefix, SCHEMA_VERSION - 1)
        settings = sk.Settings(prefix=prefix, auto_migrate=False, max_poll=0.05)
        client = sk.App(url, settings=settings, run=[])
        client.saga(definition())
        async with client:
            async with client.store.transaction() as tx:
                await tx.execute(EFFECTS.format(prefix))
            await start(client, 0, 20)
            more = asyncio.create_task(start(client, 20, 20))  # in flight while we migrate
            async with sk.open_store(url, prefix=prefix) as new:  # the new release migrates
                assert await new.schema_version() == SCHEMA_VERSION
            await more
            await start(client, 40, 10)
            await all_terminal(client, 50, timeout=90)
            # an old coordinator restarted after the migration still starts and works
            stop(old[0])
            old[0] = spawn_old(url, prefix, "coordinator", log=log)
            await start(client, 50, 10)
            await all_terminal(client, 60, timeout=90)
            await check_exactly_once(client, prefix, 60)
            # a migration that breaks older code keeps them out, with a clear message
            async with client.store.transaction() as tx:
                await tx.execute(f"UPDATE {prefix}schema_floor SET oldest = ?", SCHEMA_VERSION)
            refused = spawn_old(url, prefix, "coordinator", log=tmp_path / "refused.log")
            assert refused.wait(timeout=60) != 0
            err = (tmp_path / "refused.log").read_text()
            assert "needs sagakit code of schema version" in err, err[-2000:]
    finally:
        stop(*old)


async def test_a_worker_role_without_create_starts_on_a_current_schema(
    postgres_url: str, prefix: str
) -> None:
    """auto_migrate on a database already at this version only reads: a role with
    data privileges alone (no CREATE on the schema) starts and runs."""
    import asyncpg  # type: ignore[import-untyped]

    role = f"{prefix}worker"
    admin = await asyncpg.connect(postgres_url)
    owner = sk.open_store(postgres_url, prefix=prefix)
    await owner.open()  # the owner migrates
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
        tables = "SELECT tablename FROM pg_tables WHERE tablename LIKE $1"
        for (table,) in await admin.fetch(tables, prefix + "%"):
            await admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}")
        as_worker = postgres_url.replace("postgres@", f"{role}@", 1)
        worker = sk.open_store(as_worker, prefix=prefix)
        await worker.open()  # migrate=True, the App's default
        try:
            assert await worker.schema_version() == SCHEMA_VERSION
        finally:
            await worker.close()
    finally:
        await drop_tables(owner)
        await owner.close()
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
