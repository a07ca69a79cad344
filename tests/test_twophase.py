"""Atomic groups on real servers: a private PostgreSQL cluster (prepared transactions
on) and the machine's MariaDB. Every test ends with no prepared transaction left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

import sagakit as sk
from sagakit.errors import AtomicAborted, ConfigurationError, InvalidOperatorAction
from sagakit.examples import onboarding as ob
from sagakit.testing.pgcluster import PgCluster
from sagakit.twophase import AtomicTx, TwoPhaseOptions

pytestmark = pytest.mark.timeout(120)


class Boom(Exception):
    """Stands in for a coordinator that stops at a protocol point (in-process)."""


async def prepared(url: str) -> list[str]:
    """The prepared transactions of the database at ``url``."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


async def sql(url: str, statement: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(statement))
    finally:
        await conn.close()


@pytest.fixture
async def dbs(pg_cluster: PgCluster) -> AsyncIterator[tuple[str, str]]:
    """Two fresh databases with the onboarding tables."""
    tag = uuid.uuid4().hex[:8]
    urls = pg_cluster.create_database(f"c{tag}"), pg_cluster.create_database(f"e{tag}")
    await ob.create_tables(*urls)
    yield urls
    for url in urls:
        assert await prepared(url) == [], "a prepared transaction was left behind"
    for name in (f"c{tag}", f"e{tag}"):
        pg_cluster.psql("postgres", f'DROP DATABASE "{name}" WITH (FORCE)', check=False)


def app_for(store: str, urls: tuple[str, str], **options: object) -> sk.App:
    opts = {"recover_every": None, "safe_age": 0.0, **options}
    return ob.build_app(store, *urls, **opts)  # type: ignore[arg-type]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


async def test_a_group_commits_on_both_databases(dbs: tuple[str, str], store_url: str) -> None:
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["ada"])
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, "ada")
        assert tx.outcome == "committed" and tx.pending == []
        assert await ob.state(app, "ada") == ("VERIFIED", 1, False)
        assert await app.twophase.records.recorded(None) == {}  # forgotten


async def test_an_error_in_the_block_rolls_both_back(dbs: tuple[str, str], store_url: str) -> None:
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["bob"], enrolled=False)
        with pytest.raises(ob.NotEnrolled):
            async with app.atomic("customers", "enrollments") as tx:
                await ob.verify(tx, "bob")  # the customer update ran, then this refused
        assert tx.outcome == "aborted"
        assert await ob.state(app, "bob") == ("PENDING", 0, False)


async def test_a_branch_refusing_to_prepare_aborts_the_group(
    dbs: tuple[str, str], store_url: str
) -> None:
    """A deferred constraint is checked at PREPARE: the enrollments branch refuses."""
    await sql(dbs[1], "CREATE TABLE once (k TEXT UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["cy"])
        with pytest.raises(AtomicAborted) as err:
            async with app.atomic("customers", "enrollments") as tx:
                await ob.verify(tx, "cy")
                await tx["enrollments"].execute("INSERT INTO once VALUES ('x'), ('x')")
        assert err.value.resource == "enrollments" and "refused to prepare" in err.value.reason
        assert "23505" in err.value.reason  # unique_violation, the database's own reason
        assert await ob.state(app, "cy") == ("PENDING", 0, True)
        assert await prepared(dbs[0]) == []  # the customers branch was prepared, then rolled back


async def test_a_database_going_away_before_the_record_aborts(
    dbs: tuple[str, str], store_url: str
) -> None:
    """After the customers branch is prepared, every session of enrollments is cut."""
    app = app_for(store_url, dbs)
    dbname = dbs[1].rsplit("/", 1)[1]

    async def cut(point: str) -> None:
        if point == "prepared:1":
            await sql(dbs[0], f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      f"WHERE datname = '{dbname}'")  # fmt: skip

    async with app:
        await ob.add_customers(app, ["dan"])
        app.twophase.probe = cut
        with pytest.raises(AtomicAborted) as err:
            async with app.atomic("customers", "enrollments") as tx:
                await ob.verify(tx, "dan")
        assert err.value.resource == "enrollments" and err.value.retryable
        app.twophase.probe = None
        assert await ob.state(app, "dan") == ("PENDING", 0, True)


async def test_a_database_away_after_the_record_is_committed_by_recovery(
    dbs: tuple[str, str], store_url: str, pg_cluster: PgCluster
) -> None:
    """The decision is taken; enrollments refuses connections at commit time; recovery
    commits its branch once it is back."""
    app = app_for(store_url, dbs)
    dbname = dbs[1].rsplit("/", 1)[1]

    async def away(point: str) -> None:
        if point == "recorded":
            pg_cluster.psql("postgres", f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            pg_cluster.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            f"WHERE datname = '{dbname}'")  # fmt: skip

    async with app:
        await ob.add_customers(app, ["eve"])
        app.twophase.probe = away
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, "eve")
        app.twophase.probe = None
        assert tx.outcome == "committed" and tx.pending == ["enrollments"]
        pg_cluster.psql("postgres", f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert await prepared(dbs[1]) == [f"sk_main_{tx.group_id}_enrollments"]
        actions = await app.twophase.recover()
        assert [(a.plan.verdict, a.outcome) for a in actions] == [("commit", "done")]
        assert await ob.state(app, "eve") == ("VERIFIED", 1, False)
        assert await app.twophase.records.recorded(None) == {}


async def test_a_global_id_collision_aborts_and_leaves_the_other_alone(
    dbs: tuple[str, str], store_url: str
) -> None:
    other = "sk_main_dup1_enrollments"
    conn = await asyncpg.connect(dbs[1])
    await conn.execute("BEGIN")
    await conn.execute(f"PREPARE TRANSACTION '{other}'")
    await conn.close()
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["fay"])
        with pytest.raises(AtomicAborted) as err:
            async with app.atomic("customers", "enrollments", group_id="dup1") as tx:
                await ob.verify(tx, "fay")
        assert "already in use" in err.value.reason
        assert await ob.state(app, "fay") == ("PENDING", 0, True)
        assert await prepared(dbs[1]) == [other]  # not ours to roll back
    await sql(dbs[1], f"ROLLBACK PREPARED '{other}'")


