"""The coordinator decides on a ``db_only`` step's reply inside the step's own hop.

Where the coordinator runs in the participant's process on the participant's
store, a ``db_only`` command's reply is not sent: the coordinator's decision
(the instance's update, its history, the next command) joins the
participant's transaction, so on PostgreSQL each step and the decision after
it are one statement. Forced here on both backends: the happy path and a
refusal need no reply message; a decision that lost to another hop of its
saga writes nothing and the step runs again with its reply sent (the effect
once); a definition that fails to decide leaves its failure to the
coordinator's own hop, never to the participant's; a handler that is not
``db_only``, or a participant on a store of its own, sends its reply as before.

A saga's first step goes further: its command never travels, its hop runs
inside the start (one statement on PostgreSQL for both). Any failure there (a
refusal, an exception, a write failing at commit, a saga id already taken)
rolls the whole start back, and the start is made again with the command sent,
so the step's own hop refuses or retries it; the effect stays once.

And so do the steps after it: a decision that sends one command to a
``db_only`` handler here runs that step's hop in the same transaction, so a
saga of such steps moves on in one transaction (one statement on
PostgreSQL). A step that refuses or fails inside it rolls it back, and it is
run again with that step's command sent (the steps before it still inside):
the failure is the step's own hop's, never the hop that carried it. The tests
of a step's own hop turn this off (``Bench(inline=False)``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

import sagakit as sk
from tests.helpers import Data, Do, Refused, Undo, backend_url, drop_app_tables, eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "postgresql"])
async def app(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[sk.App]:
    url = backend_url(request, tmp_path, max_size=4)
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.02))
    yield app
    await app.stop()
    await drop_app_tables(app)


def _saga(second: Callable[[Data], Do] | None = None) -> sk.SagaDefinition[Data]:
    return (
        sk.Saga("t-here", Data)
        .step("one")
        .invoke("p", lambda d: Do(d.key + "1"))
        .compensate("p", lambda d: Undo(d.key + "1"))
        .step("two")
        .invoke("p", second or (lambda d: Do(d.key + "2")))
        .build()
    )


class Bench:
    """Participant ``p`` writing a ledger row per run (no key: a run, a row)."""

    def __init__(
        self,
        app: sk.App,
        *,
        db_only: bool = True,
        refuse: str = "",
        store: str | None = None,
        inline: bool = True,
    ) -> None:
        self.app, self.runs, self.replies, self.inline = app, [], 0, inline
        self.table = f"{app.store.prefix}here_ledger"
        self.before_write: Callable[[str, sk.Context], Awaitable[None]] | None = None
        part = app.participant("p", store=store)

        @part.command(Do, db_only=db_only)
        async def do(cmd: Do, ctx: sk.Context) -> None:
            self.runs.append(cmd.key)
            if cmd.key == refuse:
                raise Refused(f"no {cmd.key}")
            if self.before_write is not None:
                await self.before_write(cmd.key, ctx)
            await self._write(ctx, db_only, f"INSERT INTO {self.table} (k) VALUES (?)", cmd.key)

        @part.command(Undo, db_only=db_only)
        async def undo(cmd: Undo, ctx: sk.Context) -> None:
            await self._write(ctx, db_only, f"DELETE FROM {self.table} WHERE k = ?", cmd.key)

        coord = app.sagas.coordinator
        on_reply = coord.on_reply

        async def counted(scope: Any) -> None:  # the coordinator's own reply hop
            self.replies += 1
            await on_reply(scope)

        coord.on_reply = counted  # type: ignore[method-assign]

    @staticmethod
    async def _write(ctx: sk.Context, held: bool, sql: str, key: str) -> None:
        await (ctx.db.later if held else ctx.db.execute)(sql, key)

    async def start(self, defn: sk.SagaDefinition[Data]) -> None:
        self.app.saga(defn)
        await self.app.start()
        if not self.inline:  # every command travels: each step is decided in its own hop
            self.app.sagas.coordinator.hops.routes.clear()
        async with self.app.store_of("p").transaction() as tx:
            await tx.execute(f"CREATE TABLE {self.table} (k TEXT)")

    async def ledger(self) -> list[str]:
        async with self.app.store_of("p").transaction() as tx:
            rows = await tx.fetchall(f"SELECT k FROM {self.table} ORDER BY k")
        return [r[0] for r in rows]


async def _run(app: sk.App, defn: sk.SagaDefinition[Data], key: str = "k") -> sk.SagaView:
    return await app.sagas.wait(await app.sagas.start(defn, Data(key)), timeout=20)


async def test_db_only_steps_need_no_reply_message(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    bench, defn = Bench(app), _saga()
    await bench.start(defn)
    await _run(app, defn, "warm")  # prepared statements, the pool's connections
    del statements[:]
    view = await _run(app, defn)
    sent = [sql for _, sql in statements if f"{app.store.prefix}sagas" in sql]
    assert view.state == "completed"
    assert bench.replies == 0
    assert await bench.ledger() == ["k1", "k2", "warm1", "warm2"]
    if app.store.dialect == "postgresql":  # the start with both steps and their decisions
        assert len([s for s in sent if not s.startswith("SELECT id, type")]) == 1, sent


async def test_a_refusal_is_decided_in_its_own_hop_and_compensated(app: sk.App) -> None:
    bench, defn = Bench(app, refuse="k2"), _saga()
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "compensated"
    assert bench.replies == 0
    assert await bench.ledger() == []
    # both inside the start, which step two's refusal rolled back; the start again
    # with step one inside and step two's command sent; its own hop refuses
    assert bench.runs == ["k1", "k2", "k1", "k2"]


async def test_a_decision_that_lost_to_another_hop_runs_the_step_again_with_a_reply(
    app: sk.App,
) -> None:
    if app.store.dialect != "postgresql":
        pytest.skip("SQLite writes one transaction at a time: no other hop can overtake")
    bench, defn = Bench(app, inline=False), _saga()
    prefix = app.store.prefix

    async def overtaken(key: str, ctx: sk.Context) -> None:
        if key == "k2" and bench.runs.count("k2") == 1:  # another hop moves the saga on
            async with app.store.transaction() as tx:
                n = await tx.execute(f"UPDATE {prefix}sagas SET rev = rev + 1 WHERE id = ?", "s")
            assert n == 1

    bench.before_write = overtaken
    await bench.start(defn)
    view = await app.sagas.wait(await app.sagas.start(defn, Data("k"), saga_id="s"), timeout=20)
    assert view.state == "completed"
    assert bench.runs == ["k1", "k2", "k2"]  # step two's Python ran twice, its effect once
    assert await bench.ledger() == ["k1", "k2"]
    assert bench.replies == 1  # the second run sent its reply


async def test_a_definition_that_fails_to_decide_fails_the_coordinators_hop_not_the_step(
    app: sk.App,
) -> None:
    def broken(d: Data) -> Do:
        raise ValueError("a bug in step two's command")

    bench, defn = Bench(app), _saga(broken)
    await bench.start(defn)
    saga_id = await app.sagas.start(defn, Data("k"))

    async def reply_handled() -> bool:
        return bench.replies >= 1

    await eventually(reply_handled)
    assert await bench.ledger() == ["k1"]  # step one committed, its reply went out
    async with app.store.transaction() as tx:
        row = await app.store.inbox_get(tx, "p", f"saga:{saga_id}:one:forward")
    assert row is not None and row.outcome == "success"


async def test_a_handler_that_is_not_db_only_sends_its_reply(app: sk.App) -> None:
    bench, defn = Bench(app, db_only=False), _saga()
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "completed"
    assert bench.replies == 2
    assert await bench.ledger() == ["k1", "k2"]


async def test_a_participant_on_a_store_of_its_own_sends_its_reply(
    app: sk.App, tmp_path: Path
) -> None:
    bench, defn = Bench(app, store=f"sqlite:///{tmp_path}/p.db"), _saga()
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "completed"
    assert bench.replies == 2
    assert await bench.ledger() == ["k1", "k2"]


async def test_parallel_steps_each_decided_once(app: sk.App) -> None:
    """Two steps of one saga at once: their decisions meet on the instance's revision."""
    bench = Bench(app)
    defn = (
        sk.Saga("t-here-parallel", Data)
        .step("one")
        .invoke("p", lambda d: Do(d.key + "1"))
        .compensate("p", lambda d: Undo(d.key + "1"))
        .step("two", parallel=True)
        .invoke("p", lambda d: Do(d.key + "2"))
        .compensate("p", lambda d: Undo(d.key + "2"))
        .step("three")
        .invoke("p", lambda d: Do(d.key + "3"))
        .build()
    )
    await bench.start(defn)
    views = [await _run(app, defn, f"k{i}") for i in range(5)]
    assert [v.state for v in views] == ["completed"] * 5
    assert all(sorted(v.done) == ["one", "three", "two"] for v in views)
    ledger = await bench.ledger()
    assert sorted(ledger) == sorted(f"k{i}{n}" for i in range(5) for n in (1, 2, 3))


