"""NATS JetStream naming and small helpers: subjects, consumer names, streams, TLS, attempts.

Kept apart from :mod:`sagakit.transport.nats` so the transport module holds
only the transport; everything here is pure and has no connection.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import string
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError

MAX_CONSUMER_NAME = 200
TLS_OPTIONS = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_hostname")

KEEP = frozenset(string.ascii_letters + string.digits + "_-")  #: characters kept as they are


def escape(name: str) -> str:
    """``name`` as one subject token / consumer-name part: ``[A-Za-z0-9_-]`` and ``~XX``."""
    if not name:
        raise ConfigurationError("empty queue or topic name")
    return "".join(c if c in KEEP else "".join(f"~{b:02X}" for b in c.encode()) for c in name)


def subject_tokens(name: str) -> str:
    """``name`` as subject tokens: dots stay levels, other characters are escaped."""
    parts = name.split(".")
    if not all(parts):
        raise ConfigurationError(f"invalid queue or topic name {name!r}: empty segment")
    return ".".join(escape(p) for p in parts)


def consumer_name(queue: str, topic: str | None = None) -> str:
    """The durable consumer of ``queue`` for its commands, or for events of ``topic``.

    ``~~`` never occurs in an escaped name, so it separates queue and topic
    unambiguously; very long names are shortened with a hash of the full name.
    """
    name = escape(queue) if topic is None else f"{escape(queue)}~~{escape(topic)}"
    if len(name) > MAX_CONSUMER_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[: MAX_CONSUMER_NAME - 19]}~~~{digest}"
    return name


def stream_for(namespace: str) -> str:
    """The default stream of a namespace: ``sagakit`` -> ``SAGAKIT``, ``a.b`` -> ``A_B``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", namespace).upper()


def tls_context(servers: Sequence[str], options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context for ``tls://`` servers or ``tls_*`` options (None: plain TCP).

    Built at construction, so a missing certificate file fails at start-up.
    """
    wanted = any(s.startswith("tls://") for s in servers)
    if not wanted and not any(options[name] for name in TLS_OPTIONS):
        return None
    try:
        context = ssl.create_default_context(cafile=options["tls_ca_file"])
        if options["tls_cert_file"]:
            context.load_cert_chain(options["tls_cert_file"], options["tls_key_file"])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"NATS TLS options: {exc}") from None
    return context


_ATTEMPTS_KEPT = 10_000  # bounded memory for Attempts


class Attempts:
    """The highest delivery count seen per (consumer, stream sequence).

    nats-server before 2.10 can send a redelivery that meets only expired
    pull requests as if it were a first delivery (``num_delivered`` 1), which
    would reset a message's attempt count and so its retry budget.
    """

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, int], int] = OrderedDict()

    def of(self, key: tuple[str, int] | None, reported: int) -> int:
        """The server's delivery count, but never lower than one this process saw."""
        if key is None:
            return reported
        attempt = max(reported, self._seen.pop(key, 0) + 1)
        self._seen[key] = attempt
        if len(self._seen) > _ATTEMPTS_KEPT:
            self._seen.popitem(last=False)
        return attempt

    def forget(self, key: tuple[str, int] | None) -> None:
        """The message was acknowledged: it will not come back."""
        if key is not None:
            self._seen.pop(key, None)
