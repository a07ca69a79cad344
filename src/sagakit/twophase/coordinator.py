"""``app.twophase``: the resources, the groups in flight, recovery and the operator view.

A process coordinates atomic groups as one *node*: every global id it writes
starts with ``sk_<node>_``, and its recovery touches nothing else. Give each
process that runs atomic groups a node of its own
(``Settings(twophase=TwoPhaseOptions(node="a1"))``); a process restarted
after a crash takes its node back and finishes what the old one left.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigurationError, DuplicateRegistration, NotStarted
from ..messages import new_id
from ..ops.actor import Actor
from ..ops.background import Periodic
from ..store import Store
from . import operator as _op
from .decision import check_group, check_node, check_resource
from .decision import prefix as node_prefix
from .operator import Gauges, InDoubt
from .protocol import Atomic, Probe
from .record import AuditLine, Records
from .resource import Resource

log = logging.getLogger("sagakit.twophase")


@dataclass(frozen=True, slots=True)
class TwoPhaseOptions:
    """How this process runs atomic groups.

    ``node``: the owner name in every global id this process writes (unique
    per process; 1-16 lowercase letters or digits). ``concurrency``: groups in
    flight at once here; the preflight wants ``max_prepared_transactions`` at
    least this high. ``safe_age``: a prepared branch without a commit record
    is rolled back by recovery only once this old (seconds) — longer than any
    group takes from its first prepare to its record. ``recover_every``:
    seconds between recovery rounds (None: no background recovery).
    """

    node: str = "main"
    concurrency: int = 16
    safe_age: float = 30.0
    recover_every: float | None = 10.0
    preflight: bool = True

    def __post_init__(self) -> None:
        check_node(self.node)
        if self.concurrency < 1 or self.safe_age < 0:
            raise ConfigurationError("TwoPhaseOptions: concurrency >= 1 and safe_age >= 0")


def open_resource(name: str, url: str) -> Resource:
    """A resource for ``url``: ``postgresql://...`` or ``mysql://...`` / ``mariadb://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresResource

        return PostgresResource(name, url)
    if url.startswith(("mysql://", "mariadb://")):
        from .mariadb import MariaDBResource

        return MariaDBResource(name, url)
    raise ConfigurationError(f"resource {name!r}: unsupported URL (postgresql:// or mysql://)")


class TwoPhase:
    """Atomic groups over registered resources, with recovery and an operator view."""

    def __init__(self, store: Store, options: TwoPhaseOptions | None = None) -> None:
        self.store = store
        self.options = o = options or TwoPhaseOptions()
        self.node = o.node
        self.records = Records(store)
        self.resources: dict[str, Resource] = {}
        #: groups this process is running (recovery leaves them alone)
        self.active: set[str] = set()
        self.slots = asyncio.Semaphore(o.concurrency)
        #: an awaitable called at every protocol point (tests crash the process there)
        self.probe: Probe | None = None
        self._job: Periodic | None = None
        self._recovery: Any = None
        self._started = False

    @property
    def prefix(self) -> str:
        return node_prefix(self.node)

    def add(self, name: str, resource: str | Resource) -> Resource:
        """Register a resource under ``name`` (a URL or a :class:`Resource`)."""
        check_resource(name)
        if name in self.resources:
            raise DuplicateRegistration(f"resource {name!r} is already registered")
        r = open_resource(name, resource) if isinstance(resource, str) else resource
        self.resources[name] = r
        return r

    def resource(self, name: str) -> Resource:
        try:
            return self.resources[name]
        except KeyError:
            raise ConfigurationError(
                f"no resource {name!r}: register it with app.resource({name!r}, url)"
            ) from None

    # -- lifecycle -----------------------------------------------------------

    async def start(self, *, recover: bool = True) -> None:
        """Open every resource, check it can prepare, start background recovery (if ``recover``).

        The App recovers in the processes that run its coordinator.
        """
        if self._started:
            return
        for r in self.resources.values():
            await r.open()
            if self.options.preflight:
                probe = f"{self.prefix}preflight{new_id().replace('-', '')[:16]}_{r.name}"
                await r.preflight(self.options.concurrency, probe)
        self._started = True
        every = self.options.recover_every
        if every is not None and recover:
            self._job = Periodic("sagakit 2pc recovery", every, self.recover)
            self._job.start()

    async def stop(self, grace: float = 10.0) -> None:
        if self._job is not None:
            await self._job.stop(grace)
            self._job = None
        self._started = False
        for r in self.resources.values():
            await r.close()

    # -- use -----------------------------------------------------------------

    def atomic(self, *names: str, group_id: str | None = None, key: str | None = None) -> Atomic:
        """``async with tp.atomic("a", "b") as tx``: one group over these resources."""
        if not self._started:
            raise NotStarted("atomic groups need a started App (async with app: ...)")
        if len(set(names)) != len(names) or not names:
            raise ConfigurationError(f"atomic() needs distinct resource names, got {names!r}")
        group = check_group(group_id) if group_id else new_id().replace("-", "")
        return Atomic(self, [self.resource(n) for n in names], group, key)

    async def in_doubt(self, *, every_node: bool = True) -> list[InDoubt]:
        """Prepared branches nobody is finishing now, with age, locks and record."""
        return await _op.in_doubt(self, every_node=every_node)

    async def gauges(self) -> Gauges:
        """This node's branches in doubt and the oldest one's age, for metrics."""
        return await _op.gauges(self)

    async def resolve(
        self,
        gid: str,
        action: Literal["commit", "rollback"],
        *,
        actor: Actor,
        reason: str,
        force: bool = False,
    ) -> str:
        """Commit or roll back one in-doubt branch by hand, audited; the outcome."""
        return await _op.resolve(self, gid, action, actor=actor, reason=reason, force=force)

    async def audit(self, limit: int = 100, *, group: str | None = None) -> list[AuditLine]:
        """The latest recovery and operator actions, newest first."""
        return await self.records.audit_lines(limit, group=group)

    async def recover(self) -> list[Any]:
        """One recovery round (see :mod:`sagakit.twophase.recovery`); the actions taken."""
        if self._recovery is None:
            from .recovery import Recovery

            self._recovery = Recovery(self)
        actions: list[Any] = await self._recovery.run_once()
        return actions
