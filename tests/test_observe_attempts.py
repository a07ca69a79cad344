"""Which attempts a decision ended, and how: the pure part of the saga spans."""

from __future__ import annotations

from sagakit.messages import Failure, encode_json, new_id
from sagakit.observe.attempts import decided_at, ended, sent_at
from sagakit.saga.machine import Instance, ReplyReceived, SagaMachine, Started, TimerFired
from sagakit.saga.state import Progress, SagaState
from tests.helpers import Data
from tests.saga_harness import linear


def started(steps: list[str], **kw: object) -> tuple[SagaMachine, Instance]:
    machine = SagaMachine(linear("s", steps, **kw))  # type: ignore[arg-type]
    inst = Instance("id", "s", 1, SagaState.RUNNING, Data("k"), Progress())
    return machine, machine.apply(inst, Started()).instance


def test_a_reply_ends_its_attempt_with_the_failures_code() -> None:
    machine, inst = started(["a", "b"])
    mid = inst.progress.pending["a"].message_id
    failure = encode_json(Failure("shop.Refused", "no"))
    reply = ReplyReceived("a", mid, new_id(), "sagakit.Failure", "failure", failure, "a")
    d = machine.apply(inst, reply)
    [a] = ended(machine.defn, inst, d, reply, now=1e12)
    assert (a.step, a.phase, a.attempt, a.kind) == ("a", "forward", 1, "compensatable")
    assert (a.outcome, a.error_type, a.error) == ("failure", "shop.Refused", "no")
    assert a.started == sent_at(mid)


def test_a_timeout_ends_the_attempt_as_a_timeout() -> None:
    machine, inst = started(["a"], timeouts={"a": 5.0})
    p = inst.progress.pending["a"]
    fired = TimerFired("timeout", p.message_id, "a", 5.0)
    d = machine.apply(inst, fired)
    [a] = ended(machine.defn, inst, d, fired, now=1e12)
    assert (a.outcome, a.error_type) == ("timeout", "timeout")


def test_a_stale_reply_ends_nothing_and_the_decision_time_is_the_next_commands() -> None:
    machine, inst = started(["a", "b"])
    stale = ReplyReceived("a", "not-the-command", new_id(), "test.Done", "success", b"{}", "a")
    assert ended(machine.defn, inst, machine.apply(inst, stale), stale, now=1e12) == []
    mid = inst.progress.pending["a"].message_id
    ok = ReplyReceived("a", mid, new_id(), "test.Done", "success", b'{"value": 1}', "a")
    d = machine.apply(inst, ok)
    next_command = d.instance.progress.pending["b"].message_id
    assert decided_at(inst, d, now=1e12) == sent_at(next_command)


def test_only_version_7_ids_carry_a_time() -> None:
    assert sent_at("m1") is None
    assert sent_at("01a23527-4ceb-4000-9d2a-e0b1df6f7189") is None
    assert sent_at("01a23527-4ceb-7000-9d2a-e0b1df6f7189") == 0x01A235274CEB / 1000
