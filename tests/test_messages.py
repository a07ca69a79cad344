import msgspec
import pytest

import sagakit as sk
from sagakit.messages import Codec, Headers, TypeRegistry, caused_by, new_id
from tests.helpers import DidIt, Do


def test_ids_are_time_ordered_and_unique() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 36 and i[14] == "7" for i in ids)


def test_round_trip_keeps_payload_and_headers() -> None:
    codec = Codec(TypeRegistry())
    env = codec.make(Do("k", 3), Headers(saga_id="s1", step="a", reply_to="q"))
    back = codec.decode(codec.encode(env))
    assert back.type == "test.Do" and back.kind == "command"
    assert back.headers.saga_id == "s1" and back.headers.reply_to == "q"
    assert codec.payload(back) == Do("k", 3)


def test_caused_messages_inherit_ids_and_trace() -> None:
    codec = Codec(TypeRegistry())
    parent = codec.make(Do("k"), Headers(correlation_id="c", traceparent="00-abc-def-01"))
    child = caused_by(parent, step="x")
    assert child.correlation_id == "c"
    assert child.causation_id == parent.id
    assert child.traceparent == "00-abc-def-01"


def test_duplicate_name_for_another_class_raises() -> None:
    reg = TypeRegistry()
    reg.add(Do)
    reg.add(Do)  # the same class again is fine

    @sk.command("test.Do")
    class Impostor(msgspec.Struct):
        pass

    with pytest.raises(sk.DuplicateRegistration, match=r"test\.Do"):
        reg.add(Impostor)


def test_undecorated_class_is_refused() -> None:
    class Plain(msgspec.Struct):
        pass

    with pytest.raises(sk.UnknownMessageType, match="decorate"):
        TypeRegistry().add(Plain)


def test_invalid_type_name_is_refused() -> None:
    with pytest.raises(sk.ConfigurationError):
        sk.command("has space")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json", sk.MalformedMessage),
        (b'{"id": 1}', sk.MalformedMessage),
        (b"[]", sk.MalformedMessage),
        (b"x" * 300_000, sk.OversizeMessage),
    ],
)
def test_bad_bytes_give_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        Codec(TypeRegistry()).decode(data)


def test_size_is_checked_before_decoding() -> None:
    codec = Codec(TypeRegistry(), max_size=100)
    with pytest.raises(sk.OversizeMessage):
        codec.decode(b"{" * 101)  # would be a decode error if parsed first


def test_schema_mismatch_and_unknown_type() -> None:
    reg = TypeRegistry()
    reg.add(Do)
    codec = Codec(reg)
    env = codec.make(DidIt(1), Headers())
    env.type = "test.Do"  # payload {"value": 1} is not a Do
    with pytest.raises(sk.SchemaMismatch):
        codec.payload(env)
    env.type = "nobody.Knows"
    with pytest.raises(sk.UnknownMessageType):
        codec.payload(env)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    """Ids from a parent and its forked child never repeat each other's random bits."""
    import os

    from sagakit.messages import new_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write 500 ids and leave
        os.write(write, "\n".join(new_id() for _ in range(500)).encode())
        os._exit(0)
    os.close(write)
    mine = [new_id() for _ in range(500)]
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        theirs = f.read().split("\n")
    assert len(theirs) == 500
    assert not {i[19:] for i in mine} & {i[19:] for i in theirs}
