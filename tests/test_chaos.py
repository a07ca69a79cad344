"""A short run of the chaos harness (benchmarks/chaos.py) in every ``make test``.

The demo's services and two coordinators run as worker processes; while ~50
orders are in flight the harness SIGKILLs coordinators and participants
(restarting them), sends a share of all messages twice through the real
transport and, on PostgreSQL with RabbitMQ, cuts broker connections and
terminates the workers' database backends. Every saga must end final with
nothing lost, nothing applied twice and every invariant of the demo true.
The full runs (3 x 300 sagas) and their figures are in docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
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
        and out["invariants_ok"]
        and out["terminal"] == out["sagas"]
    )


def assert_survived(out: dict[str, Any], sagas: int, *, min_kills: int) -> None:
    detail = json.dumps(out["per_run"], indent=1)[:4000]
    assert out["runs"] == 1 and out["sagas"] == sagas
    assert out["terminal"] == sagas, detail
    assert out["lost"] == 0, detail
    assert out["double_applied"] == 0, detail
    assert out["invariants_ok"], detail
    faults = out["faults_injected"]
    kills = faults.get("kill_coordinator", 0) + faults.get("kill_participant", 0)
    assert kills >= min_kills, faults
    assert faults.get("duplicate_delivery", 0) > 0, faults
    assert out["per_run"][0]["fault_errors"] == [], out["per_run"][0]["fault_errors"]


def test_chaos_sqlite_short_run(tmp_path: Path) -> None:
    out = run_chaos(
        tmp_path, "--store", "sqlite", "--runs", "1", "--sagas", "50", "--place-over", "6"
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
