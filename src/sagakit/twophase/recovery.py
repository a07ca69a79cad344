"""Recovery: finish every prepared branch this node left behind, by the record.

A round scans each resource twice around reading the groups in flight and
the commit records (the order and the rules are in :mod:`.decision`), then
commits the recorded, rolls back the unrecorded once older than the safe
age, and forgets records whose branches are all gone. Every action is
idempotent — a branch already finished counts as done — and leaves one audit
line. A resource that cannot be read is skipped this round (logged); the
others are still recovered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import StoreError
from .decision import Plan, forgettable, parse, plan
from .record import AuditLine
from .resource import Prepared, Resource

if TYPE_CHECKING:
    from .coordinator import TwoPhase

log = logging.getLogger("sagakit.twophase.recovery")


@dataclass(frozen=True, slots=True)
class Action:
    """What recovery did: the plan and how it went (``done``, ``already finished``, ...)."""

    plan: Plan
    outcome: str


class Recovery:
    """Recovery rounds for one :class:`~sagakit.twophase.coordinator.TwoPhase`."""

    def __init__(self, tp: TwoPhase) -> None:
        self.tp = tp
        #: when a branch whose database gives no prepare time (XA) was first seen
        self._seen: dict[str, float] = {}

    async def run_once(self) -> list[Action]:
        tp = self.tp
        first = await self._scan()
        active = set(tp.active)
        recorded = await tp.records.recorded(tp.node)
        again = await self._scan()
        actions: list[Action] = []
        for name, branches in again.items():
            if name not in first:
                continue
            ages = {b.gid: self._age(b) for b in branches}
            seen = {b.gid for b in first[name]}
            plans = plan(seen, active, recorded, ages, node=tp.node, safe_age=tp.options.safe_age)
            for p in plans:
                if p.verdict in ("commit", "rollback"):
                    actions.append(await self._act(tp.resource(name), p))
        await self._forget(recorded, again, active, actions)
        self._seen = {g: t for g, t in self._seen.items() if _still(g, again)}
        return actions

    async def _scan(self) -> dict[str, list[Prepared]]:
        found: dict[str, list[Prepared]] = {}
        for name, r in self.tp.resources.items():
            try:
                found[name] = await r.prepared(self.tp.prefix)
            except StoreError as exc:
                log.warning("2pc recovery: cannot read %s this round (%s)", name, exc)
        return found

    def _age(self, b: Prepared) -> float:
        if b.age is not None:
            return b.age
        now = time.monotonic()
        return now - self._seen.setdefault(b.gid, now)

    async def _act(self, r: Resource, p: Plan) -> Action:
        gid = str(p.gid)
        try:
            if p.verdict == "commit":
                found = await r.commit_prepared(gid)
            else:
                found = await r.rollback_prepared(gid)
        except StoreError as exc:
            log.warning("2pc recovery: %s of %s failed (%s); next round", p.verdict, gid, exc)
            return Action(p, f"failed: {exc}")
        outcome = "done" if found else "already finished"
        await self._audit(p.gid.group, r.name, p.verdict, outcome, p.why)
        log.warning("2pc recovery: %s %s (%s): %s", p.verdict, gid, p.why, outcome)
        return Action(p, outcome)

    async def _forget(
        self,
        recorded: dict[str, list[str]],
        again: dict[str, list[Prepared]],
        active: set[str],
        actions: list[Action],
    ) -> None:
        finished = {str(a.plan.gid) for a in actions if not a.outcome.startswith("failed")}
        left = [g for bs in again.values() for b in bs if (g := parse(b.gid)) is not None]
        left = [g for g in left if str(g) not in finished]
        for group in forgettable(recorded, left, active, again.keys()):
            await self.tp.records.forget(group)
            await self._audit(group, None, "forget", "done", "every branch is committed")

    async def _audit(
        self, group: str, resource: str | None, action: str, outcome: str, why: str
    ) -> None:
        tp = self.tp
        line = AuditLine(
            tp.store.clock.now(), tp.node, group, resource, action, outcome, "recovery",
            "sagakit", why,
        )  # fmt: skip
        await tp.records.audit(line)


def _still(gid: str, again: dict[str, list[Prepared]]) -> bool:
    return any(b.gid == gid for bs in again.values() for b in bs)
