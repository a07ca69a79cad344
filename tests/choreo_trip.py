"""A small choreographed trip booking used by the choreography tests.

hotel -> flight (pivot) -> email; a full flight cancels the hotel.
"""

from __future__ import annotations

from typing import Any

import msgspec

import sagakit as sk
from sagakit.choreography import Choreography


@sk.event("trip.Requested")
class TripRequested(msgspec.Struct):
    trip: str
    hotel_full: bool = False
    flight_full: bool = False


@sk.event("trip.HotelBooked")
class HotelBooked(msgspec.Struct):
    trip: str
    flight_full: bool = False


@sk.event("trip.HotelFull")
class HotelFull(msgspec.Struct):
    trip: str
    reason: str


@sk.event("trip.FlightBooked")
class FlightBooked(msgspec.Struct):
    trip: str


@sk.event("trip.FlightFull")
class FlightFull(msgspec.Struct):
    trip: str
    reason: str


@sk.event("trip.HotelCancelled")
class HotelCancelled(msgspec.Struct):
    trip: str


@sk.event("trip.Confirmed")
class TripConfirmed(msgspec.Struct):
    trip: str


@sk.event("trip.Cancelled")
class TripCancelled(msgspec.Struct):
    trip: str
    reason: str


class NoRoom(sk.BusinessError):
    code = "trip.NoRoom"


def contract(deadline: float | None = 30.0, hold: float = 5.0) -> Choreography:
    c = (
        Choreography("book-trip")
        .starts_on(TripRequested)
        .step("book-hotel", done=HotelBooked, failed=HotelFull)
        .step("book-flight", done=FlightBooked, failed=FlightFull)
        .pivot()
        .undo("book-hotel", on=(FlightFull,), done=HotelCancelled)
        .completes_on(TripConfirmed, TripCancelled)
        .hold_early_events(seconds=hold)
    )
    return c.deadline(seconds=deadline) if deadline else c


DDL = "CREATE TABLE IF NOT EXISTS {t} (trip TEXT PRIMARY KEY, state TEXT NOT NULL)"


async def book_hotel(e: TripRequested, ctx: sk.Context) -> None:
    await ctx.db.execute(DDL.format(t="hotel"))
    await ctx.db.execute("INSERT INTO hotel VALUES (?, 'booked')", e.trip)
    if e.hotel_full:  # the insert above is rolled back with the refusal
        raise NoRoom("no room left")
    ctx.publish(HotelBooked(e.trip, e.flight_full))


async def book_flight(e: HotelBooked, ctx: sk.Context) -> None:
    if e.flight_full:
        raise NoRoom("no seat left")
    await ctx.db.execute(DDL.format(t="flight"))
    await ctx.db.execute("INSERT INTO flight VALUES (?, 'booked')", e.trip)
    ctx.publish(FlightBooked(e.trip))


async def cancel_hotel(e: FlightFull, ctx: sk.Context) -> None:
    await ctx.db.execute("UPDATE hotel SET state = 'cancelled' WHERE trip = ?", e.trip)
    ctx.publish(HotelCancelled(e.trip))


async def confirm(e: FlightBooked, ctx: sk.Context) -> None:
    ctx.publish(TripConfirmed(e.trip))


async def cancel_no_hotel(e: HotelFull, ctx: sk.Context) -> None:
    ctx.publish(TripCancelled(e.trip, e.reason))


async def cancel_no_flight(e: FlightFull, ctx: sk.Context) -> None:
    ctx.publish(TripCancelled(e.trip, e.reason))


#: handler -> (participant, event it reacts to, events it publishes, failure event builder)
WIRING: dict[str, tuple[Any, str, type[Any], tuple[type[Any], ...], Any]] = {
    "book_hotel": (
        book_hotel,
        "hotels",
        TripRequested,
        (HotelBooked, HotelFull),
        lambda exc, e: HotelFull(e.trip, str(exc)),
    ),
    "book_flight": (
        book_flight,
        "airline",
        HotelBooked,
        (FlightBooked, FlightFull),
        lambda exc, e: FlightFull(e.trip, str(exc)),
    ),
    "cancel_hotel": (cancel_hotel, "hotels", FlightFull, (HotelCancelled,), None),
    "confirm": (confirm, "trips", FlightBooked, (TripConfirmed,), None),
    "cancel_no_hotel": (cancel_no_hotel, "trips", HotelFull, (TripCancelled,), None),
    "cancel_no_flight": (cancel_no_flight, "trips", FlightFull, (TripCancelled,), None),
}


def install(app: sk.App, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """hotels, airline and trips participants (leaving out the handlers in ``skip``)."""
    parts = {n: app.participant(n) for n in ("hotels", "airline", "trips")}
    for name, (fn, who, on, publishes, refusal) in WIRING.items():
        if name not in skip:
            parts[who].event(on, publishes=publishes, on_refusal=refusal)(fn)


async def request(app: sk.App, trip: str, **kw: bool) -> None:
    async with app.begin("trips", correlation_id=trip) as ctx:
        ctx.publish(TripRequested(trip, **kw))
