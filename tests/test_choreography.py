"""Choreographed sagas: events with guarantees, the contract, the tracker, the check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit import cli
from sagakit.choreography import Choreography, ChoreographyStalled
from sagakit.choreography.check import problems
from sagakit.errors import FlowNotFound, MissingCorrelation, UndeclaredEvent
from tests.choreo_trip import (
    FlightBooked,
    FlightFull,
    HotelBooked,
    HotelCancelled,
    HotelFull,
    TripCancelled,
    TripConfirmed,
    TripRequested,
    contract,
    install,
    request,
)
from tests.helpers import eventually

FAST = sk.Settings(max_poll=0.01, retry=sk.RetryPolicy(max_attempts=3, initial=0.01))


@pytest.fixture
async def trip() -> AsyncIterator[sk.App]:
    app = sk.App("memory://", settings=FAST)
    install(app)
    app.track(contract().build())
    async with app:
        yield app


async def test_a_completed_flow_has_its_timeline_and_expects_nothing(trip: sk.App) -> None:
    await request(trip, "t1")
    view = await trip.flows.wait("t1", timeout=10)
    assert view.status == "completed"
    assert view.done == ["book-hotel", "book-flight"] and not view.failures
    assert view.owed == [] and view.expects == []
    assert [r.type for r in view.timeline] == [
        "trip.Requested",
        "trip.HotelBooked",
        "trip.FlightBooked",
        "trip.Confirmed",
    ]
    assert all(r.kind == "applied" for r in view.timeline)


async def test_a_failure_event_triggers_the_compensation_and_the_flow_ends_compensated(
    trip: sk.App,
) -> None:
    await request(trip, "t3", flight_full=True)
    view = await trip.flows.wait("t3", timeout=10)
    assert view.status == "compensated"
    assert view.failures == ["trip.FlightFull"] and view.compensated == ["book-hotel"]
    async with trip.store.transaction() as tx:
        row = await tx.fetchone("SELECT state FROM hotel WHERE trip = 't3'")
    assert row[0] == "cancelled"


async def test_a_refusing_event_handler_rolls_back_and_publishes_its_failure_event(
    trip: sk.App,
) -> None:
    await request(trip, "t2", hotel_full=True)
    view = await trip.flows.wait("t2", timeout=10)
    assert view.status == "compensated" and view.failures == ["trip.HotelFull"]
    async with trip.store.transaction() as tx:
        await tx.execute("CREATE TABLE IF NOT EXISTS hotel (trip TEXT PRIMARY KEY, state TEXT)")
        row = await tx.fetchone("SELECT count(*) FROM hotel WHERE trip = 't2'")
    assert row[0] == 0  # the insert before the refusal did not commit


# -- a tracker fed by hand ------------------------------------------------------


@sk.event("trip.Noted")
class Noted(msgspec.Struct):
    trip: str


@pytest.fixture
async def watched() -> AsyncIterator[sk.App]:
    """Only a tracker and a source of events: nobody reacts, so the test decides."""
    app = sk.App("memory://", settings=FAST)
    app.participant("source")
    app.track(contract(deadline=0.3, hold=0.3).also_records(Noted).build())
    ops = app.participant("ops")
    app.stalled = []  # type: ignore[attr-defined]

    @ops.event(ChoreographyStalled, publishes=())
    async def alert(e: ChoreographyStalled, ctx: sk.Context) -> None:
        app.stalled.append(e)  # type: ignore[attr-defined]

    async with app:
        yield app


async def emit(app: sk.App, cid: str, *events: Any) -> None:
    for e in events:
        async with app.begin("source", correlation_id=cid) as ctx:
            ctx.publish(e)


async def status_is(app: sk.App, cid: str, status: str) -> sk.choreography.FlowView:
    async def check() -> bool:
        try:
            return (await app.flows.get(cid)).status == status
        except FlowNotFound:
            return False

    await eventually(check, timeout=10)
    return await app.flows.get(cid)


async def test_events_before_the_start_are_held_then_applied_in_order(watched: sk.App) -> None:
    await emit(watched, "early", HotelBooked("early"))
    view = await status_is(watched, "early", "held")
    assert view.timeline[0].kind == "held" and "waiting for trip.Requested" in (
        view.timeline[0].reason or ""
    )
    assert view.expects == ["trip.Requested"]
    await emit(watched, "early", TripRequested("early"), FlightBooked("early"))
    await emit(watched, "early", TripConfirmed("early"))
    view = await status_is(watched, "early", "completed")
    kinds = [(r.kind, r.type) for r in view.timeline]
    assert kinds[0] == ("released", "trip.HotelBooked")
    assert ("applied", "trip.HotelBooked") in kinds and view.events == 4


async def test_an_unknown_correlation_id_after_the_hold_is_recorded_with_a_reason(
    watched: sk.App,
) -> None:
    await emit(watched, "ghost", FlightBooked("ghost"))
    view = await status_is(watched, "ghost", "orphaned")
    assert [r.kind for r in view.timeline] == ["held", "hold-expired"]
    assert "no trip.Requested for this correlation id" in (view.timeline[1].reason or "")
    await emit(watched, "ghost", HotelBooked("ghost"))

    await rows(watched, "ghost", 3)
    last = (await watched.flows.get("ghost")).timeline[-1]
    assert last.kind == "rejected" and "hold time" in (last.reason or "")


async def test_a_passed_deadline_marks_the_flow_stuck_and_publishes_stalled(
    watched: sk.App,
) -> None:
    await emit(watched, "slow", TripRequested("slow"), HotelBooked("slow"))
    view = await status_is(watched, "slow", "stuck")
    assert view.expects == ["trip.FlightBooked", "trip.Confirmed", "trip.Cancelled"]
    await eventually(lambda: _true(bool(watched.stalled)))  # type: ignore[attr-defined]
    [alert] = watched.stalled  # type: ignore[attr-defined]
    assert alert.correlation_id == "slow" and alert.status == "running"
    stuck = await watched.flows.list(status="stuck")
    assert [v.correlation_id for v in stuck] == ["slow"]
    # late events still count: the flow can finish after being reported
    await emit(watched, "slow", FlightBooked("slow"), TripConfirmed("slow"))
    await status_is(watched, "slow", "completed")


async def rows(app: sk.App, cid: str, n: int) -> sk.choreography.FlowView:
    """The flow once its timeline has ``n`` rows."""

    async def check() -> bool:
        try:
            return len((await app.flows.get(cid)).timeline) >= n
        except FlowNotFound:
            return False

    await eventually(check, timeout=10)
    return await app.flows.get(cid)


async def _true(value: bool) -> bool:
    return value


async def test_a_failure_event_for_a_finished_flow_is_recorded_and_changes_nothing(
    watched: sk.App,
) -> None:
    cid = "done"
    await emit(watched, cid, TripRequested(cid), HotelBooked(cid), FlightBooked(cid))
    await emit(watched, cid, TripConfirmed(cid))
    await status_is(watched, cid, "completed")
    await emit(watched, cid, FlightFull(cid, "too late"), HotelCancelled(cid))

    await rows(watched, cid, 6)
    view = await watched.flows.get(cid)
    assert view.status == "completed" and not view.failures and not view.compensated
    assert [r.kind for r in view.timeline[-2:]] == ["outside", "outside"]
    assert "already completed" in (view.timeline[-2].reason or "")


async def test_a_payload_that_does_not_match_is_recorded_and_changes_nothing(
    watched: sk.App,
) -> None:
    cid = "bad"
    await emit(watched, cid, TripRequested(cid))
    await status_is(watched, cid, "running")
    tracker = watched.flows.trackers["book-trip"]
    env = watched.codec.make(HotelBooked(cid), sk.messages.Headers(correlation_id=cid))
    env.payload = msgspec.Raw(b'{"trip": 42}')
    async with watched.store.transaction() as tx:
        await watched.store.queue.put(tx, tracker.queue, env.id, watched.codec.encode(env))

    await rows(watched, cid, 2)
    view = await watched.flows.get(cid)
    assert view.status == "running" and view.done == [] and view.events == 1
    assert view.timeline[-1].kind == "rejected"
    assert "payload does not match" in (view.timeline[-1].reason or "")
    assert await watched.store.dead_letters() == []  # recorded, not dead-lettered


async def test_each_event_is_counted_once_even_when_delivered_twice(watched: sk.App) -> None:
    cid = "dup"
    tracker = watched.flows.trackers["book-trip"]
    events = [TripRequested(cid), HotelBooked(cid), FlightBooked(cid), TripConfirmed(cid)]
    envs = [watched.codec.make(e, sk.messages.Headers(correlation_id=cid)) for e in events]
    async with watched.store.transaction() as tx:
        for env in envs + envs[::-1]:  # every copy twice, the second time backwards
            await watched.store.queue.put(tx, tracker.queue, env.id, watched.codec.encode(env))

    async def drained() -> bool:
        return await watched.store.queue.depth(tracker.queue) == 0

    await eventually(drained)
    view = await watched.flows.get(cid)
    assert view.status == "completed" and view.events == 4 and len(view.timeline) == 4


async def test_a_recorded_event_outside_the_contract_is_shown(watched: sk.App) -> None:
    await emit(watched, "noted", TripRequested("noted"), Noted("noted"))
    view = await rows(watched, "noted", 2)
    assert (view.timeline[1].kind, view.timeline[1].type) == ("outside", "trip.Noted")
    assert "not an event of this choreography" in (view.timeline[1].reason or "")
    assert view.status == "running" and view.events == 1


async def test_an_event_that_does_not_fit_is_shown(watched: sk.App) -> None:
    cid = "twice"
    await emit(watched, cid, TripRequested(cid), HotelBooked(cid), HotelBooked(cid))

    await rows(watched, cid, 3)
    last = (await watched.flows.get(cid)).timeline[-1]
    assert last.kind == "outside" and "already reported done" in (last.reason or "")


# -- publishing rules -----------------------------------------------------------


async def test_begin_without_a_correlation_id_is_refused() -> None:
    app = sk.App("memory://", settings=FAST)
    app.participant("source")
    async with app:
        with pytest.raises(MissingCorrelation):
            async with app.begin("source") as ctx:
                ctx.publish(TripRequested("x"))
        async with app.begin("source", new_conversation=True) as ctx:
            ctx.publish(TripRequested("x"))
            assert ctx.correlation_id


async def test_an_event_without_a_correlation_id_cannot_be_published_on() -> None:
    app = sk.App("memory://", settings=FAST)
    hotels = app.participant("hotels")
    seen: list[str | None] = []

    @hotels.event(TripRequested, publishes=(HotelBooked,))
    async def book(e: TripRequested, ctx: sk.Context) -> None:
        if e.hotel_full:  # this one begins a new conversation on purpose
            ctx.publish(HotelBooked(e.trip), new_conversation=True)
            seen.append(ctx.correlation_id)
            return
        ctx.publish(HotelBooked(e.trip))

    async with app:
        bare = app.codec.make(TripRequested("a"), sk.messages.Headers())
        ok = app.codec.make(TripRequested("b", hotel_full=True), sk.messages.Headers())
        async with app.store.transaction() as tx:
            for env in (bare, ok):
                await app.store.queue.put(tx, "hotels", env.id, app.codec.encode(env))

        async def dead() -> bool:
            return len(await app.store.dead_letters()) == 1

        await eventually(dead)
        [letter] = await app.store.dead_letters()
        assert "MissingCorrelation" in letter.reason and letter.id == bare.id
        assert seen == [None]


async def test_publishing_an_undeclared_event_raises() -> None:
    app = sk.App("memory://", settings=FAST)
    app.participant("source")
    hotels = app.participant("hotels")
    errors: list[Exception] = []

    @hotels.event(TripRequested, publishes=(HotelBooked,))
    async def book(e: TripRequested, ctx: sk.Context) -> None:
        try:
            ctx.publish(FlightBooked(e.trip))
        except UndeclaredEvent as exc:
            errors.append(exc)

    async with app:
        await emit(app, "u", TripRequested("u"))
        await eventually(lambda: _true(bool(errors)))
    assert "trip.FlightBooked" in str(errors[0])


def test_on_refusal_needs_publishes() -> None:
    p = sk.App("memory://").participant("hotels")
    with pytest.raises(sk.ConfigurationError):
        p.event(TripRequested, on_refusal=lambda exc, e: HotelFull(e.trip, str(exc)))


# -- the contract -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: Choreography("x").step("a", done=HotelBooked).build(), "no starts_on"),
        (lambda: Choreography("x").starts_on(TripRequested).build(), "at least one step"),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked)
                .step("a", done=FlightBooked)
                .build()
            ),
            "unique",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked)
                .pivot()
                .step("b", done=FlightBooked, failed=FlightFull)
                .build()
            ),
            "after the pivot cannot fail",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked, failed=HotelFull)
                .undo("a", on=(HotelFull,), done=HotelCancelled)
                .build()
            ),
            "nothing done to undo",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked)
                .step("b", done=FlightBooked, failed=FlightFull)
                .undo("a", on=(TripCancelled,), done=HotelCancelled)
                .build()
            ),
            "not a step's failure event",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked)
                .step("b", done=HotelBooked)
                .build()
            ),
            "more than one role",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked, failed=HotelFull)
                .pivot()
                .undo("a", on=(HotelFull,), done=HotelCancelled)
                .build()
            ),
            "only steps before the pivot",
        ),
        (
            lambda: (
                Choreography("x")
                .starts_on(TripRequested)
                .step("a", done=HotelBooked)
                .step("b", done=FlightBooked, failed=FlightFull)
                .step("c", done=TripConfirmed, failed=TripCancelled)
                .undo("a", on=(FlightFull,), done=HotelCancelled)
                .build()
            ),
            "does not trigger the undo of 'a'",
        ),
        (lambda: Choreography("Bad Name"), "choreography name"),
    ],
)
def test_invalid_contracts_are_refused_at_build_time(build: Any, words: str) -> None:
    with pytest.raises(sk.DefinitionError, match=words):
        build()


def test_tracking_a_choreography_twice_raises() -> None:
    app = sk.App("memory://")
    app.track(contract().build())
    with pytest.raises(sk.DuplicateRegistration):
        app.track(contract().build())


# -- sagakit check ----------------------------------------------------------------


def broken() -> sk.App:
    """The trip app with the hotel's cancellation handler missing."""
    app = sk.App("memory://")
    install(app, skip={"cancel_hotel", "confirm"})
    app.track(contract().build())
    return app


