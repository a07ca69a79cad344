"""Durable storage: a small driver protocol and the :class:`Store` above it.

A :class:`Driver` gives transactions over one database (SQLite or PostgreSQL)
and translates its errors into :mod:`sagakit.errors`. The :class:`Store` holds
sagakit's own tables (queue, inbox, dead letters, saga instances and their log)
as portable SQL over dumb records. Choose a backend by URL with
:func:`open_store`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

from ..clock import Clock, SystemClock
from ..errors import ConfigurationError
from ..transport._url import redact
from .core import DeadLetter, DeadLetterAction, InboxRow, LogEntry, SagaRecord, Store
from .queue import Queued, Waker, WorkQueue

Dialect = Literal["sqlite", "postgresql"]


class Tx(Protocol):
    """One open local transaction; handlers see it as ``ctx.db``.

    SQL uses ``?`` placeholders on every backend; values are always bound.
    """

    #: True where write transactions run one at a time (SQLite): no copy of a
    #: message can be handled alongside this transaction's
    serial: bool

    async def execute(self, sql: str, *args: Any) -> int: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, *args: Any) -> Any: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Any]: ...

    def savepoint(self) -> AbstractAsyncContextManager[None]: ...

    def on_commit(self, callback: Callable[[], None]) -> None: ...

    def notify(self, queue: str) -> None: ...

    #: savepoints open now (a write inside one may still be undone alone)
    depth: int

    def on_rollback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` if the transaction does not commit (after its rollback)."""

    async def later_returning(
        self, sql: str, column: str, *args: Any, got: Callable[[int], None]
    ) -> None:
        """:meth:`later` for an ``INSERT`` of one row whose ``column`` the caller needs:
        ``got`` gets it when the write is sent (before the next statement or the COMMIT)."""

    async def later(self, sql: str, *args: Any, check: Callable[[int], None] | None = None) -> None:
        """Run a write whose outcome nothing needs before the commit.

        For handlers too (``ctx.db.later``): a write whose row count the
        handler does not use costs no round trip of its own. The driver may
        hold it and send it with the transaction's other held writes in one
        round trip, before the next statement or the COMMIT;
        ``check`` gets its row count then and raises to abort the transaction.
        Held writes of one batch run as one statement, so two of them must not
        change the same row; a statement (``INSERT``/``UPDATE``/``DELETE``)
        without ``RETURNING``. A write with a ``check`` must change exactly one
        row when it passes: a transaction that is nothing but held writes may
        be sent as one autocommit statement, where the server enforces that
        (and ``check`` then raises the error).
        """

    def separate(self) -> None:
        """What is written from now on is another hop's, run in this transaction.

        Held writes (:meth:`later`) of one hop must not change the same row,
        but a hop cannot know what the hops run before it in the same
        transaction held (a saga's next step run inside the hop before it).
        After this call the driver keeps them apart: a later write that could
        read or change what an earlier hop's held writes touched runs after
        them, as it would in a transaction of its own.
        """

    def on_begin(self, step: Callable[[], Awaitable[None]] | None) -> bool:
        """Run ``step`` first if the transaction ever begins; False if that can't be promised.

        A driver that sends BEGIN only with the first statement that needs it
        (PostgreSQL) keeps ``step`` and runs it right after BEGIN, before that
        statement and before any write held so far; a transaction that ends
        as one autocommit batch never runs it. ``None`` takes a kept step
        back. Where the transaction has already begun, or always begins at
        once (SQLite), nothing is kept and the answer is False: the caller
        does the step itself, now.
        """

    async def peek(self, sql: str, *args: Any) -> Any:
        """Fetch one row for an optimistic decision; the transaction's writes re-check it.

        Before any other statement the driver may run it on its own, outside
        the transaction (no BEGIN, no lock): the caller must guard what it
        writes with what it read (a revision check), so a stale read fails
        the commit instead of winning.
        """


class Driver(Protocol):
    """A database connection (or pool) that runs transactions."""

    #: the store's own hop tables, exempt from keeping hops apart (:meth:`Tx.separate`)
    hop_tables: frozenset[str]

    @property
    def dialect(self) -> Dialect:
        """Which SQL dialect (read-only, so a driver may narrow it to one Literal)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...

    async def fetch_single(self, sql: str, *args: Any) -> list[Any]:
        """Run one statement as a transaction of its own (one round trip where possible)."""

    async def read(self, sql: str, *args: Any) -> list[Any]:
        """Run one read-only query outside any explicit transaction, taking no write lock."""

    async def listen(self, on_notify: Callable[[str], None], *, remote: bool = True) -> None:
        """Wake ``on_notify`` for this process's commits, and other processes' if ``remote``."""


def open_store(
    url: str, *, prefix: str = "sagakit_", clock: Clock | None = None, **options: Any
) -> Store:
    """A store for ``url``: ``sqlite:///path.db``, ``sqlite://:memory:``,
    ``memory://`` or ``postgresql://user@host:port/db``."""
    driver: Driver
    if url.startswith("memory:") or url in ("sqlite://", "sqlite://:memory:"):
        from .sqlite import SqliteDriver

        driver = SqliteDriver(":memory:", **options)
    elif url.startswith("sqlite:///"):
        from .sqlite import SqliteDriver

        driver = SqliteDriver(url[len("sqlite:///") :], **options)
    elif url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresDriver

        # Wake-ups are per table prefix, so apps sharing a database do not wake each other.
        driver = PostgresDriver(url, **{"channel": f"{prefix}wake", **options})
    else:
        raise ConfigurationError(f"unsupported store URL {redact(url)!r}")
    return Store(driver, prefix=prefix, clock=clock or SystemClock(), url=url)


__all__ = [
    "DeadLetter",
    "DeadLetterAction",
    "Dialect",
    "Driver",
    "InboxRow",
    "LogEntry",
    "Queued",
    "SagaRecord",
    "Store",
    "Tx",
    "Waker",
    "WorkQueue",
    "open_store",
]
