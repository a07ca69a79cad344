"""A throwaway PostgreSQL cluster with prepared transactions enabled.

The shared server usually runs with ``max_prepared_transactions = 0``, which
can only change with a restart; two-phase commit tests, the onboarding example
and ``benchmarks/twophase.py`` start a cluster of their own instead::

    with PgCluster() as cluster:              # initdb + pg_ctl start, in a temp dir
        url = cluster.create_database("customers")
        ...                                   # stopped and removed on exit

The binaries come from ``$SAGAKIT_PG_BIN`` or the newest
``/usr/lib/postgresql/*/bin``. Running as root, the cluster is owned by the
``postgres`` system user (PostgreSQL refuses to run as root). It listens on a
free loopback port and keeps its socket in its own directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError


@dataclass
class PgCluster:
    """One private PostgreSQL cluster; a context manager (``start``/``stop``)."""

    max_prepared_transactions: int = 64
    max_connections: int = 80
    fsync: bool = False
    user: str = "postgres"
    #: more server settings, e.g. {"track_commit_timestamp": "on"}
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    datadir: Path = field(default_factory=lambda: Path())
    _tmp: str = ""
    _bin: Path = field(default_factory=lambda: Path())
    _owner: pwd.struct_passwd | None = None

    def start(self) -> PgCluster:
        self._bin = pg_bin()
        self._owner = _run_as()
        self._tmp = tempfile.mkdtemp(prefix="sagakit-pg-")
        self.datadir = Path(self._tmp) / "data"
        self.port = self.port or free_port()
        if self._owner is not None:
            os.chown(self._tmp, self._owner.pw_uid, self._owner.pw_gid)
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", self.user, "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "-t", "60", "-l", self.log, "-o",
                  " ".join(self._server_options()), "start")  # fmt: skip
        return self

    def stop(self) -> None:
        if self._tmp and self.datadir.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log(self) -> str:
        return str(Path(self._tmp) / "server.log")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing); its URL."""
        self.psql("postgres", f'CREATE DATABASE "{name}"', check=False)
        return self.url(name)

    def psql(self, database: str, sql: str, *, check: bool = True) -> str:
        """Run ``sql`` through psql; its unaligned output."""
        out = self._run(
            "psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
            "-d", database, "-c", sql, check=check,
        )  # fmt: skip
        return out

    def _server_options(self) -> list[str]:
        return [
            f"-p {self.port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self._tmp}",
            f"-c max_prepared_transactions={self.max_prepared_transactions}",
            f"-c max_connections={self.max_connections}",
            f"-c fsync={'on' if self.fsync else 'off'}",
            "-c shared_buffers=32MB",
            *(f"-c {k}={v}" for k, v in self.settings.items()),
        ]

    def _run(self, tool: str, *args: str, check: bool = True) -> str:
        cmd = [str(self._bin / tool), *args]
        kw: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 120}
        if self._owner is not None:
            owner = self._owner
            kw["user"], kw["group"], kw["extra_groups"] = owner.pw_uid, owner.pw_gid, []
            kw["cwd"] = self._tmp
            kw["env"] = {**os.environ, "HOME": self._tmp}
        done = subprocess.run(cmd, check=False, **kw)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return str(done.stdout)


def pg_bin() -> Path:
    """Where initdb and pg_ctl are: ``$SAGAKIT_PG_BIN`` or the newest installed version."""
    if env := os.environ.get("SAGAKIT_PG_BIN"):
        return Path(env)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version)
    if not found:
        raise ConfigurationError(
            "no PostgreSQL server binaries (initdb): apt-get install postgresql, "
            "or set SAGAKIT_PG_BIN"
        )
    return found[-1].parent


def _version(path: Path) -> float:
    try:
        return float(path.parent.parent.name)
    except ValueError:
        return 0.0


def _run_as() -> pwd.struct_passwd | None:
    """The user to run the server as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigurationError("running as root needs a 'postgres' system user") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
