"""Small shared pieces for tests: message types and a bank of participants."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

import sagakit as sk


@sk.command("test.Do")
class Do(msgspec.Struct):
    key: str
    amount: int = 1


@sk.command("test.Undo")
class Undo(msgspec.Struct):
    key: str


@sk.reply("test.Done")
class DidIt(msgspec.Struct):
    value: int


@sk.event("test.Happened")
class Happened(msgspec.Struct):
    key: str


class Refused(sk.BusinessError):
    code = "test.Refused"


@dataclass
class Data:
    key: str
    total: int = 0
    log: list[str] = field(default_factory=list)


def die_with_parent() -> None:
    """preexec_fn for worker subprocesses: SIGTERM them if the test process dies."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, every: float = 0.01
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await check():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


def add(d: Data, r: DidIt) -> Data:
    return replace(d, total=d.total + r.value)


async def remove_namespace_of(t: Any) -> None:
    """Remove transport ``t``'s namespace on its broker (reopening ``t`` if closed), then close."""
    await t.close()
    await t.open()
    try:
        await t.remove_namespace(t.namespace)
    finally:
        await t.close()


async def queued(app: sk.App, queue: str) -> list[sk.Envelope]:
    """The envelopes waiting on ``queue`` of the App's database transport, oldest first."""
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {app.store.prefix}messages WHERE queue = ? ORDER BY seq", queue
        )
    return [app.codec.decode(bytes(r[0])) for r in rows]


def backend_url(request: Any, tmp_path: Any, max_size: int) -> str:
    """The store URL for a fixture parametrized ``["sqlite", "postgresql"]``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/app.db"
    return f"{request.getfixturevalue('postgres_url')}?max_size={max_size}"


async def drop_app_tables(app: sk.App) -> None:
    """After a test: drop the App's tables on PostgreSQL (a SQLite file goes with tmp_path)."""
    if app.store.dialect == "postgresql":
        from sagakit.testing import drop_tables

        await app.store.open()
        await drop_tables(app.store)
        await app.store.close()
