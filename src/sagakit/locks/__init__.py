"""Isolation for sagas: timeout-based locks and the semantic-lock helpers.

* :mod:`.rules` — the states of a reservation and the moves between them (pure);
* :mod:`.reservations` — pools of units and reservations in a participant's
  database, with the expiry sweeper (the SQL shell);
* :mod:`.pending` — the semantic lock: a record in a pending state, owned by
  the saga that will finalize or cancel it.

See docs/isolation.md for the anomalies sagas allow and which of these
countermeasures prevents which.
"""

from .pending import Pending, PendingRecord
from .reservations import Holder, Reservations
from .rules import CONFIRMED, EXPIRED, RELEASED, RESERVED, PoolAudit, Reservation

__all__ = [
    "CONFIRMED",
    "EXPIRED",
    "RELEASED",
    "RESERVED",
    "Holder",
    "Pending",
    "PendingRecord",
    "PoolAudit",
    "Reservation",
    "Reservations",
]
