"""The rules of a timeout-based lock, with no I/O.

A reservation holds ``amount`` units of a resource for a holder (a saga, and
the step that took it) until ``expires_at``. It is in one of four states, and
only these moves exist::

    reserved ──confirm (before expires_at)──▶ confirmed      final: the units are spent
        │ ──release──────────────────────────▶ released       final: the units are back
        └ ──expire (at or after expires_at)─▶ expired        final: the units are back

Every move starts from ``reserved``, so a reservation moves at most once:
whoever moves it first (a confirm, a release, the sweeper) decides, and the
others find it final. The SQL shell (:mod:`sagakit.locks.reservations`) puts
the same condition in each UPDATE, which is what makes the rules hold with
several processes at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError

RESERVED, CONFIRMED, RELEASED, EXPIRED = "reserved", "confirmed", "released", "expired"
STATES = (RESERVED, CONFIRMED, RELEASED, EXPIRED)
#: states in which a reservation's units are out of the pool
HOLDING = (RESERVED, CONFIRMED)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One holder's claim on a number of units of one resource."""

    holder: str
    step: str
    resource: str
    amount: int
    state: str
    expires_at: float

    def overdue(self, now: float) -> bool:
        """Still reserved, but its time is up: the sweeper may take it back."""
        return self.state == RESERVED and self.expires_at <= now


def confirm_refusal(r: Reservation, now: float) -> str | None:
    """Why ``r`` cannot be confirmed at ``now`` (None: it can, or already is).

    Time decides, not the sweeper: a reservation past its expiry is refused
    even if nobody has swept it yet, so a confirm never races the sweeper.
    """
    if r.state == CONFIRMED:
        return None
    if r.state == RESERVED and now < r.expires_at:
        return None
    late = now - r.expires_at
    if r.state in (RESERVED, EXPIRED):
        return f"the reservation of {r.amount} x {r.resource} expired {late:.3f}s ago"
    return f"the reservation of {r.amount} x {r.resource} was released"


def check_request(resource: str, amount: int | None, ttl: float) -> None:
    """Refuse a malformed reservation request (a programming error, not a business one)."""
    if not resource:
        raise ConfigurationError("a reservation needs a resource id")
    if amount is not None and amount <= 0:
        raise ConfigurationError(f"reserve {resource!r}: amount must be positive, got {amount}")
    if not ttl > 0:
        raise ConfigurationError(f"reserve {resource!r}: ttl must be positive, got {ttl}")


@dataclass(frozen=True, slots=True)
class PoolAudit:
    """One resource's books: every unit is free, held or spent, never two of them."""

    resource: str
    total: int
    available: int
    reserved: int
    confirmed: int

    @property
    def conserved(self) -> bool:
        return self.available >= 0 and self.total == self.available + self.reserved + self.confirmed
