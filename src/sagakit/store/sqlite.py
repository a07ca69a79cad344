"""SQLite driver: one WAL-mode connection, transactions serialised in-process.

SQLite has a single writer, so one connection with an asyncio lock is both the
fastest and the simplest shape. Statements run on the event loop thread (they
take microseconds on a local file); waiting for another process's write lock is
done with ``asyncio.sleep``, never by blocking the loop. Other processes see
new messages by short adaptive polling.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from ..errors import StoreError, StoreUnavailable

_BUSY_RETRY_S = 0.002
_BUSY_GIVE_UP_S = 30.0


def _translate(exc: sqlite3.Error) -> StoreError:
    """A file locked by another process past our patience, or an I/O error, is an
    outage (waited out, never a message's fault); anything else is an error."""
    busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    if busy or "disk I/O" in str(exc):
        return StoreUnavailable(f"sqlite: {exc}", retryable=True)
    return StoreError(f"sqlite: {exc}", retryable=False)


class SqliteTx:
    """A transaction on the shared connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._callbacks: list[Callable[[], None]] = []
        self.queues: set[str] = set()
        self._sp = 0

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            return self._conn.execute(sql, args).rowcount
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def fetchone(self, sql: str, *args: Any) -> Any:
        try:
            return self._conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction: rolled back alone if the block raises."""
        self._sp += 1
        name = f"sp{self._sp}"
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        self._conn.execute(f"RELEASE {name}")

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def notify(self, queue: str) -> None:
        self.queues.add(queue)

    def committed(self, on_notify: Callable[[str], None] | None) -> None:
        for queue in self.queues:
            if on_notify is not None:
                on_notify(queue)
        for cb in self._callbacks:
            cb()


class SqliteDriver:
    """The embedded default store driver."""

    dialect: Literal["sqlite"] = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreError(f"invalid synchronous mode {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._on_notify: Callable[[str], None] | None = None

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("PRAGMA busy_timeout=20")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        conn.row_factory = sqlite3.Row
        self._conn = conn

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def listen(self, on_notify: Callable[[str], None], *, remote: bool = True) -> None:
        """Wake ``on_notify`` on commits in this process (other processes: by polling)."""
        self._on_notify = on_notify

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("store is closed")
            await self._begin(conn)
            tx = SqliteTx(conn)
            try:
                yield tx
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise _translate(exc) from exc
        tx.committed(self._on_notify)

    async def fetch_single(self, sql: str, *args: Any) -> list[Any]:
        """One statement in its own (serialised, busy-aware) transaction."""
        async with self.transaction() as tx:
            return await tx.fetchall(sql, *args)

    async def read(self, sql: str, *args: Any) -> list[Any]:
        """A read-only query without BEGIN IMMEDIATE: it takes no write lock.

        In WAL mode a reader never waits for a writer in another process; in
        this process it still waits its turn for the one connection.
        """
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("store is closed")
            try:
                return conn.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

    async def _begin(self, conn: sqlite3.Connection) -> None:
        waited = 0.0
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or waited > _BUSY_GIVE_UP_S:
                    raise _translate(exc) from exc
            await asyncio.sleep(_BUSY_RETRY_S)
            waited += _BUSY_RETRY_S
