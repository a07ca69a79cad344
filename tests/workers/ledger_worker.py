"""A worker process for the kill test: posts ledger commands into a business table.

Usage: ``python ledger_worker.py STORE_URL PREFIX``. Each ``ledger.Post``
command inserts one ledger row and adds its amount to a balance, in the same
local transaction as the inbox row and the queue acknowledgement, with some
work in between so a SIGKILL often lands while transactions are open.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import msgspec

from sagakit import App, Context, Settings, command

WORK_S = 0.02


@command("ledger.Post")
class Post(msgspec.Struct, frozen=True):
    amount: int


def build(url: str, prefix: str) -> App:
    """The App: one participant, a short lease so redelivery after a kill is quick."""
    app = App(url, settings=Settings(lease=1.0, max_poll=0.05, prefix=prefix))
    ledger = app.participant("ledger")

    @ledger.command(Post)
    async def post(cmd: Post, ctx: Context) -> None:
        await ctx.db.execute(
            f"INSERT INTO {prefix}ledger (msg_id, amount) VALUES (?, ?)",
            ctx.envelope.id,
            cmd.amount,
        )
        await asyncio.sleep(WORK_S)
        await ctx.db.execute(f"UPDATE {prefix}balance SET total = total + ?", cmd.amount)

    return app


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    url, prefix = sys.argv[1], sys.argv[2]
    asyncio.run(build(url, prefix).run_forever())


if __name__ == "__main__":
    main()
