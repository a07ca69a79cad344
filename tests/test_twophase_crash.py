"""The crash-point matrix: a coordinator SIGKILLed at every gap of the protocol, then recovery.

At each point a real coordinator process is killed with SIGKILL while it runs
one onboarding group (customers: set VERIFIED and count it; enrollments:
remove the pending row). Then a fresh coordinator with the same node recovers.
Every group must end all-or-nothing, with no prepared transaction left and
nothing committed twice (``verified`` counts each commit of the customer
branch). The same table is published in docs/twophase.md.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from sagakit.examples import onboarding as ob
from sagakit.testing.pgcluster import PgCluster

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).parent / "workers" / "twophase_crash.py"
VERIFIED, PENDING = ("VERIFIED", 1, False), ("PENDING", 0, True)

# point: (branches prepared at the crash {resource: n}, record kept?, outcome, recovery's actions)
MATRIX = {
    "begun": ({}, False, PENDING, {}),
    "prepared:1": ({"customers": 1}, False, PENDING, {"rollback": 1}),
    "prepared": ({"customers": 1, "enrollments": 1}, False, PENDING, {"rollback": 2}),
    "recorded": ({"customers": 1, "enrollments": 1}, True, VERIFIED, {"commit": 2}),
    "committed:1": ({"enrollments": 1}, True, VERIFIED, {"commit": 1}),
    "committed": ({}, True, VERIFIED, {}),
}


@pytest.fixture(params=["postgresql", "mariadb"])
def databases(request: pytest.FixtureRequest, pg_cluster: PgCluster) -> tuple[str, str]:
    customers = pg_cluster.create_database("crash_customers")
    if request.param == "postgresql":
        return customers, pg_cluster.create_database("crash_enrollments")
    return customers, request.getfixturevalue("mariadb_url")


@pytest.mark.parametrize("point", list(MATRIX))
async def test_sigkill_at_every_point_then_recovery(
    point: str, databases: tuple[str, str], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 'coordinator.db'}"
    await ob.create_tables(*databases)
    who = f"k{uuid.uuid4().hex[:10]}"
    node = who  # a node of its own: branches an interrupted earlier run left are not ours
    app = ob.build_app(store, *databases, node=node, recover_every=None, safe_age=0.0)
    async with app:
        await ob.add_customers(app, [who])
    child = subprocess.run(
        [sys.executable, str(WORKER), store, *databases, point, who, node],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == -9, child.stdout + child.stderr  # SIGKILLed at the point
    held, record, outcome, actions = MATRIX[point]
    async with app:
        doubt = await app.twophase.in_doubt(every_node=False)
        assert Counter(d.resource for d in doubt) == Counter(held)
        assert bool(await app.twophase.records.recorded(node)) == record
        done = await app.twophase.recover()
        assert Counter(a.plan.verdict for a in done) == Counter(actions)
        assert all(a.outcome == "done" for a in done)
        assert await app.twophase.recover() == []  # idempotent
        assert await app.twophase.in_doubt(every_node=False) == []  # nothing left prepared
        assert await app.twophase.records.recorded(node) == {}  # record forgotten
        assert await ob.state(app, who) == outcome  # all or nothing, committed once
