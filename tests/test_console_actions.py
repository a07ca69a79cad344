"""The action model: queued operator commands, executed once, every attempt audited."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

import sagakit as sk
from sagakit.console import ActionRequest, AuditFilter, Operations, SagaQuery, Tokens
from sagakit.console.commands import OPERATOR_QUEUE, OperatorCommand, encode
from tests.console_bench import failed_saga, make_app
from tests.helpers import Data, eventually
from tests.saga_harness import Plan, committed

OPS = sk.Actor("ops@example.com", via="test")


@pytest.fixture
def plan() -> Plan:
    return Plan()


@pytest.fixture
async def app(tmp_path, plan: Plan) -> AsyncIterator[sk.App]:
    async with make_app(f"sqlite:///{tmp_path}/s.db", plan) as app:
        yield app


async def test_retry_is_queued_executed_and_audited_with_digests(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "k1")
    ops = Operations(app.store)
    sub = await ops.submit(
        "k1", ActionRequest("retry", "ledger fixed"), actor=OPS, source="1.2.3.4"
    )
    line = await ops.outcome(sub.command_id, "k1", timeout=10)
    assert line is not None and line.outcome == "done" and line.source == "1.2.3.4"
    assert line.before and line.after and line.before != line.after
    await eventually(lambda: _state_is(app, "k1", "completed"))
    assert committed(plan, "k1") == ["T:a", "T:b", "T:c", "T:d"]


async def test_a_command_delivered_twice_runs_once(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "dup")
    cmd = OperatorCommand("c-dup", "retry", "dup", "twice", "ops", "operator", "test")
    async with app.store.transaction() as tx:
        for n in range(2):  # the same command, queued twice (a redelivery)
            await app.store.queue.put(tx, OPERATOR_QUEUE, f"c-dup/{n}", encode(cmd))
    await app.sagas.wait("dup", timeout=10)
    await eventually(lambda: _queue_empty(app))
    lines = await Operations(app.store).audit.list(AuditFilter(target="dup"))
    assert [x.outcome for x in lines] == ["done"]
    history = (await app.sagas.get("dup")).history
    assert [e.entry for e in history].count("operator-retry") == 1


async def _queue_empty(app: sk.App) -> bool:
    return await app.store.queue.depth(OPERATOR_QUEUE) == 0


async def test_viewer_is_denied_and_the_denial_audited(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "v")
    viewer = await Tokens(app.store).verify((await Tokens(app.store).create("viewer"))[1])
    ops = Operations(app.store)
    with pytest.raises(sk.Forbidden):
        await ops.submit("v", ActionRequest("retry", "curious"), actor=viewer)
    [line] = await ops.audit.list(AuditFilter(target="v"))
    assert (line.outcome, line.role, line.action) == ("denied", "viewer", "retry")
    with pytest.raises(sk.Forbidden):
        await Operations(app.store, read_only=True).submit(
            "v", ActionRequest("retry", "x"), actor=OPS
        )
    assert (await app.sagas.get("v")).state == "failed"


async def test_refusals_are_audited_as_failed(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "r")
    ops = Operations(app.store)
    with pytest.raises(sk.InvalidOperatorAction, match="reason"):
        await ops.submit("r", ActionRequest("retry", "  "), actor=OPS)
    with pytest.raises(sk.InvalidOperatorAction, match="compensated"):
        await ops.submit("r", ActionRequest("compensate", "why not"), actor=OPS)
    with pytest.raises(sk.SagaNotFound):
        await ops.submit("nope", ActionRequest("abort", "gone"), actor=OPS)
    with pytest.raises(sk.UnknownAction):
        await ops.submit("r", ActionRequest("explode", "x"), actor=OPS)
    outcomes = [x.outcome for x in await ops.audit.list()]
    assert outcomes == ["failed", "failed", "failed"]


async def test_edit_patches_the_data_and_stores_the_diff(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "ed")
    ops = Operations(app.store)
    patch = [
        {"op": "replace", "path": "/total", "value": 41},
        {"op": "add", "path": "/log/-", "value": "fixed"},
    ]
    sub = await ops.submit("ed", ActionRequest("edit", "correct the total", patch=patch), actor=OPS)
    assert (await ops.outcome(sub.command_id, "ed", timeout=10)).outcome == "done"  # type: ignore[union-attr]
    view = await app.sagas.get("ed")
    assert view.data.total == 41 and view.data.log == ["fixed"]
    [edited] = [e for e in view.history if e.entry == "data-edited"]
    assert msgspec.json.decode(edited.detail or "")[0]["after"] == 41
    bad = [{"op": "replace", "path": "/total", "value": "not a number"}]
    sub = await ops.submit("ed", ActionRequest("edit", "oops", patch=bad), actor=OPS)
    line = await ops.outcome(sub.command_id, "ed", timeout=10)
    assert (
        line is not None and line.outcome == "failed" and "not a valid Data" in (line.detail or "")
    )
    assert (await app.sagas.get("ed")).data.total == 41


async def test_abort_and_resume(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "ab")
    ops = Operations(app.store)
    with pytest.raises(sk.InvalidOperatorAction, match="resumed"):
        await ops.submit("ab", ActionRequest("resume", "kick"), actor=OPS)
    sub = await ops.submit("ab", ActionRequest("abort", "customer cancelled"), actor=OPS)
    assert (await ops.outcome(sub.command_id, "ab", timeout=10)).outcome == "done"  # type: ignore[union-attr]
    assert (await app.sagas.get("ab")).state == "aborted"


async def test_bulk_dry_run_counts_then_runs(app: sk.App, plan: Plan) -> None:
    for key in ("b1", "b2", "b3"):
        await failed_saga(app, plan, key)
    ops = Operations(app.store)
    q, req = SagaQuery(state="failed", step="d"), ActionRequest("retry", "all fixed")
    dry = await ops.bulk(q, req, actor=OPS, dry_run=True)
    assert (dry.count, sorted(dry.sample), dry.command_id) == (3, ["b1", "b2", "b3"], None)
    assert await ops.audit.list() == []
    plan_ = await ops.bulk(q, req, actor=OPS)
    for key in ("b1", "b2", "b3"):
        await eventually(lambda key=key: _state_is(app, key, "completed"))
    await eventually(lambda: _audited(ops, 4))
    lines = await ops.audit.list(AuditFilter(limit=10))
    assert {x.command_id for x in lines} == {plan_.command_id}
    assert sorted(x.action for x in lines) == ["bulk-retry", "retry", "retry", "retry"]


async def _state_is(app: sk.App, key: str, state: str) -> bool:
    return (await app.sagas.get(key, history=False)).state == state


async def _audited(ops: Operations, n: int) -> bool:
    return len(await ops.audit.list()) >= n


async def test_resume_resends_a_lost_command_and_a_duplicate_runs_once(
    tmp_path, plan: Plan
) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    first = make_app(url, plan)
    first.only(["coordinator", "a", "b", "c"])  # nobody consumes d's queue yet
    defn = first.sagas.definitions[("piv", 1)]
    async with first:
        for key in ("lost", "kept"):
            await first.sagas.start(defn, Data(key), saga_id=key)
        await eventually(lambda: _queued(first, "d", 2))
        lost = (await first.store.saga_get("lost")).progress  # type: ignore[union-attr]
        mid = msgspec.json.decode(lost)["pending"]["d"]["message_id"]
        async with first.store.transaction() as tx:  # an operator purged it by hand
            await tx.execute(f"DELETE FROM {first.store.prefix}messages WHERE id = ?", mid)
        ops = Operations(first.store)
        for key in ("lost", "kept"):
            sub = await ops.submit(key, ActionRequest("resume", "d never answered"), actor=OPS)
            assert (await ops.outcome(sub.command_id, key, timeout=10)).outcome == "done"  # type: ignore[union-attr]
        assert await first.store.queue.depth("d") == 3  # lost's again, kept's twice
    again = Plan()
    async with make_app(url, again) as app:
        for key in ("lost", "kept"):
            await eventually(lambda key=key: _state_is(app, key, "completed"))
            assert committed(again, key) == ["T:d"]  # the duplicate answered by the inbox
        history = (await app.sagas.get("lost")).history
        assert [e.entry for e in history].count("command-resent") == 1


async def _queued(app: sk.App, queue: str, n: int) -> bool:
    return await app.store.queue.depth(queue) >= n


async def test_actions_from_python_are_audited_like_queued_ones(app: sk.App, plan: Plan) -> None:
    await failed_saga(app, plan, "py")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.sagas.retry("py", actor=sk.Actor("eve", role="viewer"), reason="curious")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.sagas.compensate("py", actor=OPS, reason="undo it")
    await app.sagas.retry("py", actor=OPS, reason="fixed")
    lines = await Operations(app.store).audit.list(AuditFilter(target="py"))
    assert [(x.action, x.outcome) for x in reversed(lines)] == [
        ("retry", "denied"),
        ("compensate", "failed"),
        ("retry", "done"),
    ]
    assert lines[0].via == "test" and lines[0].before != lines[0].after
