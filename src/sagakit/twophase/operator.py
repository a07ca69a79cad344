"""The operator's view of two-phase commit: branches in doubt, and resolving one by hand.

A branch is *in doubt* when it is prepared and no group of this process is
running it: its coordinator crashed, or a database was away at commit time.
Recovery finishes such branches on its own; an operator can look at them
(age, the locks they hold, whether a commit record exists) and resolve one
now, with a reason that is kept in the audit log.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import AmbiguousOutcome, BranchNotFound, InvalidOperatorAction
from ..ops.actor import Actor
from .decision import parse
from .record import AuditLine

if TYPE_CHECKING:
    from .coordinator import TwoPhase


@dataclass(frozen=True, slots=True)
class InDoubt:
    """A prepared branch nobody is finishing right now."""

    resource: str
    gid: str
    node: str
    group: str
    age: float | None
    recorded: bool
    locks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Gauges:
    """Numbers for metrics: branches in doubt, and the oldest one's age in seconds."""

    in_doubt: int
    oldest_age: float


async def in_doubt(
    tp: TwoPhase, *, every_node: bool = True, only: Collection[str] | None = None
) -> list[InDoubt]:
    """Prepared sagakit branches on every resource (or those named in ``only``), all
    nodes' or this node's, oldest first."""
    recorded = await tp.records.recorded(None)
    found = []
    for name, r in tp.resources.items():
        if only is not None and name not in only:
            continue
        for b in await r.prepared("sk_" if every_node else tp.prefix):
            g = parse(b.gid)
            if g is None or (g.node == tp.node and g.group in tp.active):
                continue
            found.append(InDoubt(name, b.gid, g.node, g.group, b.age, g.group in recorded, b.locks))
    return sorted(found, key=lambda d: -(d.age or 0.0))


async def gauges(tp: TwoPhase) -> Gauges:
    """This node's branches in doubt and the oldest one's age (0 when none)."""
    branches = await in_doubt(tp, every_node=False)
    ages = [b.age for b in branches if b.age is not None]
    return Gauges(len(branches), max(ages, default=0.0))


async def resolve(
    tp: TwoPhase,
    gid: str,
    action: Literal["commit", "rollback"],
    *,
    actor: Actor,
    reason: str,
    force: bool = False,
) -> str:
    """Commit or roll back one prepared branch by hand; the outcome, also audited.

    Rolling back a branch of a group with a commit record would split the
    group (its other branches are, or will be, committed): refused unless
    ``force``. A commit that finds no branch is fine when the record vouches
    for it (already committed) and :class:`AmbiguousOutcome` otherwise.
    """
    g = parse(gid)
    if g is None or g.resource not in tp.resources:
        raise BranchNotFound(f"{gid!r} is not a sagakit branch of a registered resource")
    _check(actor, reason, action)
    recorded = g.group in await tp.records.recorded(None)
    if action == "rollback" and recorded and not force:
        raise InvalidOperatorAction(
            f"group {g.group} has a commit record: rolling {g.resource} back would split it "
            "(commit it instead, or force)"
        )
    r = tp.resource(g.resource)
    found = await (r.commit_prepared(gid) if action == "commit" else r.rollback_prepared(gid))
    outcome = _outcome(action, found, recorded)
    line = AuditLine(
        tp.store.clock.now(), g.node, g.group, g.resource, action, outcome, actor.id, actor.via,
        reason,
    )  # fmt: skip
    await tp.records.audit(line)
    if outcome == "ambiguous":
        raise AmbiguousOutcome(
            f"{gid}: no prepared branch to commit and no commit record: it was committed or "
            "rolled back by someone else; check the data"
        )
    return outcome


def _check(actor: Actor, reason: str, action: str) -> None:
    if not actor.may_act():
        raise InvalidOperatorAction(f"{actor} may not {action} prepared branches")
    if not reason.strip():
        raise InvalidOperatorAction("resolving a branch needs a reason")
    if action not in ("commit", "rollback"):
        raise InvalidOperatorAction(f"unknown action {action!r}: commit or rollback")


def _outcome(action: str, found: bool, recorded: bool) -> str:
    if found:
        return "done"
    if action == "rollback" or recorded:
        return "already finished"
    return "ambiguous"


__all__ = ["Gauges", "InDoubt", "gauges", "in_doubt", "resolve"]
