"""Process managers without I/O: the checkout example through given/when/then,
definition errors, and the definition checks."""

from __future__ import annotations

from typing import Literal

import msgspec
import pytest

import sagakit as sk
from sagakit.choreography.check_cli import run_checkers
from sagakit.errors import DefinitionError, DuplicateRegistration, IllegalTransition, ProcessError
from sagakit.examples.checkout import (
    CancelRequested,
    Charge,
    Charged,
    CheckoutEnded,
    CheckoutPaid,
    CheckoutStarted,
    Refund,
    checkout,
)
from sagakit.process import Ignore, ProcessManager, StatelessSaga, TimerFired, decide, evolve, react
from sagakit.process.check import problems
from sagakit.testing import failed, given, ok

START = CheckoutStarted("o-1", 500, ["card-a", "card-b"], 600.0)


def test_starting_charges_the_first_method_and_arms_the_timeout() -> None:
    (
        given(checkout)
        .when(START)
        .then(
            sends=[("payments", Charge("o-1", 500, "card-a"))],
            status="awaiting_payment",
            timers=["payment-timeout"],
            verdict="started",
        )
    )


def test_paid_cancels_the_timeout_and_a_late_timer_changes_nothing() -> None:
    s = given(checkout, START).when(ok(Charge, Charged("p-1")))
    s.then(status="paid", completed=True, timers=[], events=[CheckoutPaid("o-1", "p-1")])
    paid = s.state()
    s.advance(3600).then(sends=[], events=[], state=paid)


def test_a_declined_card_is_retried_with_the_next_method() -> None:
    s = given(checkout, START).when(failed(Charge, "payments.CardDeclined"))
    s.then(sends=[Charge("o-1", 500, "card-b")], status="awaiting_payment")
    assert s.state().tried == 2
    s.when(ok(Charge, Charged("p-2"))).then(status="paid")


def test_every_method_declined_fails_the_checkout() -> None:
    s = given(checkout, START, failed(Charge, "payments.CardDeclined", "no"))
    s.when(failed(Charge, "payments.CardDeclined", "no money")).then(
        status="failed",
        completed=True,
        sends=[],
        events=[CheckoutEnded("o-1", "failed", "no money")],
    )


def test_the_payment_timeout_cancels() -> None:
    s = given(checkout, START).advance(599).then(status="awaiting_payment", events=[])
    s.advance(1).then(status="cancelled", completed=True)
    assert s.state().reason == "no payment within 600s"


def test_cancellation_then_a_late_success_is_refunded() -> None:
    s = given(checkout, START).when(CancelRequested("o-1")).then(status="cancelled", timers=[])
    s.when(ok(Charge, Charged("p-9"))).then(
        sends=[("payments", Refund("o-1", "p-9"))], verdict="applied"
    )
    s.when(CancelRequested("o-1")).then(verdict="ignored", sends=[])
    s.advance(3600).then(events=[])  # the timeout was cancelled with the instance


def test_a_restarted_timer_fires_once_with_its_new_token() -> None:
    pm = ProcessManager("pinger", Ping, key=lambda m: m.id)

    @pm.starts(Poke, to="waiting")
    def start(e: Poke) -> sk.Decision:
        return decide(Ping(e.id)).after("t", 10)

    @pm.on(Poke, when="waiting")
    def again(e: Poke, s: Ping) -> sk.Decision:
        return evolve(s, pokes=s.pokes + 1).after("t", 10)

    @pm.timer("t", when="waiting", to="done")
    def fired(t: TimerFired, s: Ping) -> sk.Decision:
        return evolve(s, status="done", fired_at=t.due_at)

    s = given(pm, Poke("x")).advance(5).when(Poke("x")).advance(6).then(status="waiting")
    s.advance(4).then(status="done")
    assert s.state().fired_at == s.clock.now()


@sk.event("t.Poke")
class Poke(msgspec.Struct, frozen=True):
    id: str


class Ping(msgspec.Struct, frozen=True):
    id: str
    status: Literal["waiting", "done"] = "waiting"
    pokes: int = 0
    fired_at: float = 0.0


def test_a_handler_moving_outside_its_to_is_an_illegal_transition() -> None:
    pm = ProcessManager("strict", Ping, key=lambda m: m.id)

    @pm.starts(Poke, to="waiting")
    def start(e: Poke) -> sk.Decision:
        return decide(Ping(e.id, status="done"))

    with pytest.raises(IllegalTransition, match="'done'"):
        given(pm, Poke("x"))


