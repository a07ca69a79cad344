"""The App: one store, one transport, participants and sagas, and the workers.

::

    app = App("sqlite:///orders.db")            # database transport by default
    customers = app.participant("customers")
    app.saga(create_order)
    async with app:                             # migrate, declare, consume
        saga_id = await app.sagas.start(create_order, data)
        view = await app.sagas.wait(saga_id)

Everything is wired when the App is built: the codec, one outbox writer per
store (straight onto the database transport's queues, or into the store's
outbox for a relay), the saga coordinator. ``start()`` opens the stores and
the transport and starts the consumers this process runs (``run=``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .choreography import ChoreographyDefinition, Flows
from .clock import Clock
from .console.dead_letters import DeadLetterAuditLog
from .endpoint import HopPolicy
from .errors import ConfigurationError, DuplicateRegistration, MissingCorrelation
from .locks import Reservations
from .messages import DEFAULT_MAX_SIZE, Codec, TypeRegistry, new_id, spec_of
from .observe.hooks import BASE, Hooks
from .ops.dead_letters import DeadLetters
from .ops.retention import Retention
from .outbox import OutboxWriter
from .participant import Context, Participant, conversation
from .policies import RetryPolicy
from .process import Processes, ProcessManager
from .process.runtime import ProcessTimer
from .saga import Sagas
from .saga.awaits import AWAITS, Awaits
from .saga.coordinator import Coordinator
from .saga.definition import SagaDefinition
from .saga.registry import SagaRegistry
from .signing import SigningKeys
from .store import Store, open_store
from .transport import BROKER_SCHEMES, Transport, open_transport
from .transport._url import has_option
from .twophase import Atomic, Resource, TwoPhase, TwoPhaseOptions
from .workers import COORDINATOR as COORDINATOR  # the coordinator's service name
from .workers import Workers

log = logging.getLogger("sagakit.app")

D = TypeVar("D")


@dataclass(frozen=True, slots=True)
class Settings:
    """Tuning for an App; the defaults suit most deployments (every field is
    described in the settings reference).

    ``prefetch``: messages a consumer holds at once, per queue. ``max_poll``:
    the longest a database-queue consumer or a relay sleeps when nothing woke
    it (on PostgreSQL: the interval of one look per store for due rows).
    ``max_message_size``: the largest encoded message accepted (bytes).
    ``retry``: how a handler's technical failure is retried.
    ``auto_migrate``: create or upgrade sagakit's tables at start.
    ``prefix``: the start of every table name (apps sharing a database).
    ``shutdown_grace``: how long in-flight handlers may finish at stop.
    ``lease``: how long a claimed database-queue message stays hidden from
    other consumers; a running handler's lease is extended every third of it.
    ``handler_timeout``: one run of a handler longer than this is cancelled
    and retried (None: no limit; a handler may set its own). ``max_deliveries``:
    a message delivered more often than this (its handler keeps crashing the
    process or never finishes) is dead-lettered. ``namespace``: the start of
    every name a broker transport declares, so applications sharing a broker
    never take each other's messages (None: the URL's ``namespace`` option,
    else ``sagakit``; the database transport is kept apart by ``prefix``).
    ``retention``: how long finished sagas, inbox rows and dead letters are
    kept; processes running the coordinator prune the rest (None: keep
    everything; see :mod:`sagakit.ops.retention` and ``Retention.recommended()``).
    ``stuck_after``: a running or compensating saga unchanged this long is
    logged once at WARNING by a coordinator process (None: not watched).
    """

    prefetch: int = 32
    lease: float = 30.0
    max_poll: float = 0.25
    max_message_size: int = DEFAULT_MAX_SIZE
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    handler_timeout: float | None = 60.0
    max_deliveries: int = 25
    #: a message for a saga version unknown here goes back to the queue this long
    version_grace: float = 300.0
    #: a store or broker outage is waited out this long before messages fail
    outage_patience: float = 600.0
    auto_migrate: bool = True
    prefix: str = "sagakit_"
    shutdown_grace: float = 10.0
    namespace: str | None = None
    #: sign every message and require signatures (None: off; see sagakit.signing)
    signing: SigningKeys | None = None
    retention: Retention | None = None
    stuck_after: float | None = None
    #: atomic groups (two-phase commit): this process's node, concurrency, recovery
    twophase: TwoPhaseOptions = field(default_factory=TwoPhaseOptions)

    def __post_init__(self) -> None:
        if self.retention is not None:
            self.retention.check(self.redelivery_window)
        if self.stuck_after is not None and self.stuck_after <= 0:
            raise ConfigurationError(f"stuck_after must be positive, got {self.stuck_after}")

    #: an outbox row that fails to publish on its own this often is dead-lettered
    relay_max_failures: int = 10

    @property
    def hop(self) -> HopPolicy:
        return HopPolicy(self.retry, self.handler_timeout, self.max_deliveries, self.version_grace)

    @property
    def redelivery_window(self) -> float:
        """The longest a copy of a handled message may still arrive, in seconds.

        Each of ``max_deliveries`` deliveries may last the lease (or the
        handler timeout, if longer) and wait out a retry delay; a message for
        an unknown saga version is handed back for ``version_grace`` on top.
        An inbox row must outlive this, or a late copy could run twice.
        """
        r = self.retry
        per_delivery = max(self.lease, self.handler_timeout or 0.0) + r.max_delay * (1 + r.jitter)
        return self.max_deliveries * per_delivery + self.version_grace


class App:
    """Wires a store and a transport to participants and sagas; runs the workers.

    ``App(store="sqlite:///.sagakit/sagakit.db", transport="database", *,
    settings=None, clock=None, run=None)``: ``store`` and ``transport`` are
    URLs (or objects), ``settings`` a :class:`Settings`, ``clock`` a
    :class:`~sagakit.FakeClock` in tests, ``run`` the services this process
    runs (None: all; the coordinator is ``"coordinator"``).

    Attributes:
        sagas: :class:`~sagakit.Sagas` — start, wait for, get, list and count
            saga instances; the operator actions (retry, skip, compensate,
            abort, resume, edit).
        dead_letters: list, replay and purge the main store's dead letters.
        flows: tracked choreographies and the queries on their flows.
        processes: process managers and stateless sagas.
        twophase: atomic groups over registered resources (two-phase commit).
        awaits: the endpoint behind the sagas' ``wait_for`` steps.
        participants: the participants by name.
        settings: the :class:`Settings` in force.
        store: the App's own :class:`~sagakit.Store` (sagas, queues, timers).
        transport: the :class:`~sagakit.Transport` messages travel on.
        registry: the message types this App knows, by name.
        codec: encodes and decodes envelopes (size limit, signatures).
        hooks: what the engine tells observers (see :meth:`instrument`).
        workers: the consumers, relays and housekeeping jobs this process
            runs, set going by :meth:`start` and wound down by :meth:`stop`.
    """

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
        self.store = store if isinstance(store, Store) else self._open(store, clock)
        self.transport = (
            transport
            if not isinstance(transport, str)
            else open_transport(transport, self.store, **_transport_options(transport, s))
        )
        self.registry = TypeRegistry()
        #: what the engine tells observers (see :meth:`instrument`)
        self.hooks: Hooks = BASE
        self.codec = Codec(self.registry, s.max_message_size, s.signing)
        self._writers: dict[int, OutboxWriter] = {}
        coordinator = Coordinator(SagaRegistry(), self.writer_for(self.store), s.retry)
        self.sagas = Sagas(coordinator.registry, coordinator)
        #: the endpoint behind the sagas' wait_for steps
        self.awaits = Awaits(self.store)
        #: process managers and stateless sagas (sagakit.process)
        self.processes = Processes(self.writer_for(self.store), coordinator)
        #: list, replay and purge the main store's dead letters
        self.dead_letters = DeadLetters(
            self.store, self.transport, audit=DeadLetterAuditLog(self.store)
        )
        #: atomic groups over registered resources (two-phase commit)
        self.twophase = TwoPhase(self.store, s.twophase)
        coordinator.twophase = self.twophase
        self.participants: dict[str, Participant] = {}
        #: tracked choreographies and the queries on their flows
        self.flows = Flows(self.store)
        self._pstores: dict[str, Store] = {}
        self._run = set(run) if run is not None else None
        #: the consumers, relays and jobs this process runs (set going by start())
        self.workers = Workers(self)
        self._started = False

    # -- wiring --------------------------------------------------------------

    def participant(self, name: str, *, store: str | Store | None = None) -> Participant:
        """A named participant; ``store`` gives it a database of its own."""
        taken = name in self.participants or name in self.processes.runtimes
        if taken or name.startswith("sagakit."):
            raise DuplicateRegistration(f"participant {name!r} already exists (or is reserved)")
        p = self.participants[name] = Participant(name)
        if store is not None:
            own = store if isinstance(store, Store) else self._open(store, self.store.clock)
            self._pstores[name] = own
            self.writer_for(own)
        return p

    def saga(self, definition: SagaDefinition[D]) -> SagaDefinition[D]:
        """Register a saga definition (each name and version once)."""
        self.sagas.registry.register(definition)
        for step in definition.steps:
            for cls, _ in step.on_reply.values():
                self.registry.add(cls)
                if step.action is not None and step.action.participant == AWAITS:
                    self.awaits.expect(spec_of(cls).name, self.awaits.keys.get(spec_of(cls).name))
        return definition

    def resource(self, name: str, url: str | Resource | None = None) -> Resource:
        """Register a database that atomic groups may span, under ``name``.

        ``url``: ``postgresql://...`` or ``mysql://...`` (MariaDB through XA),
        or a :class:`~sagakit.twophase.Resource`; None means the database of
        the participant ``name`` (which must have a PostgreSQL store).
        """
        if url is None:
            own = self._pstores.get(name)
            if own is None or own.dialect != "postgresql":
                raise ConfigurationError(
                    f"resource {name!r}: give a URL, or make it a participant with a "
                    "PostgreSQL store of its own"
                )
            url = own.url
        return self.twophase.add(name, url)

    def atomic(self, *names: str, group_id: str | None = None) -> Atomic:
        """One atomic group over these resources: all of its changes commit, or none.

        ``async with app.atomic("customers", "enrollments") as tx:`` then
        ``tx["customers"].execute(...)``; see :mod:`sagakit.twophase`.
        """
        return self.twophase.atomic(*names, group_id=group_id)

    def reservations(
        self,
        participant: str,
        *,
        space: str | None = None,
        ttl: float = 60.0,
        sweep_every: float | None = 1.0,
    ) -> Reservations:
        """Timeout-based locks in ``participant``'s database (see :mod:`sagakit.locks`).

        Processes that run the participant also run the expiry sweeper every
        ``sweep_every`` seconds (None: no sweeper; reservations that need
        units still reclaim overdue ones). ``space`` (default: the participant's name)
        keeps its pools apart from other participants' in a shared database.
        """
        if participant not in self.participants:
            raise ConfigurationError(f"reservations for unknown participant {participant!r}")
        if sweep_every is not None and sweep_every <= 0:
            raise ConfigurationError(f"sweep_every must be positive, got {sweep_every}")
        locks = Reservations(self.store_of(participant), space or participant, ttl=ttl)
        if sweep_every is not None:
            self.workers.sweepers.append((participant, locks, sweep_every))
        return locks

    def await_key(self, event: type[Any], field: str) -> None:
        """Pair ``event`` with waiting saga steps by its payload ``field`` instead
        of its ``correlation_id`` header (call before registering the sagas)."""
        self.awaits.expect(spec_of(event).name, field)

    def track(self, definition: ChoreographyDefinition) -> ChoreographyDefinition:
        """Track a choreography: its events feed flows keyed by correlation id
        (run by the service ``tracker``; queries in ``app.flows``)."""
        self.flows.register(definition)
        for cls in definition.types:
            self.registry.add(cls)
        return definition

    def begin(
        self, participant: str, *, correlation_id: str | None = None, new_conversation: bool = False
    ) -> AbstractAsyncContextManager[Context]:
        """A handler's transaction outside any handler, to start a conversation.

        ::

            async with app.begin("orders", correlation_id=order_id) as ctx:
                await ctx.db.execute("INSERT INTO orders ...")
                ctx.publish(OrderPlaced(...))

        The participant's business change and the events it publishes commit
        together. An event needs a correlation id: pass one, or
        ``new_conversation=True`` for a fresh one (``ctx.correlation_id``).
        """
        if participant not in self.participants:
            raise ConfigurationError(f"no participant {participant!r}")
        if correlation_id is None and not new_conversation:
            raise MissingCorrelation("begin() needs correlation_id= or new_conversation=True")
        store = self.store_of(participant)
        return conversation(store, self.writer_for(store), participant, correlation_id or new_id())

    def process(self, pm: ProcessManager[Any]) -> ProcessManager[Any]:
        """Register a process manager or stateless saga (each name once).

        Its messages arrive on the queue ``sagakit.process.NAME``; it runs in
        processes that run the service ``NAME`` (``sagakit worker --service NAME``).
        """
        if pm.name in self.participants or pm.name == COORDINATOR:
            raise DuplicateRegistration(f"{pm.name!r} already names a service of this app")
        self.processes.register(pm)
        for cls in pm.types.values():
            self.registry.add(cls)
        self.registry.add(ProcessTimer)
        if "sagakit.SagaEnded" in pm.types:
            self.sagas.coordinator.announce_ends = True
        return pm

    def store_of(self, participant: str) -> Store:
        """The store a participant's handlers run in."""
        return self._pstores.get(participant, self.store)

    def dead_letters_of(self, participant: str) -> DeadLetters:
        """The dead letters of a participant with a database of its own."""
        store = self.store_of(participant)
        return DeadLetters(store, self.transport, audit=DeadLetterAuditLog(store))

    def writer_for(self, store: Store) -> OutboxWriter:
        """The outbox writer of ``store``, chosen once for this App's transport."""
        writer = self._writers.get(id(store))
        if writer is None:
            writer = self._writers[id(store)] = OutboxWriter(store, self.transport, self.codec)
            writer.hooks = self.hooks
        return writer

    def only(self, services: Iterable[str]) -> None:
        """Run only these services in this process (the coordinator is ``coordinator``).

        For a ready-made App handed to ``sagakit worker --service``; call it
        before ``start()``.
        """
        if self._started:
            raise ConfigurationError("App.only() must be called before start()")
        self._run = set(services)

    def runs(self, name: str) -> bool:
        return self._run is None or name in self._run

    def instrument(self, hooks: Hooks) -> None:
        """Report to ``hooks`` (a :class:`~sagakit.observe.Telemetry`); before ``start()``."""
        if self._started:
            raise ConfigurationError("App.instrument() must be called before start()")
        self.hooks = hooks
        self.sagas.coordinator.hooks = hooks
        for writer in self._writers.values():
            writer.hooks = hooks
        bind = getattr(hooks, "bind", None)
        if bind is not None:
            bind(self)

    @property
    def started(self) -> bool:
        return self._started

    def stores_in_use(self) -> list[Store]:
        """The stores this process opened (its own and those of the participants it runs)."""
        return self._stores()

    def stopped_consumers(self) -> list[str]:
        """Consumers of this process whose consuming task has ended (readiness)."""
        return self.workers.stopped()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open stores and transport, declare queues, start consumers and relays."""
        if self._started:
            return
        self._started = True
        for store in self._stores():
            await store.open(migrate=self.settings.auto_migrate, listen=self._listens(store))
        await self.transport.open()
        if self.twophase.resources:  # recovery runs where the coordinator runs
            await self.twophase.start(recover=self.runs(COORDINATOR))
        for p in self.participants.values():
            for cls in p.types:
                self.registry.add(cls)
        await self.workers.start()

    async def stop(self) -> None:
        """Stop taking messages, finish in-flight ones, then close everything."""
        if not self._started:
            return
        self._started = False
        await self.workers.stop(self.settings.shutdown_grace)
        await self.twophase.stop()
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

    def _open(self, url: str, clock: Clock | None) -> Store:
        return open_store(url, prefix=self.settings.prefix, clock=clock)

    def _stores(self) -> list[Store]:
        """The stores this process uses: the App's own, and those of the participants it runs.

        A worker running one service opens that service's database and the
        App's store, not every database of the application: with several
        workers per service, connections add up quickly (docs/reliability.md,
        "The connection budget").
        """
        unique: dict[int, Store] = {id(self.store): self.store}
        for name, st in self._pstores.items():
            if self.runs(name):
                unique[id(st)] = st
        return list(unique.values())

    def _listens(self, store: Store) -> bool:
        """Whether ``store`` needs other processes' wake-ups here.

        The App's own store does (saga waiters, timers, the database
        transport's queues); a participant's store only when the database
        transport's queues live in it. Otherwise only this process writes its
        outbox, and its own commits wake its relay.
        """
        return store is self.store or self.transport.direct_writer(store) is not None


def _transport_options(url: str, s: Settings) -> dict[str, Any]:
    """Settings a transport understands; options in the URL's query win."""
    scheme = url.split(":", 1)[0]
    if scheme in ("database", "db", ""):
        return {"lease": s.lease, "max_poll": s.max_poll}
    options: dict[str, Any] = {}
    if scheme not in BROKER_SCHEMES:
        return options
    if s.namespace is not None and not has_option(url, "namespace", "prefix"):
        options["namespace"] = s.namespace
    leased = BROKER_SCHEMES[scheme] in ("nats", "redis")
    if leased and not has_option(url, "lease", "ack_wait"):
        options["lease"] = s.lease
    return options
