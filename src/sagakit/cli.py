"""The ``sagakit`` command: demo, worker, database migration and pruning, saga listing,
dead letters.

Every failure ends in one line on stderr, ``sagakit: error: ...``, with exit
status 2 for a usage or configuration error and 1 for a runtime failure (an
unreachable server, a database that refuses us); ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import __version__
from .app import COORDINATOR, App, Settings
from .choreography import TRACKER, check_cli
from .console import cli as console_cli
from .console import processes_cli
from .errors import CommandFailed, ConfigurationError, SagakitError, is_outage
from .observe.logging import configure as configure_logging
from .ops import dead_letters_cli
from .transport import redact
from .twophase import cli as twophase_cli

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("sagakit.worker")
T = TypeVar("T")

#: the demo's module; its third-party imports come with the ``demo`` extra
DEMO = "sagakit.examples.order_fulfillment.demo"
#: the extra that installs each optional module, for the hint when one is missing
EXTRA_OF = {
    "asyncpg": "postgres",
    "aio_pika": "rabbitmq",
    "nats": "nats",
    "redis": "redis",
    "rich": "demo",
    "starlette": "demo",
    "uvicorn": "demo",
    "opentelemetry": "otel",
    "prometheus_client": "metrics",
    "jinja2": "console",
}
#: what the demo imports that a plain ``pip install sagakit`` lacks
DEMO_EXTRA = frozenset(m for m, extra in EXTRA_OF.items() if extra == "demo")
DEFAULT_STORE = "sqlite:///.sagakit/sagakit.db"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the usage block plus a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sagakit: error: {message} (see '{self.prog} --help')\n")


#: the options ``sagakit worker`` can hand to an app factory, by parameter name
FACTORY_OPTIONS = ("store", "transport", "run", "settings")


def _load_app(spec: str, *, defaults: Mapping[str, Any] | None = None, **options: Any) -> Any:
    """Import ``module:attribute``: an App (or any object with async ``start``/``stop``,
    such as the demo's ``OrderFulfillment``), or a factory that returns one.

    A factory is called with those of ``options`` (``store``, ``transport``,
    ``run``, ``settings``) that are not None and that it accepts by name (all
    of them if it takes ``**kwargs``). Asking for an option the target cannot
    take is an error rather than being silently ignored. ``defaults`` (the
    environment's ``SAGAKIT_STORE``...) fill in what a factory accepts and was
    not given; a ready-made App has its own and ignores them.
    """
    obj = _import(spec)
    given = {k: v for k, v in options.items() if v is not None}
    if _runnable(obj):
        return _ready_made(obj, spec, given)
    if not callable(obj):
        raise ConfigurationError(f"{spec} is neither an App nor a factory of one")
    return _from_factory(obj, spec, given, defaults or {})


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigurationError(f"--app wants MODULE:APP, got {spec!r}")
    _working_directory_importable()
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module!r}: {exc}") from exc
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigurationError(f"module {module!r} has no attribute {attr!r}") from None


def _working_directory_importable() -> None:
    """Let ``--app shop:app`` find ``./shop.py``, as ``python -m`` and uvicorn do.

    The installed ``sagakit`` script's path starts at its own directory, not
    the working directory, so a module beside the user would not import.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _ready_made(obj: Any, spec: str, given: dict[str, Any]) -> Any:
    """A ready-made app: only ``run`` (--service) applies; it was built without it."""
    unusable = sorted(set(given) - {"run"})
    if unusable:
        raise ConfigurationError(
            f"{spec} is a ready-made app; options {unusable} need a factory function"
        )
    if "run" in given:
        _select(obj, given["run"])
    return obj


def _from_factory(
    factory: Any, spec: str, given: dict[str, Any], defaults: Mapping[str, Any]
) -> Any:
    """Call ``factory`` with the options it takes; filter ``run`` here if it does not."""
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in given.items() if takes_all or k in params}
    unusable = sorted(set(given) - set(accepted) - {"run"})
    if unusable:
        raise ConfigurationError(f"the factory {spec} takes no {', '.join(unusable)} argument")
    for k, v in defaults.items():
        if v and k not in accepted and (takes_all or k in params):
            accepted[k] = v
    app = factory(**accepted)
    if not _runnable(app):
        raise ConfigurationError(f"{spec}() returned {type(app).__name__}, not an App")
    if "run" in given and "run" not in accepted:
        _select(app, given["run"])  # the factory does not filter: do it here
    return app


def _runnable(obj: Any) -> bool:
    return (
        not inspect.isclass(obj)
        and inspect.iscoroutinefunction(getattr(obj, "start", None))
        and inspect.iscoroutinefunction(getattr(obj, "stop", None))
    )


def _app_of(obj: Any) -> App | None:
    """The sagakit App inside what the worker runs (itself, or its ``.app``)."""
    if isinstance(obj, App):
        return obj
    inner = getattr(obj, "app", None)
    return inner if isinstance(inner, App) else None


def _select(obj: Any, services: list[str]) -> None:
    """Make the App in ``obj`` consume only for ``services`` once started."""
    app = _app_of(obj)
    if app is None:
        raise ConfigurationError("--service needs an App (or an object with an App as .app)")
    app.only(services)


def _check_services(obj: Any, services: list[str] | None) -> list[str]:
    """The participants, process managers and/or coordinator this process runs;
    unknown names are errors."""
    app = _app_of(obj)
    if app is None:
        return services or ["(all)"]
    known = [*app.participants, *app.processes.runtimes, COORDINATOR]
    known += [TRACKER] if app.flows.trackers else []
    unknown = sorted(set(services or []) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown service(s) {', '.join(unknown)}; this app has {', '.join(known)}"
        )
    return sorted(services) if services else [n for n in known if app.runs(n)]


async def _start(obj: Any, patience: float) -> None:
    """Start ``obj``; while its store or broker is unavailable, retry with backoff.

    A worker started before its database or broker (a deploy, a restart of
    the machine) waits for them instead of exiting, for up to ``patience``
    seconds, saying so at WARNING.
    """
    loop = asyncio.get_running_loop()
    give_up, delay = loop.time() + patience, 0.5
    while True:
        try:
            await obj.start()
            return
        except SagakitError as exc:
            if not is_outage(exc) or loop.time() + delay > give_up:
                raise
            log.warning("cannot start yet (%s); retrying in %.1fs", exc, delay)
            await obj.stop()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def _serve(
    obj: Any,
    services: list[str],
    ready_file: str | None,
    patience: float = 0.0,
    metrics_port: int | None = None,
) -> None:
    """Start, report readiness, run until SIGTERM/SIGINT, then stop gracefully.

    With ``metrics_port``, ``/metrics``, ``/healthz`` and ``/readyz`` are served
    from before the start (``/readyz`` says 503 while the store is awaited).
    A second signal during the graceful stop exits at once (status 130).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal during shutdown: exiting now")
            os._exit(130)
        log.info("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    health = await _health(obj, metrics_port)
    try:
        if not await _until_stopped(_start(obj, patience), stop):
            return  # stopped while still waiting for the store or broker
        line = f"sagakit worker ready: pid {os.getpid()}, services {','.join(services)}"
        print(line, file=sys.stderr, flush=True)
        if ready_file:
            Path(ready_file).write_text(f"{os.getpid()}\n")
        await stop.wait()
    finally:
        await obj.stop()
        if health is not None:
            await health.stop()
    log.info("stopped cleanly")


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it); True if it finished."""
    task, stopping = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True


def _instrument(obj: Any, metrics_port: int | None) -> Any:
    """Telemetry for the worker's App: metrics with a port, tracing when configured.

    Tracing is on when an OpenTelemetry SDK is configured: by
    ``opentelemetry-instrument``, or by ``OTEL_EXPORTER_OTLP_ENDPOINT`` with
    ``sagakit[otel]`` installed. Returns the tracer provider made here (to
    flush at exit), if any.
    """
    from .observe.tracing_setup import configured_provider, provider_from_env

    provider = None if configured_provider() else provider_from_env()
    tracing = provider is not None or configured_provider()
    if metrics_port is None and not tracing:
        return None
    app = _app_of(obj)
    if app is None:
        raise ConfigurationError("--metrics-port and tracing need an App (or an object with .app)")
    from .observe import Telemetry

    app.instrument(
        Telemetry(tracing=tracing, metrics=metrics_port is not None, tracer_provider=provider)
    )
    return provider


async def _health(obj: Any, port: int | None) -> Any:
    if port is None:
        return None
    app = _app_of(obj)
    assert app is not None and app.hooks is not None
    from .observe.health import HealthServer

    server = HealthServer(app, getattr(app.hooks, "metrics", None), port=port)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigurationError(f"--metrics-port {port}: {exc.strerror or exc}") from exc
    return server


def cmd_worker(args: argparse.Namespace) -> int:
    settings = None
    if args.lease is not None or args.prefetch is not None:
        tuned = {"lease": args.lease, "prefetch": args.prefetch}
        settings = Settings(**{k: v for k, v in tuned.items() if v is not None})
    obj = _load_app(
        args.app,
        defaults={
            "store": os.environ.get("SAGAKIT_STORE"),
            "transport": os.environ.get("SAGAKIT_TRANSPORT"),
        },
        store=args.store,
        transport=args.transport,
        run=args.service,
        settings=settings,
    )
    services = _check_services(obj, args.service)
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise ConfigurationError(f"--metrics-port {args.metrics_port} is not a port number")
    provider = _instrument(obj, args.metrics_port)
    try:
        asyncio.run(
            _serve(obj, services, args.ready_file, args.connect_patience, args.metrics_port)
        )
    finally:
        if provider is not None:
            provider.shutdown()  # flush the spans still buffered
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the store's schema up to date; a store we cannot reach is exit 1."""
    from .store import open_store

    url = args.store or os.environ.get("SAGAKIT_STORE") or DEFAULT_STORE

    async def run() -> int:
        store = open_store(url, prefix=args.prefix)
        await store.open(migrate=False)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        version = asyncio.run(run())
    except ConfigurationError:
        raise
    except (SagakitError, OSError) as exc:
        raise CommandFailed(f"cannot migrate {redact(url)}: {exc}") from exc
    print(f"{redact(url)}: schema at version {version}")
    return 0


def _on_store(args: argparse.Namespace, what: str, job: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``job`` on the store of ``--store``/``--prefix`` (never migrating it).

    A store we cannot reach or read is a runtime failure (exit 1); a schema
    older than this sagakit's is a configuration error (exit 2).
    """
    from .store import open_store
    from .store.schema import SCHEMA_VERSION

    url = args.store or os.environ.get("SAGAKIT_STORE") or DEFAULT_STORE

    async def run() -> T:
        store = open_store(url, prefix=args.prefix)
        await store.open(migrate=False)
        try:
            if (found := await store.schema_version()) < SCHEMA_VERSION:
                raise ConfigurationError(
                    f"{redact(url)}: schema at version {found}, this sagakit needs "
                    f"{SCHEMA_VERSION}: run 'sagakit db migrate' first"
                )
            return await job(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ConfigurationError:
        raise
    except (SagakitError, OSError) as exc:
        raise CommandFailed(f"cannot {what} {redact(url)}: {exc}") from exc


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h`` or ``30d`` (an argparse type)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        msg = f"not a duration: {text!r} (e.g. 90, 15m, 12h, 30d)"
        raise argparse.ArgumentTypeError(msg) from None
    if seconds < 0 or seconds != seconds:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return seconds


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete (or, with --dry-run, count) what is past its retention horizon."""
    from .ops.retention import Pruner, Retention

    age = args.older_than
    base = Retention.recommended() if age is None else Retention(age, age, age)
    retention = dataclasses.replace(base, audit=args.audit_older_than, batch=args.batch)
    retention.check(Settings().redelivery_window)  # this command cannot know the app's

    async def job(store: Store) -> dict[str, int]:
        return (await Pruner(store, retention).prune(dry_run=args.dry_run)).as_dict()

    counts = _on_store(args, "prune", job)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "rows": counts}))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print("\n".join(f"{table}: {verb} {n}" for table, n in counts.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo with the arguments after ``demo``, which it parses itself."""
    demo = importlib.import_module(DEMO)  # without the demo extra: see missing_extra()
    return int(demo.main(list(args.demo_argv)))


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sagakit", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines with timestamps (default) or one JSON object per line",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="run the order-fulfillment demo (see 'sagakit demo --help')", add_help=False
    )
    d.set_defaults(func=cmd_demo, demo_argv=[])
    w = sub.add_parser(
        "worker",
        help="run participants and/or the coordinator of an App",
        description="Run an App's participants and/or its saga coordinator until SIGTERM or "
        "SIGINT, then stop gracefully (in-flight messages finish).",
    )
    w.add_argument("--app", required=True, help="MODULE:APP (an App, or a factory of one)")
    w.add_argument(
        "--service",
        action="append",
        help="participant name or 'coordinator'; repeat for several (default: all)",
    )
    w.add_argument("--store", help="store URL for the factory (default $SAGAKIT_STORE)")
    w.add_argument("--transport", help="transport URL for the factory (default $SAGAKIT_TRANSPORT)")
    w.add_argument("--lease", type=float, help="Settings.lease in seconds, for the factory")
    w.add_argument("--prefetch", type=int, help="Settings.prefetch, for the factory")
    w.add_argument("--ready-file", help="write the pid to this file once consuming")
    w.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve /metrics, /healthz and /readyz on this port (needs sagakit[metrics])",
    )
    w.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=argparse.SUPPRESS,
        help="text lines with timestamps (default) or one JSON object per line",
    )
    w.add_argument(
        "--connect-patience",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="wait this long for an unavailable store or broker at start (default 300)",
    )
    w.set_defaults(func=cmd_worker)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    m = db.add_parser(
        "migrate",
        help="apply pending schema migrations",
        description="Create sagakit's tables, or bring them up to date, in one store.",
    )
    m.add_argument("--store", help=f"store URL (default $SAGAKIT_STORE, else {DEFAULT_STORE})")
    m.add_argument("--prefix", default="sagakit_", help="table name prefix (default sagakit_)")
    m.set_defaults(func=cmd_migrate)
    _prune_parser(db)
    console_cli.add_saga_actions(_sagas_parser(sub))
    dead_letters_cli.add_parser(sub)
    twophase_cli.add_parser(sub)
    check_cli.add_parser(sub)
    console_cli.add_parser(sub)
    processes_cli.add_parser(sub)
    return p


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help=f"store URL (default $SAGAKIT_STORE, else {DEFAULT_STORE})")
    p.add_argument("--prefix", default="sagakit_", help="table name prefix (default sagakit_)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _prune_parser(db: Any) -> None:
    pr = db.add_parser(
        "prune",
        help="delete finished sagas, inbox rows and dead letters past their horizon",
        description="Delete, in bounded batches, finished sagas with their history, inbox rows "
        "no saga needs and dead letters older than the horizon (default: 30 days for sagas and "
        "dead letters, 7 for inbox rows), and the flows, process instances, reservations and "
        "2PC keys that ended before it. A horizon shorter than the default settings' "
        "redelivery window is refused. Running and failed sagas are never deleted; audit logs "
        "only with --audit-older-than.",
    )
    _store_options(pr)
    pr.add_argument("--older-than", type=duration, help="one horizon for every table: 90, 12h, 30d")
    pr.add_argument(
        "--audit-older-than", type=duration, help="also delete audit lines older than this"
    )
    pr.add_argument("--batch", type=int, default=500, help="rows per transaction (default 500)")
    pr.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    pr.set_defaults(func=cmd_prune)


def _sagas_parser(sub: Any) -> Any:
    sg = sub.add_parser("sagas", help="saga instances").add_subparsers(dest="sagas", required=True)
    ls = sg.add_parser(
        "list",
        help="list saga instances (read-only)",
        description="List saga instances, oldest first; with --stuck, the running or "
        "compensating ones unchanged for that long, longest stuck first.",
    )
    _store_options(ls)
    ls.add_argument("--stuck", type=duration, help="only sagas without progress this long")
    ls.add_argument("--state", help="only this state (running, failed, ...)")
    ls.add_argument("--type", help="only this saga type")
    ls.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    return sg


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line; everything after ``demo`` is left for the demo's own parser.

    The global options (``-v``, ``--version``, ``-h``) take no value, so the
    first word not starting with ``-`` is the command.
    """
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    if argv[at : at + 1] == ["demo"]:
        args = parser().parse_args(argv[: at + 1])
        args.demo_argv = argv[at + 1 :]
        return args
    return parser().parse_args(argv)


def missing_extra(exc: ModuleNotFoundError) -> ConfigurationError | None:
    """The install hint for an optional module that is not installed, if it is one."""
    package = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF.get(package)
    if extra is None:
        return None
    hint = ConfigurationError(f"{package!r} is not installed: pip install 'sagakit[{extra}]'")
    hint.__cause__ = exc  # -v shows where it was imported from
    return hint


def fail(exc: BaseException, status: int, verbose: bool) -> int:
    """Report ``exc`` as one line (after its traceback with ``-v``); return ``status``."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    message = " ".join(str(exc).splitlines()).strip() or type(exc).__name__
    if not isinstance(exc, SagakitError | OSError):
        message = f"unexpected {type(exc).__name__}: {message}"
        if not verbose:
            message += " (run with -v for the traceback)"
    print(f"sagakit: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    verbose = False
    try:
        args = parse(list(sys.argv[1:] if argv is None else argv))
        verbose = args.verbose
        level = logging.INFO if verbose else logging.WARNING
        configure_logging(level, fmt=getattr(args, "log_format", "text"))
        return int(args.func(args))
    except SystemExit as exc:  # argparse: --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except ConfigurationError as exc:
        return fail(exc, 2, verbose)
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        return fail(exc, 1, verbose) if hint is None else fail(hint, 2, verbose)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return fail(exc, 1, verbose)


if __name__ == "__main__":
    sys.exit(main())