async def test_a_reply_after_the_steps_timeout_matches_what_the_step_committed(
    app: sk.App,
) -> None:
    """Step one outlives its timeout: the timer's hop and the step's own decision overlap.

    Whichever wins, the saga's outcome is what the participant committed: completed
    with both rows, or compensated with none."""
    import asyncio

    bench = Bench(app)
    defn = (
        sk.Saga("t-here-slow", Data)
        .step("one")
        .invoke("p", lambda d: Do(d.key + "1"))
        .compensate("p", lambda d: Undo(d.key + "1"))
        .timeout(0.2)
        .step("two")
        .invoke("p", lambda d: Do(d.key + "2"))
        .build()
    )

    async def slow(key: str, ctx: sk.Context) -> None:
        if key == "k1" and bench.runs.count("k1") == 1:
            await asyncio.sleep(0.8)

    bench.before_write = slow
    await bench.start(defn)
    view = await _run(app, defn)
    ledger = await bench.ledger()
    if view.state == "completed":
        assert ledger == ["k1", "k2"]
    else:
        assert view.state == "compensated" and ledger == [], (view.state, ledger)
    if app.store.dialect == "postgresql":  # the step's hop holds no lock while it sleeps
        assert view.state == "compensated"


async def test_two_copies_of_a_step_at_once_apply_once_and_decide_once(app: sk.App) -> None:
    """A copy of step two's command arrives while the first runs: one commits with its
    decision; the other writes nothing and is answered from the inbox, its reply ignored."""
    import asyncio

    bench, defn = Bench(app, inline=False), _saga()
    both = asyncio.Event()
    together = app.store.dialect == "postgresql"  # SQLite runs one write transaction at a time

    async def copied(key: str, ctx: sk.Context) -> None:
        if key != "k2":
            return
        if bench.runs.count("k2") == 1:
            copy = app.codec.make(app.codec.payload(ctx.envelope), ctx.envelope.headers)
            if not together:  # queued with this run's commit: it comes right after
                await app.store.queue.put(ctx.db, "p", copy.id, app.codec.encode(copy))
                return
            async with app.store.transaction() as tx:
                await app.store.queue.put(tx, "p", copy.id, app.codec.encode(copy))
            await asyncio.wait_for(both.wait(), 20)  # both copies in their handler
        else:
            both.set()

    bench.before_write = copied
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "completed"
    # both ran their Python (the bet that each is the first copy); one effect stands
    assert bench.runs.count("k2") == 2
    assert await bench.ledger() == ["k1", "k2"]
    assert view.done == ["one", "two"]
    # the copy's answer (the stored reply, re-sent and ignored) at least, maybe after the
    # saga ended; a later step's reply too when its hop found the saga's record taken
    # by a hop that rolled back

    async def answered() -> bool:
        return bench.replies >= 1

    await eventually(answered)


