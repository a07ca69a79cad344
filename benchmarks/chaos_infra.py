"""The chaos harness's long faults: private brokers it can restart, network
namespaces it can partition, databases it can take down.

Each fault is real, not simulated inside sagakit:

``PrivateBroker``
    A RabbitMQ node, a NATS server with JetStream or a Redis server started
    for one run on a free loopback port, with its data in the run's folder
    (Redis with an append-only file fsynced on every write, as a deployment
    that must not lose messages runs it). ``restart(down)`` SIGKILLs the
    server, keeps it down for ``down`` seconds and starts it again on the same
    data: the workers' connections break, reconnects are refused meanwhile,
    and what the server had acknowledged must still be there.

``Partitions``
    Each worker runs in a network namespace of its own (``ip netns``), joined
    to the machine by a veth pair; a forwarder (:mod:`chaos_proxy`) on the host
    end of each pair leads to the services on loopback. ``cut(worker, s)``
    takes the host end of the worker's link down for ``s`` seconds: its
    packets stop both ways, as with a pulled cable, and its connections stall
    until the link returns.

``db_outage``
    PostgreSQL: the run's database is closed to connections
    (``ALLOW_CONNECTIONS false``) and the workers' sessions are terminated for
    a few seconds, so every reconnect is refused. SQLite: another process holds
    the write lock of the shared database file for a few seconds (as a long
    backup or maintenance transaction would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout:.0f} s"
                ) from None
            await asyncio.sleep(0.1)


# -- private brokers -----------------------------------------------------------


@dataclass
class PrivateBroker:
    """One broker server of the run's own, which the harness may kill and restart."""

    kind: str  # rabbitmq | nats | redis
    folder: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    node: str = ""
    restarts: int = 0

    @property
    def url(self) -> str:
        if self.kind == "rabbitmq":
            return f"amqp://guest:guest@127.0.0.1:{self.port}/"
        if self.kind == "nats":
            return f"nats://127.0.0.1:{self.port}"
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "rabbitmq":
            await self._start_rabbitmq()
        else:
            log = (self.folder / "server.log").open("ab")
            self.process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        await wait_port(self.port, 90.0)

    def _command(self) -> list[str]:
        data = str(self.folder / "data")
        os.makedirs(data, exist_ok=True)
        if self.kind == "nats":
            return ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", data]
        return [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            data,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]

    @property
    def _rabbit_base(self) -> Path:
        # the rabbitmq user must reach it: not under the run's private (0700) folder
        return Path(tempfile.gettempdir()) / f"sagakit-rabbit-{self.port}"

    def _rabbit_env(self) -> dict[str, str]:
        base = self._rabbit_base
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        }

    async def _start_rabbitmq(self) -> None:
        base = self._rabbit_base
        if not self.node:
            self.node = f"skchaos{self.port}@localhost"
            base.mkdir(parents=True, exist_ok=True)
            (base / "plugins").write_text("[].\n")
            (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
            shutil.chown(base, "rabbitmq", "rabbitmq")
            for p in base.iterdir():
                shutil.chown(p, "rabbitmq", "rabbitmq")
        env = self._rabbit_env()
        await _run(["rabbitmq-server", "-detached"], env=env)
        end = time.monotonic() + 90
        while True:  # the CLI gives up at once while the node is not yet known to epmd
            try:
                await _run(["rabbitmqctl", "-n", self.node, "await_startup"], env=env)
                return
            except RuntimeError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(1.0)

    def _rabbit_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self._rabbit_base / "pid").read_text().strip())
        return None

    def kill(self) -> None:
        """SIGKILL the server: no clean shutdown, no flush beyond what it fsynced."""
        if self.kind == "rabbitmq":
            pid = self._rabbit_pid()
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
        elif self.process is not None:
            self.process.kill()
            self.process.wait()

    async def restart(self, down: float) -> None:
        self.kill()
        await asyncio.sleep(down)
        await self.start()
        self.restarts += 1

    def ctl(self, *args: str) -> str:
        """rabbitmqctl against this node."""
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=self._rabbit_env(),
        )
        return done.stdout

    async def close(self) -> None:
        if self.kind == "rabbitmq" and self.node:
            with contextlib.suppress(Exception):
                await _run(["rabbitmqctl", "-n", self.node, "stop"], env=self._rabbit_env())
            self.kill()
            shutil.rmtree(self._rabbit_base, ignore_errors=True)
        elif self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            self.kill()


