"""A bench for the console tests: an app whose saga ``piv`` fails on step d on demand."""

from __future__ import annotations

import sagakit as sk
from sagakit.console import Tokens
from tests.helpers import Data
from tests.saga_harness import Plan, bench, linear

STEPS = ["a", "b", "c", "d"]
FAST = sk.RetryPolicy(max_attempts=2, initial=0.01, max_delay=0.02)


def make_app(url: str, plan: Plan) -> sk.App:
    app = sk.App(url, settings=sk.Settings(retry=FAST, max_poll=0.02))
    bench(app, STEPS, plan)
    app.saga(linear("piv", STEPS, pivot="b", retriable={"c": FAST, "d": FAST}))
    return app


async def failed_saga(app: sk.App, plan: Plan, key: str) -> sk.SagaView:
    """A saga stuck ``failed`` on step d, which succeeds once retried."""
    plan.refuse_times[(key, "d")] = 2
    defn = app.sagas.definitions[("piv", 1)]
    await app.sagas.start(defn, Data(key), saga_id=key)
    view = await app.sagas.wait(key, timeout=20)
    assert view.state == "failed", view
    return view


async def token(app: sk.App, role: str) -> str:
    return (await Tokens(app.store).create(role))[1]
