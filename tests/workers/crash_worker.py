"""A worker for the retry-budget test: killed under its handler, then failing once.

Usage: ``python crash_worker.py STORE_URL PREFIX RUNS_FILE HANGS [TRANSPORT_URL]``.
Each run of the ``crash.Charge`` handler appends a line to ``RUNS_FILE``; the
first ``HANGS`` runs then hang until the test kills the process, the next
raises a technical error, and the one after writes its ledger row. The worker
prints ``ready`` once it consumes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import msgspec

from sagakit import App, Context, RetryPolicy, Settings, command


@command("crash.Charge")
class Charge(msgspec.Struct, frozen=True):
    key: str


def build(url: str, prefix: str, runs: Path, hangs: int, transport: str | None = None) -> App:
    """Two tries per message, a short lease so a killed worker's message comes back soon."""
    retry = RetryPolicy(max_attempts=2, initial=0.05)
    settings = Settings(lease=0.5, max_poll=0.05, prefix=prefix, retry=retry)
    app = App(url, transport or "database", settings=settings)

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


async def serve(app: App) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with app:
        print("ready", flush=True)
        await stop.wait()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    url, prefix, runs, hangs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    transport = sys.argv[5] if len(sys.argv) > 5 else None
    asyncio.run(serve(build(url, prefix, runs, hangs, transport)))


if __name__ == "__main__":
    main()
