"""Messages: the three kinds, their envelope, the type registry and the codec.

A message type is a msgspec ``Struct`` (or a dataclass) registered under a
stable name with :func:`command`, :func:`event` or :func:`reply`. The
:class:`Envelope` carries the payload as raw JSON plus the headers that tie a
message to its business transaction. Decoding is strict and size-limited; no
pickle anywhere.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec

from .errors import (
    ConfigurationError,
    DuplicateRegistration,
    MalformedMessage,
    OversizeMessage,
    SchemaMismatch,
    UnknownMessageType,
)

if TYPE_CHECKING:
    from .signing import SigningKeys

Kind = Literal["command", "event", "reply"]
T = TypeVar("T")

DEFAULT_MAX_SIZE = 256 * 1024
MAX_ATTEMPT = 2**31 - 1
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,199}$")
_last_ms = 0
_seq = 0
# The random bits of an id only need to be unique, not secret: a generator
# seeded from the OS (and reseeded in a forked child, so parent and child never
# share a sequence) costs a fraction of a system call per id.
_rng = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


def new_id() -> str:
    """A time-ordered UUID (version 7 layout) as a 36-character string."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms, _seq = _last_ms, (_seq + 1) & 0xFFF
    else:
        _seq = 0
    _last_ms = ms
    rand = _rng.getrandbits(62)
    value = (ms << 80) | (0x7 << 76) | (_seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """The durable identity of a message type: its registered name and kind."""

    name: str
    kind: Kind


def _register_as(name: str, kind: Kind) -> Callable[[type[T]], type[T]]:
    if not _NAME.match(name):
        raise ConfigurationError(f"invalid message type name {name!r}")

    def decorate(cls: type[T]) -> type[T]:
        cls.__sagakit_message__ = MessageSpec(name, kind)  # type: ignore[attr-defined]
        return cls

    return decorate


def command(name: str) -> Callable[[type[T]], type[T]]:
    """Declare a class as a command type with a stable name."""
    return _register_as(name, "command")


def event(name: str) -> Callable[[type[T]], type[T]]:
    """Declare a class as an event type with a stable name."""
    return _register_as(name, "event")


def reply(name: str) -> Callable[[type[T]], type[T]]:
    """Declare a class as a success-reply type with a stable name."""
    return _register_as(name, "reply")


def spec_of(cls: type[Any]) -> MessageSpec:
    """The registered name and kind of a message class."""
    spec = getattr(cls, "__sagakit_message__", None)
    if not isinstance(spec, MessageSpec):
        raise UnknownMessageType(
            f"{cls.__qualname__} is not a message type: decorate it with "
            "@sagakit.command/event/reply('service.Name')"
        )
    return spec


@reply("sagakit.Done")
class Done(msgspec.Struct, frozen=True):
    """The reply sent when a command handler returns ``None``."""


@reply("sagakit.Failure")
class Failure(msgspec.Struct, frozen=True):
    """The payload of every failure reply."""

    code: str
    message: str
    technical: bool = False


class Headers(msgspec.Struct, omit_defaults=True):
    """Envelope headers; ids and trace context propagate to caused messages."""

    correlation_id: str | None = None
    causation_id: str | None = None
    saga_id: str | None = None
    saga_type: str | None = None
    step: str | None = None
    phase: str | None = None
    reply_to: str | None = None
    #: the endpoint that sent a reply; the coordinator checks it is the one asked
    sender: str | None = None
    outcome: str | None = None
    #: bounded so that a stored attempt always fits a database integer column
    attempt: Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPT)] = 1
    traceparent: str | None = None
    created_at: float = 0.0
    extra: dict[str, str] = {}


class Envelope(msgspec.Struct, omit_defaults=True):
    """A message on the wire: id, type name, kind, raw JSON payload, headers."""

    id: str
    type: str
    kind: Kind
    payload: msgspec.Raw
    headers: Headers
    #: ``key id:signature`` when the deployment signs its messages (always last)
    auth: str | None = None

    @property
    def failed(self) -> bool:
        """True for a failure reply."""
        return self.kind == "reply" and self.headers.outcome == "failure"


