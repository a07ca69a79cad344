"""The rows retention prunes besides sagas, inbox and dead letters, as data.

Each :class:`Family` is one table of instances that reach an end (a
choreographed flow, a process-manager instance, a lock reservation...) and
the tables that hold their history, keyed by the same columns. Pruning a
family deletes, oldest first and ``batch`` at a time, the rows that are
*finished* by the family's own predicate and older than its horizon, then
their history rows. The SQL is built here from constants (table and column
names are ours, never user input); values are always bound.

Which horizon each family follows, and why:

- ``sagas`` (finished business transactions): flows that ended (completed,
  compensated, or orphaned: their start event never came; a ``failed`` flow
  waits for someone to look, like a failed saga, and is kept), process
  instances that are done, reservations released or expired, and ``awaits``
  rows no saga is waiting on (an answered wait, or an event that arrived
  without a waiter). A row whose command still waits is never pruned.
- ``inbox``: the keys that make a 2PC saga step run once
  (``twophase_keys``): they deduplicate re-sent commands exactly as inbox
  rows do, so they follow the inbox rule; and the failed runs counted for a
  broker's messages (``failures``), which matter only while a message can
  still be delivered. The 2PC commit records are not
  pruned: recovery reads them for as long as a branch may be in doubt.
- ``audit``: the console's audit, the dead-letter actions and the 2PC audit
  (append-only logs; kept for ever unless ``Retention.audit`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..choreography.tracker import COMPENSATED, COMPLETED, ORPHANED
from ..locks.rules import EXPIRED, RELEASED


@dataclass(frozen=True, slots=True)
class History:
    """Rows that belong to a family's instance: ``table`` keyed by ``columns``."""

    field: str  # the Pruned counter
    table: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Family:
    """One table of instances that end, and how retention finds the ended ones."""

    field: str  # the Pruned counter
    horizon: str  # the Retention field giving its age limit
    table: str
    keys: tuple[str, ...]
    finished: str  # SQL predicate, constants only
    stamp: str  # the column dating an instance's end
    history: tuple[History, ...] = ()

    @property
    def where(self) -> str:
        """Finished and older than the bound cutoff."""
        return f"{self.finished} AND {self.stamp} < ?"

    def delete_batch(self, prefix: str, skip: str) -> str:
        """Delete up to ``?`` finished rows older than ``?``, returning their keys."""
        keys, t = ", ".join(self.keys), prefix + self.table
        pick = f"SELECT {keys} FROM {t} WHERE {self.where} ORDER BY {self.stamp} LIMIT ?"
        return f"DELETE FROM {t} WHERE ({keys}) IN ({pick}{skip}) RETURNING {keys}"

    def count(self, prefix: str) -> str:
        return f"SELECT count(*) FROM {prefix}{self.table} WHERE {self.where}"

    def count_history(self, prefix: str, h: History) -> str:
        keys, cols = ", ".join(self.keys), ", ".join(h.columns)
        ended = f"SELECT {keys} FROM {prefix}{self.table} WHERE {self.where}"
        return f"SELECT count(*) FROM {prefix}{h.table} WHERE ({cols}) IN ({ended})"


def delete_history(prefix: str, h: History, n: int) -> str:
    """Delete the history rows of ``n`` instances whose keys are bound in order."""
    one = "(" + ", ".join("?" * len(h.columns)) + ")"
    cols = ", ".join(h.columns)
    return f"DELETE FROM {prefix}{h.table} WHERE ({cols}) IN (VALUES {', '.join([one] * n)})"


def _in(*values: str) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


FAMILIES: tuple[Family, ...] = (
    Family(
        "flows",
        "sagas",
        "chor_flows",
        ("flow", "correlation_id"),
        f"status IN {_in(COMPLETED, COMPENSATED, ORPHANED)}",
        "updated_at",
        (History("flow_timeline", "chor_timeline", ("flow", "correlation_id")),),
    ),
    Family(
        "processes",
        "sagas",
        "processes",
        ("process", "key"),
        "done = 1",
        "updated_at",
        (History("process_log", "process_log", ("process", "key")),),
    ),
    Family("awaits", "sagas", "awaits", ("event_type", "key"), "waiting IS NULL", "updated_at"),
    Family(
        "reservations",
        "sagas",
        "reservations",
        ("space", "holder", "step", "resource"),
        f"state IN {_in(RELEASED, EXPIRED)}",
        "updated_at",
    ),
    Family("twophase_keys", "inbox", "twophase_keys", ("key",), "1 = 1", "decided_at"),
    Family("failures", "inbox", "failures", ("consumer", "message_id"), "1 = 1", "at"),
    Family("audit", "audit", "audit", ("seq",), "1 = 1", "at"),
    Family("dead_letter_actions", "audit", "dead_letter_actions", ("seq",), "1 = 1", "at"),
    Family("twophase_audit", "audit", "twophase_audit", ("seq",), "1 = 1", "at"),
)
