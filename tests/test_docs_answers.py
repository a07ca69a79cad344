"""The twelve questions of issue 19: each answer in docs/how-to/ backed by its behaviour.

One test per question, asserting what the page says: failures-and-timeouts.md
(Q1-Q3), participant-databases.md (Q4, Q5), connection-budgets.md (Q6),
sqlite.md (Q7), brokers.md (Q8), querying-sagas.md (Q9, Q10), install.md
(Q11), configure.md (Q12).
"""

from __future__ import annotations

import asyncio
import dataclasses
import pydoc
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

import sagakit as sk
from sagakit.errors import ConfigurationError, InvalidOperatorAction, TransportError
from sagakit.testing import drop_tables
from tests.helpers import eventually

ROOT = Path(__file__).parents[1]
FAST = sk.RetryPolicy(max_attempts=3, initial=0.01, max_delay=0.02)


@sk.command("howto.Reserve")
class Reserve(msgspec.Struct):
    key: str


@sk.command("howto.Release")
class Release(msgspec.Struct):
    key: str


@sk.command("howto.Notify")
class Notify(msgspec.Struct):
    key: str


@sk.command("howto.Charge")
class Charge(msgspec.Struct):
    key: str
    amount: int


@sk.reply("howto.Charged")
class Charged(msgspec.Struct):
    receipt: str


class Declined(sk.BusinessError):
    code = "howto.Declined"


@dataclass
class Order:
    key: str
    amount: int = 1
    receipt: str = ""


def settings(**kw: Any) -> sk.Settings:
    return sk.Settings(**{"max_poll": 0.02, "retry": FAST, **kw})


def reserve_then(name: str, **saga: Any) -> Any:
    """The first step of most sagas here: reserve, compensated by a release."""
    return (
        sk.Saga(name, Order, **saga)
        .step("reserve")
        .invoke("stock", lambda o: Reserve(o.key))
        .compensate("stock", lambda o: Release(o.key))
    )


def charge(o: Order) -> Charge:
    return Charge(o.key, o.amount)


def stock_bench(app: sk.App, log: list[str], slow: dict[str, float] | None = None) -> None:
    """The stock participant: logs what it did; sleeps in its first attempt if told."""
    stock, slow = app.participants.get("stock") or app.participant("stock"), slow or {}

    async def nap(what: str, ctx: sk.Context) -> None:
        if ctx.attempt == 1 and what in slow:
            await asyncio.sleep(slow[what])

    @stock.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> None:
        await nap("reserve", ctx)
        log.append(f"reserve {cmd.key}")

    @stock.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        await nap("release", ctx)
        log.append(f"release {cmd.key}")


def payments_bench(app: sk.App, limit: int = 100) -> None:
    payments = app.participant("payments")

    @payments.command(Charge)
    async def take(cmd: Charge, ctx: sk.Context) -> Charged:
        if cmd.amount > limit:
            raise Declined(f"{cmd.amount} is over the limit")
        return Charged(f"r-{cmd.key}")


def entries(view: sk.SagaView, step: str | None = None) -> list[str]:
    return [e.entry for e in view.history if step is None or e.step == step]


async def run(app: sk.App, saga: Any, data: Order, timeout: float = 20) -> sk.SagaView:
    return await app.sagas.wait(await app.sagas.start(saga, data), timeout, history=True)


async def dropped(store: sk.Store) -> None:
    """Drop a (closed) store's tables."""
    await store.open(migrate=False)
    try:
        await drop_tables(store)
    finally:
        await store.close()


# -- failures-and-timeouts.md ----------------------------------------------------------


