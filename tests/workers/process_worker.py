"""A worker process for the process-manager kill test.

Usage: ``python process_worker.py STORE_URL PREFIX``. The ``relay`` process
manager walks each instance through ``STEPS`` ``ledger.Post`` commands, one
after the other's reply, with a durable timer pausing it halfway; the ledger
participant inserts one row per post, with some work in its transaction so a
SIGKILL often lands while transactions are open.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import msgspec

from sagakit import App, Context, Settings, command, reply
from sagakit.process import Decision, ProcessManager, Replied, TimerFired, decide, evolve

STEPS = 5
WORK_S = 0.01


@command("relay.Open")
class Open(msgspec.Struct, frozen=True):
    key: str


@command("ledger.Post")
class Post(msgspec.Struct, frozen=True):
    key: str
    step: int


@reply("ledger.Posted")
class Posted(msgspec.Struct, frozen=True):
    step: int


class Relay(msgspec.Struct, frozen=True):
    key: str
    status: str = "posting"
    posted: list[int] = []
    paused: int = 0


def relay_manager() -> ProcessManager[Relay]:
    pm = ProcessManager(
        "relay", Relay, key=lambda m: m.key, states=["posting", "pausing", "done"], final=["done"]
    )

    @pm.starts(Open, to="posting")
    def opened(m: Open) -> Decision:
        return decide(Relay(m.key)).send("ledger", Post(m.key, 1))

    @pm.replied(Post, returns=Posted, when="posting", to=("pausing", "done"))
    def posted(r: Replied, s: Relay) -> Decision:
        s = msgspec.structs.replace(s, posted=[*s.posted, r.value.step])
        if len(s.posted) == STEPS:
            return evolve(s, status="done")
        if len(s.posted) == STEPS // 2:
            return evolve(s, status="pausing").after("pause", 0.05)
        return decide(s).send("ledger", Post(s.key, len(s.posted) + 1))

    @pm.timer("pause", when="pausing", to="posting")
    def resume(t: TimerFired, s: Relay) -> Decision:
        s = msgspec.structs.replace(s, status="posting", paused=s.paused + 1)
        return decide(s).send("ledger", Post(s.key, len(s.posted) + 1))

    return pm


def build(url: str, prefix: str) -> App:
    """The App: the relay process manager and the ledger; a short lease."""
    app = App(url, settings=Settings(lease=1.0, max_poll=0.05, prefix=prefix))
    app.process(relay_manager())
    ledger = app.participant("ledger")

    @ledger.command(Post)
    async def post(cmd: Post, ctx: Context) -> Posted:
        await ctx.db.execute(
            f"INSERT INTO {prefix}ledger (key, step) VALUES (?, ?)", cmd.key, cmd.step
        )
        await asyncio.sleep(WORK_S)
        return Posted(cmd.step)

    return app


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    url, prefix = sys.argv[1], sys.argv[2]
    asyncio.run(build(url, prefix).run_forever())


if __name__ == "__main__":
    main()
