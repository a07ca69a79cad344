"""What every service of the example shares: a participant and its own tables.

A service owns a handful of tables and nobody else touches them. Where they
live depends on the deployment:

* embedded (SQLite): the service gets a database file of its own, so its
  tables have plain names (``credit``); sharing one file with others, they are
  prefixed (``customers_credit``);
* PostgreSQL: the service gets a schema of its own in the shared database
  (``customers.credit``).

Handlers reach the tables through ``ctx.db``, inside the transaction that also
records the inbox row and the outgoing reply. Reads for reports go through the
service's own query methods (see ``audit``), never through another service.
"""

from __future__ import annotations

from typing import Any, ClassVar

import sagakit as sk


class Service:
    """Base class: a named participant plus DDL for the tables it owns."""

    name: ClassVar[str]
    #: table name -> column definitions, in SQL both SQLite and PostgreSQL accept
    tables: ClassVar[dict[str, str]]
    #: extra ``(table, columns)`` indexes
    indexes: ClassVar[list[tuple[str, str]]] = []

    def __init__(self) -> None:
        self.store: sk.Store | None = None
        self.participant: sk.Participant | None = None
        self._names: dict[str, str] = {}

    # -- wiring ------------------------------------------------------------

    def install(self, app: sk.App, store: str | sk.Store | None = None) -> sk.Participant:
        """Create the participant (in ``store``, or the app's) and register handlers."""
        self.participant = app.participant(self.name, store=store)
        self.store = app.store_of(self.name)
        dedicated = store is not None
        for table in self.tables:
            self._names[table] = _qualify(self.store.dialect, self.name, table, dedicated)
        self.register(self.participant)
        return self.participant

    def register(self, p: sk.Participant) -> None:
        """Register command and event handlers on ``p``."""
        raise NotImplementedError

    def t(self, table: str) -> str:
        """The qualified name of one of this service's tables, for SQL."""
        return self._names[table]

    # -- schema ------------------------------------------------------------

    async def create_tables(self) -> None:
        """Create the schema (PostgreSQL) and tables if missing; idempotent."""
        store = self._store()
        await store.open()
        async with store.transaction() as tx:
            if store.dialect == "postgresql":
                await tx.execute(f"CREATE SCHEMA IF NOT EXISTS {self.name}")
            for table, columns in self.tables.items():
                await tx.execute(f"CREATE TABLE IF NOT EXISTS {self.t(table)} ({columns})")
            for table, cols in self.indexes:
                idx = f"{self.name}_{table}_{cols.replace(', ', '_')}_idx"
                await tx.execute(f"CREATE INDEX IF NOT EXISTS {idx} ON {self.t(table)} ({cols})")

    async def reset(self) -> None:
        """Start clean: drop this service's tables and create them anew (a run of
        an older release may have left them in another shape)."""
        async with self._store().transaction() as tx:
            for table in self.tables:
                await tx.execute(f"DROP TABLE IF EXISTS {self.t(table)}")
        await self.create_tables()

    async def query(self, sql: str, *args: Any) -> list[Any]:
        """Run a read-only query on this service's database."""
        async with self._store().transaction() as tx:
            return await tx.fetchall(sql, *args)

    def _store(self) -> sk.Store:
        if self.store is None:
            raise RuntimeError(f"service {self.name!r} is not installed in an App")
        return self.store


def _qualify(dialect: str, service: str, table: str, dedicated: bool) -> str:
    if dialect == "postgresql":
        return f"{service}.{table}"
    return table if dedicated else f"{service}_{table}"
