"""What a database must offer to take part in an atomic group.

A :class:`Resource` opens branch transactions, prepares them under a global
id, finishes prepared ones from any connection, and lists the prepared ones
it holds. PostgreSQL (``PREPARE TRANSACTION``) and MariaDB (XA) implement it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class BranchTx(Protocol):
    """The work of one branch: SQL with ``?`` placeholders, values always bound."""

    async def execute(self, sql: str, *args: Any) -> int: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, *args: Any) -> Any: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Any]: ...


class Branch(Protocol):
    """A branch transaction in progress on one connection."""

    @property
    def tx(self) -> BranchTx: ...

    async def prepare(self) -> None:
        """Phase one: make the branch durable and undecided, or raise (it is then aborted)."""

    async def commit(self) -> bool:
        """Phase two on this connection; False if the branch was not found."""

    async def rollback(self) -> None:
        """Abandon the branch, prepared or not (never raises for 'already gone')."""

    async def close(self) -> None:
        """Give the connection back (after commit or rollback)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prepared branch as the database reports it."""

    gid: str
    #: seconds since it was prepared (None: the database does not say, as in XA)
    age: float | None
    #: the locks it holds, as ``mode on relation`` lines (empty when unknown)
    locks: tuple[str, ...] = ()


class Resource(Protocol):
    """One database that branches of atomic groups run in."""

    name: str
    kind: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin(self, gid: str) -> Branch:
        """A new branch transaction that will be prepared under ``gid``."""

    async def commit_prepared(self, gid: str) -> bool:
        """Commit a prepared branch from any connection; False if not found."""

    async def rollback_prepared(self, gid: str) -> bool:
        """Roll back a prepared branch from any connection; False if not found."""

    async def prepared(self, prefix: str) -> list[Prepared]:
        """The prepared branches of this database whose global ids start with ``prefix``."""

    async def preflight(self, concurrency: int, probe: str) -> None:
        """Check that prepared transactions work here (preparing and committing ``probe``);
        a ConfigurationError naming the setting to change if not."""
