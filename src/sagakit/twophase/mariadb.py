"""MariaDB (or MySQL) as a resource: XA START / END / PREPARE / COMMIT, XA RECOVER.

A branch's XA id is ``('sk_<node>_<group>', '<resource>')``: the group is
the global transaction, the resource its branch qualifier, so one group may
hold branches on several databases of one server. MariaDB does not say when
a branch was prepared, so recovery ages such branches from when it first saw
them. The URL is ``mysql://user:password@host:port/database`` (or
``mariadb://``); ``pip install 'sagakit[mariadb]'`` for the driver (asyncmy).
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlparse

from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..transport._url import redact
from .decision import Gid, check_resource, parse
from .resource import Prepared

try:
    import asyncmy
    from asyncmy.errors import Error as DriverError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "the MariaDB resource needs asyncmy: pip install 'sagakit[mariadb]'"
    ) from exc

_NOTA = 1397  # XAER_NOTA: unknown XID
_OUTAGE = frozenset({1040, 1053, 2002, 2003, 2006, 2013})
_RETRYABLE = _OUTAGE | {1205, 1213}
_TOKEN = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.|\"\")*\"|`[^`]*`|\?|%")
DBError = (DriverError, OSError)


@functools.lru_cache(maxsize=1024)
def to_format(sql: str) -> str:
    """``?`` placeholders to the driver's ``%s``; a ``?`` in quotes stays.

    The driver formats the whole text with ``%``, quoted parts included, so
    every literal ``%`` is doubled.
    """

    def swap(m: re.Match[str]) -> str:
        token = m.group()
        return {"?": "%s", "%": "%%"}.get(token) or token.replace("%", "%%")

    return _TOKEN.sub(swap, sql)


def translate(exc: BaseException) -> StoreError:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    text = f"mariadb: [{code}] {exc}" if code else f"mariadb: {type(exc).__name__}: {exc}"
    if code in _OUTAGE or isinstance(exc, OSError):
        return StoreUnavailable(text, retryable=True)
    return StoreError(text, retryable=code in _RETRYABLE)


def xid(gid: str) -> str:
    """``'gtrid','bqual'`` for an XA statement (the parts are strict identifiers)."""
    g = parse(gid)
    if g is None:
        raise ConfigurationError(f"not a sagakit global id: {gid!r}")
    return f"'sk_{g.node}_{g.group}','{g.resource}'"


class MariaTx:
    """SQL on the branch's connection, ``?`` placeholders like everywhere in sagakit."""

    def __init__(self, conn: Any) -> None:
        self.connection = conn

    async def _cursor(self, sql: str, args: Sequence[Any]) -> Any:
        cur = self.connection.cursor()
        try:
            await cur.execute(to_format(sql) if args else sql, tuple(args) or None)
        except DBError as exc:
            await cur.close()
            raise translate(exc) from exc
        return cur

    async def execute(self, sql: str, *args: Any) -> int:
        cur = await self._cursor(sql, args)
        n = int(cur.rowcount)
        await cur.close()
        return n

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            await self.execute(sql, *row)

    async def fetchone(self, sql: str, *args: Any) -> Any:
        cur = await self._cursor(sql, args)
        try:
            return await cur.fetchone()
        finally:
            await cur.close()

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        cur = await self._cursor(sql, args)
        try:
            return list(await cur.fetchall())
        finally:
            await cur.close()


class MariaBranch:
    """One XA branch on a connection of its own (closed at the end)."""

    def __init__(self, conn: Any, gid: str) -> None:
        self.gid, self._conn = gid, conn
        self.tx = MariaTx(conn)
        self.prepared = False

    async def prepare(self) -> None:
        x = xid(self.gid)
        await self.tx.execute(f"XA END {x}")
        try:
            await self.tx.execute(f"XA PREPARE {x}")
        except StoreError:
            await _quiet(self.tx.execute(f"XA ROLLBACK {x}"))
            raise
        self.prepared = True

    async def commit(self) -> bool:
        return await _finish(self.tx, f"XA COMMIT {xid(self.gid)}")

    async def rollback(self) -> None:
        x = xid(self.gid)
        if not self.prepared:
            await _quiet(self.tx.execute(f"XA END {x}"))
        await _finish(self.tx, f"XA ROLLBACK {x}")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class MariaDBResource:
    """A MariaDB database whose transactions can be prepared through XA."""

    kind = "mariadb"

    def __init__(self, name: str, url: str) -> None:
        self.name = check_resource(name)
        self.url = url
        self._params = _params(url)
        self._seen: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"MariaDBResource({self.name!r}, {redact(self.url)!r})"

    async def open(self) -> None:
        await (await self.connect()).ensure_closed()

    async def close(self) -> None:
        return None

    async def begin(self, gid: str) -> MariaBranch:
        conn = await self.connect()
        branch = MariaBranch(conn, gid)
        try:
            await branch.tx.execute(f"XA START {xid(gid)}")
        except StoreError:
            await branch.close()
            raise
        return branch

    async def commit_prepared(self, gid: str) -> bool:
        return await self._single(f"XA COMMIT {xid(gid)}")

    async def rollback_prepared(self, gid: str) -> bool:
        return await self._single(f"XA ROLLBACK {xid(gid)}")

    async def prepared(self, prefix: str) -> list[Prepared]:
        conn = await self.connect()
        try:
            rows = await MariaTx(conn).fetchall("XA RECOVER")
        finally:
            conn.close()
        found = []
        for _fmt, glen, _blen, data in rows:
            raw = data if isinstance(data, str) else bytes(data).decode("latin-1")
            g = parse(f"{raw[:glen]}_{raw[glen:]}")
            if g is not None and g.resource == self.name and str(g).startswith(prefix):
                found.append(Prepared(str(g), None))
        return found

    async def preflight(self, concurrency: int, probe: str) -> None:
        branch = await self.begin(probe)
        try:
            await branch.prepare()
            await self.prepared("sk_")  # XA RECOVER needs a privilege on MySQL 8
            if not await branch.commit():
                raise ConfigurationError(f"resource {self.name!r}: a prepared probe vanished")
        except StoreError as exc:
            await _quiet(branch.rollback())
            raise ConfigurationError(
                f"resource {self.name!r} ({redact(self.url)}): XA does not work for this user "
                f"({exc}); grant it XA_RECOVER_ADMIN (MySQL 8) or use an account that may"
            ) from exc
        finally:
            await branch.close()

    async def connect(self) -> Any:
        """A plain autocommit connection to this database (for DDL and reads outside XA)."""
        try:
            return await asyncmy.connect(**self._params, autocommit=True)
        except DBError as exc:
            raise translate(exc) from exc

    async def _single(self, sql: str) -> bool:
        conn = await self.connect()
        try:
            return await _finish(MariaTx(conn), sql)
        finally:
            conn.close()


def _params(url: str) -> dict[str, Any]:
    u = urlparse(url)
    if u.scheme not in ("mysql", "mariadb"):
        raise ConfigurationError(f"not a MariaDB URL: {redact(url)!r} (mysql://user@host/db)")
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": unquote(u.username or "root"),
        "password": unquote(u.password or ""),
        "database": u.path.lstrip("/") or None,
    }


async def _finish(tx: MariaTx, sql: str) -> bool:
    try:
        await tx.execute(sql)
    except StoreError as exc:
        if f"[{_NOTA}]" in str(exc):
            return False
        raise
    return True


async def _quiet(step: Any) -> None:
    with contextlib.suppress(StoreError):
        await step


__all__ = ["Gid", "MariaDBResource"]
