"""Choreographed and mixed demo under chaos (benchmarks/chaos_choreography.py).

The six services, the tracker (and for the mixed style a coordinator) run as
worker processes; while orders are in flight random workers are SIGKILLed and
restarted, so handlers die mid-transaction and their messages come back after
the lease, and a share of every process's sends and events goes out twice
through the transport. Every flow must finish, the books balance, the effect
ledger show nothing lost or applied twice, and the tracker's verdicts agree
with the books. A negative control writes ledger rows twice on purpose and
must be caught.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT / "benchmarks" / "chaos_choreography.py"
MAIN = ROOT / "benchmarks" / "chaos.py"

pytestmark = pytest.mark.timeout(200)


def run(*args: str, script: Path = CHAOS) -> dict[str, Any]:
    cmd = [sys.executable, str(script), "--json", "--min-gap", "0.4", "--max-gap", "0.9", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output (exit {done.returncode}):\n{done.stderr[-3000:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    assert done.returncode == (0 if out["ok"] else 1), done.stderr[-3000:]
    return out


@pytest.mark.parametrize("style", ["choreography", "mixed"])
def test_killed_workers_lose_nothing_and_the_tracker_agrees(style: str) -> None:
    out = run("--style", style, "--sagas", "40", "--place-over", "3")
    [r] = out["runs"]
    assert r["kills"] >= 1, r
    assert out["ok"], r["invariants"]
    assert set(r["states"]) <= {"completed", "compensated"} and sum(r["states"].values()) == 40
    assert not r["unclean_exits"], r


def test_duplicated_sends_and_events_are_applied_once() -> None:
    """Through ``chaos.py --style``: copies really went out, none took effect twice."""
    out = run(
        "--style", "choreography", "--sagas", "30", "--place-over", "3", "--dup", "0.3", script=MAIN
    )
    [r] = out["runs"]
    # ~60 expected; without the events' copies (fan-out) only a handful of timers
    assert r["duplicates_sent"] >= 20, r["faults_injected"]
    assert r["double_applied"] == 0 and r["lost"] == 0, (r["double_detail"], r["lost_detail"])
    # every completed flow left one row per step and one for its finish, no more
    assert r["ledger_rows"] >= 7 * r["states"].get("completed", 0) > 0
    assert out["ok"], r["violated"]


def test_postgres_rabbitmq_cuts_drops_and_duplicates(postgres_url: str, rabbitmq_url: str) -> None:
    """The broker's connections closed, the workers' backends terminated, sends doubled."""
    out = run(
        *("--style", "choreography", "--sagas", "30", "--place-over", "4"),
        *("--store", postgres_url, "--transport", rabbitmq_url, "--dup", "0.2"),
        script=MAIN,
    )
    [r] = out["runs"]
    faults = r["faults_injected"]
    assert faults.get("broker_cut", 0) + faults.get("db_drop", 0) > 0, faults
    assert r["duplicates_sent"] > 0 and r["kills"] >= 1, faults
    assert r["double_applied"] == 0 and r["lost"] == 0, (r["double_detail"], r["lost_detail"])
    assert out["ok"] and not r["unclean_exits"], (r["violated"], r["unclean_exits"])


def test_the_ledger_catches_an_effect_committed_twice() -> None:
    """Negative control: workers write some ledger rows twice; the run must fail."""
    out = run(
        "--sagas",
        "15",
        "--place-over",
        "1",
        "--faults",
        "duplicate_delivery",
        "--self-test-double",
        "0.3",
    )
    [r] = out["runs"]
    assert r["double_applied"] > 0 and r["double_detail"], r
    assert not out["ok"]