async def test_preflight_names_the_setting(pg_cluster: PgCluster) -> None:
    with PgCluster(max_prepared_transactions=0) as off:  # like the machine's own server
        app = sk.App("memory://", settings=sk.Settings(twophase=TwoPhaseOptions()))
        app.resource("off", off.url("postgres"))
        with pytest.raises(ConfigurationError, match="set max_prepared_transactions = 64") as e:
            await app.start()
        assert len(str(e.value).splitlines()) == 1
        await app.stop()
    many = TwoPhaseOptions(concurrency=500, recover_every=None)
    app = sk.App("memory://", settings=sk.Settings(twophase=many))
    app.resource("private", pg_cluster.url("postgres"))
    with pytest.raises(ConfigurationError, match=r"is 64; .*at least the atomic concurrency, 500"):
        await app.start()
    await app.stop()


async def test_recovery_leaves_groups_in_flight_alone(dbs: tuple[str, str], store_url: str) -> None:
    """Recovery running between prepare and record (safe age 0) must not roll back."""
    app = app_for(store_url, dbs)
    seen: list[str] = []

    async def recover_now(point: str) -> None:
        if point == "prepared":
            seen.extend(a.plan.verdict for a in await app.twophase.recover())

    async with app:
        await ob.add_customers(app, ["gus"])
        app.twophase.probe = recover_now
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, "gus")
        app.twophase.probe = None
        assert seen == [] and tx.outcome == "committed"
        assert await ob.state(app, "gus") == ("VERIFIED", 1, False)


async def stop_at(app: sk.App, point: str, customer: str) -> AtomicTx:
    """Run the onboarding group and stop it dead at ``point`` (an in-process crash)."""

    async def boom(p: str) -> None:
        if p == point:
            raise Boom(p)

    app.twophase.probe = boom
    with pytest.raises(Boom):
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, customer)
    app.twophase.probe = None
    return tx


