"""Idle consumers leave polling to one look per store for due rows.

The look wakes only the queues holding a due row (a delayed message come
due, a dead consumer's lease run out); idle consumers do not claim on their
own every ``max_poll`` (on SQLite, once they have backed off to it). If the
look fails, a consumer still claims on its own every ``SAFETY_POLL_S``. The
poller runs while anything watches.
"""

from __future__ import annotations

from typing import Any

import pytest

from sagakit.errors import StoreUnavailable
from sagakit.store import Store
from sagakit.store.consumer import QueueConsumer, QueueDelivery
from sagakit.store.due import SAFETY_POLL_S
from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)


class Counted:
    """The claims and the looks for due rows the store sends."""

    def __init__(self, store: Store) -> None:
        self.claims: dict[str, int] = {}
        self.looks = 0
        real = store.driver.fetch_single

        async def counted(sql: str, *args: Any) -> list[Any]:
            if "attempts = attempts + 1" in sql:
                self.claims[args[2]] = self.claims.get(args[2], 0) + 1
            elif ("unnest(" in sql or "json_each(" in sql) and "available_at <=" in sql:
                self.looks += 1
            return list(await real(sql, *args))

        store.driver.fetch_single = counted  # type: ignore[method-assign]


class Got:
    def __init__(self) -> None:
        self.ids: list[str] = []

    async def __call__(self, d: QueueDelivery) -> None:
        self.ids.append(d.item.id)
        await d.ack()


def consumers(store: Store, queues: list[str], got: Got) -> list[QueueConsumer]:
    return [QueueConsumer(store, q, got, prefetch=2, lease=30.0, max_poll=0.05) for q in queues]


async def _true(value: bool) -> bool:
    return value


async def test_idle_queues_are_looked_at_together_and_a_delayed_message_still_comes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sagakit.store.consumer.SAFETY_POLL_S", 60.0)  # only the look wakes
    counted, got = Counted(store), Got()
    running = consumers(store, [f"q{i}" for i in range(5)], got)
    try:
        await eventually(lambda: _true(counted.looks >= 10))  # backed off (SQLite ramps first)
        before, looks = dict(counted.claims), counted.looks
        await eventually(lambda: _true(counted.looks >= looks + 10))  # half a second idle
        assert counted.claims == before  # no consumer claimed on its own meanwhile
        async with store.transaction() as tx:
            await store.queue.put(tx, "q3", "later", b"x", delay=0.3)  # no wake-up when due
        await eventually(lambda: _true(got.ids == ["later"]), timeout=5)
        assert counted.claims["q1"] == before["q1"]  # only q3 was woken
    finally:
        for c in running:
            await c.stop()
    assert store.queue.poller._task is None  # nobody watches: the poller stopped


async def test_a_failing_look_leaves_consumers_claiming_on_their_own(
    pg: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def away(queues: Any) -> list[str]:
        raise StoreUnavailable("postgresql: connection refused", retryable=True)

    monkeypatch.setattr(pg.queue, "due", away)
    got = Got()
    [consumer] = consumers(pg, ["q"], got)
    try:
        async with pg.transaction() as tx:
            await pg.queue.put(tx, "q", "later", b"x", delay=0.2)
        await eventually(lambda: _true(got.ids == ["later"]), timeout=SAFETY_POLL_S * 1.2 + 5)
    finally:
        await consumer.stop()


async def test_the_poller_runs_while_any_consumer_of_the_store_watches(pg: Store) -> None:
    got = Got()
    a, b = consumers(pg, ["q", "q"], got)
    poller = pg.queue.poller
    assert poller._task is not None
    await a.stop()
    assert poller._task is not None, "b still watches q"
    async with pg.transaction() as tx:
        await pg.queue.put(tx, "q", "for-b", b"x", delay=0.2)
    await eventually(lambda: _true(got.ids == ["for-b"]), timeout=5)
    await b.stop()
    assert poller._task is None
