"""The Store: sagakit's tables as portable SQL over a driver.

Records are plain frozen dataclasses; serialisation happens above this layer.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..errors import (
    ConcurrencyConflict,
    ConfigurationError,
    OutcomeExists,
    SagaIdInUse,
    SagaNotFound,
    StoreError,
)
from .queue import WorkQueue
from .schema import SCHEMA_VERSION, check_prefix, oldest_compatible, statements

if TYPE_CHECKING:
    from . import Driver, Tx

log = logging.getLogger("sagakit.store")

DEAD_LETTER_KEEP = 64 * 1024  #: bytes of a dead-lettered message kept (the rest: size, hash)


#: the states of a saga that has not reached an outcome yet (SQL list)
UNFINISHED_SQL = "('running', 'compensating')"


@dataclass(frozen=True, slots=True)
class InboxRow:
    """What a consumer recorded for a message key it already handled."""

    outcome: str
    reply: bytes | None
    destination: str | None
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be processed, with the reason."""

    seq: int
    id: str | None
    queue: str
    data: bytes
    reason: str
    error_type: str
    saga_id: str | None
    created_at: float
    #: where a message the relay could not publish was going, and its kind
    destination: str | None = None
    kind: str | None = None
    #: the message's size before it was cut to a bounded prefix (None: not recorded)
    size: int | None = None

    @property
    def truncated(self) -> bool:
        """Only a prefix was kept: the bytes are not the message any more."""
        if self.size is not None:
            return self.size > len(self.data)
        return "kept]" in self.reason  # recorded before sizes were (schema 2)


@dataclass(frozen=True, slots=True)
class DeadLetterAction:
    """An operator's replay or purge of one dead letter: what, who, why."""

    at: float
    action: str
    dead_letter: int
    message_id: str | None
    queue: str
    actor: str
    role: str
    via: str
    reason: str


@dataclass(slots=True)
class SagaRecord:
    """A saga instance row; ``data`` and ``progress`` are JSON bytes."""

    id: str
    type: str
    version: int
    state: str
    data: bytes
    progress: bytes
    rev: int
    created_at: float
    updated_at: float
    deadline: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of a saga's history."""

    saga_id: str
    at: float
    entry: str
    step: str | None = None
    message_id: str | None = None
    detail: str | None = None


#: tables a hop writes whose held writes may share a batch across hops: each row is
#: written once per transaction (an inbox key, the instance, a new message or log
#: line) or is an existing row deleted by its key (an acknowledgement)
HOP_TABLES = ("messages", "inbox", "sagas", "saga_log", "failures")