async def test_q01_a_step_without_compensation_that_keeps_timing_out(tmp_path: Path) -> None:
    """Asked again per compensation_retry, then failed, earlier steps not compensated;
    with .nothing_to_undo() the earlier steps are compensated instead."""
    policy = sk.RetryPolicy(max_attempts=3, initial=0.01, max_delay=0.02)

    def saga(name: str, undo: bool) -> Any:
        s = reserve_then(name, compensation_retry=policy).step("notify")
        s = s.invoke("mailer", lambda o: Notify(o.key)).timeout(0.2)
        s = s.nothing_to_undo() if undo else s
        return s.step("charge").invoke("payments", charge).pivot().build()

    log: list[str] = []
    # the mailer never answers: this process does not run it, and no other does
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings(), run=["coordinator", "stock"])
    stock_bench(app, log)
    app.participant("mailer")
    payments_bench(app)
    stuck, undone = app.saga(saga("q1", False)), app.saga(saga("q1-nothing", True))
    async with app:
        view = await run(app, stuck, Order("a"))
        assert view.state == "failed"
        assert view.error == "step 'notify' (forward) gave up after 3 attempts: timeout after 0.2s"
        assert view.done == ["reserve"] and view.compensated == []
        assert entries(view, "notify").count("timeout") == 3
        assert "compensation-sent" not in entries(view) and log == ["reserve a"]
        with pytest.raises(InvalidOperatorAction):
            await app.sagas.compensate(view.id, actor=sk.Actor("ops"), reason="undo it all")
        await app.sagas.skip(view.id, actor=sk.Actor("ops"), reason="mail sent by hand")
        await eventually(lambda: pending(app, view.id, "charge"))  # it carries on
        view = await run(app, undone, Order("b"))
        assert view.state == "compensated"
        assert view.error == "step 'notify' failed: timeout after 0.2s"
        assert view.compensated == ["reserve"] and entries(view, "notify").count("timeout") == 1
        assert log == ["reserve a", "reserve b", "release b"]


async def test_q02_timeout_applies_to_compensation_commands(tmp_path: Path) -> None:
    """A compensation slower than the step's timeout times out and is sent again;
    when compensation_retry gives up, the saga stops in failed."""
    log: list[str] = []
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings())
    app.participant("stock", store=f"sqlite:///{tmp_path}/stock.db")
    stock_bench(app, log, slow={"release": 1.5})
    payments_bench(app, limit=10)
    build = lambda name, **kw: (  # noqa: E731
        reserve_then(name, **kw).timeout(0.3).step("charge").invoke("payments", charge).pivot()
    ).build()
    patient, impatient = (
        app.saga(build("q2")),
        app.saga(build("q2-once", compensation_retry=sk.RetryPolicy(max_attempts=1))),
    )
    async with app:
        view = await run(app, patient, Order("a", amount=99))
        assert view.state == "compensated" and view.compensated == ["reserve"]
        lines = [(e.entry, e.detail) for e in view.history if e.step == "reserve"]
        sent = [d for e, d in lines if e == "compensation-sent"]
        assert sent[:2] == ["howto.Release attempt 1", "howto.Release attempt 2"]
        after_first = lines[lines.index(("compensation-sent", sent[0])) :]
        assert ("timeout", "no reply within 0.3s") in after_first
        assert log.count("release a") == 1  # the second attempt got the first one's stored reply
        view = await run(app, impatient, Order("b", amount=99))
        assert view.state == "failed"
        assert view.error == (
            "step 'reserve' (compensate) gave up after 1 attempts: timeout after 0.3s"
        )


async def test_q03_a_late_reply_is_ignored_and_the_stored_reply_is_sent_again(
    tmp_path: Path,
) -> None:
    """The first attempt answers after its timeout: its reply is ignored; the step's
    next attempt is answered from the participant's inbox, without running again."""
    log: list[str] = []
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings())
    app.participant("stock", store=f"sqlite:///{tmp_path}/stock.db")
    stock_bench(app, log, slow={"reserve": 1.5})
    payments_bench(app)
    saga = app.saga(
        sk.Saga("q3", Order)
        .step("check")
        .invoke("stock", lambda o: Reserve(o.key))
        .timeout(0.3)
        .step("charge")
        .invoke("payments", charge)
        .pivot()
        .build()
    )
    async with app:
        sid = await app.sagas.start(saga, Order("a"))
        view = await app.sagas.wait(sid, 20)
        assert view.state == "completed" and log == ["reserve a"]

        async def ignored() -> bool:
            view = await app.sagas.get(sid)
            return any(
                e.entry == "reply-ignored" and "not awaited" in (e.detail or "")
                for e in view.history
            )

        await eventually(ignored)
        view = await app.sagas.get(sid)
        assert "timeout" in entries(view, "check") and "reply" in entries(view, "check")


