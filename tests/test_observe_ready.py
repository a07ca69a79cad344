"""``/readyz`` asks the broker too: cut a worker off its broker and it says 503 with
the reason, restore the link and it says 200 again.

The cut is real and touches nobody else: the App reaches the shared broker through
a TCP forwarder of this test's own, which is closed (every connection through it
dropped) and then opened again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

import sagakit as sk
from sagakit.observe.health import HealthServer
from tests.broker_net import noted_namespace
from tests.test_nats import remove_nats
from tests.test_rabbitmq import amqp_url, rabbitmq_vhosts, remove_rabbitmq
from tests.test_redis import remove_redis

__all__ = ["amqp_url", "rabbitmq_vhosts"]  # fixtures used here

pytestmark = pytest.mark.timeout(90)


class Forwarder:
    """A TCP forwarder to ``host:port`` that can be cut and restored on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        """Stop listening and drop every connection through the forwarder."""
        assert self.server is not None
        self.server.close()
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, up_writer}
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        self.links -= {writer, up_writer}


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


def through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the forwarder's."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_query(url: str, **options: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in options.items())


#: broker -> (url fixture, extra URL options, cleanup of what the transport made)
BROKERS: dict[str, tuple[str, dict[str, str], Callable[[Any], Any]]] = {
    "redis": ("redis_url", {}, remove_redis),
    "nats": ("nats_url", {}, remove_nats),
    "rabbitmq": ("amqp_url", {"reconnect_interval": "0.5"}, remove_rabbitmq),
}


@pytest.fixture(params=sorted(BROKERS))
async def forwarded(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Forwarder]]:
    fixture, options, _ = BROKERS[request.param]
    url = str(request.getfixturevalue(fixture))
    target = urlsplit(url)
    fwd = Forwarder(target.hostname or "127.0.0.1", target.port or 0)
    await fwd.start()
    tag = noted_namespace("skready")
    yield with_query(through(url, fwd.port), namespace=tag, **options), fwd
    if fwd.server is not None:
        fwd.server.close()


async def readyz(port: int) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(f"http://127.0.0.1:{port}/readyz")


async def until_status(port: int, status: int, timeout: float = 30.0) -> httpx.Response:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        r = await readyz(port)
        if r.status_code == status or loop.time() > end:
            return r
        await asyncio.sleep(0.2)


async def test_readyz_turns_503_when_the_broker_is_cut_off_and_200_when_back(
    tmp_path: Path, forwarded: tuple[str, Forwarder], request: pytest.FixtureRequest
) -> None:
    url, fwd = forwarded
    app = sk.App(f"sqlite:///{tmp_path}/s.db", url, settings=sk.Settings(max_poll=0.05))
    server = HealthServer(app, None, host="127.0.0.1", port=0)
    try:
        async with app:
            await server.start()
            ready = await readyz(server.port)
            assert ready.status_code == 200, ready.text
            await fwd.cut()
            down = await until_status(server.port, 503)
            assert down.status_code == 503, down.text
            problems = down.json()["problems"]
            assert any(p.startswith("transport ") and "unreachable" in p for p in problems)
            assert str(fwd.port) in " ".join(problems)  # names the broker it cannot reach
            await fwd.start()  # the same port again
            back = await until_status(server.port, 200)
            assert back.status_code == 200, back.text
            await server.stop()
    finally:  # what the transport made on the broker (the forwarder is open again)
        await BROKERS[request.node.callspec.params["forwarded"]][2](app.transport)
