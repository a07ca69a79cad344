"""The coordinator's behaviour on a real SQLite store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

import sagakit as sk
from sagakit.errors import SagaIdInUse
from sagakit.messages import Headers
from tests.helpers import Data, DidIt, Do, Refused, Undo, eventually
from tests.saga_harness import Plan, bench, committed, linear

STEPS = ["a", "b", "c", "d"]
FAST = sk.RetryPolicy(max_attempts=4, initial=0.01, max_delay=0.02)


def make_app(tmp_path, clock: sk.Clock | None = None) -> sk.App:
    settings = sk.Settings(retry=FAST, max_poll=0.02)
    return sk.App(f"sqlite:///{tmp_path}/s.db", settings=settings, clock=clock)


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
async def app(tmp_path, plan: Plan) -> AsyncIterator[sk.App]:
    app = make_app(tmp_path)
    bench(app, STEPS, plan, tmp_path)
    app.saga(linear("lin", STEPS))
    app.saga(linear("piv", STEPS, pivot="b", retriable={"c": FAST, "d": FAST}))
    app.saga(linear("cf", STEPS, compensation_retry=sk.RetryPolicy(max_attempts=2, initial=0.01)))
    async with app:
        yield app


def defn(app: sk.App, name: str) -> sk.SagaDefinition[Data]:
    return app.sagas.definitions[(name, 1)]


async def run(app: sk.App, name: str, key: str) -> sk.SagaView:
    saga_id = await app.sagas.start(defn(app, name), Data(key), saga_id=key)
    return await app.sagas.wait(saga_id, timeout=10, history=True)


async def test_happy_path_runs_every_step_in_order(app: sk.App, plan: Plan) -> None:
    view = await run(app, "lin", "ok")
    assert view.state == "completed" and view.data.total == 4
    assert committed(plan, "ok") == ["T:a", "T:b", "T:c", "T:d"]
    entries = [e.entry for e in view.history]
    assert entries[0] == "started" and entries[-1] == "completed"


async def test_business_failure_compensates_in_reverse(app: sk.App, plan: Plan) -> None:
    plan.refuse["no"] = {"c"}
    view = await run(app, "lin", "no")
    assert view.state == "compensated"
    assert "test.Refused" in (view.error or "")
    assert committed(plan, "no") == ["T:a", "T:b", "C:b", "C:a"]


async def test_start_is_idempotent(app: sk.App, plan: Plan) -> None:
    first = await app.sagas.start(defn(app, "lin"), Data("once"), saga_id="once")
    again = await app.sagas.start(defn(app, "lin"), Data("once"), saga_id="once")
    assert first == again == "once"
    await app.sagas.wait("once")
    assert committed(plan, "once") == ["T:a", "T:b", "T:c", "T:d"]


async def test_start_with_the_id_of_another_definitions_instance_is_an_error(
    app: sk.App, plan: Plan
) -> None:
    await run(app, "lin", "taken")
    with pytest.raises(SagaIdInUse, match="already names an instance of 'lin'"):
        await app.sagas.start(defn(app, "piv"), Data("taken"), saga_id="taken")


async def test_after_pivot_steps_are_retried_forward(app: sk.App, plan: Plan) -> None:
    plan.refuse_times[("fwd", "c")] = 2
    view = await run(app, "piv", "fwd")
    assert view.state == "completed"
    assert committed(plan, "fwd") == ["T:a", "T:b", "T:c", "T:d"]
    assert [e.entry for e in view.history].count("retry-scheduled") == 2


async def test_failure_at_pivot_compensates_before_it(app: sk.App, plan: Plan) -> None:
    plan.refuse["pv"] = {"b"}
    view = await run(app, "piv", "pv")
    assert view.state == "compensated"
    assert committed(plan, "pv") == ["T:a", "C:a"]


OPS = sk.Actor("ops")


async def test_retriable_step_that_gives_up_fails_then_operator_retry(
    app: sk.App, plan: Plan
) -> None:
    plan.refuse_times[("stuck", "d")] = 5  # policy allows 4 attempts
    view = await run(app, "piv", "stuck")
    assert view.state == "failed" and "gave up after 4 attempts" in (view.error or "")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.sagas.retry("stuck", actor=OPS, reason=" ")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.sagas.retry("stuck", actor=sk.Actor("eve", role="viewer"), reason="curious")
    with pytest.raises(sk.InvalidOperatorAction):
        sk.Actor("")
    await app.sagas.retry("stuck", actor=sk.Actor("ops@example.com"), reason="shipping fixed")
    view = await app.sagas.wait("stuck", history=True)
    assert view.state == "completed"
    assert any(
        e.entry == "operator-retry" and "ops@example.com" in (e.detail or "") for e in view.history
    )


async def test_compensation_that_keeps_failing_ends_failed_then_operator_retry(
    app: sk.App, plan: Plan
) -> None:
    plan.refuse["cx"] = {"c"}
    plan.crash_undo_times[("cx", "a")] = 3  # compensation policy allows 2 attempts
    view = await run(app, "cf", "cx")
    assert view.state == "failed" and "'a' (compensate)" in (view.error or "")
    await app.sagas.retry("cx", actor=OPS, reason="ledger back online")
    view = await app.sagas.wait("cx")
    assert view.state == "compensated"
    assert committed(plan, "cx") == ["T:a", "T:b", "C:b", "C:a"]


async def test_operator_force_compensation_and_abort(app: sk.App, plan: Plan) -> None:
    hold = plan.hold[("fc", "b")] = asyncio.Event()
    await app.sagas.start(defn(app, "lin"), Data("fc"), saga_id="fc")
    await eventually(_has_effect(plan, "fc", "T:a"))
    await app.sagas.compensate("fc", actor=OPS, reason="customer called")
    hold.set()
    view = await app.sagas.wait("fc")
    assert view.state == "compensated"
    # b was in flight: its compensation may run first (null) and then b is refused,
    # or b commits first and is compensated; either way nothing stays applied.
    fx = committed(plan, "fc")
    assert fx in (["T:a", "C:a"], ["T:a", "T:b", "C:b", "C:a"])
    with pytest.raises(sk.InvalidOperatorAction):
        await app.sagas.abort("fc", actor=OPS, reason="too late")


async def test_abort_stops_without_compensating(app: sk.App, plan: Plan) -> None:
    hold = plan.hold[("ab", "b")] = asyncio.Event()
    await app.sagas.start(defn(app, "lin"), Data("ab"), saga_id="ab")
    await eventually(_has_effect(plan, "ab", "T:a"))
    await app.sagas.abort("ab", actor=OPS, reason="duplicate order")
    hold.set()
    view = await app.sagas.wait("ab")
    assert view.state == "aborted"
    await eventually(lambda: _logged(app, "ab", "reply-ignored"))


async def test_queries_list_and_count(app: sk.App, plan: Plan) -> None:
    plan.refuse["q2"] = {"a"}
    await run(app, "lin", "q1")
    await run(app, "lin", "q2")
    counts = await app.sagas.counts(type="lin")
    assert counts == {"completed": 1, "compensated": 1}
    listed = await app.sagas.list(type="lin", state="compensated")
    assert [v.id for v in listed] == ["q2"]
    assert await app.sagas.list(older_than=3600) == []
    with pytest.raises(sk.SagaNotFound):
        await app.sagas.get("nope")


# -- replies that are duplicated, late, unknown or unexpected -------------------


async def reply_to(
    app: sk.App,
    saga_id: str,
    step: str,
    causation: str,
    payload: object,
    outcome: str = "success",
    sender: str | None = None,
) -> None:
    headers = Headers(
        saga_id=saga_id,
        step=step,
        causation_id=causation,
        outcome=outcome,
        sender=step if sender is None else sender,  # in the harness each step has its service
    )
    env = app.codec.make(payload, headers, kind="reply")
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "sagakit.coordinator", env.id, app.codec.encode(env))


async def test_duplicate_and_stray_replies_are_recorded_not_applied(app: sk.App) -> None:
    await run(app, "lin", "dupr")
    first_cmd = next(e for e in (await app.sagas.get("dupr")).history if e.entry == "command-sent")
    await reply_to(app, "dupr", "a", first_cmd.message_id or "", DidIt(100))  # duplicate
    await reply_to(app, "dupr", "zzz", "nope", DidIt(100))  # unknown step
    await eventually(lambda: _logged(app, "dupr", "reply-ignored", times=2))
    view = await app.sagas.get("dupr")
    assert view.state == "completed" and view.data.total == 4


async def test_a_reply_from_another_service_is_ignored(app: sk.App, plan: Plan) -> None:
    """A forged (or misrouted) reply for the awaited command changes nothing."""
    hold = plan.hold[("forged", "b")] = asyncio.Event()
    await app.sagas.start(defn(app, "lin"), Data("forged"), saga_id="forged")
    await eventually(lambda: _logged(app, "forged", "command-sent", times=2))
    cmd = [e for e in (await app.sagas.get("forged")).history if e.entry == "command-sent"][-1]
    await reply_to(app, "forged", "b", cmd.message_id or "", DidIt(100), sender="c")
    await reply_to(app, "forged", "b", cmd.message_id or "", DidIt(100), sender="")
    await eventually(lambda: _logged(app, "forged", "reply-ignored", times=2))
    hold.set()
    view = await app.sagas.wait("forged", history=True)
    assert view.state == "completed" and view.data.total == 4, "only b's own reply counted"
    ignored = [e.detail or "" for e in view.history if e.entry == "reply-ignored"]
    assert all("but the command went to 'b'" in d for d in ignored)


async def test_a_reply_that_cannot_be_applied_stops_the_saga_with_the_reply_kept(
    app: sk.App, plan: Plan
) -> None:
    """b took effect (its service said so): never compensate around it, never drop the reply."""
    hold = plan.hold[("odd", "b")] = asyncio.Event()
    await app.sagas.start(defn(app, "lin"), Data("odd"), saga_id="odd")
    await eventually(lambda: _logged(app, "odd", "command-sent", times=2))
    cmd = [e for e in (await app.sagas.get("odd")).history if e.entry == "command-sent"][-1]
    await reply_to(app, "odd", "b", cmd.message_id or "", sk.Done())  # a type b never declared
    await eventually(lambda: _logged(app, "odd", "reply-unapplied"))
    hold.set()
    view = await app.sagas.wait("odd", history=True)
    assert view.state == "failed" and "could not be applied" in (view.error or "")
    assert not any(e.entry == "compensating" for e in view.history)
    record = await app.store.saga_get("odd")
    assert record is not None and b"sagakit.Done" in record.progress, "the reply is kept"
    await eventually(_has_effect(plan, "odd", "T:b"))
    assert committed(plan, "odd") == ["T:a", "T:b"], "nothing compensated around b"
    # The operator retries: b's inbox answers with its stored (real) reply, which applies.
    await app.sagas.retry("odd", actor=OPS, reason="the odd reply was not b's")
    view = await app.sagas.wait("odd", history=True)
    assert view.state == "completed"
    assert committed(plan, "odd") == ["T:a", "T:b", "T:c", "T:d"], "b ran once"


def _has_effect(plan: Plan, saga: str, effect: str):
    async def check() -> bool:
        return effect in committed(plan, saga)

    return check


async def _logged(app: sk.App, saga: str, entry: str, times: int = 1) -> bool:
    return [e.entry for e in await app.store.history(saga)].count(entry) >= times


# -- local steps and parallel groups ----------------------------------------------


async def test_local_steps_checkpoint_their_result(tmp_path, plan: Plan) -> None:
    app = make_app(tmp_path)
    bench(app, ["a"], plan, tmp_path)

    async def double(d: Data) -> Data:
        return Data(d.key, d.total * 2, [*d.log, "doubled"])

    async def veto(d: Data) -> None:
        if d.key == "veto":
            raise Refused("local says no")

    saga = (
        sk.Saga("loc", Data)
        .step("a")
        .invoke("a", lambda d: Do(d.key))
        .on_reply(DidIt, lambda d, r: Data(d.key, 21))
        .compensate("a", lambda d: Undo(d.key))
        .step("double")
        .local(double)
        .step("veto")
        .local(veto)
        .build()
    )
    app.saga(saga)
    async with app:
        ok = await app.sagas.wait(await app.sagas.start(saga, Data("fine")))
        assert ok.state == "completed" and ok.data.total == 42 and ok.data.log == ["doubled"]
        no = await app.sagas.wait(await app.sagas.start(saga, Data("veto")))
        assert no.state == "compensated" and "local says no" in (no.error or "")
        assert committed(plan, "veto") == ["T:a", "C:a"]


async def test_parallel_group_joins_and_compensates_siblings(tmp_path, plan: Plan) -> None:
    app = make_app(tmp_path)
    bench(app, ["a", "b", "c"], plan, tmp_path)
    saga = (
        sk.Saga("par", Data)
        .step("a")
        .invoke("a", lambda d: Do(d.key))
        .compensate("a", lambda d: Undo(d.key))
        .step("b", parallel=True)
        .invoke("b", lambda d: Do(d.key))
        .compensate("b", lambda d: Undo(d.key))
        .step("c")
        .invoke("c", lambda d: Do(d.key))
        .compensate("c", lambda d: Undo(d.key))
        .build()
    )
    app.saga(saga)
    async with app:
        ok = await app.sagas.wait(await app.sagas.start(saga, Data("p1"), saga_id="p1"))
        assert ok.state == "completed"
        assert sorted((committed(plan, "p1"))[:2]) == ["T:a", "T:b"]
        plan.refuse["p2"] = {"b"}
        no = await app.sagas.wait(await app.sagas.start(saga, Data("p2"), saga_id="p2"))
        assert no.state == "compensated"
        assert committed(plan, "p2") in (["T:a", "C:a"],)


# -- timers -------------------------------------------------------------------------


async def test_step_timeout_compensates_and_late_reply_is_ignored(tmp_path, plan: Plan) -> None:
    clock = sk.FakeClock()
    app = make_app(tmp_path, clock)
    bench(app, ["a", "b"], plan, tmp_path)
    saga = linear("to", ["a", "b"], timeouts={"b": 5.0})
    app.saga(saga)
    hold = plan.hold[("slow", "b")] = asyncio.Event()
    async with app:
        await app.sagas.start(saga, Data("slow"), saga_id="slow")
        await eventually(lambda: _logged(app, "slow", "command-sent", times=2))
        clock.advance(6)
        app.store.queue.waker.wake_all()
        await eventually(lambda: _logged(app, "slow", "timeout"))
        hold.set()  # b commits after all; its reply is late, and b is compensated
        view = await app.sagas.wait("slow")
        assert view.state == "compensated" and "timeout" in (view.error or "")
        await eventually(lambda: _logged(app, "slow", "reply-ignored"))
        assert committed(plan, "slow") == ["T:a", "T:b", "C:b", "C:a"]


async def test_timer_of_a_step_that_replied_in_time_is_cancelled(tmp_path, plan: Plan) -> None:
    clock = sk.FakeClock()
    app = make_app(tmp_path, clock)
    bench(app, ["a"], plan, tmp_path)
    saga = linear("tc", ["a"], timeouts={"a": 5.0})
    app.saga(saga)
    async with app:
        view = await app.sagas.wait(await app.sagas.start(saga, Data("quick")))
        assert view.state == "completed"
        assert await app.store.queue.depth("sagakit.timers") == 0


async def test_deadline_compensates_a_saga_that_runs_too_long(tmp_path, plan: Plan) -> None:
    clock = sk.FakeClock()
    app = make_app(tmp_path, clock)
    bench(app, ["a", "b"], plan, tmp_path)
    saga = linear("dl", ["a", "b"], deadline=60.0)
    app.saga(saga)
    hold = plan.hold[("late", "b")] = asyncio.Event()
    async with app:
        await app.sagas.start(saga, Data("late"), saga_id="late")
        await eventually(lambda: _logged(app, "late", "command-sent", times=2))
        clock.advance(61)
        app.store.queue.waker.wake_all()
        await eventually(lambda: _logged(app, "late", "compensating"))
        hold.set()
        view = await app.sagas.wait("late")
        assert view.state == "compensated" and view.error == "deadline passed"


# -- versions -------------------------------------------------------------------------


async def test_new_version_runs_beside_old_instances(tmp_path, plan: Plan) -> None:
    app = make_app(tmp_path)
    bench(app, ["a", "b", "c"], plan, tmp_path)
    v1 = app.saga(linear("ver", ["a", "b"]))
    v2 = app.saga(linear("ver", ["a", "b", "c"], version=2))
    hold = plan.hold[("old", "b")] = asyncio.Event()
    async with app:
        await app.sagas.start(v1, Data("old"), saga_id="old")
        await eventually(lambda: _logged(app, "old", "command-sent", times=2))
        await app.sagas.start(v2, Data("new"), saga_id="new")
        hold.set()
        old, new = await app.sagas.wait("old"), await app.sagas.wait("new")
        assert (old.version, old.state, old.done) == (1, "completed", ["a", "b"])
        assert (new.version, new.state, new.done) == (2, "completed", ["a", "b", "c"])


async def _orphan_waiting_at_b(tmp_path, plan: Plan, url: str) -> None:
    """A version-1 instance whose step b is sent but not yet answered."""
    first = sk.App(url, settings=sk.Settings(retry=FAST, max_poll=0.02), run=["a", "coordinator"])
    bench(first, ["a", "b"], plan, tmp_path)
    v1 = first.saga(linear("gone", ["a", "b"]))
    async with first:  # b does not run here: the instance waits at step b
        await first.sagas.start(v1, Data("orphan"), saga_id="orphan")
        await eventually(lambda: _logged(first, "orphan", "command-sent", times=2))


def _upgraded(tmp_path, plan: Plan, url: str, versions: list[int], grace: float) -> sk.App:
    settings = sk.Settings(retry=FAST, max_poll=0.02, version_grace=grace, max_deliveries=10_000)
    app = sk.App(url, settings=settings)
    bench(app, ["a", "b"], plan, tmp_path)
    for v in versions:
        app.saga(linear("gone", ["a", "b"], version=v))
    return app


async def test_a_reply_for_an_unknown_version_waits_for_a_process_that_knows_it(
    tmp_path, plan: Plan
) -> None:
    """A rolling upgrade: the new coordinator hands the old instance's reply back."""
    url = f"sqlite:///{tmp_path}/s.db"
    await _orphan_waiting_at_b(tmp_path, plan, url)
    new_only = _upgraded(tmp_path, plan, url, [2], grace=60.0)
    async with new_only:  # b replies, but only version 2 is known here
        await asyncio.sleep(1.0)
        assert await new_only.store.dead_letters() == []
        assert (await new_only.sagas.get("orphan")).state == "running"
        both = _upgraded(tmp_path, plan, url, [1, 2], grace=60.0)
        both.only(["coordinator"])
        async with both:  # a process that knows version 1 comes up and takes it
            view = await both.sagas.wait("orphan", timeout=30)
    assert view.state == "completed" and view.version == 1


