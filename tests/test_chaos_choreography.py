"""Choreographed and mixed demo under SIGKILL (benchmarks/chaos_choreography.py).

The six services, the tracker (and for the mixed style a coordinator) run as
worker processes; while orders are in flight random workers are SIGKILLed and
restarted, so handlers die mid-transaction and their messages come back after
the lease. Every flow must finish, the books balance (nothing lost or applied
twice) and the tracker's verdicts agree with the books.
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

pytestmark = pytest.mark.timeout(200)


def run(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, str(CHAOS), "--json", "--min-gap", "0.4", "--max-gap", "0.9", *args]
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
