"""Lint every choreography an App tracks: ``problems(app)``.

The declarations are what it reads — each tracked contract, and each
handler's ``publishes=`` — so it needs no running service. A problem is one
readable line naming the choreography and what is missing:

- a step's done or failed event, or a completion event, that no handler publishes;
- a failure event that triggers an undo, with no handler reacting to it that
  publishes the undo's confirming event (the compensation would never run);
- a step no chain of handlers can reach from the start event;
- a handler reacting to the flow's events without ``publishes=``, which the
  check cannot see through.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from .contract import ChoreographyDefinition

if TYPE_CHECKING:
    from ..app import App

#: (participant, event type it reacts to) -> event types it declares publishing
Reactions = dict[tuple[str, str], frozenset[str] | None]


def problems(app: App) -> list[str]:
    """Every problem of every choreography ``app`` tracks (empty: all fine)."""
    reactions: Reactions = {}
    for name, p in app.participants.items():
        for kind, handled, publishes in p.handlers():
            if kind == "event":
                reactions[(name, handled)] = publishes
    found: list[str] = []
    for defn in app.flows.definitions.values():
        found += contract_problems(defn, reactions)
    return found


def contract_problems(defn: ChoreographyDefinition, reactions: Reactions) -> list[str]:
    """The problems of one contract against the handlers' declarations."""
    blind = _blind(defn, reactions)
    publishers: dict[str, set[str]] = defaultdict(set)
    for (who, _), published in reactions.items():
        for event in published or ():
            publishers[event].add(who)
    found = [f"{defn.name}: {b}" for b in blind]
    found += [f"{defn.name}: {m}" for m in _unpublished(defn, publishers)]
    found += [f"{defn.name}: {m}" for m in _undo_unhandled(defn, reactions)]
    found += [f"{defn.name}: {m}" for m in _unreachable(defn, reactions)]
    return found


def _blind(defn: ChoreographyDefinition, reactions: Reactions) -> list[str]:
    names = set(defn.events())
    return [
        f"the handler of {event!r} in {who!r} does not declare publishes=, so the check "
        "cannot see what it publishes"
        for (who, event), published in sorted(reactions.items())
        if event in names and published is None
    ]


def _unpublished(defn: ChoreographyDefinition, publishers: dict[str, set[str]]) -> list[str]:
    wanted: list[tuple[str, str]] = []
    for s in defn.steps:
        wanted.append((s.done, f"the done event of step {s.name!r}"))
        if s.failed:
            wanted.append((s.failed, f"the failure event of step {s.name!r}"))
    wanted += [(c, "a completion event") for c in defn.completions]
    return [f"no handler publishes {e!r} ({what})" for e, what in wanted if not publishers[e]]


def _undo_unhandled(defn: ChoreographyDefinition, reactions: Reactions) -> list[str]:
    found = []
    for u in defn.undos:
        for failure in u.on:
            if not any(
                event == failure and u.done in (published or ())
                for (_, event), published in reactions.items()
            ):
                found.append(
                    f"{failure!r} has no handler that publishes {u.done!r}: the undo of "
                    f"{u.step!r} would never run"
                )
    return found


def _unreachable(defn: ChoreographyDefinition, reactions: Reactions) -> list[str]:
    """Steps none of whose events a chain of reactions from the start publishes."""
    reached, frontier = {defn.start}, [defn.start]
    while frontier:
        event = frontier.pop()
        for (_, handled), published in reactions.items():
            if handled == event:
                new = set(published or ()) - reached
                reached |= new
                frontier += sorted(new)
    return [
        f"step {s.name!r} is unreachable: no chain of handlers from {defn.start!r} "
        f"publishes {s.done!r}" + (f" or {s.failed!r}" if s.failed else "")
        for s in defn.steps
        if s.done not in reached and s.failed not in reached
    ]
