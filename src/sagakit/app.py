"""The App: one store, one transport, participants and sagas, and the workers.

::

    app = App("sqlite:///orders.db")            # database transport by default
    customers = app.participant("customers")
    app.saga(create_order)
    async with app:                             # migrate, declare, consume
        saga_id = await app.sagas.start(create_order, data)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .coordinator import COORDINATOR_QUEUE, LOCAL_QUEUE, TIMER_QUEUE, Coordinator
from .endpoint import Endpoint, Route
from .errors import DuplicateRegistration
from .messages import DEFAULT_MAX_SIZE, Codec, Envelope, TypeRegistry
from .participant import Participant
from .policies import RetryPolicy
from .relay import Relay
from .saga import SagaDefinition
from .store import Store, open_store
from .transport import Subscription, Transport, open_transport
from .transport.database import QueueConsumer

log = logging.getLogger("sagakit.app")

COORDINATOR = "coordinator"


@dataclass(frozen=True, slots=True)
class Settings:
    """Tuning for an App; the defaults suit most deployments."""

    prefetch: int = 32
    lease: float = 30.0
    max_poll: float = 0.25
    max_message_size: int = DEFAULT_MAX_SIZE
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    auto_migrate: bool = True
    prefix: str = "sagakit_"
    shutdown_grace: float = 10.0


class App:
    """Wires a store and a transport to participants and sagas; runs the workers."""

    def __init__(
        self,
        store: str | Store = "sqlite:///.sagakit/sagakit.db",
        transport: str | Transport = "database",
        *,
        settings: Settings | None = None,
        clock: Clock | None = None,
        run: Iterable[str] | None = None,
    ) -> None:
        self.settings = s = settings or Settings()
        self.store = (
            store if isinstance(store, Store) else open_store(store, prefix=s.prefix, clock=clock)
        )
        self.transport = (
            transport
            if not isinstance(transport, str)
            else open_transport(transport, self.store, **_transport_options(transport, s))
        )
        self.registry = TypeRegistry()
        self.codec = Codec(self.registry, s.max_message_size)
        self.sagas = Coordinator(self.store)
        self.participants: dict[str, Participant] = {}
        self._pstores: dict[str, Store] = {}
        self._run = set(run) if run is not None else None
        self._subs: list[Subscription] = []
        self._relays: list[Relay] = []
        self._started = False

    # -- wiring --------------------------------------------------------------

    def participant(self, name: str, *, store: str | Store | None = None) -> Participant:
        """A named participant; ``store`` gives it a database of its own."""
        if name in self.participants or name.startswith("sagakit."):
            raise DuplicateRegistration(f"participant {name!r} already exists (or is reserved)")
        p = self.participants[name] = Participant(name)
        if store is not None:
            self._pstores[name] = (
                store
                if isinstance(store, Store)
                else open_store(store, prefix=self.settings.prefix, clock=self.store.clock)
            )
        return p

    def saga(self, definition: SagaDefinition[Any]) -> SagaDefinition[Any]:
        """Register a saga definition (each name and version once)."""
        self.sagas.register(definition)
        for step in definition.steps:
            for cls, _ in step.on_reply.values():
                self.registry.add(cls)
        return definition

    def store_of(self, participant: str) -> Store:
        """The store a participant's handlers run in."""
        return self._pstores.get(participant, self.store)

    def runs(self, name: str) -> bool:
        return self._run is None or name in self._run

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open stores and transport, declare queues, start consumers and relays."""
        if self._started:
            return
        self._started = True
        migrate = self.settings.auto_migrate
        for store in self._stores():
            await store.open(migrate=migrate)
        await self.transport.open()
        self._register_types()
        self.sagas.endpoint = self._endpoint(COORDINATOR_QUEUE, self.store, self._route_reply)
        await self._declare()
        await self._start_participants()
        if self.runs(COORDINATOR) and self.sagas.definitions:
            await self._start_coordinator()
        self._start_relays()

    async def stop(self) -> None:
        """Stop taking messages, finish in-flight ones, then close everything."""
        if not self._started:
            return
        self._started = False
        grace = self.settings.shutdown_grace
        await asyncio.gather(*(_stop(s, grace) for s in self._subs), return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self._relays), return_exceptions=True)
        self._subs.clear()
        self._relays.clear()
        await self.transport.close()
        for store in self._stores():
            await store.close()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def run_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with self:
            await stop.wait()
        log.info("stopped cleanly")

    # -- internals -----------------------------------------------------------

    def _stores(self) -> list[Store]:
        unique: dict[int, Store] = {id(self.store): self.store}
        for st in self._pstores.values():
            unique[id(st)] = st
        return list(unique.values())

    def _register_types(self) -> None:
        for p in self.participants.values():
            for cls in p.types:
                self.registry.add(cls)

    def _endpoint(self, name: str, store: Store, router: Any) -> Endpoint:
        return Endpoint(name, store, self.transport, self.codec, router, retry=self.settings.retry)

    async def _declare(self) -> None:
        for name, p in self.participants.items():
            await self.transport.declare(name, list(p.events))
        await self.transport.declare(COORDINATOR_QUEUE, [])

    async def _start_participants(self) -> None:
        for name, p in self.participants.items():
            if self.runs(name):
                ep = self._endpoint(name, self.store_of(name), p.route)
                await self._consume(self.transport, name, ep)

    async def _start_coordinator(self) -> None:
        coord = self.sagas
        await self._consume(self.transport, COORDINATOR_QUEUE, coord.ep)
        timers = self._endpoint(TIMER_QUEUE, self.store, lambda env: coord.on_timer)
        self._subs.append(self._store_consumer(TIMER_QUEUE, timers.handle))
        local = self._endpoint(LOCAL_QUEUE, self.store, self._route_reply)
        self._subs.append(self._store_consumer(LOCAL_QUEUE, lambda d: coord.run_local(d, local)))

    def _store_consumer(self, queue: str, handler: Any) -> QueueConsumer:
        s = self.settings
        return QueueConsumer(
            self.store, queue, handler, prefetch=s.prefetch, lease=s.lease, max_poll=s.max_poll
        )

    async def _consume(self, transport: Transport, queue: str, ep: Endpoint) -> None:
        sub = await transport.consume(queue, ep.handle, prefetch=self.settings.prefetch)
        self._subs.append(sub)

    def _route_reply(self, env: Envelope) -> Route | None:
        return self.sagas.on_reply if env.kind == "reply" else None

    def _start_relays(self) -> None:
        for store in self._stores():
            if self.transport.local_store is not store:
                relay = Relay(
                    store,
                    self.transport,
                    lease=self.settings.lease,
                    max_poll=self.settings.max_poll,
                )
                relay.start()
                self._relays.append(relay)


async def _stop(sub: Subscription, grace: float) -> None:
    """Stop a consumer, cancelling it if its handlers outlast the grace period."""
    if isinstance(sub, QueueConsumer):
        return await sub.stop(grace)
    try:
        await asyncio.wait_for(sub.stop(), grace + 1.0)
    except TimeoutError:
        log.warning("a consumer did not stop within %.1fs; abandoning it", grace)


def _transport_options(url: str, s: Settings) -> dict[str, Any]:
    """Settings a transport understands; options in the URL's query win."""
    scheme = url.split(":", 1)[0]
    if scheme in ("database", "db", ""):
        return {"lease": s.lease, "max_poll": s.max_poll}
    if scheme in ("nats", "redis") and "lease=" not in url and "ack_wait=" not in url:
        return {"lease": s.lease}
    return {}