async def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {out.decode()[-500:]}")
    return out.decode()


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# -- network namespaces ----------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why workers can't get network namespaces here (None: they can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need Linux and root"
    if not shutil.which("ip"):
        return "the ip command (iproute2) is missing"
    probe = f"skprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"ip netns add failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Link:
    namespace: str
    host_if: str
    host_ip: str


@dataclass
class Partitions:
    """A network namespace per worker, each linked to the host by a veth pair."""

    tag: str  # a few characters that keep interface names of concurrent runs apart
    links: dict[str, Link] = field(default_factory=dict)
    proxy: subprocess.Popen[bytes] | None = None
    cuts: int = 0

    def add(self, worker: str) -> Link:
        i = len(self.links) + 1
        ns, host_if, peer = f"sk{self.tag}n{i}", f"sk{self.tag}h{i}", f"sk{self.tag}p{i}"
        net = 100 + zlib.crc32(self.tag.encode()) % 150  # concurrent runs use other subnets
        host_ip, ns_ip = f"10.{net}.{i}.1", f"10.{net}.{i}.2"
        for cmd in (
            f"ip netns add {ns}",
            f"ip link add {host_if} type veth peer name {peer}",
            f"ip link set {peer} netns {ns}",
            f"ip addr add {host_ip}/30 dev {host_if}",
            f"ip link set {host_if} up",
            f"ip netns exec {ns} ip addr add {ns_ip}/30 dev {peer}",
            f"ip netns exec {ns} ip link set {peer} up",
            f"ip netns exec {ns} ip link set lo up",
            f"ip netns exec {ns} ip route add default via {host_ip}",
        ):
            subprocess.run(cmd.split(), check=True, capture_output=True)
        self.links[worker] = link = Link(ns, host_if, host_ip)
        return link

    async def start_proxy(self, ports: list[int], log: Path) -> None:
        """Forward each link's host address and each port to the same port on loopback."""
        routes = [f"{lk.host_ip}:{p}=127.0.0.1:{p}" for lk in self.links.values() for p in ports]
        self.proxy = subprocess.Popen(
            [sys.executable, str(HERE / "chaos_proxy.py"), *routes],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            start_new_session=True,
        )
        assert self.proxy.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proxy.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"the forwarder did not start (see {log})")

    def wrap(self, worker: str) -> list[str]:
        return ["ip", "netns", "exec", self.links[worker].namespace]

    def url_for(self, worker: str, url: str) -> str:
        """``url`` with its loopback host replaced by the worker's way out."""
        u = urlsplit(url)
        if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
            return url
        netloc = u.netloc.replace(f"{u.hostname}:", f"{self.links[worker].host_ip}:")
        return urlunsplit(u._replace(netloc=netloc))

    async def cut(self, worker: str, seconds: float) -> None:
        link = self.links[worker]
        await _run(["ip", "link", "set", link.host_if, "down"])
        self.cuts += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            await _run(["ip", "link", "set", link.host_if, "up"])

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proxy.wait(5)
            self.proxy.kill()
        for link in self.links.values():
            subprocess.run(["ip", "link", "del", link.host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", link.namespace], capture_output=True)


def url_port(url: str, default: int) -> int | None:
    u = urlsplit(url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        return None
    return u.port or default


# -- database outages -------------------------------------------------------------


async def pg_outage(admin_url: str, db: str, app_name: str, seconds: float) -> None:
    """Close ``db`` to connections, end the workers' sessions, reopen after ``seconds``."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(urlunsplit(urlsplit(admin_url)._replace(query="")))
    try:
        await conn.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name = $2",
                db,
                app_name,
            )
            await asyncio.sleep(seconds)
        finally:
            await conn.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
    finally:
        await conn.close()


_HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


async def sqlite_outage(path: Path, seconds: float) -> None:
    """Another process holds the write lock of the SQLite file ``path`` for ``seconds``."""
    await _run([sys.executable, "-c", _HOLD_LOCK, str(path), str(seconds)], timeout=seconds + 90)
