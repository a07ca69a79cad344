"""The versioned schema, written once for both dialects.

Tables are named ``{prefix}name``; the prefix is validated against a strict
identifier pattern because identifiers cannot be bound like values.
"""

from __future__ import annotations

import re

from ..errors import ConfigurationError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "real": "REAL"},
    "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA", "real": "DOUBLE PRECISION"},
}

# Each migration is a list of statements; append new versions, never edit old ones.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS {p}messages (
            seq {serial}, id TEXT NOT NULL, queue TEXT NOT NULL, destination TEXT,
            data {blob} NOT NULL, available_at {real} NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, created_at {real} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS {p}messages_due ON {p}messages (queue, available_at)",
        "CREATE INDEX IF NOT EXISTS {p}messages_id ON {p}messages (id)",
        """CREATE TABLE IF NOT EXISTS {p}subscriptions (
            topic TEXT NOT NULL, queue TEXT NOT NULL, PRIMARY KEY (topic, queue))""",
        """CREATE TABLE IF NOT EXISTS {p}inbox (
            consumer TEXT NOT NULL, key TEXT NOT NULL, outcome TEXT NOT NULL,
            reply {blob}, destination TEXT, attempt INTEGER NOT NULL, created_at {real} NOT NULL,
            PRIMARY KEY (consumer, key))""",
        """CREATE TABLE IF NOT EXISTS {p}dead_letters (
            seq {serial}, id TEXT, queue TEXT NOT NULL, data {blob} NOT NULL,
            reason TEXT NOT NULL, error_type TEXT NOT NULL, saga_id TEXT,
            created_at {real} NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {p}sagas (
            id TEXT PRIMARY KEY, type TEXT NOT NULL, version INTEGER NOT NULL,
            state TEXT NOT NULL, data {blob} NOT NULL, progress {blob} NOT NULL,
            rev INTEGER NOT NULL, created_at {real} NOT NULL, updated_at {real} NOT NULL,
            deadline {real}, error TEXT)""",
        "CREATE INDEX IF NOT EXISTS {p}sagas_state ON {p}sagas (state, type, created_at)",
        """CREATE TABLE IF NOT EXISTS {p}saga_log (
            seq {serial}, saga_id TEXT NOT NULL, at {real} NOT NULL, entry TEXT NOT NULL,
            step TEXT, message_id TEXT, detail TEXT)""",
        "CREATE INDEX IF NOT EXISTS {p}saga_log_saga ON {p}saga_log (saga_id, seq)",
    ],
    [
        # The outbox keeps each message's kind in a column of its own instead of
        # folding it into ``destination`` as "kind:dest".
        "ALTER TABLE {p}messages ADD COLUMN kind TEXT",
    ],
    [
        # Retention (sagakit.ops.retention): an inbox row names its saga, so it is
        # kept while the saga is unfinished; the pruner walks each table oldest first.
        "ALTER TABLE {p}inbox ADD COLUMN saga_id TEXT",
        "CREATE INDEX IF NOT EXISTS {p}inbox_created ON {p}inbox (created_at)",
        "CREATE INDEX IF NOT EXISTS {p}sagas_updated ON {p}sagas (state, updated_at)",
        "CREATE INDEX IF NOT EXISTS {p}dead_letters_created ON {p}dead_letters (created_at)",
    ],
    [
        # Dead letters become replayable: a relayed message keeps where it was
        # going, every letter its original size (a truncated one is refused),
        # and operators' replays and purges are logged with who and why.
        "ALTER TABLE {p}dead_letters ADD COLUMN destination TEXT",
        "ALTER TABLE {p}dead_letters ADD COLUMN kind TEXT",
        "ALTER TABLE {p}dead_letters ADD COLUMN size INTEGER",
        "CREATE INDEX IF NOT EXISTS {p}dead_letters_queue ON {p}dead_letters (queue, seq)",
        """CREATE TABLE IF NOT EXISTS {p}dead_letter_actions (
            seq {serial}, at {real} NOT NULL, action TEXT NOT NULL, dead_letter BIGINT NOT NULL,
            message_id TEXT, queue TEXT NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,
            via TEXT NOT NULL, reason TEXT NOT NULL)""",
        # The relay counts the times a row failed to publish on its own, apart
        # from its claims, so that an outage never makes a row look poisonous.
        "ALTER TABLE {p}messages ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
    ],
    [
        # Two-phase commit (sagakit.twophase): a group's commit record (present
        # means commit, absent means abort), the keys of saga steps run as atomic
        # groups (so a rerun step does not commit twice), and the audit of every
        # action recovery or an operator takes on a prepared branch.
        """CREATE TABLE IF NOT EXISTS {p}twophase_records (
            group_id TEXT PRIMARY KEY, node TEXT NOT NULL, resources TEXT NOT NULL,
            decided_at {real} NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {p}twophase_keys (
            key TEXT PRIMARY KEY, group_id TEXT NOT NULL, result {blob},
            decided_at {real} NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {p}twophase_audit (
            seq {serial}, at {real} NOT NULL, node TEXT NOT NULL, group_id TEXT NOT NULL,
            resource TEXT, action TEXT NOT NULL, outcome TEXT NOT NULL, actor TEXT NOT NULL,
            via TEXT NOT NULL, reason TEXT NOT NULL)""",
    ],
    [
        # Timeout-based locks and semantic locks (sagakit.locks): pools of units,
        # the reservations on them (swept by state and expiry), and pending markers.
        """CREATE TABLE IF NOT EXISTS {p}lock_pools (
            space TEXT NOT NULL, resource TEXT NOT NULL, total BIGINT NOT NULL,
            available BIGINT NOT NULL CHECK (available >= 0), PRIMARY KEY (space, resource))""",
        """CREATE TABLE IF NOT EXISTS {p}reservations (
            space TEXT NOT NULL, holder TEXT NOT NULL, step TEXT NOT NULL, resource TEXT NOT NULL,
            amount BIGINT NOT NULL, state TEXT NOT NULL, expires_at {real} NOT NULL,
            created_at {real} NOT NULL, updated_at {real} NOT NULL,
            PRIMARY KEY (space, holder, step, resource))""",
        "CREATE INDEX IF NOT EXISTS {p}reservations_due ON {p}reservations (state, expires_at)",
        """CREATE INDEX IF NOT EXISTS {p}reservations_pool
            ON {p}reservations (space, resource, state)""",
        """CREATE TABLE IF NOT EXISTS {p}pending (
            space TEXT NOT NULL, key TEXT NOT NULL, holder TEXT NOT NULL, change TEXT NOT NULL,
            since {real} NOT NULL, PRIMARY KEY (space, key))""",
    ],
    [
        # Choreographed sagas and mixing styles. The tracker (sagakit.choreography):
        # one row per tracked flow, keyed by choreography and correlation id, and
        # its timeline (applied, held, outside and rejected events, deadlines).
        """CREATE TABLE IF NOT EXISTS {p}chor_flows (
            flow TEXT NOT NULL, correlation_id TEXT NOT NULL, status TEXT NOT NULL,
            state {blob} NOT NULL, started_at {real}, updated_at {real} NOT NULL,
            PRIMARY KEY (flow, correlation_id))""",
        "CREATE INDEX IF NOT EXISTS {p}chor_flows_status ON {p}chor_flows (status, updated_at)",
        """CREATE TABLE IF NOT EXISTS {p}chor_timeline (
            seq {serial}, flow TEXT NOT NULL, correlation_id TEXT NOT NULL, at {real} NOT NULL,
            kind TEXT NOT NULL, type TEXT, step TEXT, message_id TEXT, reason TEXT, data {blob})""",
        "CREATE INDEX IF NOT EXISTS {p}chor_timeline_flow ON {p}chor_timeline "
        "(flow, correlation_id, seq)",
        # Mixing styles (sagakit.saga.awaits): a saga step waiting for an event
        # and the event, paired by (event type, key) in one row.
        """CREATE TABLE IF NOT EXISTS {p}awaits (
            event_type TEXT NOT NULL, key TEXT NOT NULL, waiting {blob}, arrived {blob},
            updated_at {real} NOT NULL, PRIMARY KEY (event_type, key))""",
    ],
    [
        # The operator console (sagakit.console): API tokens, stored as hashes and
        # revocable, and the append-only audit of every operator action, denied
        # attempts included; (command, target) makes executing a command idempotent.
        """CREATE TABLE IF NOT EXISTS {p}console_tokens (
            id TEXT PRIMARY KEY, hash TEXT NOT NULL, name TEXT NOT NULL, role TEXT NOT NULL,
            created_at {real} NOT NULL, created_by TEXT NOT NULL, revoked_at {real})""",
        """CREATE TABLE IF NOT EXISTS {p}audit (
            seq {serial}, at {real} NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,
            via TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL,
            outcome TEXT NOT NULL, source TEXT, before_digest TEXT, after_digest TEXT,
            detail TEXT, command_id TEXT)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS {p}audit_command ON {p}audit (command_id, target)",
        "CREATE INDEX IF NOT EXISTS {p}audit_target ON {p}audit (target, seq)",
    ],
    [
        # Process managers (sagakit.process): one row per instance (state, armed
        # timers, a revision), and the decision history: what came in, what the
        # state became, what went out.
        """CREATE TABLE IF NOT EXISTS {p}processes (
            process TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, status TEXT,
            state {blob} NOT NULL, meta {blob} NOT NULL, done INTEGER NOT NULL,
            rev INTEGER NOT NULL, correlation_id TEXT, created_at {real} NOT NULL,
            updated_at {real} NOT NULL, PRIMARY KEY (process, key))""",
        "CREATE INDEX IF NOT EXISTS {p}processes_status ON {p}processes (process, done, status)",
        """CREATE TABLE IF NOT EXISTS {p}process_log (
            seq {serial}, process TEXT NOT NULL, key TEXT NOT NULL, at {real} NOT NULL,
            message_id TEXT, message_type TEXT NOT NULL, verdict TEXT NOT NULL,
            status_before TEXT, status_after TEXT, detail TEXT, correlation_id TEXT)""",
        "CREATE INDEX IF NOT EXISTS {p}process_log_key ON {p}process_log (process, key, seq)",
        "CREATE INDEX IF NOT EXISTS {p}process_log_corr ON {p}process_log (correlation_id)",
    ],
    [
        # HOT updates of the saga row (PostgreSQL): a hop that leaves the state
        # alone changes no indexed column, so the row is updated in place and no
        # index gains an entry. ``updated_at`` leaves the indexes; retention walks
        # finished sagas by (state, created_at), which never changes, and checks
        # ``updated_at`` on the rows (a saga ends after it starts).
        # (The new index first: the drop's exclusive lock is then held for less.)
        "CREATE INDEX IF NOT EXISTS {p}sagas_created ON {p}sagas (state, created_at)",
        "DROP INDEX IF EXISTS {p}sagas_updated",
        # The failed runs of a handler on a broker's message (Store.count_failure):
        # the brokers count deliveries, a crash included; the retry policy counts
        # failures, as the database queue's own ``failures`` column does.
        """CREATE TABLE IF NOT EXISTS {p}failures (
            consumer TEXT NOT NULL, message_id TEXT NOT NULL, failures INTEGER NOT NULL,
            at {real} NOT NULL, PRIMARY KEY (consumer, message_id))""",
        "CREATE INDEX IF NOT EXISTS {p}failures_at ON {p}failures (at)",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)

#: Migrations older code cannot run on (a dropped or renamed column, a changed
#: meaning). Every migration so far only adds, or (11) drops an index older code
#: only sorted by, so a process of an older release keeps working on a migrated
#: database; one listed here raises the oldest release allowed to start (the
#: database records it as ``{p}schema_floor``).
BREAKING: frozenset[int] = frozenset()


def oldest_compatible(version: int) -> int:
    """The oldest schema version whose code may run on a database at ``version``."""
    return max((b for b in BREAKING if b <= version), default=1)


def check_prefix(prefix: str) -> str:
    """Validate a table prefix; raise :class:`ConfigurationError` if unsafe."""
    if not _IDENT.match(prefix):
        raise ConfigurationError(
            f"invalid table prefix {prefix!r}: use lowercase letters, digits and underscores"
        )
    return prefix


def statements(dialect: str, prefix: str, version: int) -> list[str]:
    """The DDL of one migration (1-based ``version``) for a dialect."""
    subst = {"p": check_prefix(prefix), **TYPES[dialect]}
    return [stmt.format(**subst) for stmt in MIGRATIONS[version - 1]]
