"""``sagakit dead-letters``, end to end in a subprocess against a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.store import open_store
from tests.helpers import Do, Happened

pytestmark = pytest.mark.timeout(120)


def sagakit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGAKIT_")}
    return subprocess.run(
        [sys.executable, "-m", "sagakit.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | env,
    )


def ok_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def error_line(done: subprocess.CompletedProcess[str], status: int) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == status, done.stderr
    assert len(lines) == 1 and lines[0].startswith("sagakit: error: "), done.stderr
    return lines[0]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A store with three dead letters: an event, a command, an oversize blob."""
    url = f"sqlite:///{tmp_path}/ops.db"
    codec = Codec(TypeRegistry())
    event = codec.make(Happened("k"), Headers(saga_id="s-1"))
    command = codec.make(Do("c"), Headers())

    async def fill() -> None:
        async with open_store(url) as store, store.transaction() as tx:
            for queue, env, error in (("audit", event, "RuntimeError"), ("bank", command, "X")):
                data = codec.encode(env)
                await store.dead_letter(
                    tx,
                    queue,
                    data,
                    f"{error}: boom",
                    error,
                    message_id=env.id,
                    kind=env.kind,
                    saga_id=env.headers.saga_id,
                )
            await store.dead_letter(tx, "bank", b"y" * 70_000, "too big", "OversizeMessage")

    asyncio.run(fill())
    return url


def messages_on(url: str, queue: str) -> list[bytes]:
    async def read() -> list[bytes]:
        async with open_store(url) as store, store.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT data FROM sagakit_messages WHERE queue = ? ORDER BY seq", queue
            )
        return [bytes(r[0]) for r in rows]

    return asyncio.run(read())


def test_list_filters_and_show(store_url: str) -> None:
    every = ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))
    assert [(d["queue"], d["error_type"]) for d in every] == [
        ("audit", "RuntimeError"),
        ("bank", "X"),
        ("bank", "OversizeMessage"),
    ]
    assert [d["truncated"] for d in every] == [False, False, True]
    bank = ok_json(
        sagakit("dead-letters", "list", "--store", store_url, "--queue", "bank", "--json")
    )
    assert len(bank) == 2
    saga = ok_json(sagakit("dead-letters", "list", "--store", store_url, "--saga", "s-1", "--json"))
    assert [d["seq"] for d in saga] == [every[0]["seq"]]
    shown = ok_json(
        sagakit("dead-letters", "show", str(every[0]["seq"]), "--store", store_url, "--json")
    )
    assert json.loads(shown["data"])["type"] == "test.Happened"
    text = sagakit("dead-letters", "list", "--store", store_url)
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3


def test_replay_dry_run_then_for_real_records_the_actor(store_url: str) -> None:
    [event] = ok_json(
        sagakit("dead-letters", "list", "--store", store_url, "--queue", "audit", "--json")
    )
    seq = str(event["seq"])
    base = ("dead-letters", "replay", seq, "--store", store_url, "--json")
    dry = ok_json(sagakit(*base, "--reason", "look", "--dry-run"))
    assert dry["dry_run"] and [d["seq"] for d in dry["done"]] == [event["seq"]]
    assert messages_on(store_url, "audit") == []
    done = ok_json(sagakit(*base, "--reason", "audit fixed", SAGAKIT_ACTOR="alice"))
    assert not done["dry_run"] and len(done["done"]) == 1
    [data] = messages_on(store_url, "audit")
    assert json.loads(data)["id"] == event["id"], "the stored bytes, back on their queue"
    left = ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))
    assert event["seq"] not in [d["seq"] for d in left]
    actions = _actions(store_url)
    assert actions == [("replay", event["seq"], "alice", "cli", "audit fixed")]


def test_purge_by_filter(store_url: str) -> None:
    base = ("dead-letters", "purge", "--queue", "bank", "--store", store_url, "--json")
    dry = ok_json(sagakit(*base, "--reason", "junk", "--dry-run", "--actor", "bob"))
    assert len(dry["done"]) == 2
    assert len(ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))) == 3
    done = ok_json(sagakit(*base, "--reason", "junk", "--actor", "bob"))
    assert {d["queue"] for d in done["done"]} == {"bank"} and len(done["done"]) == 2
    [left] = ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))
    assert left["queue"] == "audit"
    assert [a[2] for a in _actions(store_url)] == ["bob", "bob"]


def test_errors_are_one_line(store_url: str, tmp_path: Path) -> None:
    every = ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))
    big = str(every[2]["seq"])
    line = error_line(
        sagakit("dead-letters", "replay", big, "--store", store_url, "--reason", "x"), 1
    )
    assert "cannot be replayed" in line
    line = error_line(sagakit("dead-letters", "show", "999", "--store", store_url), 1)
    assert "no dead letter 999" in line
    line = error_line(sagakit("dead-letters", "purge", "--store", store_url, "--reason", "x"), 2)
    assert "--all" in line
    error_line(sagakit("dead-letters", "replay", big, "--store", store_url), 2)  # no --reason
    line = error_line(sagakit("dead-letters", "list", "--store", f"sqlite:///{tmp_path}/new.db"), 2)
    assert "sagakit db migrate" in line
    line = error_line(
        sagakit(
            "dead-letters", "purge", big, "--store", store_url, "--reason", "x", "--actor", "a b"
        ),
        2,
    )
    assert "actor" in line
    assert len(ok_json(sagakit("dead-letters", "list", "--store", store_url, "--json"))) == 3


def _actions(url: str) -> list[tuple[Any, ...]]:
    async def read() -> list[tuple[Any, ...]]:
        async with open_store(url) as store:
            got = await store.dead_letter_actions()
        return [(a.action, a.dead_letter, a.actor, a.via, a.reason) for a in reversed(got)]

    return asyncio.run(read())


def audit_lines(url: str) -> list[tuple[str, str, str, str, str, str | None]]:
    async def read() -> list[tuple[str, str, str, str, str, str | None]]:
        from sagakit.console import Audit

        async with open_store(url) as store:
            lines = await Audit(store).list()
        return [(a.actor, a.via, a.action, a.target, a.outcome, a.source) for a in reversed(lines)]

    return asyncio.run(read())


def test_replay_and_purge_write_the_operator_audit(store_url: str) -> None:
    env = {"SAGAKIT_STORE": store_url}
    cut = sagakit("dead-letters", "replay", "3", "--reason", "again", "--actor", "bob", **env)
    error_line(cut, 1)
    dry = sagakit("dead-letters", "purge", "--all", "--reason", "x", "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    ok_json(sagakit("dead-letters", "replay", "1", "--reason", "fixed", "--actor", "bob",
                    "--json", **env))  # fmt: skip
    ok_json(sagakit("dead-letters", "purge", "--queue", "bank", "--reason", "tidy",
                    "--json", **env, SAGAKIT_ACTOR="eve"))  # fmt: skip
    bulk = 'dead-letters:{"queue":"bank","error_type":null,"saga_id":null,' + (
        '"older_than":null,"limit":100}'
    )
    assert audit_lines(store_url) == [
        ("bob", "cli", "dead-letters.replay", "dead-letter:3", "failed", "cli"),
        ("bob", "cli", "dead-letters.replay", "dead-letter:1", "done", "cli"),
        ("eve", "cli", "dead-letters.purge", "dead-letter:2", "done", "cli"),
        ("eve", "cli", "dead-letters.purge", "dead-letter:3", "done", "cli"),
        ("eve", "cli", "bulk-dead-letters.purge", bulk, "done", "cli"),
    ]
