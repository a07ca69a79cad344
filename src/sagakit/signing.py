"""Message authentication: envelopes signed with HMAC-SHA256 under deployment keys.

For deployments whose broker is shared with less trusted clients. With
``Settings(signing=SigningKeys.parse("k2:...,k1:..."))`` every envelope the
App encodes carries ``"auth":"<key id>:<signature>"`` as its last field, and
every envelope it decodes must carry a valid one: an unsigned or badly signed
message is dead-lettered with the reason (:class:`~sagakit.errors.BadSignature`)
and never applied.

The signature covers the exact bytes of the envelope before the ``auth``
field — id, type, kind, payload and every header — so verifying needs no
re-encoding. What it does not stop: a holder of the key (any process of the
deployment) can sign anything, and a valid message can be replayed (the inbox
answers a replay as a duplicate). See docs/security.md.

Rotation uses two active keys. The first key signs; every key verifies. Roll
out ``old,new`` (old signs, both verify), then ``new,old``, then ``new``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from .errors import BadSignature, ConfigurationError

ENV_VAR = "SAGAKIT_SIGNING_KEYS"
MIN_SECRET = 32
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_AUTH = re.compile(rb',"auth":"([A-Za-z0-9_.-]{1,64}):([A-Za-z0-9_-]{43})"\}\Z')


@dataclass(frozen=True, slots=True)
class SigningKeys:
    """The deployment's signing keys: ``(key id, secret)`` pairs, the signing key first."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.keys) <= 2:
            raise ConfigurationError("give one signing key, or two while rotating")
        for kid, secret in self.keys:
            if not _KID.match(kid):
                raise ConfigurationError(f"invalid signing key id {kid!r}")
            if len(secret) < MIN_SECRET:
                raise ConfigurationError(
                    f"signing key {kid!r} is too short: use at least {MIN_SECRET} bytes"
                )

    @classmethod
    def parse(cls, spec: str) -> SigningKeys:
        """``"kid:secret[,kid:secret]"``; the first key signs."""
        pairs = []
        for part in spec.split(","):
            kid, sep, secret = part.strip().partition(":")
            if not sep:
                raise ConfigurationError("signing keys look like 'kid:secret[,kid:secret]'")
            pairs.append((kid, secret.encode()))
        return cls(tuple(pairs))

    @classmethod
    def from_env(cls, var: str = ENV_VAR) -> SigningKeys | None:
        """The keys in environment variable ``var``, or None if it is unset."""
        spec = os.environ.get(var)
        return cls.parse(spec) if spec else None

    def sign(self, data: bytes) -> bytes:
        """Append the ``auth`` field to an encoded envelope (a JSON object)."""
        kid, secret = self.keys[0]
        sig = _mac(secret, data)
        return data[:-1] + b',"auth":"' + kid.encode() + b":" + sig + b'"}'

    def verify(self, data: bytes) -> None:
        """Check the ``auth`` field of an encoded envelope; :class:`BadSignature` if wrong."""
        m = _AUTH.search(data)
        if m is None:
            raise BadSignature("unsigned message (this deployment requires signatures)")
        kid, sig = m.group(1).decode(), m.group(2)
        secret = dict(self.keys).get(kid)
        if secret is None:
            raise BadSignature(f"signed with unknown key {kid!r}")
        if not hmac.compare_digest(_mac(secret, data[: m.start()] + b"}"), sig):
            raise BadSignature(f"bad signature (key {kid!r})")


def _mac(secret: bytes, data: bytes) -> bytes:
    digest = hmac.new(secret, data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=")
