"""A bulk retry of 1,000 failed sagas: an exact dry run, then every one retried and audited."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import sagakit as sk
from sagakit.console import ActionRequest, AuditFilter, Operations, SagaQuery
from tests.console_bench import FAST
from tests.helpers import Data, eventually
from tests.saga_harness import Plan, bench, linear

N = 1000
ONCE = sk.RetryPolicy(max_attempts=1, initial=0.01)


@pytest.fixture
async def app(tmp_path) -> AsyncIterator[tuple[sk.App, Plan]]:
    plan = Plan()
    app = sk.App(
        f"sqlite:///{tmp_path}/s.db", settings=sk.Settings(retry=FAST, max_poll=0.02, prefetch=64)
    )
    bench(app, ["d"], plan)
    app.saga(linear("one", ["d"], retriable={"d": ONCE}))
    async with app:
        yield app, plan


async def _counts(app: sk.App, want: dict[str, int]) -> bool:
    return await app.sagas.counts(type="one") == want


async def test_bulk_retry_of_a_thousand_failed_sagas(app: tuple[sk.App, Plan]) -> None:
    sk_app, plan = app
    defn = sk_app.sagas.definitions[("one", 1)]
    for i in range(N + 5):
        key = f"s{i:04d}"
        if i < N:
            plan.refuse_times[(key, "d")] = 1  # fails once: the saga ends failed
        await sk_app.sagas.start(defn, Data(key), saga_id=key)
    await eventually(lambda: _counts(sk_app, {"failed": N, "completed": 5}), timeout=240, every=0.5)
    ops, actor = Operations(sk_app.store), sk.Actor("ops", via="test")
    q, req = SagaQuery(type="one", state="failed", limit=5000), ActionRequest("retry", "fixed d")
    dry = await ops.bulk(q, req, actor=actor, dry_run=True)
    assert (dry.count, len(dry.sample), dry.refused) == (N, 10, 0)
    assert await ops.audit.list() == []  # a dry run records nothing
    done = await ops.bulk(q, req, actor=actor)
    assert done.count == N
    await eventually(lambda: _counts(sk_app, {"completed": N + 5}), timeout=240, every=0.5)
    lines = await ops.audit.list(AuditFilter(limit=5000))
    assert len(lines) == N + 1 and {x.command_id for x in lines} == {done.command_id}
    assert sorted(x.action for x in lines).count("retry") == N
    assert [x.action for x in lines if x.action.startswith("bulk")] == ["bulk-retry"]
    assert {x.outcome for x in lines} == {"done"} and len({x.target for x in lines}) == N + 1