async def test_a_reply_nobody_knows_after_the_grace_is_dead_lettered(tmp_path, plan: Plan) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    await _orphan_waiting_at_b(tmp_path, plan, url)
    second = _upgraded(tmp_path, plan, url, [2], grace=0.0)
    async with second:
        await eventually(lambda: _dead(second, "SagaVersionUnknown"))
        rec = await second.store.saga_get("orphan")
        assert rec is not None and rec.state == "running" and rec.version == 1


async def test_a_process_refuses_a_schema_that_broke_its_code(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with sk.App(url) as app, app.store.transaction() as tx:
        await tx.execute(f"INSERT INTO {app.store.prefix}schema (version) VALUES (999)")
        await tx.execute(f"UPDATE {app.store.prefix}schema_floor SET oldest = 999")
    for migrate in (True, False):
        store = sk.open_store(url)
        with pytest.raises(sk.ConfigurationError, match="version 999 and needs sagakit code"):
            await store.open(migrate=migrate)
        await store.close()


async def test_an_older_process_runs_on_a_schema_that_only_added(tmp_path, caplog) -> None:
    """A rolling upgrade: the new release migrated (adding only); an older process
    restarting meanwhile still starts, with a WARNING, and migrates nothing."""
    url = f"sqlite:///{tmp_path}/s.db"
    async with sk.App(url) as app, app.store.transaction() as tx:
        await tx.execute(f"INSERT INTO {app.store.prefix}schema (version) VALUES (999)")
    for migrate in (True, False):
        store = sk.open_store(url)
        with caplog.at_level(logging.WARNING, "sagakit.store"):
            await store.open(migrate=migrate)
        assert await store.schema_version() == 999
        await store.close()
    assert "newer than this process knows" in caplog.text


async def _dead(app: sk.App, kind: str) -> bool:
    return any(d.error_type == kind for d in await app.store.dead_letters())


def test_refused_is_a_business_error() -> None:
    assert issubclass(Refused, sk.BusinessError)
    assert Undo("x").key == "x"


async def test_pivot_timeout_asks_again_instead_of_compensating(tmp_path, plan: Plan) -> None:
    clock = sk.FakeClock()
    app = make_app(tmp_path, clock)
    bench(app, ["a", "pay"], plan, tmp_path)
    saga = linear("pt", ["a", "pay"], pivot="pay", timeouts={"pay": 5.0}, deadline=60.0)
    app.saga(saga)
    hold = plan.hold[("card", "pay")] = asyncio.Event()
    async with app:
        await app.sagas.start(saga, Data("card"), saga_id="card")
        await eventually(lambda: _logged(app, "card", "command-sent", times=2))
        clock.advance(61)  # both the step timeout and the deadline are due
        app.store.queue.waker.wake_all()
        await eventually(lambda: _logged(app, "card", "retry-scheduled"))
        await eventually(lambda: _logged(app, "card", "deadline-passed"))
        hold.set()
        clock.advance(1)
        app.store.queue.waker.wake_all()
        view = await app.sagas.wait("card")
        assert view.state == "completed"
        assert committed(plan, "card") == ["T:a", "T:pay"]  # charged once, never undone


async def test_reordered_replies_in_a_parallel_group_join_correctly(tmp_path, plan: Plan) -> None:
    app = make_app(tmp_path)
    bench(app, ["a", "b", "c"], plan, tmp_path)
    saga = (
        sk.Saga("reorder", Data)
        .step("a")
        .invoke("a", lambda d: Do(d.key))
        .on_reply(DidIt, lambda d, r: Data(d.key, d.total + 1, [*d.log, "a"]))
        .step("b", parallel=True)
        .invoke("b", lambda d: Do(d.key))
        .on_reply(DidIt, lambda d, r: Data(d.key, d.total + 10, [*d.log, "b"]))
        .step("c")
        .invoke("c", lambda d: Do(d.key))
        .build()
    )
    app.saga(saga)
    hold = plan.hold[("ro", "a")] = asyncio.Event()
    async with app:
        await app.sagas.start(saga, Data("ro"), saga_id="ro")
        await eventually(lambda: _logged(app, "ro", "reply"))  # b answered first
        assert committed(plan, "ro") == ["T:b"]
        assert "c" not in (await app.sagas.get("ro")).pending  # not joined yet
        hold.set()
        view = await app.sagas.wait("ro")
        assert view.state == "completed" and view.data.total == 11
        assert view.data.log == ["b", "a"] and committed(plan, "ro") == ["T:b", "T:a", "T:c"]