# -- participant-databases.md -----------------------------------------------------------


async def test_q04_a_participant_with_its_own_database_or_schema(
    tmp_path: Path, postgres_url: str, prefix: str
) -> None:
    schema = f"howto_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    app = sk.App(f"{postgres_url}?max_size=2", settings=settings(prefix=prefix))
    try:
        customers = app.participant(
            "customers", store=f"{postgres_url}?search_path={schema}&max_size=2"
        )
        stock = app.participant("stock", store=f"sqlite:///{tmp_path}/stock.db")

        @customers.command(Reserve)
        async def hold(cmd: Reserve, ctx: sk.Context) -> None:
            await ctx.db.execute("CREATE TABLE IF NOT EXISTS credit (customer TEXT)")
            await ctx.db.execute("INSERT INTO credit VALUES (?)", cmd.key)

        @stock.command(Notify)
        async def count(cmd: Notify, ctx: sk.Context) -> None:
            await ctx.db.execute("CREATE TABLE IF NOT EXISTS seen (key TEXT)")
            await ctx.db.execute("INSERT INTO seen VALUES (?)", cmd.key)

        saga = app.saga(
            sk.Saga("q4", Order)
            .step("hold")
            .invoke("customers", lambda o: Reserve(o.key))
            .step("count")
            .invoke("stock", lambda o: Notify(o.key))
            .build()
        )
        async with app:
            assert (await run(app, saga, Order("ada"))).state == "completed"
        tables = {
            r[0]
            for r in await admin.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
            )
        }
        assert {"credit", f"{prefix}inbox", f"{prefix}messages"} <= tables
        assert await admin.fetchval(f"SELECT customer FROM {schema}.credit") == "ada"
        with sqlite3.connect(tmp_path / "stock.db") as db:
            assert db.execute("SELECT key FROM seen").fetchall() == [("ada",)]
    finally:
        await dropped(app.store)
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_q05_the_whole_ctx_db_interface(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, prefix: str
) -> None:
    url = f"sqlite:///{tmp_path}/a.db"
    if backend == "postgresql":
        url = f"{request.getfixturevalue('postgres_url')}?max_size=2"
    app = sk.App(url, settings=settings(prefix=prefix))
    app.participant("accounts")
    t = f"{prefix}accounts"
    try:
        async with app, app.begin("accounts", new_conversation=True) as ctx:
            db = ctx.db
            await db.execute(f"CREATE TABLE {t} (id TEXT PRIMARY KEY, balance INTEGER)")
            assert await db.execute(f"INSERT INTO {t} VALUES (?, ?)", "ada", 10) == 1
            rows = [("bob", 20), ("cy", 30)]
            assert await db.executemany(f"INSERT INTO {t} VALUES (?, ?)", rows) is None
            n = await db.execute(f"UPDATE {t} SET balance = balance + ? WHERE balance > ?", 1, 15)
            assert n == 2
            row = await db.fetchone(f"SELECT id, balance FROM {t} WHERE id = ?", "bob")
            assert type(row).__name__ == ("Row" if backend == "sqlite" else "Record")
            assert row[0] == "bob" and row["balance"] == 21 and tuple(row) == ("bob", 21)
            assert dict(row) == {"id": "bob", "balance": 21}
            assert await db.fetchone(f"SELECT id FROM {t} WHERE id = ?", "nobody") is None
            everyone = await db.fetchall(f"SELECT id FROM {t} ORDER BY id")
            assert isinstance(everyone, list)
            assert [r["id"] for r in everyone] == ["ada", "bob", "cy"]
            assert await db.fetchall(f"SELECT id FROM {t} WHERE balance < 0") == []
            assert await db.later(f"UPDATE {t} SET balance = 0 WHERE id = ?", "cy") is None
            row = await db.fetchone(f"SELECT balance FROM {t} WHERE id = ?", "cy")
            assert row[0] == 0  # a read sends the held write first
            with pytest.raises(RuntimeError):
                async with db.savepoint():
                    await db.execute(f"DELETE FROM {t}")
                    raise RuntimeError("only the savepoint rolls back")
            assert await db.execute(f"DELETE FROM {t} WHERE id = ?", "cy") == 1
            await db.execute(f"DROP TABLE {t}")
    finally:
        await dropped(app.store)


