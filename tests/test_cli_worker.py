"""``sagakit worker`` as a real subprocess: loads a factory with --store, runs
the chosen services, does real work, stops gracefully on SIGTERM/SIGINT, and
refuses bad arguments with exit status 2."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagakit import cli
from sagakit.app import COORDINATOR
from sagakit.examples.order_fulfillment.app import build
from sagakit.examples.order_fulfillment.payments import CARD_OK
from tests.workers import cli_app

pytestmark = pytest.mark.timeout(60)

FACTORY = "sagakit.examples.order_fulfillment.worker:create"
ROOT = Path(__file__).parents[1]


def worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sagakit.cli", "worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_ready(proc: subprocess.Popen[str], ready: Path, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("worker not ready in time")
        time.sleep(0.05)
    assert int(ready.read_text()) == proc.pid


async def prepare(store: str) -> None:
    """Create the tables first, as the demo's Cluster does before it starts workers."""
    of = build(store, run=[])
    await of.start()
    await of.stop()


async def place_one(store: str) -> str:
    """From this process (which consumes nothing), seed and place one order."""
    of = build(store, run=[])
    await of.start()
    try:
        await of.customers.add_customer("c-1", "One", 1_000_000)
        await of.inventory.add_product("KB-01", "keyboard", 5)
        _, saga_id = await of.place_order(
            "c-1", [("KB-01", 1)], card_token=CARD_OK, address="1 Test Street"
        )
        view = await of.app.sagas.wait(saga_id, timeout=30)
        return view.state
    finally:
        await of.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_worker_runs_the_saga_and_stops_cleanly(sig: int, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/sagakit.db"
    asyncio.run(prepare(store))
    ready = tmp_path / "ready"
    # Store from the environment; every service and the coordinator in the one worker.
    proc = worker(
        "--app", FACTORY, "--lease", "2", "--ready-file", str(ready), env={"SAGAKIT_STORE": store}
    )
    try:
        wait_ready(proc, ready)
        assert asyncio.run(place_one(store)) == "completed"
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "sagakit worker ready" in out and "coordinator" in out


def test_worker_runs_only_its_services(tmp_path: Path) -> None:
    """A worker for 'shipping' alone: the saga cannot complete without the rest."""
    store = f"sqlite:///{tmp_path}/sagakit.db"
    asyncio.run(prepare(store))
    ready = tmp_path / "ready"
    proc = worker(
        "--app", FACTORY, "--store", store, "--service", "shipping", "--ready-file", str(ready)
    )
    try:
        wait_ready(proc, ready)

        async def try_order() -> str:
            of = build(store, run=[])
            await of.start()
            try:
                await of.customers.add_customer("c-1", "One", 1_000_000)
                _, saga_id = await of.place_order(
                    "c-1", [("KB-01", 1)], card_token=CARD_OK, address="x"
                )
                await asyncio.sleep(1.0)
                return (await of.app.sagas.get(saga_id)).state
            finally:
                await of.stop()

        assert asyncio.run(try_order()) == "running"  # nobody runs orders or the coordinator
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "services shipping" in out


async def prepare_cli_app(store: str) -> None:
    """Create the tables before the worker starts, as prepare() does for the demo."""
    async with cli_app.create(store, run=[]):
        pass


async def pay_and_reserve(store: str) -> tuple[str, str]:
    """Run one saga on each service, with the coordinator here: (pay, reserve) states."""
    async with cli_app.create(store, run=[COORDINATOR]) as app:
        pay_id = await app.sagas.start(cli_app.PAY, cli_app.Job("p"))
        reserve_id = await app.sagas.start(cli_app.RESERVE, cli_app.Job("r"))
        paid = await app.sagas.wait(pay_id, timeout=20)
        await asyncio.sleep(1.0)
        return paid.state, (await app.sagas.get(reserve_id)).state


@pytest.mark.parametrize("form", ["app", "create"], ids=["App object", "factory"])
def test_service_runs_only_that_service_in_both_forms(form: str, tmp_path: Path) -> None:
    """``--service payments`` on a ready-made App used to run every service."""
    store = f"sqlite:///{tmp_path}/sagakit.db"
    asyncio.run(prepare_cli_app(store))
    ready = tmp_path / "ready"
    env = {"SAGAKIT_STORE": store, "PYTHONPATH": str(ROOT)}
    app = f"tests.workers.cli_app:{form}"
    proc = worker("--app", app, "--service", "payments", "--ready-file", str(ready), env=env)
    try:
        wait_ready(proc, ready)
        assert asyncio.run(pay_and_reserve(store)) == ("completed", "running")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "services payments" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "nocolon"], "MODULE:APP"),
        (["--app", "no_such_module_xyz:app"], "cannot import"),
        (["--app", "sagakit.examples.order_fulfillment.worker:nope"], "no attribute"),
        (["--app", FACTORY], "needs a store"),
        (["--app", FACTORY, "--store", "sqlite:///:memory:", "--service", "nobody"], "unknown"),
        (["--app", "sagakit.examples.order_fulfillment.catalog:CATALOG"], "neither an App"),
    ],
)
def test_worker_refuses_bad_arguments(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SAGAKIT_STORE", raising=False)
    assert cli.main(["worker", *args]) == 2
    assert message in capsys.readouterr().err


def test_factory_options_are_passed_by_name() -> None:
    seen: dict[str, object] = {}

    class Fake:
        async def start(self) -> None: ...
        async def stop(self) -> None: ...

    def factory(store: str, transport: str = "database") -> Fake:
        seen.update(store=store, transport=transport)
        return Fake()

    mod = type(sys)("fake_worker_mod")
    mod.factory = factory  # type: ignore[attr-defined]
    sys.modules["fake_worker_mod"] = mod
    try:
        obj = cli._load_app("fake_worker_mod:factory", store="s://x", transport=None, run=None)
        assert isinstance(obj, Fake) and seen == {"store": "s://x", "transport": "database"}
        with pytest.raises(cli.ConfigurationError, match="settings"):
            cli._load_app("fake_worker_mod:factory", store="s://x", settings=object())
    finally:
        del sys.modules["fake_worker_mod"]