# -- a saga's first step inside its start ------------------------------------------


async def test_the_first_step_runs_inside_the_start(app: sk.App) -> None:
    """Its command never travels: the instance is inserted as it stands after step one,
    and a one-step saga has ended when ``start`` returns."""
    bench = Bench(app)
    one = sk.Saga("t-here-one", Data).step("one").invoke("p", lambda d: Do(d.key + "1")).build()
    app.saga(one)
    await bench.start(_saga())
    saga_id = await app.sagas.start(one, Data("k"))
    assert await bench.ledger() == ["k1"]  # committed with the start
    view = await app.sagas.get(saga_id)
    assert view.state == "completed" and view.done == ["one"]
    assert bench.replies == 0
    async with app.store.transaction() as tx:
        row = await app.store.inbox_get(tx, "p", f"saga:{saga_id}:one:forward")
    assert row is not None and row.outcome == "success"
    known = app.sagas.coordinator.known
    assert known is None or known.take(saga_id) is None  # a finished saga is not kept


async def test_a_first_step_that_refuses_in_the_start_is_refused_by_its_own_hop(
    app: sk.App,
) -> None:
    bench, defn = Bench(app, refuse="k1"), _saga()
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state in ("compensated", "failed")
    assert view.done == []
    assert bench.runs == ["k1", "k1"]  # in the start (rolled back), then in its hop
    assert await bench.ledger() == []


