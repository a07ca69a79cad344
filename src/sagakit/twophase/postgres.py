"""PostgreSQL as a resource: ``PREPARE TRANSACTION`` / ``COMMIT PREPARED``.

Each branch runs on a pooled connection of its own, held from ``BEGIN`` to
``COMMIT PREPARED``; the pool stays small (``?max_size=`` in the URL, 4 by
default, as the server's connections are shared), so at most that many
groups use one database at a time. The
global id is embedded as a literal, as PostgreSQL requires; it is checked
against sagakit's strict id pattern first, so it can hold no quote.
"""

from __future__ import annotations

from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..store.postgres import LIBPQ_OPTIONS, PostgresTx
from ..store.postgres import URL_OPTIONS as STORE_OPTIONS
from ..store.postgres import DBError as _DBError
from ..store.postgres import translate as _translate
from ..transport._url import Option, count, parse_url, redact
from .decision import check_resource, parse
from .resource import Prepared

# asyncpg raises InternalClientError on a connection the server cut mid-conversation
DBError = (*_DBError, asyncpg.exceptions.InternalClientError)
#: undefined_object: no prepared transaction with that id
_NOT_FOUND = "42704"
#: a branch holds its connection from BEGIN to COMMIT PREPARED; ``?max_size=`` in the URL
#: (a participant's store URL may be given as is: its other pool options are accepted)
URL_OPTIONS = {**STORE_OPTIONS, "max_size": Option(count, 4)}


def translate(exc: BaseException) -> StoreError:
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return StoreUnavailable(f"postgresql: the connection broke: {exc}", retryable=True)
    return _translate(exc)


def literal(gid: str) -> str:
    """``gid`` as a SQL literal, once it is known to be one of ours."""
    if parse(gid) is None:
        raise ConfigurationError(f"not a sagakit global id: {gid!r}")
    return f"'{gid}'"


class PostgresBranch:
    """One branch on one connection; the connection goes back to the pool at close."""

    def __init__(self, pool: Any, conn: Any, gid: str) -> None:
        self._pool, self._conn, self.gid = pool, conn, gid
        self.tx = PostgresTx(conn)
        self.prepared = False

    async def prepare(self) -> None:
        await _run(self._conn, f"PREPARE TRANSACTION {literal(self.gid)}")
        self.prepared = True

    async def commit(self) -> bool:
        return await _finish(self._conn, f"COMMIT PREPARED {literal(self.gid)}")

    async def rollback(self) -> None:
        if self.prepared:
            await _finish(self._conn, f"ROLLBACK PREPARED {literal(self.gid)}")
        else:
            await _run(self._conn, "ROLLBACK")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self._pool.release(conn)
            except DBError:
                conn.terminate()


class PostgresResource:
    """A PostgreSQL database whose transactions can be prepared."""

    kind = "postgresql"

    def __init__(self, name: str, url: str, *, max_size: int | None = None) -> None:
        self.name = check_resource(name)
        parsed = parse_url(url, URL_OPTIONS, given={"max_size": max_size}, foreign=LIBPQ_OPTIONS)
        self.url, self.max_size = parsed.base, int(parsed.values["max_size"])
        self._pool: Any = None

    def __repr__(self) -> str:
        return f"PostgresResource({self.name!r}, {redact(self.url)!r})"

    async def open(self) -> None:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(
                    self.url, min_size=1, max_size=self.max_size, reset=_keep
                )
            except DBError as exc:
                raise translate(exc) from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def begin(self, gid: str) -> PostgresBranch:
        conn = await self._acquire()
        try:
            await _run(conn, "BEGIN")
        except StoreError:
            await self._pool.release(conn)
            raise
        return PostgresBranch(self._pool, conn, gid)

    async def commit_prepared(self, gid: str) -> bool:
        return await self._single(f"COMMIT PREPARED {literal(gid)}")

    async def rollback_prepared(self, gid: str) -> bool:
        return await self._single(f"ROLLBACK PREPARED {literal(gid)}")

    async def prepared(self, prefix: str) -> list[Prepared]:
        rows = await self._fetch(
            "SELECT p.gid, extract(epoch FROM clock_timestamp() - p.prepared)::float8, "
            "coalesce(array_agg(l.mode || ' on ' || coalesce(c.relname, l.locktype)) "
            "FILTER (WHERE l.mode IS NOT NULL), '{}') FROM pg_prepared_xacts p "
            "LEFT JOIN pg_locks x ON x.locktype = 'transactionid' AND x.pid IS NULL "
            "AND x.transactionid = p.transaction LEFT JOIN pg_locks l ON l.pid IS NULL "
            "AND l.virtualtransaction = x.virtualtransaction AND l.locktype = 'relation' "
            "LEFT JOIN pg_class c ON c.oid = l.relation "
            "WHERE p.database = current_database() AND starts_with(p.gid, $1) "
            "GROUP BY p.gid, p.prepared ORDER BY p.prepared",
            prefix,
        )
        return [Prepared(r[0], float(r[1]), tuple(sorted(r[2]))) for r in rows]

    async def preflight(self, concurrency: int, probe: str) -> None:
        rows = await self._fetch("SELECT current_setting('max_prepared_transactions')::int")
        have = int(rows[0][0])
        if have < max(1, concurrency):
            raise ConfigurationError(
                f"resource {self.name!r} ({redact(self.url)}): max_prepared_transactions is "
                f"{have}; set max_prepared_transactions = {max(concurrency, 64)} (at least the "
                f"atomic concurrency, {concurrency}) in postgresql.conf and restart the server"
            )
        await self._probe(probe)

    async def _probe(self, probe: str) -> None:
        """Prepare and commit an empty transaction: the role may do both, or we hear why."""
        branch = await self.begin(probe)
        try:
            await branch.prepare()
            if not await branch.commit():
                raise ConfigurationError(f"resource {self.name!r}: a prepared probe vanished")
        except StoreError as exc:
            await branch.rollback()
            raise ConfigurationError(
                f"resource {self.name!r} ({redact(self.url)}): this role cannot prepare and "
                f"commit transactions ({exc}); grant it ownership of its tables or use a "
                "superuser for the coordinator"
            ) from exc
        finally:
            await branch.close()

    async def _acquire(self) -> Any:
        if self._pool is None:
            raise StoreError(f"resource {self.name!r} is not open", retryable=False)
        try:
            return await self._pool.acquire(timeout=30.0)
        except DBError as exc:
            raise translate(exc) from exc

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        conn = await self._acquire()
        try:
            return list(await conn.fetch(sql, *args))
        except DBError as exc:
            raise translate(exc) from exc
        finally:
            await _release(self._pool, conn)

    async def _single(self, sql: str) -> bool:
        conn = await self._acquire()
        try:
            return await _finish(conn, sql)
        finally:
            await _release(self._pool, conn)


async def _run(conn: Any, sql: str) -> None:
    try:
        await conn.execute(sql)
    except DBError as exc:
        raise translate(exc) from exc


async def _finish(conn: Any, sql: str) -> bool:
    """COMMIT/ROLLBACK PREPARED; False when there is no such prepared transaction."""
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == _NOT_FOUND:
            return False
        raise translate(exc) from exc
    except DBError as exc:
        raise translate(exc) from exc
    return True


async def _release(pool: Any, conn: Any) -> None:
    try:
        await pool.release(conn)
    except DBError:
        conn.terminate()


async def _keep(conn: Any) -> None:
    """No per-release reset round trip (sessions keep no state; see store.postgres)."""
