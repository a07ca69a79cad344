"""The chaos harness's fault kinds and the monkey that injects them (see :mod:`chaos`).

Short faults (kills, duplicates, connection cuts, slow handlers, divergent
duplicates) are injected every one or two seconds; the long ones
(:data:`LONG_FAULTS`, opt-in with ``--faults``) last several seconds each and
need what :mod:`chaos_infra` provides: a database outage, a restart of the
run's private broker, a network partition of one worker, and a rolling
upgrade of the coordinators to a new saga version.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import chaos_app
from chaos_infra import Partitions, PrivateBroker, pg_outage, sqlite_outage

from sagakit.app import COORDINATOR
from sagakit.examples.order_fulfillment.cluster import Cluster, WorkerFailed

KILL_COORDINATOR = "kill_coordinator"
KILL_PARTICIPANT = "kill_participant"
DUPLICATE = "duplicate_delivery"
BROKER_CUT = "broker_cut"
DB_DROP = "db_drop"
SLOW_HANDLER = "slow_handler"
DIVERGENT = "divergent_duplicate"
DB_OUTAGE = "db_outage"
BROKER_RESTART = "broker_restart"
PARTITION = "partition"
ROLLING_UPGRADE = "rolling_upgrade"
SHORT_FAULTS = (
    KILL_COORDINATOR,
    KILL_PARTICIPANT,
    DUPLICATE,
    BROKER_CUT,
    DB_DROP,
    SLOW_HANDLER,
    DIVERGENT,
)
LONG_FAULTS = (DB_OUTAGE, BROKER_RESTART, PARTITION, ROLLING_UPGRADE)
FAULTS = SHORT_FAULTS + LONG_FAULTS
#: faults switched on in every worker for the whole run: kind -> counter file kind
WORKER_FAULTS = {
    DUPLICATE: chaos_app.DUP,
    SLOW_HANDLER: chaos_app.SLOW,
    DIVERGENT: chaos_app.DIVERGE,
}
WORKER_APP_NAME = "sagakit-chaos-worker"
#: how long a long fault lasts (seconds, low and high)
LONG_FAULT_S = (3.0, 8.0)


@dataclass
class Infra:
    """Where one run lives, and how to clean it up."""

    store: str  # for this process
    worker_store: str  # for the workers (tagged for db_drop)
    transport: str
    kind: str  # database | rabbitmq | nats | redis
    folder: Path
    cleanups: list[Any] = field(default_factory=list)
    vhost: str | None = None
    pg_admin: str | None = None
    pg_db: str | None = None
    redis_prefix: str | None = None
    broker: PrivateBroker | None = None
    partitions: Partitions | None = None
    sqlite_files: list[Path] = field(default_factory=list)

    def rabbitmqctl(self, *args: str) -> str:
        if self.broker is not None:
            return self.broker.ctl(*args)
        return rabbitmqctl(*args)


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def plain(url: str) -> str:
    """``url`` without its query: sagakit's options (max_size=...) mean nothing to asyncpg."""
    return urlunsplit(urlsplit(url)._replace(query=""))