# -- connection-budgets.md --------------------------------------------------------------


async def peak_connections(postgres_url: str, query: str, cap: str) -> tuple[int, int]:
    """(connections of one process's App at rest, at most under load), from pg_stat_activity."""
    name = f"howto{uuid.uuid4().hex[:10]}"
    app = sk.App(
        f"{postgres_url}?application_name={name}{cap}",
        settings=settings(prefix=f"{name}_"),
    )
    slow = app.participant("slow")

    @slow.command(Reserve)
    async def hold(cmd: Reserve, ctx: sk.Context) -> None:
        await ctx.db.execute("SELECT pg_sleep(0.4)")

    saga = app.saga(sk.Saga("q6", Order).step("s").invoke("slow", lambda o: Reserve(o.key)).build())
    watcher = await asyncpg.connect(postgres_url)
    count = lambda: watcher.fetchval(query, name)  # noqa: E731
    try:
        async with app:
            at_rest, peak = await count(), 0
            ids = [await app.sagas.start(saga, Order(str(i))) for i in range(16)]
            waiting = asyncio.gather(*(app.sagas.wait(i, 60) for i in ids))
            while not waiting.done():
                peak = max(peak, await count())
                await asyncio.sleep(0.02)
            assert {v.state for v in await waiting} == {"completed"}
    finally:
        await watcher.close()
        await dropped(app.store)
    return at_rest, peak


async def test_q06_connections_per_process_and_the_url_cap(postgres_url: str) -> None:
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    at_rest, peak = await peak_connections(postgres_url, query, "&max_size=2")
    assert 2 <= at_rest <= peak == 3  # the LISTEN connection + a pool of at most 2
    at_rest, peak = await peak_connections(postgres_url, query, "")
    assert 2 <= at_rest <= peak == 11  # the default pool grows to 10
    with pytest.raises(ConfigurationError, match="max_size"):
        sk.App(f"{postgres_url}?max_sise=2")


async def test_q06_a_participants_own_store_adds_a_pool_but_no_listen(
    tmp_path: Path, postgres_url: str, prefix: str
) -> None:
    name = f"howto{uuid.uuid4().hex[:10]}"
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings(prefix=prefix))
    app.participant("stock", store=f"{postgres_url}?application_name={name}&max_size=2")
    stock_bench(app, [])
    saga = app.saga(reserve_then("q6-own").build())
    watcher = await asyncpg.connect(postgres_url)
    query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    try:
        async with app:
            assert (await run(app, saga, Order("a"))).state == "completed"
            assert app.store_of("stock").driver.listener_pid is None  # type: ignore[attr-defined]
            assert 1 <= await watcher.fetchval(query, name) <= 2
    finally:
        await watcher.close()
        await dropped(app.store_of("stock"))


# -- sqlite.md --------------------------------------------------------------------------


