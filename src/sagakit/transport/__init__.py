"""Transports move encoded envelopes between endpoints.

Every transport gives at-least-once delivery, acknowledgement after the
handler's transaction commits, competing consumers within a queue, and fan-out
of events to every queue bound to their topic. Choose one by URL with
:func:`open_transport`.

The database transport is special: its queue lives in a :class:`Store`, so an
endpoint on that same store writes outgoing messages and acknowledges
deliveries inside its own local transaction (``local_store``). For any other
transport outgoing messages go through the store's outbox and a relay.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigurationError
from ..messages import Kind

if TYPE_CHECKING:
    from ..store import Store


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An encoded message and where it goes: a queue, or a topic for events."""

    id: str
    kind: Kind
    destination: str
    data: bytes


class Delivery(Protocol):
    """One received message; settle it exactly once with ack or nack."""

    data: bytes
    attempt: int

    async def ack(self) -> None: ...

    async def nack(self, delay: float) -> None: ...


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(Protocol):
    """A running consumer."""

    async def stop(self) -> None:
        """Take no new messages; wait for in-flight handlers to finish."""


class Transport(Protocol):
    """What every transport provides."""

    url: str
    local_store: Store | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, queue: str, topics: Sequence[str]) -> None:
        """Create ``queue`` and bind it to receive events of ``topics``."""

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Send messages; returns once the transport holds them durably."""

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Subscription:
        """Run ``handler`` for each message of ``queue``, at most ``prefetch`` at once."""


def open_transport(url: str, store: Store, **options: Any) -> Transport:
    """A transport for ``url``: ``database``, ``memory://``, ``amqp://``,
    ``nats://`` or ``redis://``."""
    scheme = url.split(":", 1)[0]
    if scheme in ("database", "db", ""):
        from .database import DatabaseTransport

        return DatabaseTransport(store, **options)
    if scheme == "memory":
        from .memory import MemoryTransport

        return MemoryTransport(**options)
    modules = {"amqp": "rabbitmq", "amqps": "rabbitmq", "nats": "nats", "redis": "redis"}
    if scheme in modules:
        import importlib

        mod = importlib.import_module(f"sagakit.transport.{modules[scheme]}")
        return mod.transport(url, **options)  # type: ignore[no-any-return]
    raise ConfigurationError(f"unsupported transport URL {url!r}")


__all__ = ["Delivery", "Handler", "Outgoing", "Subscription", "Transport", "open_transport"]
