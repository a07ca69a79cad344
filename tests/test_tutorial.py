"""The PostgreSQL + RabbitMQ tutorial page, run for real as written.

docs/tutorial/postgres-rabbitmq.md tells the reader to run ``sagakit db
migrate``, five ``sagakit worker`` processes and ``place_orders.py``. This
test runs those very commands, read from the page's ```sh blocks, with the
page's ``shop.py`` and ``place_orders.py``, on a PostgreSQL schema and a
RabbitMQ virtual host of its own (both removed afterwards), and compares the
output with the one the page shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.test_docs import DOCS, blocks_of, files_for
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures, imported for pytest

PAGE = DOCS / "tutorial" / "postgres-rabbitmq.md"
SH = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)
OUTPUT = re.compile(r"^python place_orders\.py\n```\n\n```text\n(.*?)^```", re.S | re.M)
BIN = Path(sys.executable).parent


def commands(prefix: str) -> list[list[str]]:
    """The page's shell lines that start with ``prefix``, as argv lists."""
    lines = [ln for block in SH.findall(PAGE.read_text()) for ln in block.splitlines()]
    found = [shlex.split(ln.removesuffix("&"), comments=True) for ln in lines]
    return [argv for argv in found if argv[: len(prefix.split())] == prefix.split()]


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = f"tutorial_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        yield name
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.close()


def test_the_page_runs_what_it_shows() -> None:
    assert len(commands("sagakit worker")) == 5
    assert commands("sagakit db migrate")
    assert OUTPUT.search(PAGE.read_text())


async def test_postgres_rabbitmq_tutorial(
    schema: str, postgres_url: str, amqp_url: str, tmp_path: Path
) -> None:
    place_orders = next(b for b in blocks_of(PAGE) if b.title == "place_orders.py")
    for name, code in files_for(place_orders).items():
        (tmp_path / name).write_text(code)
    sep = "&" if "?" in amqp_url else "?"
    env = {
        **os.environ,
        "PYTHONPATH": ".",
        "SAGAKIT_STORE": f"{postgres_url}?search_path={schema}&max_size=2",
        "SAGAKIT_TRANSPORT": f"{amqp_url}{sep}namespace={schema}",
    }
    migrate = commands("sagakit db migrate")[0]
    subprocess.run(_local(migrate), cwd=tmp_path, env=env, check=True, timeout=60)
    with _workers(commands("sagakit worker"), tmp_path, env):
        done = subprocess.run(
            [sys.executable, "place_orders.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    shown = OUTPUT.search(PAGE.read_text())
    assert shown is not None
    assert _lines(done.stdout) == _lines(shown[1])


@contextlib.contextmanager
def _workers(argvs: list[list[str]], cwd: Path, env: dict[str, str]) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    ready = [cwd / f"worker-{i}.ready" for i in range(len(argvs))]
    try:
        for argv, file in zip(argvs, ready, strict=True):
            procs.append(
                subprocess.Popen(
                    [*_local(argv), "--ready-file", str(file)],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=(cwd / f"{file.stem}.log").open("wb"),
                )
            )
        _wait_ready(procs, ready, cwd)
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_ready(procs: list[subprocess.Popen[bytes]], ready: list[Path], cwd: Path) -> None:
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in ready):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f.read_text() for f in sorted(cwd.glob("worker-*.log")))
            pytest.fail(f"a worker did not start:\n{logs}")
        time.sleep(0.1)


def _local(argv: list[str]) -> list[str]:
    """``sagakit ...`` as this environment's ``sagakit`` script."""
    return [str(BIN / argv[0]), *argv[1:]]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]
