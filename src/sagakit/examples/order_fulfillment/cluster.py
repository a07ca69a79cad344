"""Run the order-fulfillment application as several worker processes.

A :class:`Cluster` starts named ``sagakit worker`` processes, each running
some services (and/or the saga coordinator) of one App on a shared store and
transport, and can stop, kill and restart them by name::

    with Cluster(store, transport, Cluster.layout(per_service=1, coordinators=2),
                 lease=2.0) as cluster:
        await cluster.start()          # every worker, waits until each consumes
        cluster.pids()                 # {"orders-1": 4242, ..., "coordinator-2": 4250}
        cluster.kill("coordinator-1")  # SIGKILL: no clean-up, no acks
        await cluster.restart("coordinator-1")
    # leaving the block stops every worker gracefully (SIGTERM, then SIGKILL)

The parent is expected to have prepared the databases first (migrations,
service tables, seed data): workers create missing tables but nothing more.

Each worker writes its output (stdout and stderr, appended across restarts)
to ``<log_dir>/<name>.log`` and its pid to ``<log_dir>/<name>.ready`` once it
is consuming. Workers run in their own session (Ctrl-C in a terminal reaches
only the parent, which stops them in order) and, on Linux, receive SIGTERM if
the parent dies, so a crashed test run leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sagakit.app import COORDINATOR
from sagakit.transport._url import has_option, with_option

#: the services of the demo application, in saga order
SERVICES = ("orders", "customers", "inventory", "payments", "shipping", "loyalty")
#: the factory the workers load
DEFAULT_APP = "sagakit.examples.order_fulfillment.worker:create"


class WorkerFailed(RuntimeError):
    """A worker exited or did not become ready in time (see its log)."""


@dataclass
class Worker:
    """One named worker process (restarts keep the name, not the pid)."""

    name: str
    services: list[str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)
    #: per-worker overrides, kept across restarts (see :meth:`Cluster.configure`)
    env: dict[str, str] = field(default_factory=dict)
    wrap: list[str] = field(default_factory=list)
    store: str | None = None
    transport: str | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


#: connections the cluster leaves to everything else on the PostgreSQL server
SPARE_CONNECTIONS = 20
SERVER_CONNECTIONS = 100  #: PostgreSQL's default max_connections


def budgeted(store: str, workers: int) -> str:
    """The store URL with a pool small enough for ``workers`` processes to fit the server.

    Each worker holds its pool plus one LISTEN connection; an explicit
    ``max_size`` in the URL is left alone.
    """
    if not store.startswith(("postgresql://", "postgres://")) or has_option(store, "max_size"):
        return store
    per_worker = (SERVER_CONNECTIONS - SPARE_CONNECTIONS) // max(workers, 1) - 1
    return with_option(store, "max_size", str(max(1, min(10, per_worker))))


class Cluster:
    """Named worker processes of one App on a shared store and transport."""

    def __init__(
        self,
        store: str,
        transport: str,
        workers: Mapping[str, Sequence[str]] | None = None,
        *,
        app: str = DEFAULT_APP,
        lease: float | None = None,
        prefetch: int | None = None,
        log_dir: str | Path | None = None,
        verbose: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.store, self.transport, self.app = store, transport, app
        self.lease, self.prefetch, self.verbose = lease, prefetch, verbose
        self.env = {**os.environ, **(env or {})}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sagakit-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        layout = workers if workers is not None else self.layout()
        self.workers = {name: Worker(name, list(svcs)) for name, svcs in layout.items()}
        self.store = budgeted(store, len(self.workers))

    # -- layout ----------------------------------------------------------------

    @staticmethod
    def layout(
        per_service: int = 1, coordinators: int = 2, services: Iterable[str] = SERVICES
    ) -> dict[str, list[str]]:
        """``per_service`` processes for each service plus ``coordinators``:
        ``{"orders-1": ["orders"], ..., "coordinator-1": ["coordinator"], ...}``."""
        out = {f"{s}-{i}": [s] for s in services for i in range(1, per_service + 1)}
        out |= {f"{COORDINATOR}-{i}": [COORDINATOR] for i in range(1, coordinators + 1)}
        return out

    @property
    def names(self) -> list[str]:
        return list(self.workers)

    def running(self, service: str) -> list[str]:
        """Names of the workers that run ``service`` (e.g. ``"coordinator"``)."""
        return [n for n, w in self.workers.items() if service in w.services]

    def pids(self) -> dict[str, int | None]:
        """Each worker's current pid (None if it was never started)."""
        return {n: w.pid for n, w in self.workers.items()}

    def alive(self, name: str) -> bool:
        return self.workers[name].alive

    def configure(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        wrap: Sequence[str] | None = None,
        store: str | None = None,
        transport: str | None = None,
    ) -> None:
        """Per-worker settings for its next (re)starts: extra environment, a
        command prefix (e.g. ``["ip", "netns", "exec", "ns1"]``), other URLs."""
        w = self.workers[name]
        if env is not None:
            w.env = dict(env)
        if wrap is not None:
            w.wrap = list(wrap)
        if store is not None:
            w.store = budgeted(store, len(self.workers))
        if transport is not None:
            w.transport = transport

    def log_of(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 20) -> str:
        """The end of a worker's log, for error messages."""
        try:
            return "\n".join(self.log_of(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- lifecycle -------------------------------------------------------------

    async def start(self, names: Iterable[str] | None = None, *, timeout: float = 30.0) -> None:
        """Start the named workers (default all) and wait until each consumes."""
        chosen = list(names) if names is not None else self.names
        for name in chosen:
            self.spawn(name)
        await self.ready(chosen, timeout=timeout)

    def spawn(self, name: str) -> int:
        """Start one worker without waiting; its pid."""
        w = self.workers[name]
        if w.alive:
            raise RuntimeError(f"worker {name} is already running (pid {w.pid})")
        ready = self._ready_file(name)
        ready.unlink(missing_ok=True)
        cmd = [*w.wrap, sys.executable, "-m", "sagakit.cli"]
        if self.verbose:
            cmd.append("-v")
        store, transport = w.store or self.store, w.transport or self.transport
        cmd += ["worker", "--app", self.app, "--store", store, "--transport", transport]
        for service in w.services:
            cmd += ["--service", service]
        if self.lease is not None:
            cmd += ["--lease", str(self.lease)]
        if self.prefetch is not None:
            cmd += ["--prefetch", str(self.prefetch)]
        cmd += ["--ready-file", str(ready)]
        with self.log_of(name).open("ab") as log:
            log.write(f"--- start {w.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            w.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **w.env},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        w.starts += 1
        return w.process.pid

    async def ready(self, names: Iterable[str], *, timeout: float = 30.0) -> None:
        """Wait until each named worker is consuming; WorkerFailed if one exits or is late."""
        waiting = set(names)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while waiting:
            for name in list(waiting):
                w = self.workers[name]
                if w.process is None or w.process.poll() is not None:
                    code = None if w.process is None else w.process.returncode
                    raise WorkerFailed(
                        f"worker {name} exited with {code} before it was ready:\n{self.tail(name)}"
                    )
                if self._ready_file(name).exists():
                    waiting.discard(name)
            if not waiting:
                return
            if loop.time() > end:
                raise WorkerFailed(
                    f"workers not ready after {timeout:.0f} s: {sorted(waiting)}\n"
                    + "\n".join(f"[{n}]\n{self.tail(n, 5)}" for n in sorted(waiting))
                )
            await asyncio.sleep(0.05)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (default SIGKILL) to a worker; the pid it had. Reaps on SIGKILL."""
        w = self.workers[name]
        if w.process is None or not w.alive:
            raise RuntimeError(f"worker {name} is not running")
        pid = w.process.pid
        w.process.send_signal(sig)
        if sig == signal.SIGKILL:
            w.exits.append(w.process.wait())
        return pid

    async def restart(self, name: str, *, timeout: float = 30.0) -> int:
        """Stop the worker if it runs (gracefully), start it again, wait until ready."""
        if self.alive(name):
            self.stop([name])
        pid = self.spawn(name)
        await self.ready([name], timeout=timeout)
        return pid

    def stop(self, names: Iterable[str] | None = None, *, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM the named workers (default all) at once, SIGKILL any still up after
        ``timeout``; their exit codes (negative: killed by that signal)."""
        chosen = [n for n in (names if names is not None else self.names) if self.alive(n)]
        for name in chosen:
            with contextlib.suppress(ProcessLookupError):
                self.workers[name].process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        codes: dict[str, int] = {}
        end = time.monotonic() + timeout
        for name in chosen:
            proc = self.workers[name].process
            assert proc is not None
            try:
                codes[name] = proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
            self.workers[name].exits.append(codes[name])
        return codes

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ready_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.ready"


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux; else no-op)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
