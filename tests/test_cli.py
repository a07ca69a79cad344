"""The ``sagakit`` command's contract: every failure is one line on stderr
(``sagakit: error: ...``), exit 2 for usage or configuration, 1 for a runtime
failure, and a traceback only with ``-v``; plus ``--version``, the demo's
install hint, and the packaging that keeps the demo under ``sagakit``."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sagakit import __version__, cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).parents[1]


def sagakit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "sagakit.cli", *args],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=cwd,
        env=env,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sagakit: error: "), done.stderr
    return lines[0]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migrate_unreachable_postgres_is_one_line() -> None:
    done = sagakit("db", "migrate", "--store", f"postgresql://u:pw@127.0.0.1:{free_port()}/test")
    assert done.returncode == 1
    line = one_error_line(done)
    assert "cannot migrate" in line and "pw" not in line  # the password is redacted


def test_migrate_wrong_database_is_one_line(postgres_url: str) -> None:
    wrong = postgres_url.rsplit("/", 1)[0] + "/no_such_database_xyz"
    done = sagakit("db", "migrate", "--store", wrong)
    assert done.returncode == 1
    assert "no_such_database_xyz" in one_error_line(done)


def test_migrate_wrong_role_is_one_line(postgres_url: str) -> None:
    wrong = "postgresql://no_such_role_xyz@" + postgres_url.split("@", 1)[-1]
    done = sagakit("db", "migrate", "--store", wrong)
    assert done.returncode == 1
    assert "no_such_role_xyz" in one_error_line(done)


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_migrate_unwritable_sqlite_path_is_one_line(where: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "x.db" if where == "under-a-file" else tmp_path
    done = sagakit("db", "migrate", "--store", f"sqlite:///{path}")
    assert done.returncode == 1
    assert "cannot migrate" in one_error_line(done)


def test_migrate_bad_url_is_a_configuration_error() -> None:
    done = sagakit("db", "migrate", "--store", "bogus://x")
    assert done.returncode == 2
    assert "unsupported store URL" in one_error_line(done)


def test_verbose_adds_the_traceback() -> None:
    done = sagakit("-v", "db", "migrate", "--store", f"postgresql://127.0.0.1:{free_port()}/t")
    assert done.returncode == 1
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("sagakit: error: cannot migrate")


def test_migrate_works_and_reads_the_store_from_the_environment(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/s.db"
    env = {**os.environ, "SAGAKIT_STORE": store}
    done = subprocess.run(
        [sys.executable, "-m", "sagakit.cli", "db", "migrate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{store}: schema at version")


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["worker"], ["db"], ["db", "migrate", "--nope"], ["--nope", "demo"]],
)
def test_usage_errors_are_one_line_with_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sagakit: error: "), err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"sagakit {__version__}"


def test_migrate_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["db", "migrate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--store" in out and "--prefix" in out and "SAGAKIT_STORE" in out


def test_verbose_demo_runs(tmp_path: Path) -> None:
    """``sagakit -v demo`` used to crash with AttributeError."""
    store = f"sqlite:///{tmp_path}/sagakit.db"
    done = sagakit("-v", "demo", "--orders", "5", "--json", "--store", store, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["ok"] is True


def test_demo_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--orders", "many"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sagakit: error: "), err


def test_demo_without_its_extra_prints_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As after ``pip install sagakit`` without ``[demo]``: rich cannot be imported."""
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] + ["rich"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, cli.DEMO, raising=False)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install 'sagakit[demo]'" in err[0], err


def test_a_missing_driver_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pip install sagakit`` then a postgresql:// store: the hint, not a traceback."""
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "sagakit.store.postgres", raising=False)
    assert cli.main(["db", "migrate", "--store", "postgresql://u@127.0.0.1/t"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pip install 'sagakit[postgres]'" in err[0], err


def test_the_demo_lives_under_sagakit_only() -> None:
    """No top-level ``order_fulfillment`` package: the wheel ships ``sagakit`` alone."""
    assert importlib.util.find_spec("order_fulfillment") is None
    assert importlib.util.find_spec("sagakit.examples.order_fulfillment.demo") is not None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["src/sagakit"]


def test_extras_are_what_the_code_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "dashboard" not in extras  # no dashboard code yet
    demo = {req.split(">")[0].split("=")[0] for req in extras["demo"]}
    assert demo == set(cli.DEMO_EXTRA)


def test_the_installed_script_imports_an_app_beside_the_user(tmp_path: Path) -> None:
    """`sagakit check shop:app` in the directory holding shop.py, as a user types it
    (the console script, not `python -m`, which would add the directory itself)."""
    (tmp_path / "shop.py").write_text("import sagakit as sk\napp = sk.App('sqlite:///s.db')\n")
    script = Path(sys.executable).parent / "sagakit"
    env = {k: v for k, v in os.environ.items() if k not in ("SAGAKIT_STORE", "PYTHONPATH")}
    done = subprocess.run(
        [str(script), "check", "shop:app"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "shop:app: no problems" in done.stdout


def test_python_dash_m_sagakit_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sagakit", "--help"], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert "worker" in done.stdout
