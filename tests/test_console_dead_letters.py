"""Dead letters in the console: replay and purge through the action model, the API and
the pages, executed by a running App's coordinator, audited, idempotent per command."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from urllib.parse import unquote

import httpx
import pytest

import sagakit as sk
from sagakit.console import AuditFilter, Operations
from sagakit.console.commands import OPERATOR_QUEUE, OperatorCommand, encode
from sagakit.console.web import create_app
from sagakit.errors import NotReplayable
from sagakit.messages import Headers
from sagakit.ops.dead_letters import DeadLetterFilter
from sagakit.store import DeadLetter
from sagakit.testing import drop_tables
from sagakit.transport import Outgoing
from tests.console_bench import FAST, token
from tests.helpers import Data, Happened, eventually

pytestmark = pytest.mark.timeout(60)


class Ledger:
    """An event handler that fails (and so dead-letters) until the fix is deployed."""

    def __init__(self, app: sk.App) -> None:
        self.broken = True
        self.seen: list[str] = []
        app.participant("ledger").event(Happened)(self.on_happened)

    async def on_happened(self, evt: Happened, ctx: sk.Context) -> None:
        if self.broken:
            raise RuntimeError("ledger unavailable")
        self.seen.append(evt.key)


async def keep(data: Data) -> Data:
    return data


@pytest.fixture(params=["sqlite", "postgres"])
async def bench(
    request: pytest.FixtureRequest, tmp_path, prefix: str
) -> AsyncIterator[tuple[sk.App, Ledger]]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = request.getfixturevalue("postgres_url") + "?max_size=2"  # a shared server
    settings = sk.Settings(retry=FAST, max_poll=0.02, prefix=prefix)
    app = sk.App(url, settings=settings)
    app.saga(sk.Saga("noop", Data).step("keep").local(keep).build())  # so a coordinator runs
    ledger = Ledger(app)
    async with app:
        yield app, ledger
        if request.param == "postgres":
            await drop_tables(app.store)


def client(app: sk.App) -> httpx.AsyncClient:
    web = create_app(app.store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url="http://console")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def happened(app: sk.App, key: str) -> None:
    env = app.codec.make(Happened(key), Headers())
    await app.transport.publish([Outgoing(env.id, "event", env.type, app.codec.encode(env))])


async def dead(app: sk.App, n: int) -> list[DeadLetter]:
    letters: list[DeadLetter] = []

    async def enough() -> bool:
        letters[:] = await app.dead_letters.list()
        return len(letters) >= n

    await eventually(enough)
    return letters


async def fake_letters(app: sk.App, queue: str, n: int, *, truncated: int = 0) -> None:
    """``n`` whole envelopes dead-lettered on ``queue``, and ``truncated`` oversize ones."""
    async with app.store.transaction() as tx:
        for i in range(n):
            env = app.codec.make(Happened(f"{queue}{i}"), Headers())
            data = app.codec.encode(env)
            await app.store.dead_letter(tx, queue, data, "boom", "RuntimeError", message_id=env.id)
        for _ in range(truncated):
            await app.store.dead_letter(tx, queue, b"x" * 2_000_000, "too big", "MessageTooLarge")


async def operator_rows(app: sk.App) -> int:
    return await app.store.queue.depth(OPERATOR_QUEUE)


async def test_a_dead_letter_replayed_from_the_api_is_processed_once(
    bench: tuple[sk.App, Ledger],
) -> None:
    app, ledger = bench
    await happened(app, "k1")
    [letter] = await dead(app, 1)
    assert letter.queue == "ledger" and letter.error_type == "RuntimeError"
    ledger.broken = False  # the fix is deployed
    operator = await token(app, "operator")
    async with client(app) as http:
        r = await http.post(
            f"/api/dead-letters/{letter.seq}/replay",
            headers=bearer(operator),
            json={"reason": "ledger is back", "wait": 10},
        )
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "done" and r.json()["action"] == "dead-letters.replay"
        await eventually(lambda: _true(ledger.seen == ["k1"]))
        await asyncio.sleep(0.2)
        assert ledger.seen == ["k1"], "processed once, as a redelivery"
        assert (await http.get("/api/dead-letters", headers=bearer(operator))).json() == []
        again = await http.post(
            f"/api/dead-letters/{letter.seq}/replay",
            headers=bearer(operator),
            json={"reason": "twice?"},
        )
        assert again.status_code == 404  # gone: replayed already
    audit = Operations(app.store).audit
    [line] = await audit.list(AuditFilter(action="dead-letters.replay", outcome="done"))
    [gone] = await audit.list(AuditFilter(action="dead-letters.replay", outcome="failed"))
    assert "no dead letter" in (gone.detail or "")
    assert (line.outcome, line.target, line.reason) == (
        "done",
        f"dead-letter:{letter.seq}",
        "ledger is back",
    )
    assert line.actor.startswith("token:") and line.role == "operator" and line.before
    [logged] = await app.dead_letters.actions()
    assert (logged.action, logged.dead_letter, logged.via) == ("replay", letter.seq, "api")


async def test_purge_from_the_api_deletes_it_audited(bench: tuple[sk.App, Ledger]) -> None:
    app, ledger = bench
    await happened(app, "k1")
    [letter] = await dead(app, 1)
    async with client(app) as http:
        r = await http.post(
            f"/api/dead-letters/{letter.seq}/purge",
            headers=bearer(await token(app, "admin")),
            json={"reason": "test traffic", "wait": 10},
        )
        assert r.json()["outcome"] == "done"
    assert await app.dead_letters.list() == [] and ledger.seen == []
    [logged] = await app.dead_letters.actions()
    assert (logged.action, logged.reason) == ("purge", "test traffic")
    [line] = await Operations(app.store).audit.list(AuditFilter(action="dead-letters.purge"))
    assert line.outcome == "done" and line.detail == "purge ledger"


async def test_roles_reason_and_letters_that_cannot_be_replayed(
    bench: tuple[sk.App, Ledger],
) -> None:
    app, _ = bench
    await fake_letters(app, "q", 1, truncated=1)
    good, big = await app.dead_letters.list()
    viewer, operator = await token(app, "viewer"), await token(app, "operator")
    url = f"/api/dead-letters/{good.seq}/replay"
    async with client(app) as http:
        assert (await http.post(url, json={"reason": "x"})).status_code == 401
        r = await http.post(url, headers=bearer(viewer), json={"reason": "x"})
        assert r.status_code == 403
        for body, status in (({}, 422), ({"reason": "  "}, 409), ({"reason": 1}, 422)):
            r = await http.post(url, headers=bearer(operator), json=body)
            assert r.status_code == status, (body, r.text)
        r = await http.post(
            f"/api/dead-letters/{big.seq}/replay", headers=bearer(operator), json={"reason": "x"}
        )
        assert r.status_code == 409 and "cannot be replayed" in r.json()["error"]
        r = await http.post(
            "/api/dead-letters/999999/purge", headers=bearer(operator), json={"reason": "x"}
        )
        assert r.status_code == 404
        r = await http.post(
            f"/api/dead-letters/{2**64}/purge", headers=bearer(operator), json={"reason": "x"}
        )
        assert r.status_code == 422  # past a 64-bit row id: refused, not a 500
        bulk = {"reason": "x", "filter": {"limit": 0}}
        r = await http.post("/api/dead-letters/bulk/purge", headers=bearer(operator), json=bulk)
        assert r.status_code == 422
        r = await http.post(
            f"/api/dead-letters/{good.seq}/explode", headers=bearer(operator), json={"reason": "x"}
        )
        assert r.status_code == 404
    assert len(await app.dead_letters.list()) == 2, "nothing acted on"
    assert await operator_rows(app) == 0, "nothing queued"
    audit = Operations(app.store).audit
    denied = await audit.list(AuditFilter(outcome="denied"))
    assert {(d.actor.split(":")[0], d.action) for d in denied} == {
        ("anonymous", "dead-letters.replay"),
        ("token", "dead-letters.replay"),
    }
    failed = await audit.list(AuditFilter(outcome="failed"))
    assert {f.detail for f in failed} >= {"a reason is required"}
    assert any("cannot be replayed" in (f.detail or "") for f in failed)


async def test_bulk_dry_run_is_exact_and_changes_nothing_then_the_run_acts(
    bench: tuple[sk.App, Ledger],
) -> None:
    app, _ = bench
    await fake_letters(app, "a", 12, truncated=2)
    await fake_letters(app, "b", 3)
    h = bearer(await token(app, "operator"))
    body = {"reason": "old noise", "filter": {"queue": "a"}, "dry_run": True}
    async with client(app) as http:
        r = await http.post("/api/dead-letters/bulk/replay", headers=h, json=body)
        plan = r.json()
        assert (plan["count"], plan["refused"], plan["command_id"]) == (12, 2, None)
        assert len(plan["sample"]) == 10 and {d["queue"] for d in plan["sample"]} == {"a"}
        r = await http.post("/api/dead-letters/bulk/purge", headers=h, json=body)
        assert (r.json()["count"], r.json()["refused"]) == (14, 0)
        assert len(await app.dead_letters.list()) == 17 and await operator_rows(app) == 0
        assert await Operations(app.store).audit.list() == [], "a dry run records nothing"
        r = await http.post(
            "/api/dead-letters/bulk/purge", headers=h, json={**body, "dry_run": False}
        )
        cmd = r.json()["command_id"]
        assert cmd and r.json()["count"] == 14
    await eventually(lambda: _true_async(app, 3))
    audit = Operations(app.store).audit
    lines = await audit.list(AuditFilter(limit=100))
    assert len([x for x in lines if x.action == "bulk-dead-letters.purge"]) == 1
    done = [x for x in lines if x.action == "dead-letters.purge"]
    assert len(done) == 14 and {x.command_id for x in done} == {cmd}
    assert {x.outcome for x in done} == {"done"}
    assert {d.queue for d in await app.dead_letters.list()} == {"b"}


async def test_a_command_delivered_twice_runs_once(bench: tuple[sk.App, Ledger]) -> None:
    app, _ = bench
    await fake_letters(app, "a", 1)
    [letter] = await app.dead_letters.list()
    async with client(app) as http:
        r = await http.post(
            f"/api/dead-letters/{letter.seq}/purge",
            headers=bearer(await token(app, "operator")),
            json={"reason": "noise", "wait": 10},
        )
        cmd = r.json()["command_id"]
    # the same command again, as a redelivery after a crash would bring it
    again = OperatorCommand(
        cmd,
        "dead-letters.purge",
        f"dead-letter:{letter.seq}",
        "noise",
        "x",
        "operator",
        "http",
        seq=letter.seq,
    )
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, OPERATOR_QUEUE, "redelivered", encode(again))
    await eventually(lambda: _drained(app))
    lines = await Operations(app.store).audit.list(AuditFilter(target=f"dead-letter:{letter.seq}"))
    assert [(x.outcome, x.command_id) for x in lines] == [("done", cmd)]
    # a command whose letter another operator took in between: failed, with why
    late = OperatorCommand(
        "late",
        "dead-letters.replay",
        "dead-letter:999999",
        "x",
        "y",
        "operator",
        "http",
        seq=999999,
    )
    async with app.store.transaction() as tx:
        await app.store.queue.put(tx, OPERATOR_QUEUE, "late", encode(late))
    line = await Operations(app.store).outcome("late", "dead-letter:999999", timeout=10)
    assert line is not None and line.outcome == "failed" and "no dead letter" in (line.detail or "")


async def _drained(app: sk.App) -> bool:
    return await operator_rows(app) == 0


async def _true_async(app: sk.App, left: int) -> bool:
    return len(await app.dead_letters.list()) == left and await operator_rows(app) == 0


async def _true(value: bool) -> bool:
    return value


async def test_the_page_acts_with_its_csrf_token_and_refuses_without(
    bench: tuple[sk.App, Ledger],
) -> None:
    app, ledger = bench
    await happened(app, "k1")
    [letter] = await dead(app, 1)
    await fake_letters(app, "noise", 4)
    ledger.broken = False
    async with client(app) as http:
        http.cookies.set("sagakit_session", await token(app, "operator"))
        page = await http.get("/dead-letters")
        assert page.status_code == 200 and 'id="dl-one"' in page.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        url = f"/api/dead-letters/{letter.seq}/replay"
        r = await http.post(url, json={"reason": "no csrf"})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
        form = {"seq": str(letter.seq), "action": "replay", "reason": "ledger is back"}
        assert (await http.post("/dead-letters/act", data=form)).status_code == 403
        r = await http.post("/dead-letters/act", data={**form, "csrf": csrf[1]})
        assert r.status_code == 303 and "done" in unquote(r.headers["location"])
        await eventually(lambda: _true(ledger.seen == ["k1"]))
        bulk = {"csrf": csrf[1], "queue": "noise", "action": "purge", "reason": "noise"}
        r = await http.post("/dead-letters/bulk", data={**bulk, "dry_run": "1"})
        assert r.status_code == 200 and "<strong>4</strong> dead letters" in r.text
        assert len(await app.dead_letters.list()) == 4, "a preview changes nothing"
        r = await http.post("/dead-letters/bulk", data={**bulk, "dry_run": "0"})
        assert r.status_code == 200 and "Queued" in r.text
    await eventually(lambda: _true_async(app, 0))
    denied = await Operations(app.store).audit.list(AuditFilter(outcome="denied"))
    assert len(denied) == 2 and all("CSRF" in (d.detail or "") for d in denied)


async def test_the_python_api_acts_at_once_and_writes_the_operator_audit(
    bench: tuple[sk.App, Ledger],
) -> None:
    """``app.dead_letters`` replays or purges itself, audited like the console's commands."""
    app, _ = bench
    await fake_letters(app, "q1", 3, truncated=1)
    letters = await app.dead_letters.list(queue="q1")
    whole, cut = letters[0], letters[-1]
    ana, viewer = sk.Actor("ana"), sk.Actor("vic", role="viewer")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.dead_letters.purge(whole.seq, actor=viewer, reason="tidy")
    with pytest.raises(sk.InvalidOperatorAction):
        await app.dead_letters.purge(whole.seq, actor=ana, reason=" ")
    with pytest.raises(NotReplayable):
        await app.dead_letters.replay(cut.seq, actor=ana, reason="again")
    await app.dead_letters.purge(whole.seq, actor=ana, reason="tidy", dry_run=True)
    await app.dead_letters.replay(whole.seq, actor=ana, reason="fixed")
    out = await app.dead_letters.purge(DeadLetterFilter(queue="q1"), actor=ana, reason="gone")
    assert len(out.done) == 3
    lines = await Operations(app.store).audit.list(AuditFilter(limit=20))
    got = [(a.actor, a.action, a.target, a.outcome) for a in reversed(lines)]
    one, two = f"dead-letter:{whole.seq}", f"dead-letter:{cut.seq}"
    assert got[:4] == [
        ("vic", "dead-letters.purge", one, "denied"),
        ("ana", "dead-letters.purge", one, "failed"),
        ("ana", "dead-letters.replay", two, "failed"),
        ("ana", "dead-letters.replay", one, "done"),
    ]  # the dry run recorded nothing
    assert [(a.action, a.outcome) for a in lines[:4]] == [
        ("bulk-dead-letters.purge", "done"),
        *[("dead-letters.purge", "done")] * 3,
    ]
    assert lines[0].target.startswith("dead-letters:") and '"count":3' in (lines[0].detail or "")
