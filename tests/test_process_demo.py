"""``sagakit demo --style process-manager`` on the embedded default and on PostgreSQL,
and the checkout example as it runs from the command line."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("rich")

from sagakit.examples import checkout
from sagakit.examples.order_fulfillment import demo
from sagakit.examples.order_fulfillment.process_manager import order_flow
from sagakit.process.check import problems

pytestmark = pytest.mark.timeout(240)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    code = demo.main(["--style", "process-manager", "--json", *argv])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, result
    return result  # type: ignore[no-any-return]


def _check(result: dict[str, object], orders: int) -> None:
    assert result["style"] == "process-manager"
    assert result["orders"] == orders and result["pending"] == 0 and result["failed"] == 0
    assert all(result["invariants"].values()), result  # type: ignore[attr-defined]
    assert result["as_planned"], result
    assert result["compensated"] and result["shipping_refusals"], result


def test_the_demo_driven_by_a_process_manager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _run(capsys, "--orders", "200", "--store", f"sqlite:///{tmp_path / 'sagakit.db'}")
    _check(result, 200)


@pytest.fixture
def fresh_database(postgres_url: str) -> Iterator[str]:
    """A database of its own, so the demo's tables never meet another run's."""
    import asyncpg  # type: ignore[import-untyped]

    name = f"pm_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_the_process_manager_demo_on_postgres(
    fresh_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _check(_run(capsys, "--orders", "200", "--store", fresh_database), 200)


def test_the_style_runs_in_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--style", "process-manager", "--processes", "2"]) == 2
    assert "one process" in capsys.readouterr().err


def test_the_order_flow_passes_the_definition_checks() -> None:
    assert problems([order_flow]) == []


def test_the_checkout_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(checkout.main())
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("o-1: paid ")
    assert out[1].startswith("o-2: paid       2 method(s)")
    assert out[2].startswith("o-3: failed ")
    assert out[3].startswith("o-4: cancelled") and "no payment within 0.5s" in out[3]
    assert out[4] == "charged ['o-1', 'o-2', 'o-4'] refunded ['o-4']"
