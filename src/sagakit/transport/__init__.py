"""Transports move encoded envelopes between endpoints.

Every transport gives at-least-once delivery, acknowledgement after the
handler's transaction commits, competing consumers within a queue, and fan-out
of events to every queue bound to their topic. Choose one by URL with
:func:`open_transport`; show a URL only through :func:`redact`, which hides
its password.

Two small hooks let the database transport do better than "ack after commit"
without the layers above knowing which transport they run on:

- :meth:`Delivery.ack_in` acknowledges a delivery *inside* a transaction of the
  store that holds it (the database transport deletes its leased row there, so
  the acknowledgement commits with the business change); every other delivery
  answers ``False`` and is acknowledged after the commit.
- :meth:`Transport.direct_writer` gives a writer that puts outgoing messages
  straight onto the transport's queues inside a store transaction (the
  database transport on its own store); every other transport answers ``None``
  and messages go through the store's outbox and a relay (``sagakit.outbox``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigurationError
from ..messages import Kind
from ._url import redact

if TYPE_CHECKING:
    from ..store import Store, Tx

PING_TIMEOUT = 1.5  #: seconds a broker may take to answer :meth:`Transport.ping`


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An encoded message and where it goes: a queue, or a topic for events."""

    id: str
    kind: Kind
    destination: str
    data: bytes


class Delivery(Protocol):
    """One received message; settle it exactly once with ack or nack.

    ``attempt`` counts deliveries, a delivery lost with its process included.
    ``failures`` counts the runs of its handler that failed before this one,
    where the transport keeps that count apart (the database queue; None on
    the brokers, where the endpoint's store counts them instead): a retry
    policy spends its attempts on failures only, not on crashes of the
    workers that held the message.
    """

    data: bytes
    attempt: int
    failures: int | None

    async def ack(self) -> None: ...

    async def nack(self, delay: float, *, failed: bool = False) -> None:
        """Hand the message back, due after ``delay`` seconds; ``failed``: its handler
        failed (counted in ``failures`` where the transport keeps them)."""

    async def ack_in(self, store: Store, tx: Tx) -> bool:
        """Acknowledge inside ``tx`` if this delivery lives in ``store``.

        Returns False when it cannot (the caller acks after the commit).
        Raises :class:`~sagakit.errors.LeaseLost` if another consumer took the
        message over, so the transaction rolls back.
        """


def attempt_of(delivery: Delivery) -> int:
    """Which run of its handler this delivery is, for a retry policy: one more than its
    failed runs where the transport counts them, else its delivery count."""
    return delivery.attempt if delivery.failures is None else delivery.failures + 1


class Writer(Protocol):
    """Writes outgoing messages inside a store transaction."""

    async def write(self, tx: Tx, messages: Sequence[Outgoing]) -> None: ...


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    """A running consumer."""

    async def stop(self, grace: float = 10.0) -> None:
        """Take no new messages; give in-flight handlers ``grace`` seconds.

        Handlers still running after that are cancelled and their messages
        released at once (nack with no delay), so a restarted worker gets them
        without waiting out a lease.
        """


class Transport(Protocol):
    """What every transport provides."""

    url: str
    namespace: str
    """What every broker object of this transport is named under (see :meth:`remove_namespace`)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        """Create ``queue`` and bind it to receive events of ``topics``."""

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Send messages; returns once the transport holds them durably."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Subscription:
        """Run ``handler`` for each message of ``queue``, at most ``prefetch`` at once."""

    def direct_writer(self, store: Store) -> Writer | None:
        """A writer onto this transport's queues inside ``store``'s transactions, if any."""

    async def ping(self) -> None:
        """One cheap round trip to the broker; :class:`~sagakit.errors.TransportError`
        if it cannot be reached now (``/readyz`` asks this)."""

    async def remove_namespace(self, namespace: str) -> None:
        """Remove every broker object created under ``namespace``, by any process.

        ``namespace`` must be this transport's own (:attr:`namespace`): it is
        asked for by name so a call cannot remove the wrong deployment's
        objects by accident. Queues, exchanges, delay queues, streams,
        consumers, consumer groups and keys go, with the messages in them.
        Idempotent, and a no-op when nothing exists. Stops this transport's
        own subscriptions first; other processes should have stopped theirs.
        Afterwards close the transport (reopen it to use the namespace again).

        Raises :class:`~sagakit.errors.ForeignNamespace`, having removed
        nothing, for another namespace or an object shared with one;
        :class:`~sagakit.errors.TransportError` if the broker fails midway
        (call again: what is left is still found).
        """


# Broker URL schemes (TLS ones included) and the module of each.
BROKER_SCHEMES = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "nats": "nats",
    "tls": "nats",
    "redis": "redis",
    "rediss": "redis",
}


def open_transport(url: str, store: Store, **options: Any) -> Transport:
    """A transport for ``url``: ``database``, ``memory://``, ``amqp(s)://``,
    ``nats://`` (``tls://``) or ``redis(s)://``.

    Broker transports prefix every name they declare with the URL's
    ``namespace`` option (default ``sagakit``), so deployments sharing a
    broker stay apart.
    """
    scheme = url.split(":", 1)[0]
    if scheme in ("database", "db", ""):
        from .database import DatabaseTransport

        return DatabaseTransport(store, **options)
    if scheme == "memory":
        from .memory import MemoryTransport

        return MemoryTransport(**options)
    if scheme in BROKER_SCHEMES:
        import importlib

        mod = importlib.import_module(f"sagakit.transport.{BROKER_SCHEMES[scheme]}")
        return mod.transport(url, **options)  # type: ignore[no-any-return]
    raise ConfigurationError(f"unsupported transport URL {redact(url)!r}")


__all__ = [
    "BROKER_SCHEMES",
    "Delivery",
    "Handler",
    "Outgoing",
    "Subscription",
    "Transport",
    "Writer",
    "open_transport",
    "redact",
]