class TypeRegistry:
    """Maps stable names to message classes; one per App, never global."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Any]] = {}
        self.add(Done)
        self.add(Failure)

    def add(self, cls: type[Any]) -> MessageSpec:
        """Register ``cls``; a different class under a taken name raises."""
        spec = spec_of(cls)
        known = self._by_name.get(spec.name)
        if known is not None and known is not cls:
            raise DuplicateRegistration(
                f"message type name {spec.name!r} is already registered to "
                f"{known.__module__}.{known.__qualname__}"
            )
        self._by_name[spec.name] = cls
        return spec

    def get(self, name: str) -> type[Any]:
        """The class registered under ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownMessageType(f"unknown message type {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name


_envelope_decoder = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()


def peek(data: bytes) -> Envelope | None:
    """The envelope in bytes this deployment stored (an outbox row, a dead letter), or None.

    No size or signature check: it only reads what a stored message says about
    itself (its kind, its saga) to file or route it, never to act on it.
    """
    try:
        return _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None


class Codec:
    """Strict JSON codec with a size limit checked before any decoding.

    With ``signing`` every envelope is signed on encoding and must carry a
    valid signature to decode (:mod:`sagakit.signing`).
    """

    def __init__(
        self,
        registry: TypeRegistry,
        max_size: int = DEFAULT_MAX_SIZE,
        signing: SigningKeys | None = None,
    ) -> None:
        self.registry = registry
        self.max_size = max_size
        self.signing = signing
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    def encode(self, envelope: Envelope) -> bytes:
        """Serialise (and sign) an envelope, refusing one over the size limit."""
        if envelope.auth is not None:  # a decoded envelope sent on: sign it anew
            envelope = msgspec.structs.replace(envelope, auth=None)
        data = _encoder.encode(envelope)
        if self.signing is not None:
            data = self.signing.sign(data)
        self._check_size(data)
        return data

    def decode(self, data: bytes, *, trusted: bool = False) -> Envelope:
        """Parse an envelope (not its payload); typed errors on bad input.

        ``trusted`` skips the signature check for bytes this deployment wrote
        to its own store (a stored reply, a durable timer), which may have been
        signed with a key retired since.
        """
        self._check_size(data)
        if self.signing is not None and not trusted:
            self.signing.verify(data)
        try:
            return _envelope_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError
            raise MalformedMessage(f"not a valid envelope: {exc}") from None

    def payload(self, envelope: Envelope, cls: type[T] | None = None) -> T:
        """Decode the payload into its registered (or the given) class."""
        target = cls or self.registry.get(envelope.type)
        decoder = self._decoders.get(target)
        if decoder is None:
            decoder = self._decoders[target] = msgspec.json.Decoder(target)
        try:
            return decoder.decode(envelope.payload)  # type: ignore[no-any-return]
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise SchemaMismatch(
                f"payload of {envelope.type!r} does not match its schema: {exc}",
                saga_id=envelope.headers.saga_id,
                step=envelope.headers.step,
            ) from None

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.max_size:
            raise OversizeMessage(f"message of {len(data)} bytes exceeds limit of {self.max_size}")

    def make(
        self, payload: Any, headers: Headers, *, kind: Kind | None = None, id: str | None = None
    ) -> Envelope:
        """Wrap a registered payload object in an envelope (a fresh id unless given)."""
        spec = self.registry.add(type(payload))
        raw = msgspec.Raw(_encoder.encode(payload))
        headers.created_at = headers.created_at or time.time()
        return Envelope(id or new_id(), spec.name, kind or spec.kind, raw, headers)

    def reply(self, to: Envelope, payload: Any, *, outcome: str, sender: str) -> Envelope:
        """The reply of endpoint ``sender`` to the command ``to``."""
        return self.make(payload, reply_headers(to, outcome, sender), kind="reply")


def caused_by(parent: Envelope | None, **fields: Any) -> Headers:
    """Headers for a message caused by ``parent``: ids and trace propagate."""
    if parent is None:
        return Headers(**fields)
    h = parent.headers
    base: dict[str, Any] = {
        "correlation_id": h.correlation_id or parent.id,
        "causation_id": parent.id,
        "traceparent": h.traceparent,
        "saga_id": h.saga_id,
        "saga_type": h.saga_type,
    }
    base.update(fields)
    return Headers(**base)


def reply_headers(to: Envelope, outcome: str | None, sender: str) -> Headers:
    """Headers of a reply to ``to``: its step, phase and attempt, and who answers."""
    h = to.headers
    return caused_by(
        to, step=h.step, phase=h.phase, outcome=outcome, attempt=h.attempt, sender=sender
    )


def encode_json(value: Any) -> bytes:
    """JSON-encode a value (saga data, log details)."""
    return _encoder.encode(value)
