"""Poison messages and bad input, fuzzed with hypothesis.

Random and mutated envelopes (valid encoded envelopes with bytes flipped,
cut or inserted, fields dropped or given values of the wrong type, sizes over
the limit, odd header values) are published through every transport's real
consumer path into a running App endpoint: memory, the database transport
(SQLite, PostgreSQL) and the brokers (RabbitMQ, NATS, Redis). For every input:

* it is dead-lettered with a reason (bad bytes, unknown type, wrong schema,
  oversize, no handler, or a technical failure after the retry policy gave
  up), or it was a valid command and was handled (inbox row or handler run);
* no consumer dies: a valid message sent after the garbage is still handled,
  promptly.

The demo's HTTP API gets random and mutated bodies and paths: every answer is
a 2xx/4xx with a JSON error, never a 500 or an exception, and a valid order
placed afterwards is still accepted.

Examples are bounded (fewer on the brokers) so this runs in ``make test``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sagakit as sk
from sagakit.errors import MessageError
from sagakit.inbox import key_of as inbox_key
from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.policies import RetryPolicy
from sagakit.transport import Outgoing, Transport
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts
from tests.test_transport_contract import BROKERS

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures

pytestmark = pytest.mark.timeout(240)

QUEUE = "fuzz"
MAX_SIZE = 4096
SETTLE_S = 20.0


@sk.command("fuzz.Echo")
class Echo(msgspec.Struct):
    n: int
    text: str = ""


# -- the app under test ----------------------------------------------------------


@dataclass
class Harness:
    """An App with one participant, run on its own event loop for hypothesis."""

    app: sk.App
    loop: asyncio.AbstractEventLoop
    seen: set[str] = field(default_factory=set)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def send(self, data: bytes) -> None:
        await self.app.transport.publish([Outgoing(sk.new_id(), "command", QUEUE, data)])

    async def dead(self) -> dict[bytes, str]:
        return {d.data: d.reason for d in await self.app.store.dead_letters(100_000)}

    async def in_inbox(self, env: sk.Envelope) -> bool:
        async with self.app.store.transaction() as tx:
            return await self.app.store.inbox_get(tx, QUEUE, inbox_key(env)) is not None

    def expectation(self, data: bytes) -> sk.Envelope | None:
        """None if ``data`` must be dead-lettered; the envelope if it is a valid command."""
        try:
            env = self.app.codec.decode(data)
            if env.kind != "command" or env.type != "fuzz.Echo":
                return None
            self.app.codec.payload(env)
        except MessageError:
            return None
        return env

    async def settled(self, data: bytes, dead: dict[bytes, str]) -> bool:
        if data in dead:
            assert dead[data], "a dead letter without a reason"
            return True
        try:
            env = self.app.codec.decode(data)
        except MessageError:
            return False
        if env.kind == "command" and await self.in_inbox(env):
            # Its id (hypothesis reuses ids across examples) was already handled:
            # the inbox answers it as a duplicate before its payload is read.
            return True
        return self.expectation(data) is not None and env.id in self.seen

    async def check_batch(self, batch: list[bytes]) -> None:
        for data in batch:
            await self.send(data)
        # a valid message behind the garbage is handled promptly
        sentinel = self.app.codec.make(Echo(0, "sentinel"), Headers())
        await self.send(self.app.codec.encode(sentinel))
        await eventually(lambda: sentinel.id in self.seen, 10.0, "valid message held up")
        loop = asyncio.get_running_loop()
        end = loop.time() + SETTLE_S
        while True:
            dead = await self.dead()
            pending = [d for d in batch if not await self.settled(d, dead)]
            if not pending:
                return
            if loop.time() > end:
                raise AssertionError(f"never handled nor dead-lettered: {pending[:3]!r}")
            await asyncio.sleep(0.05)


async def eventually(cond: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(what)
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def harness(store: str, transport: str | Transport = "database") -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    cfg = sk.Settings(
        retry=RetryPolicy(max_attempts=2, initial=0.01, max_delay=0.05),
        max_poll=0.02,
        lease=1.0,
        max_message_size=MAX_SIZE,
    )
    app = sk.App(store, transport, settings=cfg)
    h = Harness(app, loop)
    p = app.participant(QUEUE)

    @p.command(Echo)
    async def echo(cmd: Echo, ctx: sk.Context) -> None:
        h.seen.add(ctx.envelope.id)

    loop.run_until_complete(app.start())
    try:
        yield h
    finally:
        loop.run_until_complete(app.stop())
        loop.close()


# -- strategies ------------------------------------------------------------------

WEIRD_INTS = [0, -1, 1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from(WEIRD_INTS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
queue_names = st.sampled_from([None, QUEUE, "nowhere", "", "sagakit.coordinator"]) | st.text(
    max_size=30
)


@st.composite
def valid_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    saga = draw(st.booleans())
    headers = Headers(
        saga_id=str(draw(st.uuids())) if saga else None,
        step=draw(st.sampled_from(["a", "b"])) if saga else None,
        phase=draw(st.sampled_from([None, "compensate"])) if saga else None,
        reply_to=draw(st.sampled_from([None, "nowhere"])),
        attempt=draw(st.integers(1, 3)),
        created_at=1_700_000_000.25,
    )
    payload = Echo(draw(st.integers(-(2**63), 2**63 - 1)), draw(st.text(max_size=40)))
    codec = Codec(TypeRegistry())
    env = codec.make(payload, headers)
    env.id = str(draw(st.uuids()))  # generation must not depend on the clock
    return msgspec.json.decode(codec.encode(env))  # type: ignore[no-any-return]


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": st.text(max_size=40) | json_values,
    "type": st.sampled_from(["fuzz.Echo", "fuzz.Nope", "sagakit.Done", ""]) | json_values,
    "kind": st.sampled_from(["command", "event", "reply", "", "COMMAND"]) | json_values,
    "payload": json_values,
    "payload.n": st.sampled_from(WEIRD_INTS) | json_values,
    "payload.text": json_values,
    "payload.extra": json_values,
    "headers": json_values,
    "headers.saga_id": st.text(max_size=40) | json_values,
    "headers.step": st.text(max_size=10) | json_values,
    "headers.phase": st.sampled_from(["compensate", "forward", None, ""]) | json_values,
    "headers.reply_to": queue_names | json_values,
    "headers.attempt": st.sampled_from(WEIRD_INTS) | json_values,
    "headers.correlation_id": st.text(max_size=40),
    "headers.extra": json_values,
    "headers.created_at": json_values,
}


@st.composite
def field_mutation(draw: st.DrawFn) -> bytes:
    doc = draw(valid_envelopes())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(sorted(FIELDS)))
        head, _, tail = path.partition(".")
        target = doc if not tail else doc.get(head)
        key = tail or head
        if not isinstance(target, dict):
            continue
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(FIELDS[path])
    return json.dumps(doc).encode()


@st.composite
def byte_mutation(draw: st.DrawFn) -> bytes:
    data = bytearray(json.dumps(draw(valid_envelopes())).encode())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def oversize(draw: st.DrawFn) -> bytes:
    doc = draw(valid_envelopes())
    doc["payload"]["text"] = "x" * draw(st.integers(MAX_SIZE, 2 * MAX_SIZE))
    return json.dumps(doc).encode()


garbage = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    field_mutation(),
    byte_mutation(),
    oversize(),
    valid_envelopes().map(lambda d: json.dumps(d).encode()),
)
batches = st.lists(garbage, min_size=1, max_size=6)


def fuzz(h: Harness, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batches)
    def one(batch: list[bytes]) -> None:
        h.run(h.check_batch([d for d in batch if d]))

    one()
    # nothing died: still consuming after every example
    sentinel = h.app.codec.make(Echo(1, "last"), Headers())
    h.run(h.send(h.app.codec.encode(sentinel)))
    h.run(eventually(lambda: sentinel.id in h.seen, 10.0, "the endpoint stopped consuming"))


# -- found by this fuzz test -----------------------------------------------------

BAD_UTF8_PAYLOAD = (
    b'{"id": "c9d12c14-6d8f-a509-2e32-37a0f06f7712", "type": "fuzz.Echo", "kind": "command", '
    b'"payload": {"n": 1, "text": "48\x96"}, "headers": {"reply_to": "nowhere"}}'
)
BAD_UTF8_HEADER = (
    b'{"id": "\xff", "type": "fuzz.Echo", "kind": "command", "payload": {"n": 1}, "headers": {}}'
)


def test_invalid_utf8_is_a_typed_error() -> None:
    """msgspec reports invalid UTF-8 in a string as UnicodeDecodeError, not DecodeError:
    it used to escape the codec, so the endpoint treated the message as a technical
    failure (retried, then dead-lettered as such) or, in the envelope itself, let the
    exception out of the handler: redelivered for ever."""
    codec = Codec(TypeRegistry())
    codec.registry.add(Echo)
    with pytest.raises(sk.MalformedMessage):
        codec.decode(BAD_UTF8_HEADER)
    with pytest.raises(sk.SchemaMismatch):
        codec.payload(codec.decode(BAD_UTF8_PAYLOAD))


def test_invalid_utf8_is_dead_lettered_at_once(tmp_path: Path) -> None:
    with harness(f"sqlite:///{tmp_path}/fuzz.db") as h:
        h.run(h.check_batch([BAD_UTF8_PAYLOAD, BAD_UTF8_HEADER]))
        letters = {d.data: d for d in h.run(h.app.store.dead_letters())}
        assert letters[BAD_UTF8_PAYLOAD].error_type == "SchemaMismatch"
        assert letters[BAD_UTF8_HEADER].error_type == "MalformedMessage"


HUGE_ATTEMPT = (
    b'{"id": "0b7d4c14-6d8f-a509-2e32-37a0f06f7712", "type": "fuzz.Echo", "kind": "command", '
    b'"payload": {"n": 1}, "headers": {"saga_id": "s", "step": "a", "phase": "compensate", '
    b'"reply_to": "nowhere", "attempt": 9223372036854775808}}'
)


def test_attempt_beyond_a_database_integer_is_malformed(tmp_path: Path) -> None:
    """An attempt of 2**63 used to decode, then fail every insert into the inbox
    (OverflowError on SQLite), including the dead-letter transaction's failure
    reply: the message was redelivered for ever."""
    with harness(f"sqlite:///{tmp_path}/fuzz.db") as h:
        h.run(h.check_batch([HUGE_ATTEMPT]))
        letters = {d.data: d for d in h.run(h.app.store.dead_letters())}
        assert letters[HUGE_ATTEMPT].error_type == "MalformedMessage"


# -- transports ------------------------------------------------------------------


def test_fuzz_memory_transport() -> None:
    with harness("memory://", "memory://") as h:
        fuzz(h, 40)


def test_fuzz_database_transport_sqlite(tmp_path: Path) -> None:
    with harness(f"sqlite:///{tmp_path}/fuzz.db") as h:
        fuzz(h, 40)


def test_fuzz_database_transport_postgres(postgres_url: str, prefix: str) -> None:
    from sagakit.store import open_store
    from sagakit.testing import drop_tables

    store = open_store(postgres_url, prefix=prefix)
    with harness(store) as h:  # type: ignore[arg-type]
        fuzz(h, 12)
        h.run(store.open())
        h.run(drop_tables(store))
        h.run(store.close())


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_fuzz_broker_transports(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = BROKERS[broker]
    url = str(request.getfixturevalue(spec.url_fixture))
    module = importlib.import_module(spec.module)
    t: Transport = module.transport(url, **spec.options(f"fuzz-{uuid.uuid4().hex[:8]}"))
    with harness(f"sqlite:///{tmp_path}/fuzz.db", t) as h:
        try:
            fuzz(h, 8)
        finally:
            if spec.cleanup is not None:
                h.run(spec.cleanup(t))


# -- the demo's HTTP API ---------------------------------------------------------

GOOD = {
    "customer_id": "c-1",
    "items": [{"sku": "KB-01", "quantity": 2}],
    "address": "1 Test Street",
}
ORDER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "customer_id": st.text(max_size=120) | json_values,
    "items": json_values
    | st.lists(
        st.fixed_dictionaries(
            {"sku": st.sampled_from(["KB-01", "NOPE", ""]) | json_values, "quantity": json_values}
        ),
        max_size=3,
    ),
    "address": st.text(max_size=600) | json_values,
    "card_token": st.text(max_size=120) | json_values,
    "unexpected": json_values,
}


@st.composite
def order_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "big":
        return json.dumps({**GOOD, "address": "x" * draw(st.integers(501, 70_000))}).encode()
    doc: dict[str, Any] = json.loads(json.dumps(GOOD))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(ORDER_FIELDS)))
        if draw(st.booleans()) and key in doc:
            del doc[key]
        else:
            doc[key] = draw(ORDER_FIELDS[key])
    return json.dumps(doc).encode()


def test_fuzz_demo_http_api(tmp_path: Path) -> None:
    from sagakit.examples.order_fulfillment.api import create_api
    from sagakit.examples.order_fulfillment.app import build

    loop = asyncio.new_event_loop()
    of = build(f"sqlite:///{tmp_path}/sagakit.db")
    loop.run_until_complete(of.start())

    async def setup() -> httpx.AsyncClient:
        await of.customers.add_customer("c-1", "Ada", 10_000_000)
        await of.inventory.add_product("KB-01", "keyboard", 1_000_000)
        transport = httpx.ASGITransport(app=create_api(of))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    client = loop.run_until_complete(setup())

    async def post(body: bytes) -> httpx.Response:
        return await client.post(
            "/orders", content=body, headers={"content-type": "application/json"}
        )

    def check(r: httpx.Response) -> None:
        assert r.status_code in (200, 202, 307, 404, 405, 413, 422), (r.status_code, r.text[:300])
        if r.status_code in (413, 422):  # (a 404 may be the router's own, for a path with no route)
            assert "error" in r.json()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(order_bodies(), st.text(max_size=60))
    def one(body: bytes, ident: str) -> None:
        check(loop.run_until_complete(post(body)))
        path = "/orders/" + urllib.parse.quote(ident, safe="")
        check(loop.run_until_complete(client.get(path)))
        check(loop.run_until_complete(client.get("/sagas/" + uuid.uuid4().hex)))

    try:
        one()
        r = loop.run_until_complete(post(json.dumps(GOOD).encode()))
        assert r.status_code == 202, r.text
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(of.stop())
        loop.close()