async def test_q07_a_slow_sqlite_handler_holds_its_participants_file(tmp_path: Path) -> None:
    """Handlers of one SQLite file run one at a time; the coordinator's own file is not
    held, so a step timeout fires on time and the compensation waits for the forward
    run, then undoes it. Another process's write lock is waited out, not failed."""
    runs: list[tuple[str, str, float]] = []
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings())
    stock = app.participant("stock", store=f"sqlite:///{tmp_path}/stock.db")

    @stock.command(Reserve)
    async def reserve(cmd: Reserve, ctx: sk.Context) -> None:
        runs.append(("begin", cmd.key, time.time()))
        await asyncio.sleep(1.2 if cmd.key != "quick" else 0)  # inside the transaction
        runs.append(("end", cmd.key, time.time()))

    @stock.command(Release)
    async def release(cmd: Release, ctx: sk.Context) -> None:
        runs.append(("release", cmd.key, time.time()))

    saga = app.saga(reserve_then("q7").timeout(0.3).build())
    patient = app.saga(reserve_then("q7-patient").build())
    async with app:
        a, b = [await app.sagas.start(saga, Order(k)) for k in ("a", "b")]
        views = [await app.sagas.wait(i, 20, history=True) for i in (a, b)]
        assert [v.state for v in views] == ["compensated", "compensated"]
        seen = [(what, key) for what, key, _ in runs]
        first = seen[0][1]
        assert seen[:2] == [("begin", first), ("end", first)]  # one at a time
        for v in views:
            key, timed_out = v.data.key, next(e.at for e in v.history if e.entry == "timeout")
            ended = next(at for what, k, at in runs if (what, k) == ("end", key))
            assert timed_out < ended  # the coordinator was not held up
            assert seen.index(("release", key)) > seen.index(("end", key))

        runs.clear()
        other = sqlite3.connect(tmp_path / "stock.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = await app.sagas.start(patient, Order("quick"))
        await asyncio.sleep(0.5)
        assert runs == []
        other.execute("COMMIT")
        other.close()
        view = await app.sagas.wait(started, 20)
        assert view.state == "completed" and [r[0] for r in runs] == ["begin", "end"]


# -- brokers.md ---------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


async def test_q08_a_rabbitmq_vhost_must_be_created_and_granted_first(
    rabbitmq_url: str, tmp_path: Path
) -> None:
    vhost = f"howto-{uuid.uuid4().hex[:8]}"
    url = f"{rabbitmq_url.rstrip('/')}/{vhost}"

    async def one_saga() -> sk.SagaView:
        app = sk.App(f"sqlite:///{tmp_path}/{uuid.uuid4().hex}.db", url, settings=settings())
        log: list[str] = []
        stock_bench(app, log)
        saga = app.saga(reserve_then("q8").build())
        async with app:
            return await run(app, saga, Order("a"))

    fix = f"rabbitmqctl add_vhost {vhost} && rabbitmqctl set_permissions -p {vhost} guest"
    with pytest.raises(TransportError, match=f"refused the virtual host '{vhost}'") as missing:
        await one_saga()
    assert fix in str(missing.value)
    rabbitmqctl("add_vhost", vhost)
    try:
        with pytest.raises(TransportError, match="no permissions on it"):
            await one_saga()
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        assert (await one_saga()).state == "completed"
    finally:
        rabbitmqctl("delete_vhost", vhost)


# -- querying-sagas.md --------------------------------------------------------------------


@sk.command("howto.Ship")
class Ship(msgspec.Struct):
    key: str


async def test_q09_the_format_of_saga_view_error(tmp_path: Path) -> None:
    nobody_runs = ["coordinator", "stock", "payments", "shipping"]  # not the mailer
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings(), run=nobody_runs)
    app.participant("mailer")
    stock_bench(app, [])
    payments_bench(app, limit=10)
    shipping = app.participant("shipping")

    @shipping.command(Ship)
    async def ship(cmd: Ship, ctx: sk.Context) -> None:
        if cmd.key == "crash":
            raise RuntimeError("the carrier's API is down")
        raise Declined("no carrier today")

    def broken(o: Order, r: Charged) -> Order:
        raise ValueError(f"cannot read {r.receipt}")

    pay = reserve_then("q9").step("charge").invoke("payments", charge).on_reply(Charged, broken)
    plain = reserve_then("q9-plain").step("charge").invoke("payments", charge).pivot()
    shipped = plain.step("ship").invoke("shipping", lambda o: Ship(o.key)).retry(FAST)
    crash = reserve_then("q9-crash").step("ship").invoke("shipping", lambda o: Ship(o.key))
    a, b, c = app.saga(pay.build()), app.saga(shipped.build()), app.saga(crash.build())
    waiting = [
        app.saga(
            reserve_then(name, deadline=deadline)
            .step("notify")
            .invoke("mailer", lambda o: Notify(o.key))
            .nothing_to_undo()
            .build()
        )
        for name, deadline in (("q9-forced", None), ("q9-late", 0.3))
    ]
    async with app:
        assert (await run(app, a, Order("x", amount=99))).error == (
            "step 'charge' failed: howto.Declined: 99 is over the limit"
        )
        assert (await run(app, a, Order("x"))).error == (
            "step 'charge' succeeded but its reply could not be applied: "
            "ValueError: cannot read r-x"
        )
        assert (await run(app, b, Order("x"))).error == (
            "step 'ship' (forward) gave up after 3 attempts: howto.Declined: no carrier today"
        )
        assert (await run(app, c, Order("crash"))).error == (
            "step 'ship' failed: RuntimeError: the carrier's API is down"
        )
        assert (await run(app, waiting[1], Order("x"))).error == "deadline passed"
        forced = await app.sagas.start(waiting[0], Order("x"))
        await eventually(lambda: pending(app, forced, "notify"))
        await app.sagas.compensate(forced, actor=sk.Actor("ops"), reason="customer left")
        assert (await app.sagas.wait(forced)).error == "forced by operator"
        stuck = await run(app, b, Order("y"))
        await app.sagas.abort(stuck.id, actor=sk.Actor("ops"), reason="by hand")
        assert (await app.sagas.wait(stuck.id)).error == "aborted by operator"