@pytest.mark.parametrize("failure", ["raises", "write fails at commit"])
async def test_a_first_step_that_fails_in_the_start_is_retried_by_its_own_hop(
    app: sk.App, failure: str
) -> None:
    """Its handler raises, or its held write fails with the start's statement: the
    start is made again with the command sent, and the step's own hop runs it."""
    bench, defn = Bench(app), _saga()

    async def first_run_fails(key: str, ctx: sk.Context) -> None:
        if key != "k1" or bench.runs.count("k1") != 1:
            return
        if failure == "raises":
            raise ConnectionError("the first run fails")
        await ctx.db.later(f"INSERT INTO {app.store.prefix}no_such_table (k) VALUES (?)", key)

    bench.before_write = first_run_fails
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "completed"
    if failure == "raises" or app.store.dialect == "sqlite":  # (SQLite runs held writes
        # at once) step one's hop failed: the start again with its command sent
        assert bench.runs == ["k1", "k1", "k2"]  # its own hop runs step two inside it
    else:  # the start's statement failed, nobody's hop in particular: none inside again
        assert bench.runs == ["k1", "k2", "k1", "k2"]
    assert await bench.ledger() == ["k1", "k2"]


async def test_starting_an_existing_saga_again_applies_its_first_step_once(app: sk.App) -> None:
    """The second start takes step one's hop in its transaction, which the taken saga
    id rolls back whole: the handler ran again (the bet that it is the first copy),
    its effect stays once."""
    bench, defn = Bench(app), _saga()
    await bench.start(defn)
    view = await app.sagas.wait(await app.sagas.start(defn, Data("k"), saga_id="s"), timeout=20)
    assert view.state == "completed"
    assert await app.sagas.start(defn, Data("k"), saga_id="s") == "s"
    assert bench.runs.count("k1") == 2
    assert await bench.ledger() == ["k1", "k2"]


