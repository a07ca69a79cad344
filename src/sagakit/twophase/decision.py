"""What to do with a prepared branch: pure decisions, no I/O.

Global ids name their owner: ``sk_<node>_<group>_<resource>``. A coordinator
process owns one ``node`` and only ever touches branches under its prefix,
so several processes (each with its own node) share databases safely.

Recovery takes four snapshots in this order, after Citus:

1. ``first``: the branches prepared now, with their ages;
2. ``active``: the groups this process is still running;
3. ``recorded``: the groups with a commit record;
4. ``again``: the branches prepared now, with their ages.

A branch is acted on only if it is in both scans (a group that finished in
between is gone from the second) and its group was not active at step 2. A
group still running writes its record before it leaves ``active``, so reading
``active`` before ``recorded`` never mistakes a committing group for an
abandoned one. Then: recorded → commit; not recorded and older than the safe
age → roll back (presumed abort); younger → leave for the next round.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigurationError

NODE = re.compile(r"^[a-z0-9]{1,16}$")
RESOURCE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
GROUP = re.compile(r"^[a-z0-9]{1,40}$")
_GID = re.compile(r"^sk_([a-z0-9]{1,16})_([a-z0-9]{1,40})_([a-z][a-z0-9_]{0,39})$")

Verdict = Literal["commit", "rollback", "wait", "skip"]


@dataclass(frozen=True, slots=True)
class Gid:
    """A branch's global id, taken apart."""

    node: str
    group: str
    resource: str

    def __str__(self) -> str:
        return f"sk_{self.node}_{self.group}_{self.resource}"


def check_node(node: str) -> str:
    if not NODE.match(node):
        raise ConfigurationError(f"invalid 2PC node name {node!r}: 1-16 lowercase letters/digits")
    return node


def check_resource(name: str) -> str:
    if not RESOURCE.match(name):
        raise ConfigurationError(
            f"invalid resource name {name!r}: a lowercase letter, then letters, digits, _"
        )
    return name


def check_group(group: str) -> str:
    if not GROUP.match(group):
        raise ConfigurationError(f"invalid group id {group!r}: 1-40 lowercase letters/digits")
    return group


def gid(node: str, group: str, resource: str) -> str:
    return str(Gid(check_node(node), check_group(group), check_resource(resource)))


def parse(text: str) -> Gid | None:
    """The parts of a sagakit global id; None for anybody else's."""
    m = _GID.match(text)
    return Gid(m.group(1), m.group(2), m.group(3)) if m else None


def prefix(node: str) -> str:
    """The start of every global id ``node`` owns."""
    return f"sk_{check_node(node)}_"


@dataclass(frozen=True, slots=True)
class Plan:
    """What recovery does with one branch, and why (the audit line's reason)."""

    gid: Gid
    verdict: Verdict
    why: str


def decide(
    branch: Gid,
    age: float,
    *,
    recorded: bool,
    active: bool,
    safe_age: float,
) -> Plan:
    """The verdict for one branch seen in both scans."""
    if active:
        return Plan(branch, "skip", "its group is still running in this process")
    if recorded:
        return Plan(branch, "commit", "the group has a commit record")
    if age < safe_age:
        return Plan(branch, "wait", f"no record, but prepared only {age:.1f}s ago")
    return Plan(branch, "rollback", f"no commit record after {age:.1f}s (presumed abort)")


def plan(
    first: Iterable[str],
    active: Iterable[str],
    recorded: Iterable[str],
    again: Mapping[str, float],
    *,
    node: str,
    safe_age: float,
) -> list[Plan]:
    """Verdicts for the branches of ``node`` seen prepared in both scans (see the module)."""
    seen, busy, done = set(first), set(active), set(recorded)
    plans = []
    for text, age in sorted(again.items()):
        g = parse(text)
        if g is None or g.node != node or text not in seen:
            continue
        plans.append(
            decide(g, age, recorded=g.group in done, active=g.group in busy, safe_age=safe_age)
        )
    return plans


def forgettable(
    recorded: Mapping[str, Iterable[str]],
    remaining: Iterable[Gid],
    active: Iterable[str],
    scanned: Iterable[str],
) -> list[str]:
    """Recorded groups whose branches are all finished: their records may go.

    ``recorded`` maps a group to its resources; a group qualifies when none of
    its branches is still prepared, it is not active, and every one of its
    resources was scanned this round (a database that could not be read may
    still hold a branch).
    """
    left = {g.group for g in remaining}
    busy, looked = set(active), set(scanned)
    return [
        group
        for group, resources in recorded.items()
        if group not in left and group not in busy and set(resources) <= looked
    ]
