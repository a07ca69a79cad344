"""Drop the tables a test created under its unique prefix."""

from __future__ import annotations

import re

from sagakit.store import Store

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


async def drop_tables(store: Store) -> None:
    """Drop every PostgreSQL table whose name starts with the store's prefix."""
    if store.dialect != "postgresql":
        return
    async with store.transaction() as tx:
        rows = await tx.fetchall(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "AND starts_with(tablename, ?)",
            store.prefix,
        )
        for row in rows:
            name = row[0]
            assert _IDENT.match(name), name
            await tx.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
