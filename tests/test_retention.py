"""Retention: exactly what is past its horizon goes, in bounded batches, and
dedupe keeps what it needs; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import sagakit as sk
from sagakit.clock import FakeClock
from sagakit.errors import ConfigurationError
from sagakit.inbox import SUCCESS
from sagakit.ops.retention import DAY, Pruned, Pruner, Retention
from sagakit.store import InboxRow, LogEntry, SagaRecord, Store, open_store
from sagakit.testing import drop_tables
from tests.helpers import Data, DidIt, Do, Refused, eventually
from tests.saga_harness import Plan, bench, linear

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0
OLD = T0 - 100 * DAY  # long past every horizon
RECENT = T0 - 1 * DAY  # inside every horizon
HORIZONS = Retention(sagas=30 * DAY, inbox=7 * DAY, dead_letters=30 * DAY, batch=2)


def _url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _url(request, request.param, tmp_path)


@pytest.fixture
async def store(url: str, prefix: str) -> AsyncIterator[Store]:
    st = open_store(url, prefix=prefix, clock=FakeClock(OLD))
    await st.open()
    try:
        yield st
    finally:
        await drop_tables(st)
        await st.close()


async def saga(
    store: Store, saga_id: str, state: str, at: float, lines: int = 3, ended: float | None = None
) -> None:
    rec = SagaRecord(saga_id, "t", 1, state, b"{}", b"{}", 0, at, at if ended is None else ended)
    async with store.transaction() as tx:
        await store.saga_insert(tx, rec)
        await store.log(tx, [LogEntry(saga_id, at, f"line{i}") for i in range(lines)])


async def inbox(store: Store, key: str, saga_id: str | None = None) -> None:
    async with store.transaction() as tx:
        await store.inbox_admit(tx, "svc", key, 1, saga_id)
        await store.inbox_record(tx, "svc", key, InboxRow(SUCCESS, b"r", None, 1))


async def dead(store: Store, message_id: str) -> None:
    async with store.transaction() as tx:
        await store.dead_letter(tx, "q", b"x", "why", "E", message_id=message_id)


async def rows(store: Store, sql: str) -> list[Any]:
    async with store.transaction() as tx:
        return [tuple(r) for r in await tx.fetchall(sql.format(p=store.prefix))]


async def remaining(store: Store) -> dict[str, list[Any]]:
    return {
        "sagas": sorted(r[0] for r in await rows(store, "SELECT id FROM {p}sagas")),
        "saga_log": sorted(set(await rows(store, "SELECT saga_id FROM {p}saga_log"))),
        "inbox": sorted(r[0] for r in await rows(store, "SELECT key FROM {p}inbox")),
        "dead_letters": sorted(r[0] for r in await rows(store, "SELECT id FROM {p}dead_letters")),
    }


async def seed(store: Store) -> None:
    """Rows on both sides of every horizon; the clock ends at T0."""
    clock = store.clock
    assert isinstance(clock, FakeClock)
    for state in ("completed", "compensated", "aborted"):
        await saga(store, f"old-{state}", state, OLD)
    for state in ("failed", "running", "compensating"):
        await saga(store, f"old-{state}", state, OLD)  # unfinished: never pruned
    await saga(store, "new-completed", "completed", RECENT)
    # started long ago, ended recently: its end, not its start, dates it
    await saga(store, "long-completed", "completed", OLD, ended=RECENT)
    for sid in ("old-completed", "old-failed", "old-running", "new-completed"):
        await inbox(store, f"saga:{sid}:a:forward", sid)
    await inbox(store, "saga:elsewhere:a:forward", "elsewhere")  # its saga is in another store
    await inbox(store, "old-message")
    await dead(store, "old-dead")
    clock.advance(RECENT - OLD)
    await inbox(store, "new-message")
    await dead(store, "new-dead")
    clock.advance(T0 - RECENT)


async def test_prunes_exactly_what_is_past_its_horizon(store: Store) -> None:
    await seed(store)
    pruned = await Pruner(store, HORIZONS).prune()
    assert pruned == Pruned(sagas=3, saga_log=9, inbox=3, dead_letters=1)
    assert await remaining(store) == {
        "sagas": [
            "long-completed",
            "new-completed",
            "old-compensating",
            "old-failed",
            "old-running",
        ],
        "saga_log": [
            ("long-completed",),
            ("new-completed",),
            ("old-compensating",),
            ("old-failed",),
            ("old-running",),
        ],
        # kept: the rows of unfinished, failed and recently finished sagas, and a new one
        "inbox": [
            "new-message",
            "saga:new-completed:a:forward",
            "saga:old-failed:a:forward",
            "saga:old-running:a:forward",
        ],
        "dead_letters": ["new-dead"],
    }
    assert await Pruner(store, HORIZONS).prune() == Pruned()  # nothing left to do


async def test_dry_run_counts_the_same_and_deletes_nothing(store: Store) -> None:
    await seed(store)
    before = await remaining(store)
    counted = await Pruner(store, HORIZONS).prune(dry_run=True)
    assert await remaining(store) == before
    assert counted == await Pruner(store, HORIZONS).prune()


async def test_a_horizon_of_none_keeps_that_table(store: Store) -> None:
    await seed(store)
    pruned = await Pruner(store, Retention(dead_letters=30 * DAY)).prune()
    assert pruned == Pruned(dead_letters=1)
    assert len((await remaining(store))["sagas"]) == 8


async def test_each_batch_is_bounded(store: Store) -> None:
    await seed(store)
    pruner = Pruner(store, HORIZONS)  # batch=2
    cutoff = T0 - 7 * DAY
    assert await pruner.inbox_batch(cutoff) == Pruned(inbox=2)
    assert await pruner.inbox_batch(cutoff) == Pruned(inbox=1)
    assert await pruner.inbox_batch(cutoff) == Pruned(inbox=0)


async def test_oldest_go_first(store: Store) -> None:
    clock = store.clock
    assert isinstance(clock, FakeClock)
    for i in range(5):
        await saga(store, f"s{i}", "completed", OLD + i, lines=1)
    clock.advance(T0 - OLD)
    await Pruner(store, HORIZONS).sagas_batch("completed", T0 - 30 * DAY)
    assert (await remaining(store))["sagas"] == ["s2", "s3", "s4"]


async def test_two_pruners_at_once_delete_each_row_once(url: str, prefix: str) -> None:
    stores = [open_store(url, prefix=prefix, clock=FakeClock(OLD)) for _ in range(2)]
    for st in stores:
        await st.open()
    try:
        first = stores[0]
        for i in range(40):
            await saga(first, f"s{i}", "completed", OLD)
            await inbox(first, f"m{i}")
            await dead(first, f"d{i}")
        for st in stores:
            st.clock.advance(T0 - OLD)  # type: ignore[attr-defined]
        retention = Retention(sagas=30 * DAY, inbox=7 * DAY, dead_letters=30 * DAY, batch=3)
        results = await asyncio.gather(*(Pruner(st, retention).prune() for st in stores))
        total = Pruned()
        for r in results:
            total.add(r)
        assert total == Pruned(sagas=40, saga_log=120, inbox=40, dead_letters=40)
        assert await remaining(first) == {
            "sagas": [],
            "saga_log": [],
            "inbox": [],
            "dead_letters": [],
        }
    finally:
        await drop_tables(stores[0])
        for st in stores:
            await st.close()


# -- the horizon rule -----------------------------------------------------------------


def test_an_inbox_horizon_shorter_than_redelivery_is_refused() -> None:
    window = sk.Settings().redelivery_window
    assert window == 25 * (60 + 30 * 1.2) + 300  # deliveries x (timeout + retry) + grace
    with pytest.raises(ConfigurationError, match="redelivered"):
        sk.Settings(retention=Retention(inbox=window - 1))
    with pytest.raises(ConfigurationError, match="redelivered"):
        sk.Settings(retention=Retention(sagas=60.0))
    sk.Settings(retention=Retention(inbox=window, sagas=window))
    sk.Settings(retention=Retention.recommended())


def test_the_rule_follows_the_settings() -> None:
    quick = sk.RetryPolicy(max_delay=1.0, jitter=0.0)
    s = sk.Settings(lease=2.0, handler_timeout=1.0, max_deliveries=3, retry=quick, version_grace=4)
    assert s.redelivery_window == 3 * (2 + 1) + 4
    sk.Settings(
        lease=2.0,
        handler_timeout=1.0,
        max_deliveries=3,
        retry=quick,
        version_grace=4,
        retention=Retention(sagas=13, inbox=13),
    )


def test_sagas_may_not_go_before_their_inbox_rows() -> None:
    with pytest.raises(ConfigurationError, match="must not be shorter"):
        Retention(sagas=7 * DAY, inbox=8 * DAY).check(0.0)
    with pytest.raises(ConfigurationError):
        Retention(batch=0)
    with pytest.raises(ConfigurationError):
        Retention(inbox=-1)


# -- dedupe after pruning, end to end ---------------------------------------------------

HOLD = sk.RetryPolicy(max_attempts=None, initial=3600.0, max_delay=3600.0)


async def test_a_redelivered_command_is_still_deduplicated(url: str, prefix: str) -> None:
    """The inbox rows of an unfinished saga outlive the horizon, so a late copy is a duplicate.

    ``k``'s step ``b`` refuses and waits an hour for its retry, so the saga is
    still running when a pruner ten days ahead runs; ``done`` finished.
    """
    ran: list[tuple[str, str]] = []
    sent: dict[str, sk.Envelope] = {}
    app = sk.App(url, settings=sk.Settings(prefix=prefix, max_poll=0.02))
    _participants(app, ran, sent)
    app.saga(linear("two", ["a", "b"], retriable={"b": HOLD}))
    later = open_store(url, prefix=prefix, clock=FakeClock(time.time() + 10 * DAY))
    await later.open()
    try:
        async with app:
            await _run_both(app)
            pruned = await Pruner(later, Retention(sagas=30 * DAY, inbox=7 * DAY)).prune()
            assert pruned.inbox > 0 and pruned.sagas == 0  # done's rows went, k's stayed
            await _redeliver(app, sent["k"])
            await eventually(lambda: _ignored_replies(app, "k"))
            assert ran.count(("k", "a")) == 1  # the copy did not run again
    finally:
        await drop_tables(later)
        await later.close()


def _participants(app: sk.App, ran: list[tuple[str, str]], sent: dict[str, sk.Envelope]) -> None:
    """``a`` and ``b`` take ``Do``; ``b`` refuses saga ``k``; runs are counted at commit."""
    for name in ("a", "b"):

        async def do(cmd: Do, ctx: sk.Context, name: str = name) -> DidIt:
            if name == "b" and cmd.key == "k":
                raise Refused("not now")
            sent.setdefault(cmd.key, ctx.envelope)
            ctx.db.on_commit(lambda: ran.append((cmd.key, name)))
            return DidIt(1)

        app.participant(name).command(Do)(do)


async def _run_both(app: sk.App) -> None:
    defn = app.sagas.definitions[("two", 1)]
    await app.sagas.wait(await app.sagas.start(defn, Data("done"), saga_id="done"))
    await app.sagas.start(defn, Data("k"), saga_id="k")

    async def waiting() -> bool:
        view = await app.sagas.get("k")
        return any(e.entry == "retry-scheduled" for e in view.history)

    await eventually(waiting)


async def _redeliver(app: sk.App, env: sk.Envelope) -> None:
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "a", env.id, app.codec.encode(env), kind="command")


async def _ignored_replies(app: sk.App, saga_id: str) -> bool:
    view = await app.sagas.get(saga_id)
    return any(e.entry == "reply-ignored" for e in view.history)


async def test_the_app_prunes_in_the_background(tmp_path: Path) -> None:
    quick = sk.RetryPolicy(max_attempts=2, initial=0.01, max_delay=0.01, jitter=0.0)
    retention = Retention(sagas=1.0, inbox=1.0, dead_letters=1.0, every=0.05)
    settings = sk.Settings(
        lease=0.1,
        handler_timeout=0.1,
        max_deliveries=2,
        retry=quick,
        version_grace=0.1,
        max_poll=0.02,
        retention=retention,
    )
    app = sk.App(f"sqlite:///{tmp_path}/bg.db", settings=settings)
    bench(app, ["a"], Plan())
    defn = app.saga(linear("one", ["a"]))
    async with app:
        await app.sagas.wait(await app.sagas.start(defn, Data("x"), saga_id="x"))

        async def gone() -> bool:
            return not await app.sagas.list() and not await rows(app.store, _INBOX)

        await eventually(gone, timeout=10)


_INBOX = "SELECT key FROM {p}inbox"


# --- the other kinds of instance (sagakit.ops.families) ---------------------

FLOW = (
    "INSERT INTO {p}chor_flows (flow, correlation_id, status, state, updated_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
TIMELINE = (
    "INSERT INTO {p}chor_timeline (flow, correlation_id, at, kind) VALUES (?, ?, ?, 'applied')"
)
PROCESS = (
    "INSERT INTO {p}processes (process, key, version, state, meta, done, rev, created_at, "
    "updated_at) VALUES (?, ?, 1, ?, ?, ?, 1, ?, ?)"
)
PROCESS_LOG = (
    "INSERT INTO {p}process_log (process, key, at, message_type, verdict) "
    "VALUES (?, ?, ?, 't', 'applied')"
)
AWAIT = (
    "INSERT INTO {p}awaits (event_type, key, waiting, arrived, updated_at) VALUES (?, ?, ?, ?, ?)"
)
RESERVATION = (
    "INSERT INTO {p}reservations (space, holder, step, resource, amount, state, expires_at, "
    "created_at, updated_at) VALUES ('s', ?, 'st', 'r', 1, ?, ?, ?, ?)"
)
TWOPHASE_KEY = "INSERT INTO {p}twophase_keys (key, group_id, decided_at) VALUES (?, 'g', ?)"
FAILURE = "INSERT INTO {p}failures (consumer, message_id, failures, at) VALUES ('c', ?, 1, ?)"
AUDIT = (
    "INSERT INTO {p}audit (at, actor, role, via, action, target, reason, outcome) "
    "VALUES (?, 'ann', 'operator', 'cli', 'retry', ?, 'why', 'done')"
)
DL_ACTION = (
    "INSERT INTO {p}dead_letter_actions (at, action, dead_letter, queue, actor, role, via, "
    "reason) VALUES (?, 'replay', 1, ?, 'ann', 'operator', 'cli', 'why')"
)
TP_AUDIT = (
    "INSERT INTO {p}twophase_audit (at, node, group_id, action, outcome, actor, via, reason) "
    "VALUES (?, 'n', ?, 'commit', 'done', 'ann', 'cli', 'why')"
)


async def put(store: Store, sql: str, *args: Any) -> None:
    async with store.transaction() as tx:
        await tx.execute(sql.format(p=store.prefix), *args)


async def seed_families(store: Store) -> None:
    """Per table: an ended old row (goes), an ended recent one and an unended old one (stay)."""
    clock = store.clock
    assert isinstance(clock, FakeClock)
    clock.advance(T0 - clock.now())
    for key, status, at in [
        ("a", "completed", OLD),
        ("b", "orphaned", OLD),
        ("c", "completed", RECENT),
        ("d", "running", OLD),
        ("e", "failed", OLD),
    ]:
        await put(store, FLOW, "f", key, status, b"{}", at)
        for _ in range(2):
            await put(store, TIMELINE, "f", key, at)
    for key, done, at in [("a", 1, OLD), ("c", 1, RECENT), ("d", 0, OLD)]:
        await put(store, PROCESS, "pm", key, b"{}", b"{}", done, at, at)
        await put(store, PROCESS_LOG, "pm", key, at)
    await put(store, AWAIT, "E", "answered", None, b"e", OLD)
    await put(store, AWAIT, "E", "still-waiting", b"cmd", None, OLD)  # a saga waits: kept
    await put(store, AWAIT, "E", "recent", None, b"e", RECENT)
    for holder, state, at in [
        ("a", "released", OLD),
        ("b", "expired", OLD),
        ("c", "released", RECENT),
        ("d", "reserved", OLD),
    ]:
        await put(store, RESERVATION, holder, state, at, at, at)
    for key, at in [("old", OLD), ("recent", T0 - 1.0)]:  # the inbox horizon is 7 days
        await put(store, TWOPHASE_KEY, key, at)
        await put(store, FAILURE, key, at)
    for target, at in [("old", OLD), ("recent", RECENT)]:
        for sql in (AUDIT, DL_ACTION, TP_AUDIT):
            await put(store, sql, at, target)


FAMILY_HORIZONS = Retention(
    sagas=30 * DAY, inbox=7 * DAY, dead_letters=30 * DAY, audit=30 * DAY, batch=2
)
FAMILIES_PRUNED = Pruned(
    flows=2,
    flow_timeline=4,
    processes=1,
    process_log=1,
    awaits=1,
    reservations=2,
    twophase_keys=1,
    failures=1,
    audit=1,
    dead_letter_actions=1,
    twophase_audit=1,
)


async def family_rows(store: Store) -> dict[str, list[Any]]:
    q = {
        "flows": "SELECT correlation_id FROM {p}chor_flows",
        "timeline": "SELECT DISTINCT correlation_id FROM {p}chor_timeline",
        "processes": "SELECT key FROM {p}processes",
        "process_log": "SELECT key FROM {p}process_log",
        "awaits": "SELECT key FROM {p}awaits",
        "reservations": "SELECT holder FROM {p}reservations",
        "twophase_keys": "SELECT key FROM {p}twophase_keys",
        "failures": "SELECT message_id FROM {p}failures",
        "audit": "SELECT target FROM {p}audit",
        "dead_letter_actions": "SELECT queue FROM {p}dead_letter_actions",
        "twophase_audit": "SELECT group_id FROM {p}twophase_audit",
    }
    return {name: sorted(r[0] for r in await rows(store, sql)) for name, sql in q.items()}


async def test_ended_flows_processes_locks_keys_and_audit_are_pruned(store: Store) -> None:
    await seed_families(store)
    assert await Pruner(store, FAMILY_HORIZONS).prune(dry_run=True) == FAMILIES_PRUNED
    assert await Pruner(store, FAMILY_HORIZONS).prune() == FAMILIES_PRUNED
    assert await family_rows(store) == {
        "flows": ["c", "d", "e"],
        "timeline": ["c", "d", "e"],
        "processes": ["c", "d"],
        "process_log": ["c", "d"],
        "awaits": ["recent", "still-waiting"],
        "reservations": ["c", "d"],
        "twophase_keys": ["recent"],
        "failures": ["recent"],
        "audit": ["recent"],
        "dead_letter_actions": ["recent"],
        "twophase_audit": ["recent"],
    }
    assert await Pruner(store, FAMILY_HORIZONS).prune() == Pruned()


async def test_audit_is_kept_unless_its_horizon_is_set(store: Store) -> None:
    await seed_families(store)
    pruned = await Pruner(store, HORIZONS).prune()
    assert (pruned.audit, pruned.dead_letter_actions, pruned.twophase_audit) == (0, 0, 0)
    assert Retention.recommended().audit is None
    assert len((await family_rows(store))["audit"]) == 2


#: the columns of the saga row an index may hold: none that a hop changes while
#: the state stays put, so that hop's update is HOT on PostgreSQL (no new index
#: entries); ``updated_at`` above all, which every hop changes
STABLE_COLUMNS = {"id", "type", "state", "created_at"}


async def test_no_index_of_the_saga_table_holds_a_column_a_hop_changes(store: Store) -> None:
    p = store.prefix
    if store.dialect == "postgresql":
        indexed = await rows(
            store,
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = '{p}sagas'::regclass",
        )
    else:
        names = [r[1] for r in await rows(store, "PRAGMA index_list({p}sagas)")]
        indexed = [
            r
            for n in names
            for r in await rows(store, f"SELECT name FROM pragma_index_info('{n}')")
        ]
    columns = {r[0] for r in indexed}
    assert "state" in columns and "created_at" in columns  # retention's walk
    assert columns <= STABLE_COLUMNS, f"{p}sagas indexes {columns - STABLE_COLUMNS}"
