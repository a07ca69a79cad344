"""Small pieces the contract suites share; nothing here needs pytest to import."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
from collections.abc import Awaitable, Callable, Iterator

from ..errors import ConfigurationError
from ..store import Store


class Raised:
    """What :func:`_raises` caught, for further assertions."""

    value: BaseException | None = None


@contextlib.contextmanager
def raises(kind: type[BaseException]) -> Iterator[Raised]:
    """Like ``pytest.raises``, so this module does not need pytest to import."""
    caught = Raised()
    try:
        yield caught
    except kind as exc:
        caught.value = exc
        return
    raise AssertionError(f"{kind.__name__} was not raised")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str = "condition",
    every: float = 0.01,
) -> None:
    """Poll ``check`` (sync or async) until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > end:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(every)


_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


async def drop_tables(store: Store) -> None:
    """Drop the PostgreSQL tables under ``store``'s prefix (teardown of a test).

    Names come from the catalog and are checked against the identifier rule
    before they are spliced into ``DROP TABLE``. A SQLite store is left alone:
    its file belongs to the test's temporary directory.
    """
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
            if not _TABLE.match(name):
                raise ConfigurationError(f"unexpected table name {name!r}")
            await tx.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
