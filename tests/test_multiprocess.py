"""The order-fulfillment demo split across processes: one ``sagakit worker``
per service plus two coordinator processes, on PostgreSQL with RabbitMQ or
NATS JetStream (and on SQLite files with the database transport), also when
one coordinator is SIGKILLed halfway.

Each test gets a database of its own on the PostgreSQL server (the services'
schemas have fixed names, so a private database is what keeps concurrent
runs apart), a private RabbitMQ virtual host (the approach of
tests/test_rabbitmq.py) or a private JetStream stream and subject prefix.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest

from sagakit.examples.order_fulfillment import demo
from sagakit.examples.order_fulfillment.cluster import Cluster
from tests.test_nats import delete_stream
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures

pytestmark = pytest.mark.timeout(90)


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    name = f"sagakit_mp_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(postgres_url, f"CREATE DATABASE {name}"))
    try:
        yield urlunparse(urlparse(postgres_url)._replace(path=f"/{name}"))
    finally:
        asyncio.run(_admin(postgres_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def nats_stream_url(nats_url: str) -> Iterator[str]:
    """``nats_url`` with a stream and subject prefix of this test's own."""
    tag = uuid.uuid4().hex[:8]
    stream = f"SAGAKIT_MP{tag.upper()}"
    yield f"{nats_url}?stream={stream}&prefix=sagakit-mp{tag}"
    asyncio.run(delete_stream(nats_url, stream))


def run_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> dict[str, Any]:
    code = demo.main(["--json", "--timeout", "45", "--log-dir", str(tmp_path / "logs"), *args])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0, _explain(out, tmp_path)
    return out


def _explain(out: dict[str, Any], tmp_path: Path) -> str:
    logs = {p.name: p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log"))}
    return json.dumps(out, indent=1) + "\n" + "\n".join(f"== {k}\n{v}" for k, v in logs.items())


def assert_healthy(out: dict[str, Any], orders: int, *, chaos: bool) -> None:
    assert out["orders"] == orders
    assert out["invariants"] and all(out["invariants"].values()), out["invariants"]
    assert out["as_planned"], out["outcomes"]
    assert out["pending"] == 0 and out["failed"] == 0
    names = set(Cluster.layout(1, 2))
    assert set(out["processes"]) == names
    assert len(set(out["processes"].values())) == len(names)  # separate processes
    assert out["workers_stopped_cleanly"], out["worker_exit_codes"]
    if chaos:
        c = out["chaos"]
        assert c["killed"] == "coordinator-1"
        assert c["restarted_pid"] not in (None, c["killed_pid"])
        assert out["processes"]["coordinator-1"] == c["restarted_pid"]
        assert 0 < c["finished_at_kill"] < orders


@pytest.mark.parametrize("chaos", [False, True], ids=["plain", "coordinator-sigkill"])
def test_postgres_rabbitmq(
    chaos: bool,
    pg_database: str,
    amqp_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orders = 100 if chaos else 60
    args = ["--orders", str(orders), "--processes", "1", "--store", pg_database]
    out = run_demo(
        capsys, tmp_path, *args, "--transport", amqp_url, *(["--chaos"] if chaos else [])
    )
    assert_healthy(out, orders, chaos=chaos)
    assert out["transport"].startswith("amqp://") and "guest:guest" not in out["transport"]


@pytest.mark.parametrize("chaos", [False, True], ids=["plain", "coordinator-sigkill"])
def test_postgres_nats(
    chaos: bool,
    pg_database: str,
    nats_stream_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orders = 100 if chaos else 60
    args = ["--orders", str(orders), "--processes", "1", "--store", pg_database]
    out = run_demo(
        capsys, tmp_path, *args, "--transport", nats_stream_url, *(["--chaos"] if chaos else [])
    )
    assert_healthy(out, orders, chaos=chaos)


def test_sqlite_files_database_transport(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No services needed: each service's SQLite file, the queues in the App's file."""
    store = f"sqlite:///{tmp_path}/sagakit.db"
    out = run_demo(capsys, tmp_path, "--orders", "40", "--processes", "1", "--store", store)
    assert_healthy(out, 40, chaos=False)


def test_bad_multiprocess_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--chaos"]) == 2
    assert demo.main(["--processes", "1", "--coordinators", "1", "--chaos"]) == 2
    assert demo.main(["--processes", "1", "--serve"]) == 2
    assert demo.main(["--processes", "-1"]) == 2
    assert "--chaos" in capsys.readouterr().err