async def pending(app: sk.App, saga_id: str, step: str) -> bool:
    return step in (await app.sagas.get(saga_id, history=False)).pending


async def test_q10_app_sagas_paging_and_wait(tmp_path: Path) -> None:
    app = sk.App(f"sqlite:///{tmp_path}/a.db", settings=settings())
    documented = pydoc.render_doc(sk.App, renderer=pydoc.plaintext)
    public = [n for n in vars(app) if not n.startswith("_")]
    assert "sagas" in public
    assert [n for n in public if not re.search(rf"\b{n}: ", documented)] == []
    stock_bench(app, [])
    saga = app.saga(reserve_then("q10").build())
    async with app:
        ids = [await app.sagas.start(saga, Order(str(i)), saga_id=f"s{i}") for i in range(5)]
        pages, after = [], None
        while page := await app.sagas.list(type="q10", limit=2, after=after):
            pages.append([v.id for v in page])
            after = page[-1].id
        assert sorted(i for p in pages for i in p) == sorted(ids)
        assert [len(p) for p in pages] == [2, 2, 1]
        # woken by the commit that ends the saga: a ten-minute poll never comes into it
        view = await app.sagas.wait(await app.sagas.start(saga, Order("w")), timeout=20, poll=600)
        assert view.state == "completed"


# -- install.md ---------------------------------------------------------------------------


def test_q11_sagakit_demo_without_the_demo_extra_says_what_to_install() -> None:
    """As after a plain ``pip install sagakit``: rich (from the extra) cannot be imported."""
    code = "import sys; sys.modules['rich'] = None; from sagakit.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "demo"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "sagakit: error: 'rich' is not installed: pip install 'sagakit[demo]'"
    ]


# -- configure.md -------------------------------------------------------------------------


def shown(default: Any) -> str:
    """A default as the page writes it: an options object as ``Type()``."""
    if dataclasses.is_dataclass(default) and default == type(default)():
        return f"{type(default).__name__}()"
    return repr(default)


def test_q12_every_settings_field_is_on_the_configure_page_with_its_default() -> None:
    page = (ROOT / "docs" / "how-to" / "configure.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", page, re.M))
    for f in dataclasses.fields(sk.Settings):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        assert rows.get(f.name) == shown(default), f.name
    assert set(rows) == {f.name for f in dataclasses.fields(sk.Settings)}


async def test_q10_wait_is_woken_by_another_apps_commit_on_postgresql(
    postgres_url: str, prefix: str
) -> None:
    """The App that waits runs nothing; another one (its own pool and LISTEN
    connection, as another process would have) ends the saga. The waiter's
    ten-minute poll never comes into it: the commit's NOTIFY wakes it."""
    url = f"{postgres_url}?max_size=2"
    waiter = sk.App(url, settings=settings(prefix=prefix), run=[])
    worker = sk.App(url, settings=settings(prefix=prefix))
    for app in (waiter, worker):
        stock_bench(app, [])
    sagas = [app.saga(reserve_then("q10-pg").build()) for app in (waiter, worker)]
    try:
        async with worker, waiter:
            saga_id = await waiter.sagas.start(sagas[0], Order("a"))
            view = await waiter.sagas.wait(saga_id, timeout=20, poll=600)
            assert view.state == "completed"
    finally:
        await dropped(worker.store)