class Store:
    """sagakit's durable state in one database."""

    def __init__(self, driver: Driver, *, prefix: str, clock: Clock, url: str = "") -> None:
        self.driver = driver
        self.prefix = check_prefix(prefix)
        self.clock = clock
        self.url = url
        self._opened = False
        self._lock_row = " FOR UPDATE" if driver.dialect == "postgresql" else ""
        # the hop's own rows: composed into one batch by design (see Tx.separate)
        driver.hop_tables = frozenset(f"{self.prefix}{t}" for t in HOP_TABLES)
        self.queue = WorkQueue(self)

    @property
    def dialect(self) -> str:
        return self.driver.dialect

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A new local transaction on this store's database."""
        return self.driver.transaction()

    # -- lifecycle ---------------------------------------------------------

    async def open(self, *, migrate: bool = True, listen: bool = True) -> None:
        """Connect, apply pending migrations if asked, start listening for wake-ups.

        ``listen=False`` spends no connection on other processes' wake-ups (a
        store whose queues only this process's own commits feed).
        """
        if self._opened:
            return
        await self.driver.open()
        self._opened = True
        if migrate:
            await self.migrate()
        else:
            await self._check_schema()
        await self.driver.listen(self.queue.waker.wake, remote=listen)
        self.queue.waker.complete = listen and self.dialect == "postgresql"

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.driver.close()

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def migrate(self) -> int:
        """Apply every migration newer than the database's; return the version.

        A database already at this release's version is only read: a worker
        whose role may not create tables starts with ``auto_migrate`` on.
        """
        current = await self._current_or_none()
        if current is not None and current >= SCHEMA_VERSION:
            return current
        p = self.prefix
        async with self.transaction() as tx:
            if self.dialect == "postgresql":  # one migrator at a time, before any DDL
                await tx.execute("SELECT pg_advisory_xact_lock(?)", _lock_key(p))
            for table, column in (("schema", "version"), ("schema_floor", "oldest")):
                ddl = f"CREATE TABLE IF NOT EXISTS {p}{table} ({column} INTEGER NOT NULL)"
                await tx.execute(ddl)
            current, floor = await self._versions(tx)
            _refuse_newer(current, floor, self.prefix)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in statements(self.dialect, p, version):
                    await tx.execute(stmt)
                await tx.execute(f"INSERT INTO {p}schema (version) VALUES (?)", version)
            if current < SCHEMA_VERSION:
                await tx.execute(f"DELETE FROM {p}schema_floor")
                oldest = oldest_compatible(SCHEMA_VERSION)
                await tx.execute(f"INSERT INTO {p}schema_floor (oldest) VALUES (?)", oldest)
        return max(current, SCHEMA_VERSION)

    async def _versions(self, tx: Tx) -> tuple[int, int]:
        """The database's schema version and the oldest code version it admits."""
        row = await tx.fetchone(f"SELECT max(version) FROM {self.prefix}schema")
        floor = await tx.fetchone(f"SELECT max(oldest) FROM {self.prefix}schema_floor")
        current = int(row[0] or 0)
        # a database migrated before floors were recorded admits only its own version
        return current, int(floor[0] or current)

    async def _check_schema(self) -> None:
        await self._current_or_none()  # not migrated yet: the first statement will say so

    async def _current_or_none(self) -> int | None:
        """The schema version, after refusing one this code is too old for;
        None before the schema tables exist."""
        try:
            async with self.transaction() as tx:
                current, floor = await self._versions(tx)
        except StoreError:
            return None
        _refuse_newer(current, floor, self.prefix)
        return current

    async def schema_version(self) -> int:
        """The schema version of the database (0 before the first migration)."""
        try:
            async with self.transaction() as tx:
                row = await tx.fetchone(f"SELECT max(version) FROM {self.prefix}schema")
        except StoreError:
            return 0  # no schema table yet
        return int(row[0] or 0)

    # -- inbox -------------------------------------------------------------

    async def inbox_admit(
        self, tx: Tx, consumer: str, key: str, attempt: int, saga_id: str | None = None
    ) -> InboxRow:
        """Claim ``key`` for a handler run, or return what is stored under it.

        One statement that also serialises copies: a new key is inserted as
        ``running`` (a concurrent copy's insert waits on it until this
        transaction ends); an existing row is locked by the no-op update. A
        returned ``running`` row is ours: a committed row is never ``running``.
        ``saga_id`` ties the row to its saga, so retention keeps it while the
        saga is unfinished.
        """
        row = await tx.fetchone(
            f"INSERT INTO {self.prefix}inbox (consumer, key, outcome, attempt, created_at, "
            "saga_id) VALUES (?, ?, 'running', ?, ?, ?) ON CONFLICT (consumer, key) DO UPDATE "
            "SET consumer = excluded.consumer RETURNING outcome, reply, destination, attempt",
            consumer,
            key,
            attempt,
            self.clock.now(),
            saga_id,
        )
        return InboxRow(row[0], bytes(row[1]) if row[1] is not None else None, row[2], row[3])

    async def inbox_admit_barring(
        self, tx: Tx, consumer: str, key: str, bar: str, attempt: int, saga_id: str | None
    ) -> tuple[InboxRow, str]:
        """:meth:`inbox_admit` of ``key`` then :meth:`inbox_bar` of ``bar``, as one statement.

        A compensation's admission and its barrier in one round trip on
        PostgreSQL: the bar's insert reads the admission's row, so the two keys
        are always locked in that order (admission first) and copies cannot
        deadlock. Elsewhere, the two statements one after the other.
        """
        if self.dialect != "postgresql":
            row = await self.inbox_admit(tx, consumer, key, attempt, saga_id)
            return row, await self.inbox_bar(tx, consumer, bar, attempt, saga_id)
        p, now = self.prefix, self.clock.now()
        got = await tx.fetchone(
            f"WITH a AS (INSERT INTO {p}inbox (consumer, key, outcome, attempt, created_at, "
            "saga_id) VALUES (?, ?, 'running', ?, ?, ?) ON CONFLICT (consumer, key) DO UPDATE "
            "SET consumer = excluded.consumer RETURNING outcome, reply, destination, attempt), "
            f"b AS (INSERT INTO {p}inbox (consumer, key, outcome, attempt, created_at, saga_id) "
            "SELECT ?, ?, 'cancelled', ?, ?, ? FROM a ON CONFLICT (consumer, key) DO UPDATE SET "
            f"outcome = CASE WHEN {p}inbox.outcome = 'success' THEN 'success' "
            "ELSE 'cancelled' END RETURNING outcome) "
            "SELECT a.outcome, a.reply, a.destination, a.attempt, b.outcome FROM a, b",
            *(consumer, key, attempt, now, saga_id),
            *(consumer, bar, attempt, now, saga_id),
        )
        row = InboxRow(got[0], bytes(got[1]) if got[1] is not None else None, got[2], got[3])
        return row, str(got[4])

    async def inbox_get(self, tx: Tx, consumer: str, key: str) -> InboxRow | None:
        """What is stored under ``key`` (a plain read: no lock, no waiting)."""
        row = await tx.fetchone(
            f"SELECT outcome, reply, destination, attempt FROM {self.prefix}inbox "
            "WHERE consumer = ? AND key = ?",
            consumer,
            key,
        )
        if row is None:
            return None
        return InboxRow(row[0], bytes(row[1]) if row[1] is not None else None, row[2], row[3])

    async def inbox_record(self, tx: Tx, consumer: str, key: str, row: InboxRow) -> None:
        """Store the outcome of the run that :meth:`inbox_admit` let through."""
        await tx.later(
            f"UPDATE {self.prefix}inbox SET outcome = ?, reply = ?, destination = ?, "
            "attempt = ? WHERE consumer = ? AND key = ?",
            row.outcome,
            row.reply,
            row.destination,
            row.attempt,
            consumer,
            key,
        )

    async def inbox_record_first(
        self, tx: Tx, consumer: str, key: str, row: InboxRow, saga_id: str | None
    ) -> None:
        """Store ``row`` under ``key`` if nothing is stored there yet, with no admission first.

        A held write (one round trip with the rest of the transaction's writes on
        PostgreSQL): if a row already exists (another copy's outcome, or one a
        concurrent copy is committing, which the insert waits for), the write
        changes nothing and fails ``tx`` with :class:`OutcomeExists`, so the
        caller can admit the message the usual way in a fresh transaction.
        """
        await tx.later(
            f"INSERT INTO {self.prefix}inbox (consumer, key, outcome, reply, destination, "
            "attempt, created_at, saga_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (consumer, key) DO NOTHING",
            *(consumer, key, row.outcome, row.reply, row.destination, row.attempt),
            *(self.clock.now(), saga_id),
            check=_first(key),
        )

    async def inbox_require_success(self, tx: Tx, consumer: str, key: str) -> None:
        """Hold a guard that fails ``tx`` with :class:`OutcomeExists` unless ``key`` succeeded.

        For a compensation stored without admission or barrier (a ``db_only``
        bet): the guard locks the forward step's row as the barrier would, so
        the bet stands only where the barrier would have let it through.
        """
        await tx.later(
            f"UPDATE {self.prefix}inbox SET outcome = outcome WHERE consumer = ? AND key = ? "
            "AND outcome = 'success'",
            consumer,
            key,
            check=_first(key, "no success is stored"),
        )

    async def inbox_bar(
        self, tx: Tx, consumer: str, key: str, attempt: int, saga_id: str | None = None
    ) -> str:
        """Bar ``key`` unless it succeeded; returns the outcome now stored.

        ``success`` means the barred run had taken effect and stays; anything
        else becomes ``cancelled``, so the run can never take effect later.
        Waits for a run of ``key`` still in its transaction.
        """
        p = self.prefix
        row = await tx.fetchone(
            f"INSERT INTO {p}inbox (consumer, key, outcome, attempt, created_at, saga_id) "
            "VALUES (?, ?, 'cancelled', ?, ?, ?) ON CONFLICT (consumer, key) DO UPDATE SET "
            f"outcome = CASE WHEN {p}inbox.outcome = 'success' THEN 'success' "
            "ELSE 'cancelled' END RETURNING outcome",
            consumer,
            key,
            attempt,
            self.clock.now(),
            saga_id,
        )
        return str(row[0])

    # -- failed runs -------------------------------------------------------

    async def count_failure(self, consumer: str, message_id: str) -> int:
        """Count one failed run of ``consumer``'s handler on a message; return its failures.

        For transports that count only deliveries (the brokers): a run that
        raised is counted here, in a transaction of its own, while a run cut
        short by a crash never is, so a message whose workers were killed
        under it keeps its retries. The row goes with the message's outcome
        or dead letter (:meth:`clear_failures`); what is left is pruned with
        the inbox.
        """
        async with self.transaction() as tx:
            row = await tx.fetchone(
                f"INSERT INTO {self.prefix}failures (consumer, message_id, failures, at) "
                "VALUES (?, ?, 1, ?) ON CONFLICT (consumer, message_id) DO UPDATE "
                f"SET failures = {self.prefix}failures.failures + 1, at = excluded.at "
                "RETURNING failures",
                consumer,
                message_id,
                self.clock.now(),
            )
        return int(row[0])

    async def clear_failures(self, tx: Tx, consumer: str, message_id: str) -> None:
        """Forget a message's counted failures with ``tx`` (its outcome or dead letter):
        a replay or resend under the same id starts with every retry."""
        await tx.later(
            f"DELETE FROM {self.prefix}failures WHERE consumer = ? AND message_id = ?",
            consumer,
            message_id,
        )

    # -- dead letters ------------------------------------------------------

    async def dead_letter(
        self,
        tx: Tx,
        queue: str,
        data: bytes,
        reason: str,
        error_type: str,
        *,
        message_id: str | None = None,
        saga_id: str | None = None,
        destination: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Keep a message that cannot be processed, with why and where it was.

        An oversize message must not grow the store: only a prefix of
        :data:`DEAD_LETTER_KEEP` bytes is kept, with the size and hash in the reason.
        """
        size = len(data)
        reason, data = _bounded(data, reason)
        await tx.execute(
            f"INSERT INTO {self.prefix}dead_letters (id, queue, data, reason, error_type, "
            "saga_id, created_at, destination, kind, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            message_id,
            queue,
            data,
            reason,
            error_type,
            saga_id,
            self.clock.now(),
            destination,
            kind,
            size,
        )

    async def dead_letters(
        self,
        limit: int = 100,
        *,
        queue: str | None = None,
        error_type: str | None = None,
        saga_id: str | None = None,
        created_before: float | None = None,
    ) -> list[DeadLetter]:
        """Dead letters matching every given filter, oldest first."""
        conds = {"queue": queue, "error_type": error_type, "saga_id": saga_id}
        where, args = _dead_letter_filters(conds, created_before)
        rows = await self.driver.read(
            f"SELECT {_DL_COLUMNS} FROM {self.prefix}dead_letters{where} ORDER BY seq LIMIT ?",
            *args,
            limit,
        )
        return [_dead_letter(r) for r in rows]

    async def dead_letter_get(self, seq: int) -> DeadLetter | None:
        rows = await self.driver.read(
            f"SELECT {_DL_COLUMNS} FROM {self.prefix}dead_letters WHERE seq = ?", seq
        )
        return _dead_letter(rows[0]) if rows else None

    async def dead_letter_delete(self, tx: Tx, seq: int) -> bool:
        """Remove one dead letter; False if another operator got there first."""
        n = await tx.execute(f"DELETE FROM {self.prefix}dead_letters WHERE seq = ?", seq)
        return n == 1

    async def dead_letter_log(self, tx: Tx, a: DeadLetterAction) -> None:
        """Record an operator's action on a dead letter (the row itself goes)."""
        await tx.execute(
            f"INSERT INTO {self.prefix}dead_letter_actions (at, action, dead_letter, message_id, "
            "queue, actor, role, via, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            *(a.at, a.action, a.dead_letter, a.message_id, a.queue),
            *(a.actor, a.role, a.via, a.reason),
        )

    async def dead_letter_actions(self, limit: int = 100) -> list[DeadLetterAction]:
        """The latest operator actions on dead letters, newest first."""
        rows = await self.driver.read(
            "SELECT at, action, dead_letter, message_id, queue, actor, role, via, reason "
            f"FROM {self.prefix}dead_letter_actions ORDER BY seq DESC LIMIT ?",
            limit,
        )
        return [DeadLetterAction(*r) for r in rows]

    # -- sagas -------------------------------------------------------------

    async def saga_insert(self, tx: Tx, rec: SagaRecord) -> bool:
        """Insert a new instance; False if the id exists (start is idempotent)."""
        n = await tx.execute(
            f"INSERT INTO {self.prefix}sagas (id, type, version, state, data, progress, rev, "
            "created_at, updated_at, deadline, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            *_saga_values(rec),
        )
        return n == 1

    async def saga_insert_later(self, tx: Tx, rec: SagaRecord) -> None:
        """Insert a new instance with ``tx``'s held writes; :class:`SagaIdInUse` if the id exists.

        The error rolls the whole transaction back, so whatever was held with
        it (the saga's first history lines and commands) goes too.
        """
        saga_id = rec.id

        def check(n: int) -> None:
            if n != 1:
                raise SagaIdInUse(f"saga id {saga_id!r} exists", saga_id=saga_id)

        await tx.later(
            f"INSERT INTO {self.prefix}sagas (id, type, version, state, data, progress, rev, "
            "created_at, updated_at, deadline, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            *_saga_values(rec),
            check=check,
        )

    async def saga_load(self, tx: Tx, saga_id: str, *, lock: bool = True) -> SagaRecord | None:
        """Load an instance, row-locked on PostgreSQL when ``lock``."""
        row = await tx.fetchone(
            f"SELECT id, type, version, state, data, progress, rev, created_at, updated_at, "
            f"deadline, error FROM {self.prefix}sagas WHERE id = ?"
            + (self._lock_row if lock else ""),
            saga_id,
        )
        return _saga_record(row) if row is not None else None

    async def saga_peek(self, tx: Tx, saga_id: str) -> SagaRecord | None:
        """Load an instance without a lock (:meth:`Tx.peek`); :meth:`saga_update` re-checks it."""
        row = await tx.peek(
            f"SELECT id, type, version, state, data, progress, rev, created_at, updated_at, "
            f"deadline, error FROM {self.prefix}sagas WHERE id = ?",
            saga_id,
        )
        return _saga_record(row) if row is not None else None

    async def saga_update(self, tx: Tx, rec: SagaRecord) -> None:
        """Write an instance back; optimistic check on ``rev`` (then bumped)."""
        rec.updated_at = self.clock.now()
        await tx.later(
            f"UPDATE {self.prefix}sagas SET state = ?, data = ?, progress = ?, rev = ?, "
            "updated_at = ?, deadline = ?, error = ? WHERE id = ? AND rev = ?",
            rec.state,
            rec.data,
            rec.progress,
            rec.rev + 1,
            rec.updated_at,
            rec.deadline,
            rec.error,
            rec.id,
            rec.rev,
            check=_current(rec.id),
        )
        rec.rev += 1

    async def saga_unchanged(self, tx: Tx, rec: SagaRecord) -> None:
        """Fail ``tx`` with :class:`ConcurrencyConflict` unless ``rec``'s revision is current.

        For a decision that changed nothing but was taken on a read without a
        lock (:meth:`saga_peek`), or on the record this process committed last
        (another process may have written since).
        """
        await tx.later(
            f"UPDATE {self.prefix}sagas SET rev = rev WHERE id = ? AND rev = ?",
            rec.id,
            rec.rev,
            check=_current(rec.id),
        )

    async def saga_get(self, saga_id: str) -> SagaRecord | None:
        """Read an instance outside any transaction (one round trip, no locks)."""
        rows = await self.driver.read(
            f"SELECT id, type, version, state, data, progress, rev, created_at, updated_at, "
            f"deadline, error FROM {self.prefix}sagas WHERE id = ?",
            saga_id,
        )
        return _saga_record(rows[0]) if rows else None

    async def log(self, tx: Tx, entries: Sequence[LogEntry]) -> None:
        """Append lines to saga histories (one held write, see :meth:`Tx.later`)."""
        if not entries:
            return
        values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(entries))
        args = [
            a for e in entries for a in (e.saga_id, e.at, e.entry, e.step, e.message_id, e.detail)
        ]
        await tx.later(
            f"INSERT INTO {self.prefix}saga_log (saga_id, at, entry, step, message_id, detail) "
            f"VALUES {values}",
            *args,
        )

    async def history(self, saga_id: str) -> list[LogEntry]:
        rows = await self.driver.read(
            f"SELECT saga_id, at, entry, step, message_id, detail FROM {self.prefix}saga_log "
            "WHERE saga_id = ? ORDER BY seq",
            saga_id,
        )
        return [LogEntry(*r) for r in rows]

    async def saga_list(
        self,
        *,
        type: str | None = None,
        state: str | None = None,
        created_before: float | None = None,
        stuck_before: float | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[SagaRecord]:
        """Instances filtered by type, state and age, oldest first.

        ``stuck_before``: only unfinished instances (running or compensating)
        not changed since then, longest unchanged first. ``after``: the id of
        the last instance of the previous page; the page starts after it in
        the same order (ties broken by id), so paging skips and repeats nothing.
        """
        where, args = _filters(
            type=type, state=state, created_before=created_before, stuck_before=stuck_before
        )
        order = "updated_at" if stuck_before is not None else "created_at"
        if after is not None:
            where, args = await self._after(where, args, order, after)
        rows = await self.driver.read(
            f"SELECT id, type, version, state, data, progress, rev, created_at, updated_at, "
            f"deadline, error FROM {self.prefix}sagas{where} ORDER BY {order}, id LIMIT ?",
            *args,
            limit,
        )
        return [_saga_record(r) for r in rows]

    async def _after(
        self, where: str, args: list[Any], order: str, after: str
    ) -> tuple[str, list[Any]]:
        """``where`` narrowed to the instances that follow ``after`` in ``order``."""
        mark = await self.saga_get(after)
        if mark is None:
            raise SagaNotFound(f"no saga {after!r} to page after", saga_id=after)
        at = mark.updated_at if order == "updated_at" else mark.created_at
        cond = f"({order} > ? OR ({order} = ? AND id > ?))"
        where = f"{where} AND {cond}" if where else f" WHERE {cond}"
        return where, [*args, at, at, after]

    async def saga_count_stuck(self, stuck_before: float, *, type: str | None = None) -> int:
        """How many unfinished instances have not changed since ``stuck_before``."""
        where, args = _filters(type=type, stuck_before=stuck_before)
        rows = await self.driver.read(f"SELECT count(*) FROM {self.prefix}sagas{where}", *args)
        return int(rows[0][0])

    async def saga_counts(self, *, type: str | None = None) -> dict[str, int]:
        """Number of instances per state."""
        where, args = _filters(type=type)
        rows = await self.driver.read(
            f"SELECT state, count(*) FROM {self.prefix}sagas{where} GROUP BY state", *args
        )
        return {r[0]: int(r[1]) for r in rows}


def _current(saga_id: str) -> Callable[[int], None]:
    """The check of a write guarded by the saga's revision."""

    def check(n: int) -> None:
        if n != 1:
            raise ConcurrencyConflict("saga changed concurrently", saga_id=saga_id)

    return check


def _first(key: str, what: str = "an outcome is already stored") -> Callable[[int], None]:
    """The check of :meth:`Store.inbox_record_first`'s insert (and of the success guard)."""

    def check(n: int) -> None:
        if n != 1:
            raise OutcomeExists(f"{what} under {key!r}")

    return check


def _filters(**conds: Any) -> tuple[str, list[Any]]:
    ops = {
        "type": "type = ?",
        "state": "state = ?",
        "created_before": "created_at < ?",
        "stuck_before": f"state IN {UNFINISHED_SQL} AND updated_at < ?",
    }
    parts = [(ops[k], v) for k, v in conds.items() if v is not None]
    if not parts:
        return "", []
    return " WHERE " + " AND ".join(p for p, _ in parts), [v for _, v in parts]


_DL_COLUMNS = (
    "seq, id, queue, data, reason, error_type, saga_id, created_at, destination, kind, size"
)


def _dead_letter_filters(
    conds: dict[str, str | None], created_before: float | None
) -> tuple[str, list[Any]]:
    parts: list[tuple[str, Any]] = [(f"{c} = ?", v) for c, v in conds.items() if v is not None]
    if created_before is not None:
        parts.append(("created_at < ?", created_before))
    if not parts:
        return "", []
    return " WHERE " + " AND ".join(p for p, _ in parts), [v for _, v in parts]


def _bounded(data: bytes, reason: str) -> tuple[str, bytes]:
    if len(data) <= DEAD_LETTER_KEEP:
        return reason, data
    digest = hashlib.sha256(data).hexdigest()
    reason += f" [{len(data)} bytes, sha256 {digest}; the first {DEAD_LETTER_KEEP} kept]"
    return reason, data[:DEAD_LETTER_KEEP]


def _dead_letter(r: Any) -> DeadLetter:
    return DeadLetter(r[0], r[1], r[2], bytes(r[3]), *r[4:])


def _saga_values(rec: SagaRecord) -> tuple[Any, ...]:
    return (
        rec.id,
        rec.type,
        rec.version,
        rec.state,
        rec.data,
        rec.progress,
        rec.rev,
        rec.created_at,
        rec.updated_at,
        rec.deadline,
        rec.error,
    )


def _saga_record(r: Any) -> SagaRecord:
    return SagaRecord(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), *r[6:])


def _refuse_newer(found: int, floor: int, prefix: str) -> None:
    """A process must not run on a schema its code cannot use.

    A newer schema whose migrations only added is fine (an older process
    during a rolling upgrade); one that broke older code is refused.
    """
    if found <= SCHEMA_VERSION:
        return
    if floor > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema under prefix {prefix!r} is at version {found} and needs "
            f"sagakit code of schema version {floor} or newer (this process knows "
            f"{SCHEMA_VERSION}): upgrade sagakit in this process"
        )
    log.warning(
        "the database schema under prefix %r is at version %d, newer than this process "
        "knows (%d) but compatible with it: finish the upgrade",
        prefix,
        found,
        SCHEMA_VERSION,
    )


def _lock_key(prefix: str) -> int:
    return int.from_bytes(prefix.encode()[:8].ljust(8, b"\0"), "big") & 0x7FFFFFFFFFFFFFFF