async def test_recovery_commits_recorded_and_rolls_back_unrecorded(
    dbs: tuple[str, str], store_url: str
) -> None:
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["hal", "ivy"])
        kept = await stop_at(app, "recorded", "hal")
        dropped = await stop_at(app, "prepared", "ivy")
        assert len(await prepared(dbs[0])) == 2
        doubt = await app.twophase.in_doubt()
        assert {(d.group, d.recorded) for d in doubt} == {
            (kept.group_id, True),
            (dropped.group_id, False),
        }
        assert any("on ob_customers" in lock for d in doubt for lock in d.locks)
        assert (await app.twophase.gauges()).in_doubt == 4
        actions = await app.twophase.recover()
        verdicts = sorted((a.plan.gid.group, a.plan.verdict, a.outcome) for a in actions)
        assert verdicts == sorted(
            [(kept.group_id, "commit", "done")] * 2 + [(dropped.group_id, "rollback", "done")] * 2
        )
        assert await ob.state(app, "hal") == ("VERIFIED", 1, False)
        assert await ob.state(app, "ivy") == ("PENDING", 0, True)
        assert await app.twophase.recover() == []  # idempotent: nothing left
        audit = await app.twophase.audit()
        assert {(a.action, a.actor) for a in audit} == {
            ("commit", "recovery"), ("rollback", "recovery"), ("forget", "recovery")
        }  # fmt: skip


async def test_recovery_waits_for_the_safe_age(dbs: tuple[str, str], store_url: str) -> None:
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["jan"])
        tx = await stop_at(app, "prepared", "jan")
        assert await app.twophase.recover() == []  # too young to presume aborted
        for d in await app.twophase.in_doubt():
            await app.twophase.resolve(
                d.gid, "rollback", actor=sk.Actor("ops"), reason="test cleanup"
            )
        lines = await app.twophase.audit(group=tx.group_id)
        assert {(a.action, a.actor, a.reason) for a in lines} == {
            ("rollback", "ops", "test cleanup")
        }


async def test_an_operator_may_not_split_a_recorded_group(
    dbs: tuple[str, str], store_url: str
) -> None:
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["kim"])
        tx = await stop_at(app, "recorded", "kim")
        gid = f"sk_main_{tx.group_id}_customers"
        with pytest.raises(InvalidOperatorAction, match="would split it"):
            await app.twophase.resolve(gid, "rollback", actor=sk.Actor("ops"), reason="oops")
        assert await app.twophase.resolve(gid, "commit", actor=sk.Actor("ops"), reason="go") == (
            "done"
        )
        await app.twophase.recover()  # commits the other branch, forgets the record
        assert await ob.state(app, "kim") == ("VERIFIED", 1, False)


