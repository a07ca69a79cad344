"""A worker process running a 3-step saga's participants and/or its coordinator.

Usage: ``python saga_worker.py STORE_URL PREFIX [SERVICE ...]``. Each step's
handler records its effect in ``{prefix}effects`` in the participant's local
transaction, so a test can count what really committed. Sagas whose key
starts with ``refuse-`` fail at step ``c`` and are compensated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass

import msgspec

import sagakit as sk

STEPS = ("a", "b", "c")
WORK_S = 0.005


@sk.command("w.Do")
class Do(msgspec.Struct, frozen=True):
    key: str


@sk.command("w.Undo")
class Undo(msgspec.Struct, frozen=True):
    key: str


@dataclass
class Job:
    key: str


class Refused(sk.BusinessError):
    code = "w.Refused"


def definition() -> sk.SagaDefinition[Job]:
    saga = sk.Saga("three-steps", Job)
    for name in STEPS:
        saga.step(name).invoke(name, lambda d: Do(d.key)).compensate(name, lambda d: Undo(d.key))
    return saga.build()


def build(url: str, prefix: str, services: list[str] | None = None) -> sk.App:
    settings = sk.Settings(lease=1.0, max_poll=0.05, prefix=prefix)
    app = sk.App(url, settings=settings, run=services)
    for name in STEPS:
        _participant(app.participant(name), name, prefix)
    app.saga(definition())
    return app


def _participant(part: sk.Participant, name: str, prefix: str) -> None:
    async def record(ctx: sk.Context, key: str, action: str) -> None:
        await ctx.db.execute(
            f"INSERT INTO {prefix}effects (saga, step, action) VALUES (?, ?, ?)", key, name, action
        )
        await asyncio.sleep(WORK_S)  # widen the window a SIGKILL can land in

    @part.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        if name == "c" and cmd.key.startswith("refuse-"):
            raise Refused("step c refuses")
        await record(ctx, cmd.key, "do")

    @part.command(Undo)
    async def undo(cmd: Undo, ctx: sk.Context) -> None:
        await record(ctx, cmd.key, "undo")


#: "N": act as the release before the newest N migrations (a rolling upgrade's old side)
BEHIND_ENV = "SAGAKIT_TEST_SCHEMA_BEHIND"


def fall_behind(n: int) -> None:
    """Withhold the newest ``n`` migrations, as an older release of sagakit would."""
    from sagakit.store import core, schema

    schema.MIGRATIONS = schema.MIGRATIONS[:-n]
    schema.SCHEMA_VERSION = core.SCHEMA_VERSION = len(schema.MIGRATIONS)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if behind := int(os.environ.get(BEHIND_ENV, "0") or 0):
        fall_behind(behind)
    url, prefix, *services = sys.argv[1:]
    asyncio.run(build(url, prefix, services or None).run_forever())


if __name__ == "__main__":
    main()
