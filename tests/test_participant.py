"""Participants on a real SQLite store: inbox, outbox, retries, dead letters."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest

import sagakit as sk
from sagakit.endpoint import DEAD_LETTER_KEEP
from sagakit.messages import Headers
from sagakit.policies import RetryPolicy
from tests.helpers import Data, DidIt, Do, Happened, Refused, eventually

REPLIES = "test.replies"


@pytest.fixture
async def app(tmp_path) -> AsyncIterator[sk.App]:
    settings = sk.Settings(retry=RetryPolicy(max_attempts=3, initial=0.01), max_poll=0.02)
    app = sk.App(f"sqlite:///{tmp_path}/p.db", settings=settings)
    bank = app.participant("bank")
    calls: list[str] = []
    app.calls = calls  # type: ignore[attr-defined]

    @bank.command(Do)
    async def do(cmd: Do, ctx: sk.Context) -> DidIt:
        calls.append(cmd.key)
        if cmd.key.startswith("refuse"):
            raise Refused("not today")
        if cmd.key.startswith("crash"):
            raise RuntimeError("disk on fire")
        await ctx.db.execute("CREATE TABLE IF NOT EXISTS ledger (k TEXT PRIMARY KEY, n INT)")
        await ctx.db.execute("INSERT INTO ledger (k, n) VALUES (?, ?)", cmd.key, cmd.amount)
        ctx.publish(Happened(cmd.key))
        return DidIt(cmd.amount)

    for group in ("audit", "mail"):
        part = app.participant(group)

        @part.event(Happened)
        async def seen(evt: Happened, ctx: sk.Context, group: str = group) -> None:
            calls.append(f"{group}:{evt.key}")

    app.saga(sk.Saga("noop", Data).step("a").invoke("bank", lambda d: Do(d.key)).build())
    async with app:
        await app.transport.declare(REPLIES, [])
        yield app


async def send(app: sk.App, payload: object, *, msg_id: str | None = None) -> str:
    env = app.codec.make(payload, Headers(reply_to=REPLIES))
    if msg_id:
        env.id = msg_id
    await raw(app, "bank", app.codec.encode(env), env.id)
    return env.id


async def raw(app: sk.App, queue: str, data: bytes, msg_id: str = "raw") -> None:
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, queue, msg_id, data)


async def replies(app: sk.App) -> list[sk.Envelope]:
    async with app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT data FROM {app.store.prefix}messages WHERE queue = ? ORDER BY seq", REPLIES
        )
    return [app.codec.decode(bytes(r[0])) for r in rows]


async def test_command_commits_change_reply_and_event_together(app: sk.App) -> None:
    await send(app, Do("a", 5))
    await eventually(lambda: _count(app, 1))
    [reply] = await replies(app)
    assert reply.headers.outcome == "success" and reply.type == "test.Done"
    await eventually(lambda: _has(app, {"audit:a", "mail:a"}))


async def test_duplicate_delivery_does_not_apply_twice_and_resends_reply(app: sk.App) -> None:
    await send(app, Do("dup", 1), msg_id="m-1")
    await eventually(lambda: _count(app, 1))
    await send(app, Do("dup", 1), msg_id="m-1")
    await eventually(lambda: _count(app, 2))
    async with app.store.transaction() as tx:
        row = await tx.fetchone("SELECT count(*) FROM ledger WHERE k = 'dup'")
    assert row[0] == 1
    assert app.calls.count("dup") == 1  # type: ignore[attr-defined]


async def test_business_failure_becomes_failure_reply(app: sk.App) -> None:
    await send(app, Do("refuse-1"))
    await eventually(lambda: _count(app, 1))
    [reply] = await replies(app)
    assert reply.failed
    failure = app.codec.payload(reply, sk.Failure)
    assert failure.code == "test.Refused" and not failure.technical


async def test_technical_failure_is_retried_then_dead_lettered_with_reply(app: sk.App) -> None:
    await send(app, Do("crash-1"))
    await eventually(lambda: _count(app, 1))
    assert app.calls.count("crash-1") == 3  # type: ignore[attr-defined]
    [reply] = await replies(app)
    assert reply.failed and app.codec.payload(reply, sk.Failure).technical
    [dead] = await app.store.dead_letters()
    assert "disk on fire" in dead.reason and dead.queue == "bank"


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        (b"{not json", "MalformedMessage"),
        (
            b'{"id":"x","type":"nobody.Knows","kind":"command","payload":{},"headers":{}}',
            "NoHandler",
        ),
        (
            b'{"id":"x","type":"test.Do","kind":"command","payload":{"key":1},'
            b'"headers":{"reply_to":"test.replies"}}',
            "SchemaMismatch",
        ),
        (b"x" * (300 * 1024), "OversizeMessage"),
    ],
)
async def test_bad_input_is_dead_lettered_and_worker_keeps_going(
    app: sk.App, data: bytes, error_type: str
) -> None:
    await raw(app, "bank", data)
    await send(app, Do("after"))
    await eventually(lambda: _has(app, {"after"}))
    dead = await app.store.dead_letters()
    assert [d.error_type for d in dead] == [error_type]
    assert dead[0].data == data[:DEAD_LETTER_KEEP], "a bounded prefix, never the whole body"
    if len(data) > DEAD_LETTER_KEEP:
        digest = hashlib.sha256(data).hexdigest()
        assert f"{len(data)} bytes, sha256 {digest}" in dead[0].reason


async def test_schema_mismatch_on_a_command_still_gets_a_failure_reply(app: sk.App) -> None:
    bad = (
        b'{"id":"x","type":"test.Do","kind":"command","payload":{"key":1},'
        b'"headers":{"reply_to":"test.replies"}}'
    )
    await raw(app, "bank", bad)
    await eventually(lambda: _count(app, 1))
    [reply] = await replies(app)
    assert reply.failed and app.codec.payload(reply, sk.Failure).code == "SchemaMismatch"


async def test_reply_for_unknown_saga_is_dead_lettered(app: sk.App) -> None:
    env = app.codec.make(
        DidIt(1), Headers(saga_id="ghost", step="x", outcome="success"), kind="reply"
    )
    await raw(app, "sagakit.coordinator", app.codec.encode(env), env.id)
    await eventually(lambda: _dead(app, "UnknownSaga"))


async def _count(app: sk.App, n: int) -> bool:
    return len(await replies(app)) >= n


async def _has(app: sk.App, keys: set[str]) -> bool:
    return keys <= set(app.calls)  # type: ignore[attr-defined]


async def _dead(app: sk.App, error_type: str) -> bool:
    return any(d.error_type == error_type for d in await app.store.dead_letters())
