"""Health as the console shows it: sagas per state, stuck ones, queues and the outbox lag."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...outbox import OUTBOX_QUEUE
from ..commands import OPERATOR_QUEUE

if TYPE_CHECKING:
    from ...store import Store

STUCK_AFTER = 300.0  #: seconds without progress that count as stuck on this page


async def health(store: Store) -> dict[str, Any]:
    """Counts, the stuck sagas, every store queue's depth and oldest message age."""
    now = store.clock.now()
    rows = await store.driver.read(
        f"SELECT queue, count(*), min(created_at) FROM {store.prefix}messages GROUP BY queue"
    )
    queues = {r[0]: {"depth": int(r[1]), "oldest_s": round(now - float(r[2]), 3)} for r in rows}
    dead = await store.driver.read(f"SELECT count(*) FROM {store.prefix}dead_letters")
    outbox = queues.get(OUTBOX_QUEUE, {"depth": 0, "oldest_s": 0.0})
    return {
        "sagas": await store.saga_counts(),
        "stuck": await store.saga_count_stuck(now - STUCK_AFTER),
        "stuck_after_s": STUCK_AFTER,
        "queues": queues,
        "outbox_lag_s": outbox["oldest_s"],
        "operator_commands_queued": queues.get(OPERATOR_QUEUE, {}).get("depth", 0),
        "dead_letters": int(dead[0][0]),
    }
