"""``sagakit check MODULE:APP``: lint an application's declarations.

The command runs every function in :data:`CHECKERS` — each takes the App and
returns a list of problems as readable lines — prints them, and exits 1 if
there is any (0 when all is well, 2 for bad usage). Other styles add their
checker to the list.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError
from ..process import check as process_check
from . import check

Checker = Callable[[Any], list[str]]

#: every checker ``sagakit check`` runs, in order
CHECKERS: list[Checker] = [check.problems, process_check.problems]


def add_parser(sub: Any) -> None:
    """Register ``check`` under the ``sagakit`` parser."""
    p = sub.add_parser(
        "check",
        help="lint an App's choreographies (and other declarations)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("app", metavar="MODULE:APP", help="an App, or a factory of one")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_check)


def app_of(obj: Any) -> Any:
    """The App in what ``MODULE:APP`` named (an App, or an object holding one as ``.app``)."""
    from ..app import App

    for candidate in (obj, getattr(obj, "app", None)):
        if isinstance(candidate, App):
            return candidate
    raise ConfigurationError(f"{type(obj).__name__} is not an App and holds none")


def run_checkers(app: Any, checkers: list[Checker] | None = None) -> list[str]:
    found: list[str] = []
    for checker in checkers or CHECKERS:
        found += checker(app)
    return found


def cmd_check(args: argparse.Namespace) -> int:
    from ..cli import _load_app

    app = app_of(_load_app(args.app))
    found = run_checkers(app)
    tracked = sorted(app.flows.definitions)
    if args.json:
        print(json.dumps({"ok": not found, "problems": found, "choreographies": tracked}))
    elif found:
        print(f"{len(found)} problem{'s' if len(found) > 1 else ''} in {args.app}:")
        for line in found:
            print(f"  - {line}")
    else:
        n = len(tracked)
        print(f"{args.app}: no problems ({n} choreograph{'y' if n == 1 else 'ies'} checked)")
    return 1 if found else 0
