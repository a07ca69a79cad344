"""Store-wide gauges, read with a few aggregate queries when ``/metrics`` is scraped.

- ``sagakit_sagas_active{saga_type,state}``: running and compensating instances;
- ``sagakit_saga_oldest_active_age_seconds{saga_type}``;
- ``sagakit_sagas_stuck{saga_type}``: unfinished and unchanged for ``stuck_after``
  (the rule of :mod:`sagakit.ops.stuck`);
- ``sagakit_sagas_failed{saga_type}``: stopped in ``failed``, waiting for an operator;
- ``sagakit_steps_long_retrying{saga_type,step,phase}``: steps on attempt
  ``long_retry`` or later (read from the unfinished instances, at most ``SCAN``);
- ``sagakit_outbox_pending{store}`` and ``sagakit_outbox_oldest_age_seconds{store}``;
- ``sagakit_timers_pending``; ``sagakit_dead_letters{store,queue}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..outbox import OUTBOX_QUEUE
from ..saga.coordinator import TIMER_QUEUE
from ..store.core import UNFINISHED_SQL

if TYPE_CHECKING:
    from ..store import Store
    from .metrics import Metrics

SCAN = 10_000  #: the most unfinished instances one scrape decodes for long-retrying steps

Values = dict[tuple[str, ...], float]


class _Pending(msgspec.Struct):
    attempt: int
    phase: str
    waiting: bool = False


class _Progress(msgspec.Struct):
    pending: dict[str, _Pending] = {}


_progress = msgspec.json.Decoder(_Progress)


class StoreGauges:
    """Reads the gauges of the App's store and of its participants' stores.

    ``stores`` gives the stores by name when a scrape asks (participants may be
    added after the App was instrumented).
    """

    def __init__(
        self,
        main: Store,
        stores: Callable[[], Mapping[str, Store]],
        *,
        stuck_after: float,
        long_retry: int,
    ) -> None:
        self.main, self.stores = main, stores
        self.stuck_after, self.long_retry = stuck_after, long_retry

    def register(self, m: Metrics) -> None:
        m.gauge("sagas_active", "Unfinished sagas", ["saga_type", "state"], self.active)
        m.gauge(
            "saga_oldest_active_age_seconds",
            "Age of the oldest unfinished saga",
            ["saga_type"],
            self.oldest,
        )
        m.gauge(
            "sagas_stuck",
            f"Unfinished sagas unchanged for {self.stuck_after:g}s",
            ["saga_type"],
            self.stuck,
        )
        m.gauge(
            "sagas_failed", "Sagas stopped in failed, for an operator", ["saga_type"], self.failed
        )
        m.gauge(
            "steps_long_retrying",
            f"Steps awaiting attempt {self.long_retry} or later",
            ["saga_type", "step", "phase"],
            self.long_retrying,
        )
        m.gauge("outbox_pending", "Outbox rows not yet relayed", ["store"], self.outbox_pending)
        m.gauge(
            "outbox_oldest_age_seconds", "Age of the oldest outbox row", ["store"], self.outbox_age
        )
        m.gauge("timers_pending", "Durable timers not yet fired", [], self.timers)
        m.gauge("dead_letters", "Dead letters kept", ["store", "queue"], self.dead_letters)

    async def _read(self, store: Store, sql: str, *args: object) -> list[Any]:
        return await store.driver.read(sql.format(p=store.prefix), *args)

    async def active(self) -> Values:
        rows = await self._read(
            self.main,
            f"SELECT type, state, count(*) FROM {{p}}sagas WHERE state IN {UNFINISHED_SQL} "
            "GROUP BY type, state",
        )
        return {(str(t), str(s)): float(n) for t, s, n in rows}

    async def oldest(self) -> Values:
        rows = await self._read(
            self.main,
            f"SELECT type, min(created_at) FROM {{p}}sagas WHERE state IN {UNFINISHED_SQL} "
            "GROUP BY type",
        )
        now = self.main.clock.now()
        return {(str(t),): max(0.0, now - float(c)) for t, c in rows}

    async def stuck(self) -> Values:
        before = self.main.clock.now() - self.stuck_after
        rows = await self._read(
            self.main,
            f"SELECT type, count(*) FROM {{p}}sagas WHERE state IN {UNFINISHED_SQL} "
            "AND updated_at < ? GROUP BY type",
            before,
        )
        return {(str(t),): float(n) for t, n in rows}

    async def failed(self) -> Values:
        rows = await self._read(
            self.main, "SELECT type, count(*) FROM {p}sagas WHERE state = 'failed' GROUP BY type"
        )
        return {(str(t),): float(n) for t, n in rows}

    async def long_retrying(self) -> Values:
        rows = await self._read(
            self.main,
            f"SELECT type, progress FROM {{p}}sagas WHERE state IN {UNFINISHED_SQL} LIMIT ?",
            SCAN,
        )
        counts: Counter[tuple[str, ...]] = Counter()
        for saga_type, raw in rows:
            for step, p in _progress.decode(bytes(raw)).pending.items():
                if p.attempt >= self.long_retry:
                    counts[(str(saga_type), step, p.phase)] += 1
        return {k: float(v) for k, v in counts.items()}

    async def outbox_pending(self) -> Values:
        out: Values = {}
        for name, store in self.stores().items():
            rows = await self._read(
                store, "SELECT count(*) FROM {p}messages WHERE queue = ?", OUTBOX_QUEUE
            )
            out[(name,)] = float(rows[0][0])
        return out

    async def outbox_age(self) -> Values:
        out: Values = {}
        for name, store in self.stores().items():
            rows = await self._read(
                store, "SELECT min(created_at) FROM {p}messages WHERE queue = ?", OUTBOX_QUEUE
            )
            oldest = rows[0][0]
            age = store.clock.now() - float(oldest) if oldest is not None else 0.0
            out[(name,)] = max(0.0, age)
        return out

    async def timers(self) -> Values:
        rows = await self._read(
            self.main, "SELECT count(*) FROM {p}messages WHERE queue = ?", TIMER_QUEUE
        )
        return {(): float(rows[0][0])}

    async def dead_letters(self) -> Values:
        out: Values = {}
        for name, store in self.stores().items():
            rows = await self._read(
                store, "SELECT queue, count(*) FROM {p}dead_letters GROUP BY queue"
            )
            out.update({(name, str(q)): float(n) for q, n in rows})
        return out
