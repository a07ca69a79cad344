"""What the transport contract's topic mixins share: hooks and a test handler.

The topic mixins (:mod:`.delivery`, :mod:`.redelivery`, :mod:`.fanout`,
:mod:`.lifecycle`, :mod:`.app_level`) build on :class:`TransportHooks`;
:class:`~sagakit.testing.TransportContract` composes them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import ClassVar, NoReturn

from ..messages import Kind, new_id
from ..store import Store, open_store
from ..transport import Delivery, Outgoing, Subscription, Transport
from ._support import eventually


class Deliveries:
    """Collects deliveries for the contract tests and settles them."""

    def __init__(self, *, settle: bool = True, hold: float = 0.0) -> None:
        self.got: list[tuple[bytes, int]] = []
        self.settle, self.hold = settle, hold
        self.running = 0
        self.max_running = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            self.got.append((delivery.data, delivery.attempt))
            if self.settle:
                await delivery.ack()
        finally:
            self.running -= 1

    def data(self) -> list[bytes]:
        return [d for d, _ in self.got]


def at_least(inbox: Deliveries, n: int) -> Callable[[], bool]:
    return lambda: len(inbox.data()) >= n


def out(kind: Kind, destination: str, data: bytes) -> Outgoing:
    return Outgoing(new_id(), kind, destination, data)


def skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


class TransportHooks:
    """The hooks of the transport contract, with their defaults.

    See :class:`~sagakit.testing.TransportContract` for what to override.
    """

    #: seconds to wait for something that must happen
    timeout: ClassVar[float] = 15.0
    #: seconds of quiet after which "nothing more arrived" is believed
    quiet: ClassVar[float] = 0.5

    # -- hooks -------------------------------------------------------------

    def new_queue(self) -> str:
        """A queue (or topic) name no other test uses."""
        return f"contract-{uuid.uuid4().hex[:12]}"

    async def open_peer(self, transport: Transport) -> Transport:
        """Another opened transport on the same broker; the test closes it."""
        return transport

    def app_store(self, transport: Transport) -> Store:
        """The store of the app in the app-level test."""
        return open_store("memory://")

    async def crash(self, transport: Transport, subscription: Subscription) -> None:
        """Make ``subscription`` vanish with its deliveries unsettled."""
        skip(f"{type(transport).__name__}: a consumer cannot die apart from its broker")

    async def cut_connection(self, transport: Transport) -> None:
        """Cut the connection under ``transport`` (or restart its broker)."""
        skip(f"{type(transport).__name__} has no connection to cut")

    async def close_peer(self, transport: Transport, peer: Transport) -> None:
        if peer is not transport:
            await peer.close()

    async def wait(self, check: Callable[[], bool], what: str) -> None:
        await eventually(check, self.timeout, what)

    async def settle_down(self) -> None:
        """Give stray (wrong) deliveries time to show up."""
        await asyncio.sleep(self.quiet)