async def test_two_starts_of_one_saga_id_at_once_apply_its_first_step_once(app: sk.App) -> None:
    """Both run step one inside their start; one start commits, the other's whole
    transaction fails on the taken id (or the step's inbox key) and it returns the id."""
    import asyncio

    bench, defn = Bench(app), _saga()
    both = asyncio.Event()

    async def together(key: str, ctx: sk.Context) -> None:
        if key == "k1" and bench.runs.count("k1") == 2:
            both.set()
        elif key == "k1" and bench.runs.count("k1") == 1 and app.store.dialect == "postgresql":
            await asyncio.wait_for(both.wait(), 10)  # both starts inside step one's handler

    bench.before_write = together
    await bench.start(defn)
    ids = await asyncio.gather(*(app.sagas.start(defn, Data("k"), saga_id="s") for _ in "ab"))
    assert ids == ["s", "s"]
    view = await app.sagas.wait("s", timeout=20)
    assert view.state == "completed"
    assert await bench.ledger() == ["k1", "k2"]
    assert bench.runs.count("k1") >= 2  # both ran its Python; one effect stands


# -- the steps after it, inside the same transaction -------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def strict(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[sk.App]:
    """No retries: a failure charged to the wrong hop fails its step for good."""
    url = backend_url(request, tmp_path, max_size=4)
    settings = sk.Settings(prefix=prefix, max_poll=0.02, retry=sk.RetryPolicy(max_attempts=1))
    app = sk.App(url, settings=settings)
    yield app
    await app.stop()
    await drop_app_tables(app)


def _after_a_travelling_step(bench: Bench) -> sk.SagaDefinition[Data]:
    """Step one's handler is not ``db_only``: its reply travels and the coordinator's
    own hop sends step two, whose hop then carries step three."""

    q = bench.app.participant("q")

    @q.command(Do)
    async def first(cmd: Do, ctx: sk.Context) -> None:
        bench.runs.append(cmd.key)
        await ctx.db.execute(f"INSERT INTO {bench.table} (k) VALUES (?)", cmd.key)

    @q.command(Undo)
    async def undo_first(cmd: Undo, ctx: sk.Context) -> None:
        await ctx.db.execute(f"DELETE FROM {bench.table} WHERE k = ?", cmd.key)

    saga: Any = sk.Saga("t-here-carried", Data)
    for i, who in enumerate("qp", 1):
        saga = saga.step(("one", "two")[i - 1]).invoke(who, lambda d, i=i: Do(f"{d.key}{i}"))
        saga = saga.compensate(who, lambda d, i=i: Undo(f"{d.key}{i}"))
    return saga.step("three").invoke("p", lambda d: Do(d.key + "3")).build()  # type: ignore[no-any-return]


async def test_a_saga_of_db_only_steps_has_ended_when_its_start_returns(app: sk.App) -> None:
    bench, saga = Bench(app), cast(Any, sk.Saga("t-here-three", Data))
    for i, step in enumerate(("one", "two", "three"), 1):
        saga = saga.step(step).invoke("p", lambda d, i=i: Do(f"{d.key}{i}"))
    defn = saga.build()
    await bench.start(defn)
    saga_id = await app.sagas.start(defn, Data("k"))
    view = await app.sagas.get(saga_id)  # no wait: it committed with the start
    assert view.state == "completed" and view.done == ["one", "two", "three"]
    assert await bench.ledger() == ["k1", "k2", "k3"]
    assert bench.runs == ["k1", "k2", "k3"] and bench.replies == 0
    async with app.store.transaction() as tx:
        for step in ("one", "two", "three"):
            row = await app.store.inbox_get(tx, "p", f"saga:{saga_id}:{step}:forward")
            assert row is not None and row.outcome == "success", step
    history = [(h.entry, h.step) for h in (await app.sagas.get(saga_id, history=True)).history]
    steps = [(e, step) for step in ("one", "two", "three") for e in ("command-sent", "reply")]
    assert history == [("started", None), *steps, ("completed", None)]  # as if they travelled


