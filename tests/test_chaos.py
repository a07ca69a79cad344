"""A short run of the chaos harness (benchmarks/chaos.py) in every ``make test``.

The demo's services and two coordinators run as worker processes; while ~50
orders are in flight the harness SIGKILLs coordinators and participants
(restarting them), sends a share of all messages twice through the real
transport and, on PostgreSQL with RabbitMQ, cuts broker connections and
terminates the workers' database backends. Every saga must end final with
nothing lost, nothing applied twice, no saga whose final state disagrees with
what the services committed, and every invariant of the demo true.

Two more faults target the engine's concurrency: ``slow_handler`` (handler
runs that outlive the lease before they commit) and ``divergent_duplicate``
(two copies of one command delivered at once whose flaky external call
answers them differently). The full runs (3 x 300 sagas) and their figures
are in docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT / "benchmarks" / "chaos.py"

pytestmark = pytest.mark.timeout(150)


def run_chaos(tmp_path: Path, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    cmd = [sys.executable, str(CHAOS), "--json", "--log-dir", str(tmp_path / "chaos"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output (exit {done.returncode}):\n{done.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert done.returncode == (0 if _clean(out) else 1), done.stderr[-3000:]
    return out


def _clean(out: dict[str, Any]) -> bool:
    return (
        out["lost"] == 0
        and out["double_applied"] == 0
        and out["outcome_mismatch"] == 0
        and out["invariants_ok"]
        and out["terminal"] == out["sagas"]
    )


def assert_clean(out: dict[str, Any], sagas: int) -> None:
    """Every saga final, nothing lost or doubled, books agree with the sagas."""
    detail = json.dumps(out["per_run"], indent=1)[:4000]
    assert out["runs"] == 1 and out["sagas"] == sagas
    assert out["terminal"] == sagas, detail
    assert out["lost"] == 0, detail
    assert out["double_applied"] == 0, detail
    assert out["outcome_mismatch"] == 0, detail
    assert out["invariants_ok"], detail
    assert out["per_run"][0]["fault_errors"] == [], out["per_run"][0]["fault_errors"]


def assert_survived(out: dict[str, Any], sagas: int, *, min_kills: int) -> None:
    assert_clean(out, sagas)
    faults = out["faults_injected"]
    kills = faults.get("kill_coordinator", 0) + faults.get("kill_participant", 0)
    assert kills >= min_kills, faults
    assert faults.get("duplicate_delivery", 0) > 0, faults


#: the faults of the first short runs; the newer ones have runs of their own (below)
CLASSIC = ("--faults", "kill_coordinator,kill_participant,duplicate_delivery,broker_cut,db_drop")


def test_chaos_sqlite_short_run(tmp_path: Path) -> None:
    out = run_chaos(
        tmp_path,
        "--store",
        "sqlite",
        "--runs",
        "1",
        "--sagas",
        "50",
        "--place-over",
        "6",
        *CLASSIC,
    )
    assert_survived(out, 50, min_kills=3)


def test_chaos_postgres_rabbitmq_short_run(
    tmp_path: Path, postgres_url: str, rabbitmq_url: str
) -> None:
    out = run_chaos(
        tmp_path,
        "--store",
        postgres_url,
        "--transport",
        rabbitmq_url,
        "--runs",
        "1",
        "--sagas",
        "40",
        "--place-over",
        "6",
        *CLASSIC,
    )
    assert_survived(out, 40, min_kills=2)
    faults = out["faults_injected"]
    assert faults.get("db_drop", 0) + faults.get("broker_cut", 0) > 0, faults


def test_harness_sees_a_double_application(tmp_path: Path) -> None:
    """Negative control: ledger rows written twice on purpose must be reported."""
    out = run_chaos(
        tmp_path,
        "--store",
        "sqlite",
        "--sagas",
        "20",
        "--place-over",
        "2",
        "--faults",
        "kill_participant",
        "--self-test-double",
        "0.2",
    )
    assert out["double_applied"] > 0, out
    assert out["lost"] == 0 and out["invariants_ok"]


# -- slow handlers and divergent duplicates ------------------------------------

# A 1 s lease halves each slow handler's sleep (1.5-3 leases), so twice the
# slowed runs cost the same time: about a dozen expected, never none in practice.
NEW_FAULTS = (
    "--faults",
    "slow_handler,divergent_duplicate",
    *("--slow", "0.06", "--lease", "1", "--diverge", "0.3"),
)


def assert_new_faults_bit(out: dict[str, Any]) -> None:
    faults = out["faults_injected"]
    assert faults.get("slow_handler", 0) > 0, faults
    assert faults.get("divergent_duplicate", 0) > 0, faults


def test_chaos_sqlite_slow_and_divergent(tmp_path: Path) -> None:
    """SQLite serialises a process's transactions, so copies of one command
    cannot overlap there; the run still must come out clean."""
    out = run_chaos(
        tmp_path, "--store", "sqlite", "--sagas", "30", "--place-over", "4", *NEW_FAULTS
    )
    assert_new_faults_bit(out)
    assert_clean(out, 30)


def test_chaos_postgres_slow_and_divergent(tmp_path: Path, postgres_url: str) -> None:
    """PostgreSQL with the database transport: a lease runs out under a slow
    handler, and two copies of one command run truly concurrently."""
    out = run_chaos(
        tmp_path, "--store", postgres_url, "--sagas", "40", "--place-over", "4", *NEW_FAULTS
    )
    assert_new_faults_bit(out)
    assert_clean(out, 40)


# -- long faults: outages, broker restarts, partitions, a rolling upgrade -------


def assert_long_faults_bit(out: dict[str, Any], *kinds: str) -> None:
    faults = out["faults_injected"]
    for kind in kinds:
        assert faults.get(kind, 0) > 0, faults


def test_chaos_sqlite_outage_and_rolling_upgrade(tmp_path: Path) -> None:
    """Another process holds the SQLite write lock for seconds at a time, and the
    coordinators are replaced one by one by a release that also knows saga v2
    while v2 orders already come in: nothing may be dead-lettered or lost."""
    out = run_chaos(
        tmp_path,
        *("--store", "sqlite", "--sagas", "60", "--place-over", "10"),
        *("--faults", "kill_participant,db_outage,rolling_upgrade"),
    )
    assert_clean(out, 60)
    assert_long_faults_bit(out, "db_outage", "rolling_upgrade")
    assert out["per_run"][0]["by_version"].get("v2", 0) > 0, out["per_run"][0]["by_version"]


@pytest.mark.timeout(300)
def test_chaos_postgres_nats_restart_partition_outage(
    tmp_path: Path, postgres_url: str, nats_url: str
) -> None:
    """The run's own NATS server is SIGKILLed and restarted, a worker's network
    link goes down for seconds, and the database refuses connections for
    seconds; every saga still ends as its participants' books say."""
    from benchmarks import chaos_infra

    if why := chaos_infra.netns_unavailable():
        pytest.skip(why)
    out = run_chaos(
        tmp_path,
        *("--store", postgres_url, "--transport", nats_url),
        *("--sagas", "40", "--place-over", "10", "--min-gap", "2", "--max-gap", "4"),
        *("--faults", "kill_participant,broker_restart,partition,db_outage"),
        timeout=240,
    )
    assert_clean(out, 40)
    assert_long_faults_bit(out, "broker_restart", "partition", "db_outage")


