"""Signed messages: a forged or unsigned message is dead-lettered and never applied.

The broker test is the threat the feature exists for: a plain client on the
same RabbitMQ virtual host publishes a forged pivot reply and a forged
command straight into the deployment's queues.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

import sagakit as sk
from sagakit.errors import BadSignature, ConfigurationError
from sagakit.messages import Codec, Headers, TypeRegistry
from sagakit.signing import SigningKeys
from sagakit.testing import drop_tables
from sagakit.transport import Outgoing
from tests.helpers import Do, eventually
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures

pytestmark = pytest.mark.timeout(120)

KEY_NEW = "k2:" + "n" * 40
KEY_OLD = "k1:" + "o" * 40


def _codec(spec: str | None) -> Codec:
    return Codec(TypeRegistry(), signing=SigningKeys.parse(spec) if spec else None)


def _signed(spec: str) -> bytes:
    codec = _codec(spec)
    return codec.encode(codec.make(Do("k"), Headers(saga_id="s")))


def test_a_signed_envelope_verifies_and_any_change_breaks_it() -> None:
    codec, data = _codec(KEY_NEW), _signed(KEY_NEW)
    assert codec.decode(data).headers.saga_id == "s"
    for tampered in (data.replace(b'"s"', b'"t"'), data.replace(b'"k"', b'"x"')):
        with pytest.raises(BadSignature, match="bad signature"):
            codec.decode(tampered)


def test_unsigned_and_unknown_keys_are_refused() -> None:
    codec = _codec(KEY_NEW)
    with pytest.raises(BadSignature, match="unsigned"):
        codec.decode(_codec(None).encode(codec.make(Do("k"), Headers())))
    with pytest.raises(BadSignature, match="unknown key 'k1'"):
        codec.decode(_signed(KEY_OLD))


def test_rotation_verifies_both_keys_and_signs_with_the_first() -> None:
    rotating = _codec(f"{KEY_NEW},{KEY_OLD}")
    assert rotating.decode(_signed(KEY_OLD)).type == "test.Do"
    assert _codec(KEY_NEW).decode(rotating.encode(rotating.make(Do("k"), Headers())))


def test_a_stored_envelope_is_signed_anew_when_sent_on() -> None:
    old, new = _codec(KEY_OLD), _codec(KEY_NEW)
    env = old.decode(_signed(KEY_OLD))
    assert env.auth is not None
    assert new.decode(new.encode(env)).id == env.id


def test_bad_keys_are_configuration_errors() -> None:
    for spec in ("k1", "k1:short", f"{KEY_NEW},{KEY_OLD},k3:{'x' * 40}", "bad id:" + "x" * 40):
        with pytest.raises(ConfigurationError):
            SigningKeys.parse(spec)


# -- a deployment that signs, and a forger on its broker ----------------------------


@sk.command("sign.Charge")
class Charge(msgspec.Struct):
    order: str


class Order(msgspec.Struct):
    order: str


def _build(
    store: str, transport: str, prefix: str, run: list[str], charged: list[str]
) -> tuple[sk.App, sk.SagaDefinition[Order]]:
    saga = (
        sk.Saga("signed", Order)
        .step("hold")
        .invoke("stock", lambda d: Do(d.order))
        .step("charge")
        .invoke("payments", lambda d: Charge(d.order))
        .pivot()
        .build()
    )
    settings = sk.Settings(
        prefix=prefix, max_poll=0.02, signing=SigningKeys.parse(f"{KEY_NEW},{KEY_OLD}")
    )
    app = sk.App(store, transport, settings=settings, run=run)
    app.saga(saga)

    @app.participant("stock").command(Do)
    async def hold(cmd: Do, ctx: sk.Context) -> None:
        pass

    @app.participant("payments").command(Charge)
    async def charge(cmd: Charge, ctx: sk.Context) -> None:
        ctx.db.on_commit(lambda: charged.append(cmd.order))

    return app, saga


@pytest.fixture(params=["sqlite", "rabbitmq"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db", "database"
    return request.getfixturevalue("postgres_url"), request.getfixturevalue("amqp_url")


async def test_forged_messages_are_dead_lettered_and_never_applied(
    urls: tuple[str, str], prefix: str
) -> None:
    """The stock service is down, so the saga waits on it; a forger acts meanwhile."""
    charged: list[str] = []
    app, saga = _build(*urls, prefix, ["coordinator", "payments"], charged)
    async with app:
        saga_id = await app.sagas.start(saga, Order("o1"))
        await eventually(lambda: _logged(app, saga_id, "command-sent"))
        await _forge(app, saga_id)
        await eventually(lambda: _dead(app, 2), timeout=30)
        dead = await app.store.dead_letters()
        assert sorted(d.reason.split(":", 1)[1].strip() for d in dead) == [
            "signed with unknown key 'k9'",
            "unsigned message (this deployment requires signatures)",
        ]
        assert {d.error_type for d in dead} == {"BadSignature"}
        assert (await app.sagas.get(saga_id)).state == "running", "the forged reply did nothing"
        assert charged == [], "the forged charge did nothing"
        stock, _ = _build(*urls, prefix, ["stock"], charged)
        async with stock:  # the stock service comes back: the real reply counts
            view = await app.sagas.wait(saga_id, timeout=30)
        assert view.state == sk.SagaState.COMPLETED and charged == ["o1"]
        if app.store.dialect == "postgresql":
            await drop_tables(app.store)


async def _forge(app: sk.App, saga_id: str) -> None:
    """Publish a reply signed with a key the deployment doesn't have, and an unsigned charge."""
    cmd = next(e for e in (await app.sagas.get(saga_id)).history if e.entry == "command-sent")
    forger = Codec(TypeRegistry(), signing=SigningKeys.parse("k9:" + "f" * 40))
    unsigned = Codec(TypeRegistry())
    headers = Headers(
        saga_id=saga_id, step="hold", causation_id=cmd.message_id, outcome="success", sender="stock"
    )
    reply = forger.make(sk.Done(), headers, kind="reply")
    charge = unsigned.make(Charge("o1"), Headers(saga_id=saga_id, step="charge"))
    await app.transport.publish(
        [
            Outgoing(reply.id, "reply", "sagakit.coordinator", forger.encode(reply)),
            Outgoing(charge.id, "command", "payments", unsigned.encode(charge)),
        ]
    )


async def _logged(app: sk.App, saga_id: str, entry: str) -> bool:
    return any(e.entry == entry for e in (await app.sagas.get(saga_id)).history)


async def _dead(app: sk.App, n: int) -> bool:
    return len(await app.store.dead_letters()) >= n