def test_check_lists_what_the_handlers_do_not_publish() -> None:
    found = problems(broken())
    assert any(
        "'trip.FlightFull' has no handler that publishes 'trip.HotelCancelled'" in p for p in found
    ), found
    assert any("no handler publishes 'trip.Confirmed'" in p for p in found), found


def test_check_finds_unreachable_steps() -> None:
    app = sk.App("memory://")
    install(app, skip={"book_flight"})
    app.track(contract().build())
    found = problems(app)
    assert any("step 'book-flight' is unreachable" in p for p in found), found


def test_check_command_exits_non_zero_with_a_readable_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["check", "tests.test_choreography:broken"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("2 problems in tests.test_choreography:broken:")
    assert cli.main(["check", "tests.test_choreography:whole"]) == 0
    assert "no problems (1 choreography checked)" in capsys.readouterr().out


def test_check_passes_on_the_demo_choreography(capsys: pytest.CaptureFixture[str]) -> None:
    spec = "sagakit.examples.order_fulfillment.choreography:application"
    assert cli.main(["check", spec, "--json"]) == 0
    assert '"ok": true' in capsys.readouterr().out


def whole() -> sk.App:
    app = sk.App("memory://")
    install(app)
    app.track(contract().build())
    return app


# -- the diagram ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "svg"),
    [
        ("sagakit.examples.order_fulfillment.choreography", "place-order-choreography.svg"),
        ("sagakit.examples.order_fulfillment.mixed", "place-order-mixed.svg"),
    ],
)
def test_the_diagram_is_drawn_from_the_contract_and_committed(module: str, svg: str) -> None:
    import importlib
    import xml.dom.minidom
    from pathlib import Path

    from sagakit.choreography.diagram import lane_of, render

    defn = importlib.import_module(module).place_order
    drawn = render(defn)
    xml.dom.minidom.parseString(drawn)  # well-formed
    for name in defn.events():
        assert f"<title>{name}</title>" in drawn
        assert f">{lane_of(name)}</text>" in drawn  # its service has a lane
    assert drawn.count("stroke-dasharray") == sum(len(u.on) for u in defn.undos)
    committed = Path(__file__).parent.parent / "docs" / svg
    assert committed.read_text() == drawn, f"regenerate docs/{svg} (see diagram.py)"