@pytest.mark.parametrize("failure", ["raises", "refuses"])
async def test_a_step_that_fails_inside_anothers_hop_is_the_steps_own_failure(
    strict: sk.App, failure: str
) -> None:
    """Step three fails inside step two's hop: that hop runs again at once with step
    three's command sent, and step three's own hop retries (succeeds) or refuses it.
    With no retries at all, charging the failure to step two's message would fail
    step two for good instead."""
    app = strict
    bench = Bench(app, refuse="k3" if failure == "refuses" else "")

    async def first_run_fails(key: str, ctx: sk.Context) -> None:
        if key == "k3" and bench.runs.count("k3") == 1:
            raise ConnectionError("step three's first run fails")

    if failure == "raises":
        bench.before_write = first_run_fails
    defn = _after_a_travelling_step(bench)
    await bench.start(defn)
    view = await _run(app, defn)
    assert bench.runs.count("k2") == 2  # step two's hop ran twice, the second time alone
    assert bench.runs.count("k3") == 2  # inside step two's hop, then in its own
    if failure == "raises":
        assert bench.replies == 1  # step one's: step two's second run decided on its reply
        assert view.state == "completed", view
        assert await bench.ledger() == ["k1", "k2", "k3"]
    else:
        assert view.state == "compensated", view
        assert await bench.ledger() == []
    assert await app.dead_letters.list() == []


