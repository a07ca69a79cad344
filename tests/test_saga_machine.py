"""The saga machine on its own: pure decisions, no database, no clock.

Each test builds an instance, applies one event and reads the decision — the
way a newcomer can check what happens next without running anything.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import DefinitionError, InvalidOperatorAction
from sagakit.saga.machine import (
    CancelTimer,
    HistoryLine,
    Instance,
    OperatorAction,
    ReplyReceived,
    SagaMachine,
    SendCommand,
    Started,
    StartTimer,
    TimerFired,
)
from sagakit.saga.state import Pending, Progress, SagaState
from tests.helpers import DidIt, Do, Undo


class D(msgspec.Struct):
    key: str
    total: int = 0


def _machine(defn: sk.SagaDefinition[Any]) -> SagaMachine:
    counter = itertools.count(1)
    return SagaMachine(defn, ids=lambda: f"m{next(counter)}")


def _instance(**progress: Any) -> Instance:
    return Instance("s1", "t", 1, SagaState.RUNNING, D("k"), Progress(**progress))


def _reply(step: str, mid: str, sender: str, type_: str, payload: bytes = b"{}") -> ReplyReceived:
    return ReplyReceived(step, mid, "r1", type_, "success", payload, sender)


def _add(d: D, r: DidIt) -> D:
    if r.value < 0:
        raise ValueError("negative totals are a bug in on_reply")
    return D(d.key, d.total + r.value)


SAGA = (
    sk.Saga("t", D)
    .step("reserve")
    .invoke("stock", lambda d: Do(d.key))
    .compensate("stock", lambda d: Undo(d.key))
    .step("check")
    .invoke("rules", lambda d: Do(d.key))
    .nothing_to_undo()
    .timeout(5)
    .step("charge")
    .invoke("payments", lambda d: Do(d.key))
    .on_reply(DidIt, _add)
    .pivot()
    .timeout(5)
    .step("ship")
    .invoke("shipping", lambda d: Do(d.key))
    .retry(sk.RetryPolicy.forever())
    .build()
)


def test_start_sends_the_first_step_and_touches_nothing_else() -> None:
    inst = _instance()
    d = _machine(SAGA).apply(inst, Started())
    [cmd] = d.of(SendCommand)
    assert (cmd.step, cmd.participant, cmd.phase) == ("reserve", "stock", "forward")
    assert inst.progress.pending == {}, "the machine never changes its input"


def test_a_step_with_nothing_to_undo_that_times_out_lets_backward_recovery_run() -> None:
    inst = _instance(done=["reserve"], pending={"check": Pending("m1", 1, "forward", timer="t1")})
    d = _machine(SAGA).apply(inst, TimerFired("timeout", "m1", "check", 5))
    assert d.instance.state == SagaState.COMPENSATING
    [undo] = d.of(SendCommand)
    assert (undo.step, undo.phase, undo.participant) == ("reserve", "compensate", "stock")


def test_a_step_that_may_have_acted_is_asked_again_not_compensated_around() -> None:
    inst = _instance(
        done=["reserve", "check"], pending={"charge": Pending("m1", 1, "forward", timer="t1")}
    )
    d = _machine(SAGA).apply(inst, TimerFired("timeout", "m1", "charge", 5))
    assert d.instance.state == SagaState.RUNNING
    assert [t.kind for t in d.of(StartTimer)] == ["retry"]
    assert d.of(SendCommand) == []


def test_nothing_to_undo_is_only_for_steps_without_compensation_before_the_pivot() -> None:
    with pytest.raises(DefinitionError, match="nothing_to_undo"):
        (
            sk.Saga("bad", D)
            .step("a")
            .invoke("x", lambda d: Do(d.key))
            .compensate("x", lambda d: Undo(d.key))
            .nothing_to_undo()
            .build()
        )


@pytest.mark.parametrize(
    ("type_", "payload", "why"),
    [
        ("sagakit.Done", b"{}", "unexpected reply type"),
        ("test.Done", b'{"value": "x"}', "ValidationError"),
        ("test.Done", b'{"value": -1}', "bug in on_reply"),
    ],
)
def test_a_success_reply_that_cannot_be_applied_stops_for_an_operator(
    type_: str, payload: bytes, why: str
) -> None:
    inst = _instance(done=["reserve", "check"], pending={"charge": Pending("m1", 1, "forward")})
    d = _machine(SAGA).apply(inst, _reply("charge", "m1", "payments", type_, payload))
    assert d.instance.state == SagaState.FAILED
    assert why in (d.instance.error or "")
    assert d.instance.progress.unapplied["charge"].startswith(type_), "the reply is kept"
    assert d.of(SendCommand) == [], "nothing is compensated around the charge"
    again = _machine(SAGA).apply(d.instance, OperatorAction("retry", sk.Actor("ops"), "fixed"))
    [cmd] = again.of(SendCommand)
    assert (cmd.step, cmd.attempt) == ("charge", 2)
    assert again.instance.progress.unapplied == {}


def test_an_operator_cannot_compensate_around_a_pivot_in_flight() -> None:
    inst = _instance(done=["reserve", "check"], pending={"charge": Pending("m1", 1, "forward")})
    with pytest.raises(InvalidOperatorAction, match="'charge' is in flight"):
        _machine(SAGA).apply(inst, OperatorAction("compensate", sk.Actor("ops"), "customer"))


def test_a_step_retried_for_ever_keeps_a_bounded_delay() -> None:
    """Round 1 overflowed at attempt 1025 (about 8.5 hours of a downstream outage)."""
    policy = sk.RetryPolicy.forever()
    for attempt in (1025, 10**6, 10**12):
        assert 0 < policy.delay(attempt) <= policy.max_delay * (1 + policy.jitter)
    inst = _instance(
        done=["reserve", "check", "charge"],
        pivoted=True,
        pending={"ship": Pending("m1", 5000, "forward")},
    )
    failure = msgspec.json.encode(sk.Failure("carrier.Down", "still down", True))
    d = _machine(SAGA).apply(
        inst, ReplyReceived("ship", "m1", "r1", "sagakit.Failure", "failure", failure, "shipping")
    )
    [timer] = d.of(StartTimer)
    assert timer.kind == "retry" and timer.seconds <= 36


def test_a_finished_saga_cancels_its_deadline_timer() -> None:
    saga = sk.Saga("d", D, deadline=60).step("a").invoke("x", lambda d: Do(d.key)).build()
    m = _machine(saga)
    started = m.apply(_instance(), Started())
    [deadline] = [t for t in started.of(StartTimer) if t.kind == "deadline"]
    [cmd] = started.of(SendCommand)
    done = m.apply(started.instance, _reply("a", cmd.message_id, "x", "sagakit.Done"))
    assert done.instance.state == SagaState.COMPLETED
    assert [c.message_id for c in done.of(CancelTimer)] == [deadline.message_id]


def test_a_step_retried_for_ever_adds_bounded_history() -> None:
    """Every line of the first ten attempts, then one attempt in a hundred."""
    m = _machine(SAGA)
    inst = _instance(done=["reserve", "check", "charge"], pivoted=True)
    failure = msgspec.json.encode(sk.Failure("carrier.Down", "still down", True))
    lines = 0
    for attempt in range(1, 1001):
        inst.progress.pending["ship"] = Pending(f"c{attempt}", attempt, "forward")
        reply = ReplyReceived(
            "ship", f"c{attempt}", "r", "sagakit.Failure", "failure", failure, "shipping"
        )
        lines += len(m.apply(inst, reply).of(HistoryLine))
    assert lines == 2 * (10 + 10), "reply + retry-scheduled for attempts 1-10, 100, ..., 1000"


OPS = sk.Actor("ops")
SHIP_WAITING = {"ship": Pending("t9", 1500, "forward", waiting=True)}
AFTER_PIVOT = ["reserve", "check", "charge"]


def test_an_operator_retries_a_long_retrying_step_now_with_a_fresh_budget() -> None:
    inst = _instance(done=AFTER_PIVOT, pending=SHIP_WAITING, pivoted=True)
    d = _machine(SAGA).apply(inst, OperatorAction("retry", OPS, "carrier is back"))
    assert [c.message_id for c in d.of(CancelTimer)] == ["t9"], "the scheduled retry is dropped"
    [cmd] = d.of(SendCommand)
    assert (cmd.step, cmd.attempt) == ("ship", 1501)
    assert d.instance.progress.pending["ship"].base == 1500, "a fresh retry budget"


def test_an_operator_skips_a_long_retrying_step_and_the_saga_completes() -> None:
    inst = _instance(done=AFTER_PIVOT, pending=SHIP_WAITING, pivoted=True)
    d = _machine(SAGA).apply(inst, OperatorAction("skip", OPS, "shipped by hand", "ship"))
    assert d.instance.state == SagaState.COMPLETED
    assert d.of(SendCommand) == []
    assert any(
        h.entry == "step-skipped" and "shipped by hand" in (h.detail or "")
        for h in d.of(HistoryLine)
    )


def test_skipping_a_stuck_compensation_carries_backward_recovery_on() -> None:
    inst = Instance(
        "s1",
        "t",
        1,
        SagaState.FAILED,
        D("k"),
        Progress(
            done=["reserve", "check"],
            compensations=["check", "reserve"],
            stuck=Pending("", 7, "compensate"),
            stuck_step="check",
        ),
    )
    d = _machine(SAGA).apply(inst, OperatorAction("skip", OPS, "released by hand"))
    assert d.instance.state == SagaState.COMPENSATING
    [undo] = d.of(SendCommand)
    assert (undo.step, undo.phase) == ("reserve", "compensate")


def test_skip_refuses_another_step_and_a_healthy_instance() -> None:
    inst = _instance(done=AFTER_PIVOT, pending=SHIP_WAITING, pivoted=True)
    with pytest.raises(InvalidOperatorAction, match="can be skipped"):
        _machine(SAGA).apply(inst, OperatorAction("skip", OPS, "oops", "charge"))
    busy = _instance(done=["reserve"], pending={"check": Pending("m1", 1, "forward")})
    with pytest.raises(InvalidOperatorAction, match="can be skipped"):
        _machine(SAGA).apply(busy, OperatorAction("skip", OPS, "oops"))
