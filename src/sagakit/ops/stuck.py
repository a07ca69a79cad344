"""Stuck sagas: instances that have made no progress for too long.

A running or compensating saga whose record has not changed for
``Settings.stuck_after`` seconds is *stuck*: its participant may be down, a
message may sit in a dead-letter queue, a timer may be missing. The
coordinator process watches for them and logs each newly stuck saga once, at
WARNING, with its id and the step(s) it waits on. Which ones were logged is
remembered in memory only, so a restarted process logs the still-stuck ones
again, once; a saga that moves on and later stalls again is logged again.
``app.sagas.list(stuck_for=...)`` and ``app.sagas.count_stuck(...)`` (and
``sagakit sagas list --stuck``) give the same answer on demand.

A step retried for ever changes the record on every retry, so it counts as
progress here; its attempt count is in the saga's progress and history.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..saga.queries import SagaQueries, SagaView

log = logging.getLogger("sagakit.stuck")

#: the most stuck sagas one check looks at (the longest stuck first)
LIMIT = 1000


class StuckWatcher:
    """Logs each saga that became stuck since the last check, once."""

    def __init__(self, queries: SagaQueries, after: float, *, limit: int = LIMIT) -> None:
        self.queries = queries
        self.after = after
        self.limit = limit
        self._logged: set[str] = set()

    async def check(self) -> list[SagaView]:
        """Log the newly stuck sagas and return them."""
        stuck = await self.queries.list(stuck_for=self.after, limit=self.limit)
        new = [v for v in stuck if v.id not in self._logged]
        for view in new:
            self._warn(view)
        self._logged = {v.id for v in stuck}  # forget those that moved on
        return new

    def _warn(self, view: SagaView) -> None:
        now = self.queries.store.clock.now()
        steps = ", ".join(view.pending) or "(none pending)"
        log.warning(
            "saga %s (%s v%d) is stuck: %s, no progress for %.0fs, waiting on step %s",
            view.id,
            view.type,
            view.version,
            view.state.value,
            now - view.updated_at,
            steps,
            extra={"saga_id": view.id, "step": steps},
        )