async def pg_exec(url: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(plain(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# -- faults --------------------------------------------------------------------


@dataclass
class Restart:
    worker: str
    service: str
    killed_at: float
    ready_at: float | None = None


@dataclass
class Monkey:
    """Injects faults at random moments until told to stop."""

    cluster: Cluster
    infra: Infra
    rng: random.Random
    kinds: list[str]
    interval: tuple[float, float]
    min_kills: int = 5
    counts: Counter[str] = field(default_factory=Counter)
    restarts: list[Restart] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_starts: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    #: called once the first coordinator runs the new saga version (rolling upgrade)
    on_upgrade: Callable[[], None] | None = None
    #: long faults under way (at most one of each kind at a time)
    active: set[str] = field(default_factory=set)
    upgraded: bool = False
    #: seconds into the run at which the rolling upgrade starts
    upgrade_at: float = 1.0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Every ``interval``: one fault; the first ones cycle through every kind."""
        weights = {KILL_COORDINATOR: 2, KILL_PARTICIPANT: 3, BROKER_CUT: 1, DB_DROP: 1}
        weights |= dict.fromkeys(LONG_FAULTS, 1)
        if ROLLING_UPGRADE in self.kinds:  # once, early, while orders are still placed
            self.active.add(ROLLING_UPGRADE)
            self._spawn(self._later(self.upgrade_at, self._long(ROLLING_UPGRADE)))
        kinds = [k for k in self.kinds if k in weights and k != ROLLING_UPGRADE]
        if not kinds:
            return
        first = self.rng.sample(kinds, len(kinds))
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.rng.uniform(*self.interval))
            if self._stop.is_set():
                break
            kills = self.counts[KILL_COORDINATOR] + self.counts[KILL_PARTICIPANT]
            if first:
                kind = first.pop()
            elif kills < self.min_kills and self.rng.random() < 0.8:
                kind = self.rng.choice([k for k in kinds if k.startswith("kill_")] or kinds)
            else:
                kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
            if kind in LONG_FAULTS:
                if kind not in self.active:
                    self.active.add(kind)
                    self._spawn(self._long(kind))
            elif kind in (BROKER_CUT, DB_DROP):  # slow (rabbitmqctl): in the background
                self._spawn(self._guarded(kind))
            else:
                await self._guarded(kind)

    async def _guarded(self, kind: str) -> None:
        try:
            await self.inject(kind)
        except Exception as exc:  # a fault that could not be injected is reported
            self.errors.append(f"{kind}: {exc!r}")

    async def inject(self, kind: str) -> None:
        if kind in (KILL_COORDINATOR, KILL_PARTICIPANT):
            coord = kind == KILL_COORDINATOR
            names = [
                n
                for n, w in self.cluster.workers.items()
                if (COORDINATOR in w.services) == coord and n not in self.down
            ]
            if not names:
                return
            victim = self.rng.choice(names)
            self.down.add(victim)
            self.cluster.kill(victim)
            rec = Restart(victim, self.cluster.workers[victim].services[0], time.time())
            self.restarts.append(rec)
            self.counts[kind] += 1
            self._spawn(self._restart(rec))
        elif kind == BROKER_CUT:
            if await self.cut_broker():
                self.counts[kind] += 1
        elif kind == DB_DROP:
            if await self.drop_db():
                self.counts[kind] += 1
        elif kind in LONG_FAULTS and await self.inject_long(kind):
            self.counts[kind] += 1

    async def _later(self, seconds: float, coro: Any) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            coro.close()  # stopped before it was due
        except TimeoutError:
            await coro

    async def _long(self, kind: str) -> None:
        try:
            await self._guarded(kind)
        finally:
            self.active.discard(kind)

    async def inject_long(self, kind: str) -> bool:
        """One long fault; whether it could be injected."""
        seconds = self.rng.uniform(*LONG_FAULT_S)
        infra = self.infra
        if kind == DB_OUTAGE and infra.pg_admin and infra.pg_db:
            await pg_outage(infra.pg_admin, infra.pg_db, WORKER_APP_NAME, seconds)
        elif kind == DB_OUTAGE and infra.sqlite_files:
            await sqlite_outage(self.rng.choice(infra.sqlite_files), seconds)
        elif kind == BROKER_RESTART and infra.broker is not None:
            await infra.broker.restart(seconds / 2)
        elif kind == PARTITION and infra.partitions is not None:
            names = [n for n in infra.partitions.links if n not in self.down]
            if not names:
                return False
            await infra.partitions.cut(self.rng.choice(names), seconds)
        elif kind == ROLLING_UPGRADE:
            return await self.rolling_upgrade()
        else:
            return False
        return True

    async def rolling_upgrade(self) -> bool:
        """Replace the coordinators one at a time by processes that also know saga v2.

        Once the first is stopped, new orders start as v2 (``on_upgrade``: the
        new release's front end is out first), so for a while only old
        coordinators receive replies and timers of a version they do not know
        and must hand them back rather than fail them.
        """
        if self.upgraded:
            return False
        self.upgraded = True
        names = self.cluster.running(COORDINATOR)
        for i, name in enumerate(names):
            while name in self.down:  # a kill's restart is under way
                await asyncio.sleep(0.1)
            self.down.add(name)
            try:
                self.cluster.stop([name])  # a graceful stop, as a deployment does
                if i == 0 and self.on_upgrade is not None:
                    self.on_upgrade()  # the new front end is out before a new coordinator
                w = self.cluster.workers[name]
                self.cluster.configure(name, env={**w.env, chaos_app.SAGA_V2_ENV: "1"})
                await self.cluster.restart(name, timeout=90.0)
            finally:
                self.down.discard(name)
            await asyncio.sleep(self.rng.uniform(*LONG_FAULT_S))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, rec: Restart) -> None:
        await asyncio.sleep(self.rng.uniform(0.1, 1.0))
        try:
            for attempt in range(1, 4):
                try:
                    await self.cluster.restart(rec.worker, timeout=90.0)
                    rec.ready_at = time.time()
                    return
                except WorkerFailed as exc:
                    # e.g. a db_drop hit the worker while it started: it exits 1, as
                    # sagakit worker does on a startup error; a supervisor restarts it
                    self.failed_starts.append(f"{rec.worker}: {str(exc).splitlines()[-1]}")
                    if attempt == 3:
                        self.errors.append(f"restart {rec.worker}: {exc!r}")
                    await asyncio.sleep(0.5)
        finally:
            self.down.discard(rec.worker)

    async def cut_broker(self) -> bool:
        infra, loop = self.infra, asyncio.get_running_loop()
        if infra.kind == "rabbitmq" and infra.vhost:
            out = await loop.run_in_executor(
                None, infra.rabbitmqctl, "list_connections", "pid", "vhost", "-q"
            )
            conns = [
                line.split("\t")[0]
                for line in out.splitlines()
                if line.split("\t")[-1:] == [infra.vhost]
            ]
            if not conns:
                return False
            chosen = conns if self.rng.random() < 0.5 else [self.rng.choice(conns)]
            for pid in chosen:
                with contextlib.suppress(subprocess.SubprocessError):
                    await loop.run_in_executor(
                        None, infra.rabbitmqctl, "close_connection", pid, "sagakit chaos"
                    )
            return True
        if infra.kind == "redis" and infra.redis_prefix:
            import redis.asyncio as aioredis

            raw = aioredis.Redis.from_url(infra.transport.split("?", 1)[0])
            try:
                name = f"sagakit:{infra.redis_prefix}"
                ids = [c["id"] for c in await raw.client_list() if c.get("name") == name]
                if not ids:
                    return False
                chosen = ids if self.rng.random() < 0.5 else [self.rng.choice(ids)]
                for cid in chosen:
                    await raw.execute_command("CLIENT", "KILL", "ID", cid)
            finally:
                await raw.aclose()
            return True
        if infra.kind == "nats":
            alive = [n for n in self.cluster.names if self.cluster.alive(n) and n not in self.down]
            if not alive:
                return False
            victim = self.cluster.workers[self.rng.choice(alive)].process
            assert victim is not None
            with contextlib.suppress(ProcessLookupError):
                victim.send_signal(signal.SIGUSR1)
            return True
        return False

    async def drop_db(self) -> bool:
        infra = self.infra
        if not infra.pg_db:
            return False
        rows = await pg_exec(
            infra.store,
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            infra.pg_db,
            WORKER_APP_NAME,
        )
        pids = [r[0] for r in rows]
        if not pids:
            return False
        chosen = pids if self.rng.random() < 0.3 else self.rng.sample(pids, max(1, len(pids) // 3))
        await pg_exec(
            infra.store, "SELECT pg_terminate_backend(p) FROM unnest($1::int[]) p", chosen
        )
        return True

    async def stop(self, runner: asyncio.Task[None]) -> None:
        """Inject nothing more (a fault under way finishes); wait for the restarts."""
        self._stop.set()
        await asyncio.gather(runner, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