async def test_the_cli_lists_and_resolves(dbs: tuple[str, str], store_url: str) -> None:
    app = app_for(store_url, dbs, safe_age=3600.0)
    async with app:
        await ob.add_customers(app, ["lou"])
        tx = await stop_at(app, "prepared", "lou")
    env = {**os.environ, "SAGAKIT_STORE": store_url, "SAGAKIT_ACTOR": "ops"}
    res = [f"--resource=customers={dbs[0]}", f"--resource=enrollments={dbs[1]}"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sagakit.cli", "2pc", *args, *res],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    branches = json.loads(listed.stdout)
    assert {b["group"] for b in branches} == {tx.group_id} and len(branches) == 2
    assert all(b["recorded"] is False and b["age"] >= 0 for b in branches)
    for b in branches:
        done = cli("resolve", b["gid"], "--rollback", "--reason", "abandoned at prepare", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["outcome"] == "done"
    again = cli("resolve", branches[0]["gid"], "--commit", "--reason", "no such branch")
    assert again.returncode == 1 and "sagakit: error:" in again.stderr
    assert "no prepared branch" in again.stderr and len(again.stderr.splitlines()) == 1
    assert "no branch in doubt" in cli("list").stdout


async def test_an_atomic_saga_step_commits_once(dbs: tuple[str, str], store_url: str) -> None:
    """The step's key and result go with the commit record: a rerun commits nothing."""
    app = app_for(store_url, dbs)
    async with app:
        await ob.add_customers(app, ["max"])
        view = await app.sagas.wait(
            await app.sagas.start(ob.onboard_atomic, ob.Onboard("max"), saga_id="s-max")
        )
        assert view.state == "completed"
        step = ob.onboard_atomic.step("verify-and-unenroll").local
        rerun = step.bind(app.twophase, "s-max:verify-and-unenroll")  # type: ignore[union-attr]
        assert await rerun(ob.Onboard("max")) is None  # the stored result, not a second commit
        assert await ob.state(app, "max") == ("VERIFIED", 1, False)


async def test_a_group_spans_postgresql_and_mariadb(
    pg_cluster: PgCluster, mariadb_url: str, store_url: str
) -> None:
    customers = pg_cluster.create_database(f"c{uuid.uuid4().hex[:8]}")
    await ob.create_tables(customers, mariadb_url)
    node = f"m{uuid.uuid4().hex[:8]}"  # not the node of branches an interrupted run left
    app = app_for(store_url, (customers, mariadb_url), node=node)
    ids = [f"m{uuid.uuid4().hex[:8]}" for _ in range(3)]
    async with app:
        await ob.add_customers(app, ids)
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, ids[0])
        assert await ob.state(app, ids[0]) == ("VERIFIED", 1, False)
        kept = await stop_at(app, "recorded", ids[1])
        await stop_at(app, "prepared:2", ids[2])
        found = {(d.resource, d.recorded) for d in await app.twophase.in_doubt(every_node=False)}
        assert found == {("customers", True), ("customers", False), ("enrollments", True),
                         ("enrollments", False)}  # fmt: skip
        await app.twophase.recover()
        assert await ob.state(app, ids[1]) == ("VERIFIED", 1, False)
        assert await ob.state(app, ids[2]) == ("PENDING", 0, True)
        assert await app.twophase.in_doubt(every_node=False) == []
        assert kept.group_id not in await app.twophase.records.recorded(None)
        async with app.atomic("customers", "enrollments") as tx:
            await tx["enrollments"].execute(
                f"DELETE FROM {ob.PENDING} WHERE customer IN (?, ?, ?)", *ids
            )
    assert await prepared(customers) == []


async def test_the_onboarding_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sagakit.examples.onboarding"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "every group all-or-nothing" in done.stdout


async def test_a_participants_database_is_a_resource(dbs: tuple[str, str]) -> None:
    app = sk.App("memory://", settings=sk.Settings(twophase=TwoPhaseOptions(recover_every=None)))
    app.participant("customers", store=dbs[0] + "?max_size=2")
    app.participant("local")
    assert app.resource("customers").name == "customers"
    with pytest.raises(ConfigurationError, match="PostgreSQL store of its own"):
        app.resource("local")
    with pytest.raises(sk.DuplicateRegistration):
        app.resource("customers", dbs[1])
    async with app, app.atomic("customers") as tx:
        row = await tx["customers"].fetchone("SELECT count(*) FROM ob_customers")
    assert row[0] == 0


async def test_mariadb_placeholders_leave_quoted_text_alone(mariadb_url: str) -> None:
    from sagakit.twophase.mariadb import MariaDBResource, MariaTx

    conn = await MariaDBResource("m", mariadb_url).connect()
    try:
        row = await MariaTx(conn).fetchone("SELECT '?', 'x%', ? % 3, ?", 7, "a'b")
    finally:
        conn.close()
    assert tuple(row) == ("?", "x%", 1, "a'b")


async def test_recovery_touches_only_its_own_nodes_branches(
    dbs: tuple[str, str], store_url: str
) -> None:
    """Two coordinators share the databases and the store, each with its own node."""
    other = app_for(store_url, dbs, node="other")
    mine = app_for(store_url, dbs, node="mine")
    async with other, mine:
        await ob.add_customers(other, ["ned"])
        left = await stop_at(other, "prepared", "ned")
        assert await mine.twophase.recover() == []  # not mine, however old
        assert {d.node for d in await mine.twophase.in_doubt()} == {"other"}
        assert await mine.twophase.in_doubt(every_node=False) == []
        actions = await other.twophase.recover()
        assert {(a.plan.gid.group, a.plan.verdict) for a in actions} == {
            (left.group_id, "rollback")
        }
        assert await ob.state(mine, "ned") == ("PENDING", 0, True)


async def test_groups_in_doubt_are_gauges_on_the_metrics_endpoint(
    dbs: tuple[str, str], store_url: str
) -> None:
    """A group stopped after prepare shows as in doubt, with its age, on /metrics."""
    from prometheus_client import generate_latest

    app = app_for(store_url, dbs, safe_age=3600.0)
    telemetry = sk.Telemetry(tracing=False)
    app.instrument(telemetry)
    async with app:
        await ob.add_customers(app, ["hal"])
        await stop_at(app, "prepared", "hal")
        assert telemetry.metrics is not None
        await telemetry.metrics.refresh()
        text = generate_latest(telemetry.metrics.registry).decode()
        assert "sagakit_twophase_in_doubt 2.0" in text, text
        assert "sagakit_twophase_oldest_prepared_age_seconds" in text
        for branch in await app.twophase.in_doubt():
            await app.twophase.resolve(
                branch.gid, "rollback", actor=sk.Actor("test"), reason="clean up"
            )