def test_harness_sees_an_outcome_mismatch(tmp_path: Path) -> None:
    """Negative control: a compensation's ledger row deleted in 2 compensated
    sagas must make exactly those 2 sagas mismatches (``lost`` sees the
    never-compensated effect too)."""
    out = run_chaos(
        tmp_path,
        "--store",
        "sqlite",
        "--sagas",
        "20",
        "--place-over",
        "2",
        "--faults",
        "kill_participant",
        "--self-test-mismatch",
        "2",
    )
    assert out["per_run"][0]["self_test_mismatch"] == 2, out
    assert out["outcome_mismatch"] == 2, out
    assert out["double_applied"] == 0 and out["invariants_ok"], out


def _chaos_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chaos_harness", CHAOS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


chaos = _chaos_module()
STEPS = list(chaos.STEP_SERVICE)
DONE = chaos.OrderBooks("approved", "reserved", 1, 1, 1)
UNDONE = chaos.OrderBooks("rejected", "released")


def _ledger(forward: list[str], compensate: list[str]) -> dict[tuple[str, str], int]:
    rows = {(s, "forward"): 1 for s in forward}
    return rows | {(s, "compensate"): 1 for s in compensate}


BEFORE_STOCK = ["create-order", "reserve-credit"]


@pytest.mark.parametrize(
    ("state", "ledger", "books", "mismatch"),
    [
        ("completed", _ledger(STEPS, []), DONE, False),
        ("completed", _ledger(STEPS[:-1], []), DONE, True),  # a step without effect
        ("completed", _ledger(STEPS, []) | {("ship", "forward"): 2}, DONE, True),
        ("completed", _ledger(STEPS, ["reserve-credit"]), DONE, True),
        ("completed", _ledger(STEPS, []), UNDONE, True),
        # reserve-stock refused: the two steps before it are undone
        ("compensated", _ledger(BEFORE_STOCK, BEFORE_STOCK), UNDONE, False),
        ("compensated", _ledger(BEFORE_STOCK, ["create-order"]), UNDONE, True),
        ("compensated", _ledger(["create-order"], BEFORE_STOCK), UNDONE, True),
        ("compensated", _ledger([*BEFORE_STOCK, "charge-card"], BEFORE_STOCK), UNDONE, True),
        ("compensated", _ledger(BEFORE_STOCK, BEFORE_STOCK), DONE, True),
        # create-order timed out and its compensation overtook it: the barrier
        # cancelled the create, so no order row is right; with the create's
        # effect committed, a missing row is not
        ("compensated", {}, chaos.OrderBooks(), False),
        ("compensated", _ledger(["create-order"], []), chaos.OrderBooks(), True),
        ("running", {}, chaos.OrderBooks(), False),  # not final: not judged
    ],
)
def test_outcome_mismatch_rules(
    state: str, ledger: dict[tuple[str, str], int], books: Any, mismatch: bool
) -> None:
    assert bool(chaos.outcome_mismatches(state, ledger, books)) == mismatch
