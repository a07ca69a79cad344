"""A process for the handoff tests: a local consumer that messages are handed to.

Usage: ``python handoff_worker.py kill URL PREFIX QUEUE`` puts one message
that is handed to this process's consumer and SIGKILLs the process after the
COMMIT, before the handler runs (prints ``handed`` first).

``python handoff_worker.py share URL PREFIX QUEUE N`` puts ``N`` messages on
a queue it also consumes (other processes consume it too) and runs them
until killed: each run holds ``{prefix}running``'s row for its message, so a
copy running at the same time elsewhere is recorded in ``{prefix}overlaps``;
every third run outlives the lease (the heartbeat must keep it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sagakit.errors import StoreError
from sagakit.store import Store, open_store
from sagakit.store.consumer import QueueConsumer, QueueDelivery

KILL_LEASE = 5.0  #: the killed process's lease: the row stays leased this long
SHARE_LEASE = 1.5


def _url(url: str) -> str:
    return f"{url}?max_size=2" if url.startswith("postgresql") else url


async def kill(url: str, prefix: str, queue: str) -> None:
    store = open_store(_url(url), prefix=prefix)
    await store.open(migrate=False)

    async def never(d: QueueDelivery) -> None:  # the process dies before this runs
        print("handler ran", flush=True)

    consumer = QueueConsumer(store, queue, never, prefetch=4, lease=KILL_LEASE)

    def die() -> None:
        if len(consumer._inflight) == 1:  # the item was handed, its handler not yet run
            print("handed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    async with store.transaction() as tx:
        await store.queue.put(tx, queue, "doomed", b"x")
        tx.on_commit(die)  # after the handoff's own commit callback
    await asyncio.sleep(30)


async def share(url: str, prefix: str, queue: str, n: int) -> None:
    store = open_store(_url(url), prefix=prefix)
    await store.open(migrate=False)
    pid = os.getpid()

    async def run(d: QueueDelivery) -> None:
        await _exclusive(store, f"INSERT INTO {prefix}running (id) VALUES (?)", d, pid)
        await asyncio.sleep(
            SHARE_LEASE * 1.4 if int(d.item.id.rsplit("-", 1)[1]) % 3 == 0 else 0.01
        )
        async with store.transaction() as tx:
            await tx.execute(f"DELETE FROM {prefix}running WHERE id = ?", d.item.id)
            await tx.execute(f"INSERT INTO {prefix}runs (id, pid) VALUES (?, ?)", d.item.id, pid)
        await d.ack()

    QueueConsumer(store, queue, run, prefetch=3, lease=SHARE_LEASE, max_poll=0.05)
    for i in range(n):
        async with store.transaction() as tx:
            await store.queue.put(tx, queue, f"{pid}-{i}", b"x")
        await asyncio.sleep(0.005)
    print("put", flush=True)
    await asyncio.sleep(120)


async def _exclusive(store: Store, sql: str, d: QueueDelivery, pid: int) -> None:
    """Mark the message running; if a copy already runs, record the overlap."""
    try:
        async with store.transaction() as tx:
            await tx.execute(sql, d.item.id)
    except StoreError:
        async with store.transaction() as tx:
            await tx.execute(
                f"INSERT INTO {store.prefix}overlaps (id, pid) VALUES (?, ?)", d.item.id, pid
            )


def main() -> None:
    mode, url, prefix, queue = sys.argv[1:5]
    if mode == "kill":
        asyncio.run(kill(url, prefix, queue))
    else:
        asyncio.run(share(url, prefix, queue, int(sys.argv[5])))


if __name__ == "__main__":
    main()
