"""A plain TCP forwarder for the chaos harness's network partitions.

::

    python benchmarks/chaos_proxy.py 10.231.1.1:5432=127.0.0.1:5432 10.231.1.1:5672=127.0.0.1:5672

Workers placed in network namespaces (see :mod:`chaos_net`) reach the
machine's services, which listen on loopback only, through this forwarder
bound to the host end of their veth pair. It copies bytes both ways and
nothing else, so a partition (the veth link taken down) stalls a worker's
connections exactly as a pulled cable would: packets stop, TCP retransmits,
and the connections resume or time out when the link comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def forward(target: tuple[str, int]) -> object:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(*target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    return handle


def address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(routes: list[str]) -> None:
    servers = []
    for route in routes:
        listen, _, target = route.partition("=")
        host, port = address(listen)
        servers.append(await asyncio.start_server(forward(address(target)), host, port))  # type: ignore[arg-type]
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
