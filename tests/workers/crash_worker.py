"""A worker for the retry-budget test: killed under its handler, then failing once.

Usage: ``python crash_worker.py STORE_URL PREFIX RUNS_FILE HANGS``. Each run of
the ``crash.Charge`` handler appends a line to ``RUNS_FILE``; the first
``HANGS`` runs then hang until the test kills the process, the next raises a
technical error, and the one after writes its ledger row.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import msgspec

from sagakit import App, Context, RetryPolicy, Settings, command


@command("crash.Charge")
class Charge(msgspec.Struct, frozen=True):
    key: str


def build(url: str, prefix: str, runs: Path, hangs: int) -> App:
    """Two tries per message, a short lease so a killed worker's message comes back soon."""
    retry = RetryPolicy(max_attempts=2, initial=0.05)
    app = App(url, settings=Settings(lease=0.5, max_poll=0.05, prefix=prefix, retry=retry))

    @app.participant("crash").command(Charge)
    async def charge(cmd: Charge, ctx: Context) -> None:
        with runs.open("a") as f:
            f.write(f"{cmd.key}\n")
        run = len(runs.read_text().splitlines())
        if run <= hangs:
            await asyncio.sleep(3600)  # killed here
        if run == hangs + 1:
            raise ConnectionError("the card service is away")
        await ctx.db.execute(f"INSERT INTO {prefix}charges (k) VALUES (?)", cmd.key)

    return app


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    url, prefix, runs, hangs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    asyncio.run(build(url, prefix, runs, hangs).run_forever())


if __name__ == "__main__":
    main()
