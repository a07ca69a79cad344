"""Dead letters for operators, on real SQLite and PostgreSQL: list, replay, purge,
and the relay's rule for a message the broker will never take."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

import sagakit as sk
from sagakit.errors import (
    DeadLetterNotFound,
    InvalidOperatorAction,
    NotReplayable,
    TransportError,
)
from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.ops.dead_letters import DeadLetterFilter, DeadLetters
from sagakit.outbox import OUTBOX_QUEUE, OutboxTable, Relay
from sagakit.policies import RetryPolicy
from sagakit.store import DeadLetter, Store, open_store
from sagakit.testing import drop_tables
from sagakit.transport import Outgoing
from sagakit.transport.memory import MemoryTransport
from tests.helpers import DidIt, Do, Happened, eventually

pytestmark = pytest.mark.timeout(60)

REPLIES = "test.replies"
ALICE = sk.Actor("alice")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/dl.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def prefix_for(store_url: str, prefix: str) -> str:
    return prefix if store_url.startswith("postgresql") else "sagakit_"


class Bank:
    """A participant whose event handler and command handler can be broken."""

    def __init__(self, app: sk.App) -> None:
        self.app = app
        self.broken = True
        self.seen: list[str] = []
        self.runs: list[str] = []
        audit, bank = app.participant("audit"), app.participant("bank")
        audit.event(Happened)(self.on_happened)
        bank.command(Do)(self.on_do)

    async def on_happened(self, evt: Happened, ctx: sk.Context) -> None:
        if self.broken:
            raise RuntimeError("audit log unavailable")
        self.seen.append(evt.key)

    async def on_do(self, cmd: Do, ctx: sk.Context) -> DidIt:
        self.runs.append(cmd.key)
        raise RuntimeError("ledger unavailable")


@pytest.fixture
async def bank(store_url: str, prefix_for: str) -> AsyncIterator[Bank]:
    settings = sk.Settings(
        retry=RetryPolicy(max_attempts=2, initial=0.01), max_poll=0.02, prefix=prefix_for
    )
    app = sk.App(store_url, settings=settings)
    b = Bank(app)
    async with app:
        await app.transport.declare(REPLIES, [])
        yield b
    if store_url.startswith("postgresql"):  # the shared database keeps nothing of ours
        async with open_store(store_url, prefix=prefix_for) as store:
            await drop_tables(store)


async def happened(app: sk.App, key: str) -> None:
    env = app.codec.make(Happened(key), Headers())
    await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])


async def dead(app: sk.App, n: int, **filters: str) -> list[DeadLetter]:
    letters: list[DeadLetter] = []

    async def enough() -> bool:
        letters[:] = await app.dead_letters.list(**filters)
        return len(letters) >= n

    await eventually(enough)
    return letters


async def put_raw(app: sk.App, queue: str, data: bytes) -> None:
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, queue, "raw", data)


async def test_a_poison_event_fixed_and_replayed_is_processed_once(bank: Bank) -> None:
    app = bank.app
    await happened(app, "k1")
    [letter] = await dead(app, 1, queue="audit")
    assert letter.error_type == "RuntimeError" and letter.kind == "event"
    assert not letter.truncated and letter.size == len(letter.data)
    bank.broken = False  # the fix is deployed
    out = await app.dead_letters.replay(letter.seq, actor=ALICE, reason="audit log is back")
    assert [d.seq for d in out.done] == [letter.seq] and not out.refused
    await eventually(lambda: _true(bank.seen == ["k1"]))
    await asyncio.sleep(0.2)
    assert bank.seen == ["k1"], "processed once"
    assert await app.dead_letters.list() == []
    [action] = await app.dead_letters.actions()
    assert (action.action, action.dead_letter, action.actor) == ("replay", letter.seq, "alice")
    assert action.reason == "audit log is back" and action.via == "python"


async def test_a_replayed_command_with_an_outcome_is_answered_from_the_inbox(bank: Bank) -> None:
    app = bank.app
    env = app.codec.make(Do("c1"), Headers(reply_to=REPLIES))
    await put_raw_env(app, env)
    [letter] = await dead(app, 1, queue="bank")
    await eventually(lambda: _replies(app, 1))
    assert bank.runs == ["c1", "c1"]  # two attempts, then the failure reply
    await app.dead_letters.replay(letter.seq, actor=ALICE, reason="ledger fixed")
    await eventually(lambda: _replies(app, 2))
    [first, again] = await replies(app)
    assert first.failed and again.failed
    assert app.codec.payload(again, sk.Failure) == app.codec.payload(first, sk.Failure)
    assert bank.runs == ["c1", "c1"], "the handler did not run again"
    assert await app.dead_letters.list() == []


async def test_dry_runs_change_nothing(bank: Bank) -> None:
    app = bank.app
    await happened(app, "k2")
    [letter] = await dead(app, 1)
    bank.broken = False
    replay = await app.dead_letters.replay(
        DeadLetterFilter(queue="audit"), actor=ALICE, reason="try", dry_run=True
    )
    purge = await app.dead_letters.purge(letter.seq, actor=ALICE, reason="try", dry_run=True)
    assert [d.seq for d in replay.done] == [letter.seq] == [d.seq for d in purge.done]
    await asyncio.sleep(0.2)
    assert await app.dead_letters.list() == [letter] and bank.seen == []
    assert await app.dead_letters.actions() == []
    viewer = sk.Actor("vera", role="viewer")  # may look (a dry run), not act
    await app.dead_letters.replay(letter.seq, actor=viewer, reason="look", dry_run=True)
    with pytest.raises(InvalidOperatorAction):
        await app.dead_letters.replay(letter.seq, actor=viewer, reason="act")
    with pytest.raises(InvalidOperatorAction):
        await app.dead_letters.purge(letter.seq, actor=ALICE, reason="  ")


async def test_purge_by_filter_takes_only_what_matches(bank: Bank) -> None:
    app = bank.app
    await put_raw(app, "bank", b"{not json")
    await put_raw(app, "audit", b"{not json either")
    await happened(app, "k3")
    await dead(app, 3)
    f = DeadLetterFilter(queue="bank", error_type="MalformedMessage")
    out = await app.dead_letters.purge(f, actor=ALICE, reason="garbage from a test client")
    [gone] = out.done
    assert gone.queue == "bank"
    left = await app.dead_letters.list()
    assert sorted((d.queue, d.error_type) for d in left) == [
        ("audit", "MalformedMessage"),
        ("audit", "RuntimeError"),
    ]
    assert await app.dead_letters.list(error_type="RuntimeError", older_than=3600) == []
    with pytest.raises(DeadLetterNotFound):
        await app.dead_letters.get(gone.seq)
    [action] = await app.dead_letters.actions()
    assert action.action == "purge" and action.queue == "bank"


async def test_truncated_or_undecodable_letters_are_refused_with_the_reason(bank: Bank) -> None:
    app = bank.app
    await put_raw(app, "bank", b"x" * (300 * 1024))
    await put_raw(app, "bank", b"{not json")
    letters = await dead(app, 2)  # the two are handled concurrently: either may go first
    [big] = [d for d in letters if d.size == 300 * 1024]
    [garbage] = [d for d in letters if d is not big]
    assert big.truncated and big.size == 300 * 1024
    with pytest.raises(NotReplayable, match="cannot be replayed"):
        await app.dead_letters.replay(big.seq, actor=ALICE, reason="why not")
    out = await app.dead_letters.replay(DeadLetterFilter(), actor=ALICE, reason="all")
    refused = {d.seq: why for d, why in out.refused}
    assert out.done == [] and sorted(refused) == sorted([big.seq, garbage.seq])
    assert "not a sagakit envelope" in refused[garbage.seq]
    assert len(await app.dead_letters.list()) == 2


async def test_replay_by_filter_replays_each_match(bank: Bank) -> None:
    app = bank.app
    for key in ("a", "b"):
        await happened(app, key)
    await dead(app, 2, queue="audit")
    bank.broken = False
    out = await app.dead_letters.replay(
        DeadLetterFilter(queue="audit", error_type="RuntimeError"), actor=ALICE, reason="fixed"
    )
    assert len(out.done) == 2
    await eventually(lambda: _true(sorted(bank.seen) == ["a", "b"]))
    assert len(await app.dead_letters.actions()) == 2


# -- the relay ------------------------------------------------------------------


class Flaky:
    """A transport that rejects one message for good, or everything for a while."""

    url = "flaky://"

    def __init__(self, poison: str | None = None) -> None:
        self.poison = poison
        self.down = False
        self.sent: list[str] = []
        self.tries: dict[str, int] = {}

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        for m in messages:
            self.tries[m.id] = self.tries.get(m.id, 0) + 1
        if self.down:
            raise TransportError("connection lost")
        if any(m.id == self.poison for m in messages):
            raise TransportError("message rejected by the broker", retryable=False)
        self.sent += [m.id for m in messages]


@pytest.fixture
async def store(store_url: str, prefix_for: str) -> AsyncIterator[Store]:
    s = open_store(store_url, prefix=prefix_for)
    await s.open()
    try:
        yield s
    finally:
        if store_url.startswith("postgresql"):
            await drop_tables(s)
        await s.close()


async def outbox(store: Store, ids: list[str]) -> None:
    async with store.transaction() as tx:
        codec = Codec(TypeRegistry())
        envs = [codec.make(Do(i), Headers(saga_id=f"s-{i}"), id=i) for i in ids]
        out = [Outgoing(e.id, "command", "stock", codec.encode(e)) for e in envs]
        await OutboxTable(store).write(tx, out)


async def drain(relay: Relay, rounds: int) -> None:
    for _ in range(rounds):
        with contextlib.suppress(TransportError):  # an outage round: the rows wait
            await relay.relay_once()


async def test_relay_dead_letters_a_poison_row_alone_after_n_tries(store: Store) -> None:
    ids = ["m1", "m2", "poison", "m3"]
    await outbox(store, ids)
    t = Flaky(poison="poison")
    relay = Relay(store, t, max_failures=3, backoff=0.0)  # type: ignore[arg-type]
    await drain(relay, 6)
    assert sorted(t.sent) == ["m1", "m2", "m3"], "batch-mates delivered, each once"
    assert t.tries["poison"] == 1 + 3  # the failed batch, then three times alone
    assert await store.queue.depth(OUTBOX_QUEUE) == 0
    [letter] = await store.dead_letters()
    assert (letter.queue, letter.id, letter.destination, letter.kind) == (
        OUTBOX_QUEUE,
        "poison",
        "stock",
        "command",
    )
    assert "rejected by the broker" in letter.reason and "3 times" in letter.reason
    assert letter.error_type == "TransportError" and letter.saga_id == "s-poison"


async def test_a_replayed_outbox_letter_goes_back_to_the_relay(store: Store) -> None:
    await outbox(store, ["poison"])
    t = Flaky(poison="poison")
    relay = Relay(store, t, max_failures=2, backoff=0.0)  # type: ignore[arg-type]
    await drain(relay, 3)
    [letter] = await store.dead_letters()
    t.poison = None  # the broker takes it now
    dl = DeadLetters(store, t)  # type: ignore[arg-type]
    await dl.replay(letter.seq, actor=ALICE, reason="broker limit raised")
    await drain(relay, 1)
    assert t.sent == ["poison"] and await store.dead_letters() == []


async def test_an_outage_never_dead_letters(store: Store) -> None:
    await outbox(store, ["m1", "m2"])
    t = Flaky()
    t.down = True
    relay = Relay(store, t, max_failures=2, backoff=0.0)  # type: ignore[arg-type]
    for _ in range(10):
        with pytest.raises(TransportError):
            await relay.relay_once()
    assert await store.dead_letters() == [] and t.sent == []
    t.down = False
    await drain(relay, 1)
    assert sorted(t.sent) == ["m1", "m2"]


async def test_every_row_failing_is_an_outage_not_poison(store: Store) -> None:
    """Errors the broker calls final, but for every row: the broker, not the messages."""
    await outbox(store, ["m1", "m2"])
    t = Flaky()
    relay = Relay(store, t, max_failures=2, backoff=0.0)  # type: ignore[arg-type]

    async def reject(messages: Sequence[Outgoing]) -> None:
        raise TransportError("not authorised", retryable=False)

    t.publish = reject  # type: ignore[method-assign]
    for _ in range(6):
        with pytest.raises(TransportError):
            await relay.relay_once()
    assert await store.dead_letters() == []
    assert await store.queue.depth(OUTBOX_QUEUE) == 2


async def test_an_outage_backs_off(store: Store) -> None:
    await outbox(store, ["m1"])
    t = Flaky()
    t.down = True
    relay = Relay(store, t, backoff=60.0)  # type: ignore[arg-type]
    with pytest.raises(TransportError):
        await relay.relay_once()
    assert await relay.relay_once() == 0, "the row waits out its backoff"
    assert t.tries == {"m1": 1}


# -- helpers --------------------------------------------------------------------


async def put_raw_env(app: sk.App, env: sk.Envelope) -> None:
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, "bank", env.id, app.codec.encode(env), kind="command")


async def replies(app: sk.App) -> list[sk.Envelope]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {app.store.prefix}messages WHERE queue = ? ORDER BY seq", REPLIES
        )
    return [app.codec.decode(bytes(r[0])) for r in rows]


async def _replies(app: sk.App, n: int) -> bool:
    return len(await replies(app)) >= n


async def _true(value: bool) -> bool:
    return value


class Picky(MemoryTransport):
    """A broker that refuses events mentioning ``poison`` until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = True

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if self.refuse and any(m.kind == "event" and b'"poison"' in m.data for m in messages):
            raise TransportError("message rejected by the broker", retryable=False)
        await super().publish(messages)


async def test_an_app_relay_dead_letters_poison_and_replays_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    picky = Picky()
    settings = sk.Settings(relay_max_failures=2, max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/relay.db", picky, settings=settings)
    seen: list[str] = []

    @app.participant("bank").command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> None:
        ctx.publish(Happened(cmd.key))

    @app.participant("audit").event(Happened)
    async def audit(evt: Happened, ctx: sk.Context) -> None:
        seen.append(evt.key)

    async with app:
        for key in ("a", "poison", "b"):
            env = app.codec.make(Do(key), Headers())
            await picky.publish([Outgoing(env.id, "command", "bank", app.codec.encode(env))])
        [letter] = await dead(app, 1, queue=OUTBOX_QUEUE)
        assert (letter.destination, letter.kind) == ("test.Happened", "event")
        await eventually(lambda: _true(sorted(seen) == ["a", "b"]))
        picky.refuse = False
        await app.dead_letters.replay(letter.seq, actor=ALICE, reason="broker fixed")
        await eventually(lambda: _true(sorted(seen) == ["a", "b", "poison"]))
        assert await app.dead_letters.list() == []