def test_definition_errors_are_raised_at_registration() -> None:
    pm = ProcessManager("defs", Ping, key=lambda m: m.id)
    with pytest.raises(DefinitionError, match="undeclared"):
        pm.on(Poke, when="nowhere")
    pm.on(Poke, when="waiting")(lambda e, s: react())
    with pytest.raises(DuplicateRegistration):
        pm.on(Poke, when="waiting")
    with pytest.raises(DefinitionError):
        StatelessSaga("sl").timer("t")


def test_a_stateless_saga_maps_events_to_commands() -> None:
    saga = StatelessSaga("forwarder")

    @saga.on(CheckoutPaid)
    def paid(e: CheckoutPaid) -> sk.Decision:
        return react().send("shipping", Charge(e.order_id, 0, "n/a"))

    given(saga).when(CheckoutPaid("o-1", "p")).then(sends=[("shipping", Charge("o-1", 0, "n/a"))])

    @saga.on(CheckoutStarted)
    def bad(e: CheckoutStarted) -> sk.Decision:
        return decide(1)

    with pytest.raises(ProcessError, match="only send and publish"):
        given(saga).when(START)


def test_the_example_passes_the_definition_checks() -> None:
    assert problems([checkout]) == []


def test_the_checks_name_each_problem() -> None:
    pm = ProcessManager(
        "broken",
        Ping,
        states=["waiting", "stuck", "orphan", "done"],
        final=["done"],
        missing=Ignore(),
    )

    @pm.starts(Poke, to="waiting")
    def start(e: Poke) -> sk.Decision:
        return decide(Ping(e.id)).after("reminder", 5)

    @pm.on(CheckoutPaid, when="waiting", to="stuck")
    def paid(e: CheckoutPaid, s: Ping) -> sk.Decision:
        return evolve(s, status="stuck")

    @pm.on(CancelRequested, when="done", to="waiting")
    def reopen(e: CancelRequested, s: Ping) -> sk.Decision:
        return evolve(s, status="waiting")

    @pm.timer("never-started", when="waiting", to="done")
    def late(t: TimerFired, s: Ping) -> sk.Decision:
        return evolve(s, status="done")

    found = problems([pm])
    app = sk.App("memory://")
    app.process(pm)
    # `sagakit check MODULE:APP` runs these checks beside the choreography lint
    assert run_checkers(app) == found
    unmapped = "has no key mapping (key= on the process manager or the handler)"
    assert found == [
        f"broken: message 't.Poke' {unmapped}",
        f"broken: message 'checkout.CheckoutPaid' {unmapped}",
        f"broken: message 'checkout.CancelRequested' {unmapped}",
        "broken: timer 'reminder' is started but has no @broken.timer handler",
        "broken: timer handler 'never-started' waits for a timer no handler starts",
        "broken: state 'orphan' is unreachable",
        "broken: state 'stuck' is not final and nothing leads out of it",
        "broken: message handler of 'checkout.CancelRequested' leaves final state 'done' "
        "for 'waiting'",
    ]


def test_the_diagrams_are_generated_from_the_definitions() -> None:
    from pathlib import Path

    from sagakit.examples.order_fulfillment.process_manager import order_flow
    from sagakit.process.diagram import render

    docs = Path(__file__).parent.parent / "docs"
    for pm, name in ((checkout, "checkout-process.svg"), (order_flow, "order-flow-process.svg")):
        svg = render(pm)
        for state in pm.states:
            assert f">{state}</text>" in svg
        assert (docs / name).read_text() == svg, f"regenerate docs/{name}"
    assert "timer payment-timeout" in render(checkout)


def test_each_command_is_answered_once_whatever_the_copies_of_its_reply() -> None:
    """A participant that handled a command twice answers twice (a new reply id
    each time); only the first answer moves the instance."""
    from sagakit.process.definition import Replied
    from sagakit.process.machine import Input, apply

    inst = given(checkout, START).instances["o-1"]
    (step,) = inst.awaiting
    declined = Replied("payments.Charge", False, sk.Failure("payments.CardDeclined", "no"))
    first = apply(
        checkout, inst, Input("reply", "payments.Charge", declined, "r1", "o-1", step=step), 0
    )
    assert [c.command.method for c in first.commands] == ["card-b"]
    assert first.after is not None and step not in first.after.awaiting
    copy = Input("reply", "payments.Charge", declined, "r2", "o-1", step=step)
    again = apply(checkout, first.after, copy, 0)
    assert again.verdict == "ignored" and again.commands == () and again.after is None
