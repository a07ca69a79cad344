"""The ``sagakit`` command: demo, worker, and database migration."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .errors import ConfigurationError


def _load_app(spec: str) -> Any:
    """Import ``module:attribute`` (an App, or a zero-argument factory of one)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigurationError(f"--app wants MODULE:APP, got {spec!r}")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if callable(obj) and not hasattr(obj, "start") else obj


def cmd_worker(args: argparse.Namespace) -> int:
    app = _load_app(args.app)
    if args.service:
        app._run = set(args.service)
    asyncio.run(app.run_forever())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .store import open_store

    async def run() -> int:
        store = open_store(args.store, prefix=args.prefix)
        await store.open(migrate=False)
        try:
            version = await store.migrate()
        finally:
            await store.close()
        print(f"{args.store}: schema at version {version}")
        return 0

    return asyncio.run(run())


def cmd_demo(argv: Sequence[str]) -> int:
    try:
        demo = importlib.import_module("order_fulfillment.demo")
    except ImportError as exc:
        print(
            f"the demo application is not installed ({exc}); install sagakit from the "
            "repository with 'make demo'",
            file=sys.stderr,
        )
        return 2
    return int(demo.main(list(argv)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sagakit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="run the order-fulfillment demo (see 'sagakit demo --help')", add_help=False
    )
    w = sub.add_parser("worker", help="run participants and/or the coordinator of an App")
    w.add_argument("--app", required=True, help="MODULE:APP")
    w.add_argument("--service", action="append", help="participant name or 'coordinator'")
    w.set_defaults(func=cmd_worker)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    m = db.add_parser("migrate", help="apply pending schema migrations")
    m.add_argument("--store", default="sqlite:///.sagakit/sagakit.db")
    m.add_argument("--prefix", default="sagakit_")
    m.set_defaults(func=cmd_migrate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return cmd_demo(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"sagakit: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
