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
]

SCHEMA_VERSION = len(MIGRATIONS)


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