async def test_a_long_saga_moves_on_in_bounded_transactions(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    """A transaction runs at most CHAIN_MAX steps' hops after its own; the next step's
    command is sent, and its hop carries the rest."""
    from sagakit.endpoint import CHAIN_MAX

    n = CHAIN_MAX + 4
    saga: Any = sk.Saga("t-here-long", Data)
    for i in range(n):
        saga = saga.step(f"s{i:02}").invoke("p", lambda d, i=i: Do(f"{d.key}{i:02}"))
    defn = saga.build()
    bench = Bench(app)
    await bench.start(defn)
    await _run(app, defn, "warm")
    del statements[:]
    view = await _run(app, defn)
    assert view.state == "completed" and len(view.done) == n
    assert sorted(bench.runs[n:]) == [f"k{i:02}" for i in range(n)]  # each step once
    sent = [sql for _, sql in statements if f"{app.store.prefix}sagas" in sql]
    if app.store.dialect == "postgresql":  # the start with CHAIN_MAX + 1 steps, then the rest
        assert len([s for s in sent if not s.startswith("SELECT id, type")]) == 2, sent


async def test_waiting_for_a_saga_that_ended_inside_its_start_reads_nothing(
    app: sk.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start committed the saga's final record: ``wait`` takes it from there."""
    bench, defn = Bench(app), _saga()
    await bench.start(defn)
    reads: list[str] = []
    read = app.store.saga_get

    async def counted(saga_id: str) -> Any:
        reads.append(saga_id)
        return await read(saga_id)

    monkeypatch.setattr(app.store, "saga_get", counted)
    view = await _run(app, defn)
    assert view.state == "completed" and view.done == ["one", "two"]
    assert reads == []


def test_a_waker_keeps_what_a_start_offered_for_its_waiter_bounded() -> None:
    from sagakit.store.queue import Waker

    waker = Waker(expect_at_most=2)
    for name in "abc":
        with waker.starting(name):  # each ends inside its start
            waker.offer(name, name.upper())
    with waker.starting("d"):  # one that did not end
        pass
    assert [waker.taken(n) for n in "abcd"] == [None, "B", "C", None]  # the oldest dropped
    waker.forget("c")  # its waiter is done
    assert waker.taken("c") is None and waker.taken("b") == "B"


async def test_steps_in_one_transaction_see_each_others_held_writes(
    app: sk.App, statements: list[tuple[int, str]]
) -> None:
    """Step one inserts a row, steps two and three update it, all with ``ctx.db.later``
    and all in the start's transaction: every update lands, as if each step had its own
    transaction (on PostgreSQL held writes share one statement, and one snapshot,
    unless the driver keeps the hops apart)."""
    table = f"{app.store.prefix}here_counter"
    part = app.participant("r")

    @part.command(Do, db_only=True)
    async def count(cmd: Do, ctx: sk.Context) -> None:
        base, n = cmd.key[:-1], cmd.key[-1]
        if n == "1":
            await ctx.db.later(f"INSERT INTO {table} (k, n) VALUES (?, 1)", base)
        else:
            await ctx.db.later(f"UPDATE {table} SET n = n + 1 WHERE k = ?", base)

    saga: Any = sk.Saga("t-here-counter", Data)
    for i in (1, 2, 3):
        saga = saga.step(f"s{i}").invoke("r", lambda d, i=i: Do(f"{d.key}{i}"))
    defn = saga.build()
    app.saga(defn)
    await app.start()
    async with app.store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {table} (k TEXT, n INTEGER)")
    view = await _run(app, defn)
    assert view.state == "completed" and view.done == ["s1", "s2", "s3"]
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(f"SELECT k, n FROM {table}")
    assert [tuple(r) for r in rows] == [("k", 3)]
    if app.store.dialect == "postgresql":  # the updates waited for what they change
        assert any(sql == "BEGIN" for _, sql in statements)


async def test_a_compensation_failing_inside_a_refusals_hop_is_its_own_failure(
    strict: sk.App,
) -> None:
    """Step two refuses in its own hop; the decision on that runs step one's
    compensation in the same transaction, where it fails once: the refusal is
    recorded with its reply sent instead (not redelivered), and the compensation's
    own hop runs it again."""
    app = strict
    bench, defn = Bench(app, refuse="k2"), _saga()
    write, failed = bench._write, []

    async def undo_fails_once(ctx: sk.Context, held: bool, sql: str, key: str) -> None:
        if sql.startswith("DELETE") and not failed:
            failed.append(key)
            raise ConnectionError("the compensation's first run fails")
        await write(ctx, held, sql, key)

    bench._write = undo_fails_once  # type: ignore[method-assign]
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "compensated", view
    assert failed == ["k1"] and await bench.ledger() == []
    assert bench.runs.count("k2") == 2  # inside the start, then in its own hop: once each
    assert await app.dead_letters.list() == []


async def test_a_step_whose_write_fails_at_the_commit_of_anothers_hop_is_its_own_failure(
    strict: sk.App,
) -> None:
    """Step two's handler runs a statement (so its hop is no bet), step three runs in
    its hop and holds a write that fails only when the transaction commits: step
    two's hop runs again with step three's command sent, and is not charged."""
    app = strict
    bench = Bench(app)

    async def hooks(key: str, ctx: sk.Context) -> None:
        if key == "k2":
            await ctx.db.execute(f"SELECT count(*) FROM {bench.table}")
        elif key == "k3" and bench.runs.count("k3") == 1:
            await ctx.db.later(f"INSERT INTO {app.store.prefix}no_such_table (k) VALUES (?)", key)

    bench.before_write = hooks
    defn = _after_a_travelling_step(bench)
    await bench.start(defn)
    view = await _run(app, defn)
    assert view.state == "completed", view
    assert await bench.ledger() == ["k1", "k2", "k3"]
    assert bench.runs.count("k3") == 2
    assert await app.dead_letters.list() == []


def test_a_waker_trusts_what_a_start_kept_only_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process may move the saga on (an operator's retry): after KEEP_S a
    waiter reads the row instead; a commit here that moves it on withdraws it at once."""
    from sagakit.store import queue

    waker = queue.Waker()
    with waker.starting("a"):
        waker.offer("a", "A")
    waker.withdraw("a")
    assert waker.taken("a") is None
    monkeypatch.setattr(queue, "KEEP_S", -1.0)
    with waker.starting("b"):
        waker.offer("b", "B")
    assert waker.taken("b") is None
