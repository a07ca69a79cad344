"""A coordinator that runs one onboarding group and is SIGKILLed at a protocol point.

    python twophase_crash.py STORE CUSTOMERS ENROLLMENTS POINT CUSTOMER NODE

The crash hook lives here, in the test's process, not in the library: the
library only calls ``app.twophase.probe`` at each point.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sagakit.examples import onboarding as ob


async def main(
    store: str, customers: str, enrollments: str, point: str, who: str, node: str
) -> None:
    app = ob.build_app(store, customers, enrollments, node=node, recover_every=None)

    async def die(at: str) -> None:
        if at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    async with app:
        app.twophase.probe = die
        async with app.atomic("customers", "enrollments") as tx:
            await ob.verify(tx, who)
    print("finished without a crash")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
