"""Retention: deleting what no one needs any more, without breaking dedupe.

Left alone, a store only grows: every saga keeps its row, its history and
the inbox rows of its commands for ever. :class:`Retention` says how long
each kind of row is kept (None: for ever) and :class:`Pruner` deletes what
is older, oldest first, in bounded batches, each batch its own short
transaction, so pruning a large backlog never holds locks for long.

What is pruned, and when:

- **Finished sagas and their history**: instances ``completed``,
  ``compensated`` or ``aborted`` whose last change (their finish) is older
  than ``sagas``. A ``failed`` instance is never pruned: it waits for an
  operator, however old it is; nor is a running or compensating one.
- **Inbox rows** older than ``inbox``, except those of a saga that is still
  unfinished (or failed), or finished less than ``inbox`` ago. A row names its
  saga (``saga_id``), and every copy and retry of one step shares one row, so
  the row's own age says nothing about when the last copy was sent: the
  saga's finish does. That is why a saga's inbox rows are not deleted together
  with the saga but by the inbox horizon measured from the saga's finish, and
  why ``sagas`` may not be shorter than ``inbox`` (the finish must still be
  known when the rows are judged).
- **Dead letters** older than ``dead_letters``.
- **The other kinds of instance** that end — choreographed flows, process
  managers, lock reservations, answered waits — by the ``sagas`` horizon, the
  2PC step keys by the ``inbox`` horizon, and the audit logs by ``audit``
  (kept for ever unless set): :mod:`sagakit.ops.families` lists them.

The rule that keeps dedupe whole: a copy of a message may still arrive as
long as it can be redelivered — up to ``max_deliveries`` deliveries, each
lasting up to the lease or the handler timeout and followed by a retry delay,
plus the grace a message for an unknown saga version is handed back for
(:attr:`sagakit.app.Settings.redelivery_window`). An inbox row deleted
before that could let a late copy run twice, so ``inbox`` (and ``sagas``,
else a late reply finds no saga and is dead-lettered) must be at least that
long; :meth:`Retention.check` refuses anything shorter. A participant with a
database of its own cannot see saga states, so there a saga's rows are dated
by their creation alone: give it an inbox horizon longer than your longest
saga can run (its deadline, or how long you let one wait for an operator).

Several processes may prune at once: on PostgreSQL each batch takes its rows
``FOR UPDATE SKIP LOCKED``, so two pruners never wait for or fight over the
same rows; SQLite has a single writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .families import FAMILIES, Family, delete_history

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger("sagakit.retention")

DAY = 86_400.0
#: saga states whose instances never change again (``failed`` waits for an operator)
FINISHED = ("completed", "compensated", "aborted")
MAX_BATCH = 5_000
HORIZONS = ("sagas", "inbox", "dead_letters", "audit")


@dataclass(frozen=True, slots=True)
class Retention:
    """How long rows are kept, in seconds (None: for ever), and how pruning runs.

    ``sagas``: finished instances and their history, counted from their finish.
    ``inbox``: handled-message records (see the module docstring for the rule).
    ``dead_letters``: counted from when the message was dead-lettered.
    ``audit``: the console's audit, dead-letter actions and 2PC audit lines
    (None, the default even in :meth:`recommended`: kept for ever).
    ``batch``: rows per table deleted in one transaction. ``every``: seconds
    between two runs of the background pruner.
    """

    sagas: float | None = None
    inbox: float | None = None
    dead_letters: float | None = None
    audit: float | None = None
    batch: int = 500
    every: float = 60.0

    def __post_init__(self) -> None:
        for name in HORIZONS:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigurationError(f"Retention.{name} must not be negative, got {value}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigurationError(f"Retention.batch must be 1..{MAX_BATCH}, got {self.batch}")
        if self.every <= 0:
            raise ConfigurationError(f"Retention.every must be positive, got {self.every}")

    @classmethod
    def recommended(cls) -> Retention:
        """A month of finished sagas and dead letters, a week of inbox rows."""
        return cls(sagas=30 * DAY, inbox=7 * DAY, dead_letters=30 * DAY)

    def check(self, redelivery_window: float) -> None:
        """Refuse horizons that could let a late copy of a message run twice."""
        for name in ("inbox", "sagas"):
            value = getattr(self, name)
            if value is not None and value < redelivery_window:
                raise ConfigurationError(
                    f"Retention.{name} is {value:g}s, shorter than the longest a message can "
                    f"still be redelivered ({redelivery_window:g}s: max_deliveries x (lease or "
                    "handler timeout + retry max_delay) + version_grace)"
                )
        if self.sagas is not None and self.inbox is not None and self.sagas < self.inbox:
            raise ConfigurationError(
                f"Retention.sagas ({self.sagas:g}s) must not be shorter than Retention.inbox "
                f"({self.inbox:g}s): a saga's finish dates its inbox rows"
            )


@dataclass(slots=True)
class Pruned:
    """Rows deleted (or, in a dry run, that would be) per table."""

    sagas: int = 0
    saga_log: int = 0
    inbox: int = 0
    dead_letters: int = 0
    flows: int = 0
    flow_timeline: int = 0
    processes: int = 0
    process_log: int = 0
    awaits: int = 0
    reservations: int = 0
    twophase_keys: int = 0
    failures: int = 0
    audit: int = 0
    dead_letter_actions: int = 0
    twophase_audit: int = 0

    def add(self, other: Pruned) -> None:
        for name, n in asdict(other).items():
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


class Pruner:
    """Deletes rows past their horizon from one store, in bounded batches."""

    def __init__(self, store: Store, retention: Retention) -> None:
        self.store = store
        self.retention = retention
        p = store.prefix
        self._skip = " FOR UPDATE SKIP LOCKED" if store.dialect == "postgresql" else ""
        # inbox rows whose saga is unfinished, failed or finished recently are kept
        self._inbox_where = (
            f"i.created_at < ? AND NOT EXISTS (SELECT 1 FROM {p}sagas s WHERE s.id = i.saga_id "
            f"AND (s.state NOT IN {_sql_list(FINISHED)} OR s.updated_at >= ?))"
        )

    async def prune(self, *, dry_run: bool = False) -> Pruned:
        """Delete everything past its horizon (or count it); returns rows per table."""
        cutoffs = self._cutoffs()
        if dry_run:
            return await self._count(cutoffs)
        sagas, inbox, dead = cutoffs["sagas"], cutoffs["inbox"], cutoffs["dead_letters"]
        passes: list[tuple[Callable[[], Awaitable[Pruned]], str]] = []
        if sagas is not None:
            passes += [(partial(self.sagas_batch, st, sagas), "sagas") for st in FINISHED]
        if inbox is not None:
            passes.append((partial(self.inbox_batch, inbox), "inbox"))
        if dead is not None:
            passes.append((partial(self.dead_letters_batch, dead), "dead_letters"))
        for fam in FAMILIES:
            if (cut := cutoffs[fam.horizon]) is not None:
                passes.append((partial(self.family_batch, fam, cut), fam.field))
        done = Pruned()
        for batch, table in passes:
            done.add(await self._drain(batch, table))
        return done

    def _cutoffs(self) -> dict[str, float | None]:
        """One "now" for the whole run, so all passes agree with each other."""
        now = self.store.clock.now()
        horizons = {name: getattr(self.retention, name) for name in HORIZONS}
        return {name: None if h is None else now - h for name, h in horizons.items()}

    async def _drain(self, batch: Callable[[], Awaitable[Pruned]], table: str) -> Pruned:
        """Run ``batch`` until one comes back short; other tasks run in between."""
        total = Pruned()
        while True:
            got = await batch()
            total.add(got)
            if getattr(got, table) < self.retention.batch:
                return total
            await asyncio.sleep(0)

    async def sagas_batch(self, state: str, cutoff: float) -> Pruned:
        """Up to ``batch`` finished sagas in ``state``, with their history.

        One state at a time, so the (state, created_at) index yields the
        oldest first without sorting every candidate. No index holds
        ``updated_at`` (it would keep every hop's update from being HOT), so
        the walk goes by ``created_at``, which is never later than
        ``updated_at``: a saga that ended before the cutoff started before it
        (clocks that disagree between processes only delay it by their skew).
        """
        p, n = self.store.prefix, self.retention.batch
        async with self.store.transaction() as tx:
            rows = await tx.fetchall(
                f"DELETE FROM {p}sagas WHERE id IN (SELECT id FROM {p}sagas WHERE state = ? "
                "AND created_at < ? AND updated_at < ? ORDER BY created_at LIMIT ?"
                f"{self._skip}) RETURNING id",
                state,
                cutoff,
                cutoff,
                n,
            )
            ids = [r[0] for r in rows]
            logged = 0
            if ids:
                marks = ", ".join("?" * len(ids))
                logged = await tx.execute(
                    f"DELETE FROM {p}saga_log WHERE saga_id IN ({marks})", *ids
                )
        return Pruned(sagas=len(ids), saga_log=logged)

    async def inbox_batch(self, cutoff: float) -> Pruned:
        """Up to ``batch`` inbox rows past the horizon whose saga no longer needs them."""
        p = self.store.prefix
        async with self.store.transaction() as tx:
            n = await tx.execute(
                f"DELETE FROM {p}inbox WHERE (consumer, key) IN (SELECT i.consumer, i.key "
                f"FROM {p}inbox i WHERE {self._inbox_where} ORDER BY i.created_at LIMIT ?"
                f"{self._skip})",
                cutoff,
                cutoff,
                self.retention.batch,
            )
        return Pruned(inbox=n)

    async def dead_letters_batch(self, cutoff: float) -> Pruned:
        """Up to ``batch`` dead letters older than the horizon."""
        p = self.store.prefix
        async with self.store.transaction() as tx:
            n = await tx.execute(
                f"DELETE FROM {p}dead_letters WHERE seq IN (SELECT seq FROM {p}dead_letters "
                f"WHERE created_at < ? ORDER BY created_at LIMIT ?{self._skip})",
                cutoff,
                self.retention.batch,
            )
        return Pruned(dead_letters=n)

    async def family_batch(self, fam: Family, cutoff: float) -> Pruned:
        """Up to ``batch`` ended instances of one family, with their history."""
        p, got = self.store.prefix, Pruned()
        async with self.store.transaction() as tx:
            sql = fam.delete_batch(p, self._skip)
            keys = [tuple(r) for r in await tx.fetchall(sql, cutoff, self.retention.batch)]
            setattr(got, fam.field, len(keys))
            for h in fam.history if keys else ():
                bound = [v for k in keys for v in k]
                setattr(got, h.field, await tx.execute(delete_history(p, h, len(keys)), *bound))
        return got

    async def _count(self, cutoffs: dict[str, float | None]) -> Pruned:
        """What :meth:`prune` would delete now, by the same predicates."""
        counts = Pruned()
        async with self.store.transaction() as tx:
            for table, sql, args in self._count_queries(cutoffs):
                row = await tx.fetchone(sql, *args)
                setattr(counts, table, int(row[0]))
        return counts

    def _count_queries(
        self, cutoffs: dict[str, float | None]
    ) -> list[tuple[str, str, tuple[float, ...]]]:
        sagas, inbox, dead = cutoffs["sagas"], cutoffs["inbox"], cutoffs["dead_letters"]
        p = self.store.prefix
        done = f"state IN {_sql_list(FINISHED)} AND created_at < ? AND updated_at < ?"
        queries: list[tuple[str, str, tuple[float, ...]]] = []
        if sagas is not None:
            both = (sagas, sagas)
            queries.append(("sagas", f"SELECT count(*) FROM {p}sagas WHERE {done}", both))
            in_done = f"SELECT id FROM {p}sagas WHERE {done}"
            log_sql = f"SELECT count(*) FROM {p}saga_log WHERE saga_id IN ({in_done})"
            queries.append(("saga_log", log_sql, both))
        if inbox is not None:
            inbox_sql = f"SELECT count(*) FROM {p}inbox i WHERE {self._inbox_where}"
            queries.append(("inbox", inbox_sql, (inbox, inbox)))
        if dead is not None:
            dead_sql = f"SELECT count(*) FROM {p}dead_letters WHERE created_at < ?"
            queries.append(("dead_letters", dead_sql, (dead,)))
        for fam in FAMILIES:
            if (cut := cutoffs[fam.horizon]) is not None:
                queries.append((fam.field, fam.count(p), (cut,)))
                queries += [(h.field, fam.count_history(p, h), (cut,)) for h in fam.history]
        return queries


def _sql_list(values: tuple[str, ...]) -> str:
    """A constant list for SQL (our own state names, never user input)."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"
