"""SQLite driver: one WAL-mode connection, transactions serialised in-process.

SQLite has a single writer, so one connection with an asyncio lock is both the
fastest and the simplest shape. Statements run on the event loop thread (they
take microseconds on a local file); waiting for another process's write lock is
done with ``asyncio.sleep``, never by blocking the loop. Other processes see
new messages by short adaptive polling.

Group commit: the write transaction's BEGIN IMMEDIATE and COMMIT cost more
than a hop's statements, so transactions that queue up behind each other
share one. Each caller's transaction after the first runs in a savepoint of
the shared one (a caller that raises rolls back alone; the first, with
nobody else in it yet, rolls the whole transaction back); the last caller in line — or the
:data:`GROUP_MAX`-th — commits for everyone. Nobody's ``async with`` returns
before that COMMIT, so a transaction is durable when its block ends, exactly
as before; commit callbacks and wake-ups run after it. A lone transaction
commits at once: grouping only happens when callers are already waiting, so
it adds no latency. Reads (:meth:`SqliteDriver.read`) commit an open group
first, so they never see another caller's writes before they are durable.
The price: a transaction that holds the connection for long (a handler
waiting on something slow inside it) also holds back the COMMIT of the few
that ran just before it in its group; it already held back every other
transaction of the process, since there is one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from ..errors import StoreError, StoreUnavailable
from .held import check_held

log = logging.getLogger("sagakit.store.sqlite")

_BUSY_RETRY_S = 0.002
_BUSY_GIVE_UP_S = 30.0
GROUP_MAX = 64  #: transactions committed together at most (bounds latency and the WAL)
_MEMBER = "sagakit_member"


def _translate(exc: sqlite3.Error) -> StoreError:
    """A file locked by another process past our patience, or an I/O error, is an
    outage (waited out, never a message's fault); anything else is an error."""
    busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    if busy or "disk I/O" in str(exc):
        return StoreUnavailable(f"sqlite: {exc}", retryable=True)
    return StoreError(f"sqlite: {exc}", retryable=False)


class SqliteTx:
    """A transaction on the shared connection."""

    serial = True  # one writer at a time

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._callbacks: list[Callable[[], None]] = []
        self._undos: list[Callable[[], None]] = []
        self.queues: set[str] = set()
        self._sp = 0
        #: savepoints open now
        self.depth = 0

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

    def separate(self) -> None:
        """Nothing to do: each statement runs when it is made (see :meth:`Tx.separate`)."""

    def on_begin(self, step: Callable[[], Awaitable[None]] | None) -> bool:
        """Always False: the transaction is open from the start (see :meth:`Tx.on_begin`)."""
        return False

    async def peek(self, sql: str, *args: Any) -> Any:
        """Inside the transaction like any read: it costs no round trip here."""
        return await self.fetchone(sql, *args)

    async def later(self, sql: str, *args: Any, check: Callable[[int], None] | None = None) -> None:
        """SQLite statements cost no round trip: run it now."""
        check_held(sql)
        n = await self.execute(sql, *args)
        if check is not None:
            check(n)

    async def later_returning(
        self, sql: str, column: str, *args: Any, got: Callable[[int], None]
    ) -> None:
        """An ``INSERT`` of one row, now; ``got`` gets its ``column``."""
        row = await self.fetchone(f"{sql} RETURNING {column}", *args)
        got(row[0])

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction: rolled back alone if the block raises."""
        self._sp += 1
        name = f"sp{self._sp}"
        self._conn.execute(f"SAVEPOINT {name}")
        self.depth += 1
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        finally:
            self.depth -= 1
        self._conn.execute(f"RELEASE {name}")

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def notify(self, queue: str) -> None:
        self.queues.add(queue)

    def on_rollback(self, callback: Callable[[], None]) -> None:
        self._undos.append(callback)

    def committed(self, on_notify: Callable[[str], None] | None) -> None:
        for queue in self.queues:
            if on_notify is not None:
                on_notify(queue)
        for cb in self._callbacks:
            cb()

    def rolled_back(self) -> None:
        undos, self._undos = self._undos, []
        for cb in undos:
            cb()


class _Group:
    """One shared write transaction: its members' transactions and their commit."""

    __slots__ = ("done", "txs")

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.txs: list[SqliteTx] = []


class SqliteDriver:
    """The embedded default store driver."""

    dialect: Literal["sqlite"] = "sqlite"
    hop_tables: frozenset[str] = frozenset()  # statements run when made: nothing to keep apart

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreError(f"invalid synchronous mode {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._on_notify: Callable[[str], None] | None = None
        self._group: _Group | None = None
        self._waiting = 0  # callers queued for the connection
        self._flushes: set[asyncio.Task[None]] = set()
        #: write transactions committed and callers' transactions in them (group commit)
        self.commits = 0
        self.grouped = 0

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
        async with self._queued():
            self._commit_group()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def listen(self, on_notify: Callable[[str], None], *, remote: bool = True) -> None:
        """Wake ``on_notify`` on commits in this process (other processes: by polling)."""
        self._on_notify = on_notify

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """A caller's transaction, a member of the open group (group commit).

        A member that fails is rolled back alone: to its savepoint, or, for
        the group's first member (nothing else in it yet), with the whole
        transaction, so the first needs no savepoint and a caller alone (one
        in flight) sends no SAVEPOINT or RELEASE.
        """
        async with self._queued():
            conn = self._connection()
            group = self._group
            first = group is None
            if group is None:
                await self._begin(conn)
                group = self._group = _Group()
            else:
                self._savepoint(conn, group)
            tx = SqliteTx(conn)
            try:
                yield tx
                if not first:
                    _run(conn, f"RELEASE {_MEMBER}")  # fails if SQLite ended it all
                elif not conn.in_transaction:
                    raise StoreError(
                        "sqlite: the transaction was rolled back by SQLite", retryable=False
                    )
            except BaseException:
                self._undo(conn, group, first)
                tx.rolled_back()
                raise
            group.txs.append(tx)
            await self._gather(group)
        await asyncio.shield(group.done)  # durable before the block returns

    def _savepoint(self, conn: sqlite3.Connection, group: _Group) -> None:
        try:
            _run(conn, f"SAVEPOINT {_MEMBER}")
        except StoreError:
            self._settle(group)  # never leave a group nobody will end
            raise

    def _undo(self, conn: sqlite3.Connection, group: _Group, first: bool) -> None:
        """Roll one caller's transaction back alone, keeping the group's others
        (the first caller's: the whole transaction, which nobody else has joined)."""
        if first:  # nobody else joined yet: the group, empty, ends with it
            self._commit_group()
            return
        try:
            conn.execute(f"ROLLBACK TO {_MEMBER}")
            conn.execute(f"RELEASE {_MEMBER}")
        except sqlite3.Error as exc:
            if not conn.in_transaction:  # SQLite ended the whole transaction itself
                self._lose_group(exc)
                return
        self._settle(group)

    def _lose_group(self, exc: sqlite3.Error) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.done.set_exception(_translate(exc))
            group.done.exception()
            _rolled_back(group)

    async def _gather(self, group: _Group) -> None:
        """Let callers that are ready to run queue up for the group, then settle it.

        SQLite statements never suspend, so nobody else runs while a transaction
        is open; one turn of the event loop lets the handlers that are ready
        reach the connection and join.
        """
        if self._waiting == 0 and len(group.txs) < GROUP_MAX:
            try:
                await asyncio.sleep(0)
            except BaseException:
                self._commit_group()  # our writes are in it: never leave it unowned
                raise
        self._settle(group)

    def _settle(self, group: _Group) -> None:
        """Commit the group now unless another caller waits to join it."""
        if self._waiting == 0 or len(group.txs) >= GROUP_MAX:
            self._commit_group()

    def _commit_group(self) -> None:
        group, self._group = self._group, None
        if group is None or self._conn is None:
            return
        conn = self._conn
        if not group.txs:
            _quiet_rollback(conn)
            group.done.set_result(None)
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _quiet_rollback(conn)
            group.done.set_exception(_translate(exc))
            group.done.exception()  # retrieved: a caller may have been cancelled meanwhile
            _rolled_back(group)
            return
        self.commits += 1
        self.grouped += len(group.txs)
        group.done.set_result(None)
        for tx in group.txs:  # in the order the transactions ran
            try:
                tx.committed(self._on_notify)
            except Exception:  # one caller's callback must not cost the others theirs
                log.exception("commit callback failed")

    @asynccontextmanager
    async def _queued(self) -> AsyncIterator[None]:
        """Hold the connection; while queued, count as a caller the group waits for."""
        self._waiting += 1
        try:
            await self._lock.acquire()
        except BaseException:
            self._waiting -= 1
            self._flush_later()  # the group may have been left open for us
            raise
        self._waiting -= 1
        try:
            yield
        finally:
            self._lock.release()

    def _flush_later(self) -> None:
        """A caller gave up its place: commit an open group nobody else will."""
        if self._group is None or self._waiting or self._lock.locked():
            return
        task = asyncio.ensure_future(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        async with self._queued():
            if self._waiting == 0:
                self._commit_group()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    async def fetch_single(self, sql: str, *args: Any) -> list[Any]:
        """One statement in its own (serialised, busy-aware) transaction."""
        async with self.transaction() as tx:
            return await tx.fetchall(sql, *args)

    async def read(self, sql: str, *args: Any) -> list[Any]:
        """A read-only query without BEGIN IMMEDIATE: it takes no write lock.

        In WAL mode a reader never waits for a writer in another process; in
        this process it still waits its turn for the one connection, and an
        open group is committed first (a read sees only durable writes).
        """
        async with self._queued():
            conn = self._connection()
            self._commit_group()
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


def _rolled_back(group: _Group) -> None:
    for tx in group.txs:
        try:
            tx.rolled_back()
        except Exception:
            log.exception("rollback callback failed")


def _run(conn: sqlite3.Connection, sql: str) -> None:
    try:
        conn.execute(sql)
    except sqlite3.Error as exc:
        raise _translate(exc) from exc


def _quiet_rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")
