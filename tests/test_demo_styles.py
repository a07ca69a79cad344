"""``sagakit demo --style choreography|mixed``: same plan, same books, same JSON contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sagakit.examples.order_fulfillment import demo

KEYS = {"orders", "completed", "compensated", "failed", "pending", "elapsed_s", "sagas_per_s"}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = demo.main(["--json", *argv])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("style", ["choreography", "mixed"])
def test_style_on_the_embedded_default(
    style: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:///{tmp_path}/sagakit.db"
    code, result = _run(
        capsys, "--style", style, "--orders", "40", "--seed", "11", "--store", store
    )
    assert code == 0, result
    assert set(result) >= KEYS and result["style"] == style
    assert all(result["invariants"].values()) and result["as_planned"], result
    assert result["completed"] + result["compensated"] == 40
    assert result["pending"] == 0 and result["failed"] == 0


@pytest.mark.parametrize("style", ["choreography", "mixed"])
def test_style_on_postgres_and_rabbitmq(
    style: str, postgres_url: str, rabbitmq_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = _run(
        capsys,
        "--style",
        style,
        "--orders",
        "30",
        "--store",
        postgres_url,
        "--transport",
        rabbitmq_url,
    )
    assert code == 0, result
    assert all(result["invariants"].values()) and result["as_planned"], result


def test_a_style_refuses_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--style", "choreography", "--processes", "2"]) == 2
    assert "runs in one process" in capsys.readouterr().err
