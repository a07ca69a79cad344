"""Shared helpers for the benchmark scripts: URLs, scratch databases, counting
commits, statistics, memory, and printing tables.

Nothing here is imported by sagakit itself; the scripts put this directory on
``sys.path`` by being run as ``python benchmarks/<script>.py``.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse, urlunparse

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


# -- PostgreSQL -----------------------------------------------------------------


def pg_url() -> str:
    """The server to benchmark against (env overrides the loopback default)."""
    return os.environ.get(
        "SAGAKIT_BENCH_POSTGRES_URL", os.environ.get("SAGAKIT_TEST_POSTGRES_URL", DEFAULT_PG_URL)
    )


def reachable(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=1):
            return True
    except OSError:
        return False


def sagakit_postgres() -> str | None:
    """None if sagakit can use PostgreSQL here, else the reason it cannot."""
    try:
        import asyncpg  # noqa: F401

        from sagakit.store import postgres  # noqa: F401
    except ImportError as exc:
        return f"sagakit PostgreSQL store not available ({exc})"
    return None


def with_database(url: str, dbname: str) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(path="/" + dbname))


def database_of(url: str) -> str:
    return urlparse(url).path.lstrip("/") or "postgres"


async def _admin(url: str, *sql: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        out = []
        for stmt in sql:
            out.append(await conn.fetch(stmt))
        return out
    finally:
        await conn.close()


def admin(url: str, *sql: str) -> list[Any]:
    """Run statements on a short-lived connection (outside any event loop)."""
    import asyncio

    return asyncio.run(_admin(url, *sql))


class ScratchDatabase:
    """A database of our own on the server, so ``xact_commit`` counts only our work.

    ``pg_stat_database.xact_commit`` is per database; other people's tests on
    the same server would otherwise be counted too. If the role may not create
    databases, the given database is used and commit counts are marked shared.
    """

    def __init__(self, base_url: str, suffix: str = "") -> None:
        self.base_url = base_url
        self.name = f"sagakit_bench_{os.getpid()}{suffix}"
        self.url = with_database(base_url, self.name)
        self.private = False

    def __enter__(self) -> ScratchDatabase:
        try:
            admin(self.base_url, f"DROP DATABASE IF EXISTS {self.name}")
            admin(self.base_url, f"CREATE DATABASE {self.name}")
            self.private = True
        except Exception as exc:
            print(f"note: cannot create a scratch database ({exc}); counting on the shared one")
            self.url, self.name = self.base_url, database_of(self.base_url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.private:
            admin(self.base_url, f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")

    def xact_commit(self) -> int:
        """Committed transactions so far in the database, once its backends are gone.

        Backends report their counters when they exit (or after seconds of
        idleness), so wait until nobody is connected to the database; the
        query runs from the base database so it does not count itself.
        """
        deadline = time.monotonic() + 10
        while True:
            (rows,) = admin(
                self.base_url,
                "SELECT xact_commit, (SELECT count(*) FROM pg_stat_activity WHERE datname = "
                f"'{self.name}') FROM pg_stat_database WHERE datname = '{self.name}'",
            )
            commits, connected = int(rows[0][0]), int(rows[0][1])
            if connected == 0 or not self.private or time.monotonic() > deadline:
                return commits
            time.sleep(0.05)


async def drop_prefixed_tables(url: str, prefix: str) -> None:
    """Drop every table whose name starts with ``prefix`` (bench clean-up)."""
    (rows,) = await _admin(
        url,
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        f"AND tablename LIKE '{prefix.replace('_', chr(92) + '_')}%'",
    )
    names = [r[0] for r in rows]
    if names:
        await _admin(url, "DROP TABLE IF EXISTS " + ", ".join(names) + " CASCADE")


# -- SQLite commit counting ----------------------------------------------------


class CommitCounter:
    """Counts committed *write* transactions of every sqlite3 connection in the process.

    Installed by wrapping ``sqlite3.connect`` so that every connection (sagakit's,
    SQLAlchemy's inside DBOS, the hand-written saga's) is a subclass that looks
    at ``in_transaction`` and ``total_changes`` around each statement: a
    transaction that ends by COMMIT after changing rows counts once, as does a
    row-changing statement run outside a transaction (autocommit). Read-only
    transactions and rollbacks write nothing to the WAL and are not counted.
    """

    count = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls.installed = True
        real_connect = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            kwargs.setdefault("factory", _CountingConnection)
            return real_connect(*args, **kwargs)

        sqlite3.connect = connect  # type: ignore[assignment]
        sqlite3.dbapi2.connect = connect  # type: ignore[assignment]  # SQLAlchemy uses this one


def _after(conn: Any, was_tx: bool, changes: int, sql: str | None) -> None:
    """After a statement: count a commit when a transaction that changed rows ended.

    ``total_changes`` is compared with its value when the connection was last
    outside a transaction: statements with RETURNING count their changes only
    once their rows are fetched, so the end of the transaction is the moment
    to look, not each statement.
    """
    if conn.in_transaction:
        return
    if conn.total_changes != conn._sk_base:
        rollback = sql is not None and sql.lstrip()[:8].upper().startswith("ROLLBACK")
        if not rollback:
            CommitCounter.count += 1
    conn._sk_base = conn.total_changes


class _CountingCursor(sqlite3.Cursor):
    def execute(self, sql: str, *args: Any) -> Any:  # type: ignore[override]
        conn = self.connection
        was, changes = conn.in_transaction, conn.total_changes
        try:
            return super().execute(sql, *args)
        finally:
            _after(conn, was, changes, sql)

    def executemany(self, sql: str, *args: Any) -> Any:  # type: ignore[override]
        conn = self.connection
        was, changes = conn.in_transaction, conn.total_changes
        try:
            return super().executemany(sql, *args)
        finally:
            _after(conn, was, changes, sql)


class _CountingConnection(sqlite3.Connection):
    _sk_base = 0

    def cursor(self, factory: Any = _CountingCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql: str, *args: Any) -> Any:  # type: ignore[override]
        was, changes = self.in_transaction, self.total_changes
        try:
            return super().execute(sql, *args)
        finally:
            _after(self, was, changes, sql)

    def executemany(self, sql: str, *args: Any) -> Any:  # type: ignore[override]
        was, changes = self.in_transaction, self.total_changes
        try:
            return super().executemany(sql, *args)
        finally:
            _after(self, was, changes, sql)

    def commit(self) -> None:
        was, changes = self.in_transaction, self.total_changes
        super().commit()
        _after(self, was, changes, None)

    def rollback(self) -> None:
        super().rollback()
        self._sk_base = self.total_changes


# -- PostgreSQL round-trip counting ----------------------------------------------


class RoundTripCounter:
    """Counts the statements every asyncpg connection in the process sends, client-side.

    The shared server has no ``pg_stat_statements`` (it needs
    ``shared_preload_libraries``), so the count is taken where the statements
    leave: ``execute``, ``executemany``, ``fetch``, ``fetchrow`` and
    ``fetchval`` of :class:`asyncpg.Connection` are wrapped and counted, one
    each (a call is one round trip: asyncpg sends ``executemany``'s rows as
    one pipelined batch). BEGIN, COMMIT and LISTEN health probes count like
    any statement; a pool's own connection set-up does not.
    """

    count = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        import asyncpg

        cls.installed = True
        for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
            setattr(asyncpg.Connection, name, _counted(getattr(asyncpg.Connection, name)))


def _counted(method: Any) -> Any:
    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        RoundTripCounter.count += 1
        return await method(self, *args, **kwargs)

    return counted


# -- numbers ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on sorted values; nan if empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a process so far, in MiB (``VmHWM``).

    Not ``ru_maxrss``: Linux carries that over from the parent across fork and
    exec, so a child would report at least its parent's peak.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else 0.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def hardware() -> dict[str, str]:
    """nproc, memory, CPU model and load, for the record."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout
        total = mem.splitlines()[1].split()[1]
    except (OSError, IndexError):
        total = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpus": str(os.cpu_count()),
        "memory": total,
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load": load,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# -- output ----------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table with rich if installed, else aligned plain text."""
    cells = [[fmt(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
        for r in cells:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for r in cells:
        table.add_row(*r)
    Console(width=200).print(table)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    numeric = [
        all(isinstance(r[i], int | float) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]
    out = [
        "| " + " | ".join(headers) + " |",
        "|" + "".join("---:|" if n else "---|" for n in numeric),
    ]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)
