"""Definition checks for process managers: mistakes found before the first message.

:func:`problems` returns readable one-line problems (an empty list when all
is well) for every process manager registered on an App:

- a message it handles has no key mapping (no default ``key=``, no per-message ``key=``);
- a declared state cannot be reached from a starting handler;
- a non-final state has no handler out of it (an instance would stay there forever);
- a timer is started (``.after("name", ...)`` in a handler) but has no ``@pm.timer("name")``,
  or a timer handler waits for a timer no handler ever starts;
- a handler moves an instance out of a final state.

Handlers that run in a final state must name it in ``when=``; the machine
records and ignores every other message for a finished instance, so that rule
is enforced at run time, and a handler guarded by no state never runs there.
The timer names are read from the handlers' source (string literals passed to
``after``); a name computed at run time is not seen.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .definition import Handler, ProcessManager

if TYPE_CHECKING:
    from ..app import App


def problems(app: App | Iterable[ProcessManager[Any]]) -> list[str]:
    """Every problem of every process manager of ``app`` (or of the given ones)."""
    managers = app.processes.managers.values() if hasattr(app, "processes") else app
    found: list[str] = []
    for pm in managers:
        found += problems_of(pm)
    return found


def problems_of(pm: ProcessManager[Any]) -> list[str]:
    """The problems of one process manager, each prefixed with its name."""
    found = _keys(pm) + _timers(pm)
    if pm.states and not pm.stateless:
        found += _reachability(pm) + _finals(pm)
    return [f"{pm.name}: {p}" for p in found]


def _handlers(pm: ProcessManager[Any]) -> list[Handler]:
    return [h for slot in pm.handlers.values() for h in slot]


def _keys(pm: ProcessManager[Any]) -> list[str]:
    if pm.stateless:
        return []
    return [
        f"message {h.trigger!r} has no key mapping (key= on the process manager or the handler)"
        for h in _handlers(pm)
        if h.kind in ("start", "message") and pm.key is None and h.trigger not in pm.keys
    ]


def edges(pm: ProcessManager[Any]) -> list[tuple[str | None, str, Handler]]:
    """Declared transitions ``(from, to, handler)``; ``from`` None for a starting handler.

    A handler without ``when=`` applies in every non-final state; every
    handler may keep the state it was given (a self-loop), and ``to=`` lists
    where else it may move it.
    """
    out: list[tuple[str | None, str, Handler]] = []
    for h in _handlers(pm):
        if h.kind == "start":
            out += [(None, t, h) for t in sorted(h.to or ())]
            continue
        sources = (
            sorted(h.when) if h.when is not None else [s for s in pm.states if s not in pm.final]
        )
        for src in sources:
            out += [(src, t, h) for t in sorted((h.to or frozenset()) | {src})]
    return out


def _reachability(pm: ProcessManager[Any]) -> list[str]:
    found = [
        f"starting handler of {h.trigger!r} declares no to= state"
        for h in _handlers(pm)
        if h.kind == "start" and not h.to
    ]
    reached: set[str] = set()
    frontier = [t for s, t, _ in edges(pm) if s is None]
    while frontier:
        state = frontier.pop()
        if state not in reached:
            reached.add(state)
            frontier += [t for s, t, _ in edges(pm) if s == state]
    found += [f"state {s!r} is unreachable" for s in pm.states if s not in reached]
    exits = {s for s, t, _ in edges(pm) if s is not None and t != s}
    found += [
        f"state {s!r} is not final and nothing leads out of it"
        for s in pm.states
        if s in reached and s not in pm.final and s not in exits
    ]
    return found


def _finals(pm: ProcessManager[Any]) -> list[str]:
    return [
        f"{h.kind} handler of {h.trigger!r} leaves final state {s!r} for {t!r}"
        for s, t, h in edges(pm)
        if s in pm.final and t != s
    ]


def _timers(pm: ProcessManager[Any]) -> list[str]:
    started = set()
    for h in _handlers(pm):
        started |= started_timers(h.fn)
    handled = {h.trigger for h in _handlers(pm) if h.kind == "timer"}
    found = [
        f"timer {t!r} is started but has no @{pm.name}.timer handler"
        for t in sorted(started - handled)
    ]
    found += [
        f"timer handler {t!r} waits for a timer no handler starts"
        for t in sorted(handled - started)
    ]
    return found


def started_timers(fn: Any) -> set[str]:
    """Names passed as string literals to ``.after(...)`` in ``fn``'s source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "after"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }
