"""The workers of one process: the consumers, relays and housekeeping an App runs.

:class:`~sagakit.app.App` is where an application is declared (participants,
sagas, process managers, trackers, resources); :class:`Workers` is what
``App.start()`` sets going in this process, given the services it runs
(``App.only``/``run=``), and what ``App.stop()`` winds down:

- one consumer per participant queue, process-manager queue and tracker
  queue, through the App's transport;
- where the coordinator runs: the coordinator's reply queue, and the store
  queues for saga timers, local steps and operator commands;
- each process manager's and tracker's timer queue, from the store;
- housekeeping: retention, the stuck-saga watcher, the lock sweepers;
- a relay per store whose outbox feeds a broker.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from .choreography import TRACKER
from .choreography.shell import TIMER_QUEUE as TRACK_TIMERS
from .console.commands import OPERATOR_QUEUE, CommandExecutor
from .endpoint import Endpoint, Route, Router
from .locks import Reservations
from .messages import Envelope
from .ops.background import Periodic
from .ops.retention import Pruner
from .ops.stuck import StuckWatcher
from .outbox import Relay
from .process.runtime import timer_queue
from .saga.awaits import AWAITS
from .saga.coordinator import COORDINATOR_QUEUE, LOCAL_QUEUE, TIMER_QUEUE, Coordinator
from .saga.inline import Inline
from .store import Store
from .store.consumer import QueueConsumer
from .transport import Subscription

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("sagakit.app")

COORDINATOR = "coordinator"


class Workers:
    """What one process runs for an App, started and stopped as a whole."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.subs: list[Subscription] = []
        self.relays: list[Relay] = []
        #: (participant, reservations, seconds): lock sweepers, run where the participant runs
        self.sweepers: list[tuple[str, Reservations, float]] = []

    async def start(self) -> None:
        """Declare the queues, then start every consumer, job and relay of this process."""
        app = self.app
        await self._declare()
        coordinating = app.runs(COORDINATOR) and bool(app.sagas.definitions)
        await self._start_participants(coordinating)
        await self._start_processes()
        if coordinating:
            await self._start_coordinator()
        if app.runs(TRACKER) and app.flows.trackers:
            await self._start_trackers()
        self._start_housekeeping(coordinating)
        self._start_relays()

    async def stop(self, grace: float) -> None:
        """Stop taking messages and let in-flight ones finish (up to ``grace`` seconds)."""
        self.app.sagas.coordinator.hops.routes.clear()  # steps run inside running hops only
        await asyncio.gather(*(_stop(s, grace) for s in self.subs), return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.relays), return_exceptions=True)
        self.subs.clear()
        self.relays.clear()

    def stopped(self) -> list[str]:
        """Consumers whose consuming task has ended (readiness)."""
        return [_name(sub) for sub in self.subs if _ended(sub)]

    def _endpoint(
        self, name: str, store: Store, router: Router, *, trusted: bool = False
    ) -> Endpoint:
        app = self.app
        ep = Endpoint(name, app.writer_for(store), router, policy=app.settings.hop, trusted=trusted)
        ep.hooks = app.hooks
        return ep

    async def _declare(self) -> None:
        app, transport = self.app, self.app.transport
        for name, p in app.participants.items():
            await transport.declare(name, list(p.events))
        await transport.declare(COORDINATOR_QUEUE, [])
        if app.awaits.keys:
            await transport.declare(AWAITS, sorted(app.awaits.keys))
        for tracker in app.flows.trackers.values():
            await transport.declare(tracker.queue, sorted(tracker.defn.watched()))
        for pm in app.processes.managers.values():
            await transport.declare(pm.queue, pm.subscribed())

    async def _start_participants(self, coordinating: bool) -> None:
        """A consumer per participant this process runs; where the coordinator runs
        here on the participant's store, it decides on the participant's replies in
        the participant's own hop, and a saga's steps inside its start or inside
        another step's hop (``sagakit.saga.inline``)."""
        app = self.app
        for name, p in app.participants.items():
            if app.runs(name):
                store = app.store_of(name)
                ep = self._endpoint(name, store, p.route)
                coord = app.sagas.coordinator
                if coordinating and store is app.store:
                    ep.fold = coord.hops.decide_here
                await self._consume(name, ep)
                if ep.fold is not None:  # and a saga's steps may run inside other hops
                    coord.hops.routes[name] = Inline(ep, p.db_only)

    async def _start_coordinator(self) -> None:
        app, coord = self.app, self.app.sagas.coordinator
        replies = self._endpoint(COORDINATOR_QUEUE, app.store, _route_replies(coord))
        await self._consume(COORDINATOR_QUEUE, replies)
        timers = self._endpoint(
            TIMER_QUEUE, app.store, lambda env: Route(coord.on_timer), trusted=True
        )
        self.subs.append(self._store_consumer(TIMER_QUEUE, timers.handle))
        local = self._endpoint(LOCAL_QUEUE, app.store, _route_replies(coord), trusted=True)
        self.subs.append(self._store_consumer(LOCAL_QUEUE, lambda d: coord.run_local(d, local)))
        executor = CommandExecutor(coord, app.dead_letters)
        self.subs.append(self._store_consumer(OPERATOR_QUEUE, executor.handle))
        if app.awaits.keys:
            await self._consume(AWAITS, self._endpoint(AWAITS, app.store, app.awaits.route))

    async def _start_trackers(self) -> None:
        app = self.app
        for tracker in app.flows.trackers.values():
            await self._consume(
                tracker.queue, self._endpoint(tracker.queue, app.store, tracker.route)
            )
        timers = self._endpoint(TRACK_TIMERS, app.store, app.flows.timer_route, trusted=True)
        self.subs.append(self._store_consumer(TRACK_TIMERS, timers.handle))

    async def _start_processes(self) -> None:
        """Each process manager: its queue through the broker, its timers (and
        held messages) from the store's own queue, one inbox for both."""
        app = self.app
        for name, rt in app.processes.runtimes.items():
            if not app.runs(name):
                continue
            writer, hop, queue = app.writer_for(app.store), app.settings.hop, rt.pm.queue
            ep = Endpoint(queue, writer, rt.route, policy=hop, consumer=queue)
            timers = Endpoint(queue, writer, rt.route, policy=hop, consumer=queue, trusted=True)
            ep.hooks = timers.hooks = app.hooks  # spans and log context, as every hop
            await self._consume(queue, ep)
            self.subs.append(self._store_consumer(timer_queue(rt.pm), timers.handle))

    def _start_housekeeping(self, coordinating: bool) -> None:
        """Retention runs in every process over the stores it uses (several pruners at
        once are safe); the stuck-saga watcher runs where the coordinator runs."""
        app, s, jobs = self.app, self.app.settings, []
        if s.retention is not None:
            pruners = [Pruner(store, s.retention) for store in app.stores_in_use()]
            prune = partial(_prune_all, pruners)
            jobs.append(Periodic("sagakit retention", s.retention.every, prune))
        if s.stuck_after is not None and coordinating:
            watcher = StuckWatcher(app.sagas.queries, s.stuck_after)
            every = min(60.0, max(0.05, s.stuck_after / 2))
            jobs.append(Periodic("sagakit stuck-saga watcher", every, watcher.check))
        for name, locks, every in self.sweepers:
            if app.runs(name):
                jobs.append(Periodic(f"sagakit lock sweeper {locks.space}", every, locks.sweep))
        for job in jobs:
            job.start()
            self.subs.append(job)

    def _store_consumer(self, queue: str, handler: Any) -> QueueConsumer:
        s = self.app.settings
        return QueueConsumer(
            self.app.store, queue, handler, prefetch=s.prefetch, lease=s.lease, max_poll=s.max_poll
        )

    async def _consume(self, queue: str, ep: Endpoint) -> None:
        app = self.app
        sub = await app.transport.consume(queue, ep.handle, prefetch=app.settings.prefetch)
        self.subs.append(sub)

    def _start_relays(self) -> None:
        app, s = self.app, self.app.settings
        for store in app.stores_in_use():
            if app.writer_for(store).relayed:
                relay = Relay(
                    store,
                    app.transport,
                    lease=s.lease,
                    max_poll=s.max_poll,
                    max_failures=s.relay_max_failures,
                )
                relay.hooks = app.hooks
                relay.start()
                self.relays.append(relay)


def _route_replies(coord: Coordinator) -> Router:
    route, start = Route(coord.on_reply), Route(coord.on_start)

    def router(env: Envelope) -> Route | None:
        if env.kind == "command" and env.type == "sagakit.StartSaga":
            return start
        return route if env.kind == "reply" else None

    return router


def _ended(sub: Subscription) -> bool:
    task = getattr(sub, "_task", None)
    return isinstance(task, asyncio.Task) and task.done()


def _name(sub: Subscription) -> str:
    task = getattr(sub, "_task", None)
    return task.get_name() if isinstance(task, asyncio.Task) else type(sub).__name__


async def _prune_all(pruners: list[Pruner]) -> None:
    for pruner in pruners:
        pruned = await pruner.prune()
        if pruned.total:
            log.info("retention pruned %s from %s", pruned.as_dict(), pruner.store.prefix)


async def _stop(sub: Subscription, grace: float) -> None:
    """Stop a consumer; one that hangs past its grace period is abandoned."""
    try:
        await asyncio.wait_for(sub.stop(grace), grace + 5.0)
    except TimeoutError:
        log.warning("a consumer did not stop within %.1fs; abandoning it", grace)
