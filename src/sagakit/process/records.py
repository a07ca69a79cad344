"""The process managers' tables: instances and the decision history.

``processes`` holds one row per (process manager, key): the state as JSON, the
armed timers and sequence in ``meta``, a revision checked on every update.
``process_log`` holds one row per input handled — applied, ignored, held or
a stale timer — with the status before and after and what went out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import ConcurrencyConflict
from ..messages import encode_json
from .machine import Armed, Instance

if TYPE_CHECKING:
    from ..store import Store, Tx


class Meta(msgspec.Struct, array_like=True):
    """The machine's bookkeeping kept beside the state."""

    seq: int = 0
    timers: dict[str, tuple[int, str, float, float]] = {}
    awaiting: list[str] = []
    trace: str | None = None


_meta = msgspec.json.Decoder(Meta)


@dataclass(slots=True)
class ProcessRecord:
    """An instance row; ``state`` and ``meta`` are JSON bytes."""

    process: str
    key: str
    version: int
    status: str | None
    state: bytes
    meta: bytes
    done: bool
    rev: int
    correlation_id: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of an instance's decision history."""

    seq: int
    process: str
    key: str
    at: float
    message_id: str | None
    message_type: str
    verdict: str
    status_before: str | None
    status_after: str | None
    detail: dict[str, Any]
    correlation_id: str | None


def to_instance(rec: ProcessRecord, state: Any) -> Instance:
    meta = _meta.decode(rec.meta)
    timers = {n: Armed(*t) for n, t in meta.timers.items()}
    return Instance(
        rec.key, state, rec.status, rec.done, timers, meta.seq, rec.correlation_id,
        frozenset(meta.awaiting), meta.trace,
    )  # fmt: skip


def meta_of(inst: Instance) -> bytes:
    timers = {n: (a.token, a.message_id, a.started_at, a.due_at) for n, a in inst.timers.items()}
    return encode_json(Meta(inst.seq, timers, sorted(inst.awaiting), inst.trace))


_COLS = (
    "process, key, version, status, state, meta, done, rev, correlation_id, created_at, updated_at"
)


class ProcessTable:
    """SQL for the process tables of one store (values always bound)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        p = store.prefix
        lock = " FOR UPDATE" if store.dialect == "postgresql" else ""
        self._load = f"SELECT {_COLS} FROM {p}processes WHERE process = ? AND key = ?"
        self._load_locked = self._load + lock
        self._insert = (
            f"INSERT INTO {p}processes ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING"
        )
        self._update = (
            f"UPDATE {p}processes SET version = ?, status = ?, state = ?, meta = ?, done = ?, "
            "rev = rev + 1, updated_at = ? WHERE process = ? AND key = ? AND rev = ?"
        )
        self._log = (
            f"INSERT INTO {p}process_log (process, key, at, message_id, message_type, verdict, "
            "status_before, status_after, detail, correlation_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )

    async def load(self, tx: Tx, process: str, key: str) -> ProcessRecord | None:
        """The instance row, locked for this transaction on PostgreSQL.

        A key with no row yet is locked too (a transaction-scoped advisory
        lock on PostgreSQL; SQLite has one writer), so two messages that would
        both start the same instance run one after the other and the second
        sees the first one's instance.
        """
        row = await tx.fetchone(self._load_locked, process, key)
        if row is None and self.store.dialect == "postgresql":
            await tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
                             f"{self.store.prefix}process:{process}:{key}")  # fmt: skip
            row = await tx.fetchone(self._load_locked, process, key)
        return _record(row) if row is not None else None

    async def insert(self, tx: Tx, rec: ProcessRecord) -> None:
        """Create an instance (its key is locked by :meth:`load`; a conflict is retried)."""
        n = await tx.execute(self._insert, *_values(rec))
        if n != 1:
            raise ConcurrencyConflict(
                f"{rec.process} instance {rec.key!r} was started concurrently"
            )

    async def update(self, tx: Tx, rec: ProcessRecord) -> None:
        args = (rec.version, rec.status, rec.state, rec.meta, int(rec.done), rec.updated_at)
        n = await tx.execute(self._update, *args, rec.process, rec.key, rec.rev)
        if n != 1:
            raise ConcurrencyConflict(f"{rec.process} instance {rec.key!r} changed underneath")

    async def log(self, tx: Tx, e: HistoryEntry) -> None:
        detail = encode_json(e.detail).decode() if e.detail else None
        await tx.execute(
            self._log, e.process, e.key, e.at, e.message_id, e.message_type, e.verdict,
            e.status_before, e.status_after, detail, e.correlation_id,
        )  # fmt: skip

    async def get(self, process: str, key: str) -> ProcessRecord | None:
        async with self.store.transaction() as tx:
            row = await tx.fetchone(self._load, process, key)
        return _record(row) if row is not None else None

    async def history(self, process: str | None = None, key: str | None = None, *,
                      correlation_id: str | None = None) -> list[HistoryEntry]:  # fmt: skip
        """Decision history, oldest first, of one instance or one correlation id."""
        where, args = [], []
        for col, value in (("process", process), ("key", key), ("correlation_id", correlation_id)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql = f"SELECT * FROM {self.store.prefix}process_log"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(sql, *args)
        return [_entry(r) for r in rows]

    async def counts(self, process: str) -> dict[str, int]:
        """How many instances are in each status (``done`` ones under their status too)."""
        sql = (
            f"SELECT status, count(*) FROM {self.store.prefix}processes "
            "WHERE process = ? GROUP BY status"
        )
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(sql, process)
        return {str(r[0]): int(r[1]) for r in rows}


def _values(rec: ProcessRecord) -> tuple[Any, ...]:
    return (
        rec.process, rec.key, rec.version, rec.status, rec.state, rec.meta, int(rec.done),
        rec.rev, rec.correlation_id, rec.created_at, rec.updated_at,
    )  # fmt: skip


def _record(r: Any) -> ProcessRecord:
    return ProcessRecord(
        r[0], r[1], int(r[2]), r[3], bytes(r[4]), bytes(r[5]), bool(r[6]), int(r[7]),
        r[8], float(r[9]), float(r[10]),
    )  # fmt: skip


def _entry(r: Any) -> HistoryEntry:
    detail = msgspec.json.decode(r[9]) if r[9] else {}
    return HistoryEntry(
        int(r[0]), r[1], r[2], float(r[3]), r[4], r[5], r[6], r[7], r[8], detail, r[10]
    )
