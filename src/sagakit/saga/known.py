"""The instances this process wrote last: a coordinator's optimistic read without a round trip.

After a hop commits, the coordinator keeps the record it wrote (its state and
revision). The next hop of that saga in this process decides on it instead
of reading the row again. That is safe because every write of a hop is guarded
by the revision: if another process moved the saga on meanwhile, the hop
writes nothing, and the record is gone from here (taken, never put back by a
failed hop), so the hop run again reads the row. Bounded: the oldest records
are forgotten first; a finished saga's record is not kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..store import SagaRecord

DEFAULT_CAPACITY = 4096  #: records kept at most (about one per saga in flight is needed)


class KnownSagas:
    """Records committed by this process, taken by the next hop of their saga."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._records: dict[str, SagaRecord] = {}

    def take(self, saga_id: str) -> SagaRecord | None:
        """The record last committed here for ``saga_id``, removed (None if not known)."""
        return self._records.pop(saga_id, None)

    def keep(self, rec: SagaRecord) -> None:
        """Remember ``rec`` as committed (call after the commit)."""
        records = self._records
        records.pop(rec.id, None)
        records[rec.id] = rec
        if len(records) > self.capacity:
            del records[next(iter(records))]

    def __len__(self) -> int:
        return len(self._records)
