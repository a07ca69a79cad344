"""The session-end net for broker namespaces the tests made (the brokers' twin of the
PostgreSQL table net in conftest.py).

A test makes its namespace with :func:`noted_namespace` (or :func:`note`), which notes the test;
at the end of the session every noted namespace still found on a broker
(RabbitMQ's default virtual host, NATS, Redis; asked of each broker's own API)
is removed with ``Transport.remove_namespace`` and its test named, so the one
that did not clean up can be mended.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

from sagakit.store import open_store
from sagakit.transport import open_transport
from sagakit.transport._nats_names import stream_for
from sagakit.transport._url import fresh_namespace, with_option

#: every namespace noted this session -> the test that made it
ISSUED: dict[str, str] = {}


def noted_namespace(label: str) -> str:
    """A fresh namespace, noted for the session-end net."""
    ns = fresh_namespace(label)
    note(ns)
    return ns


def note(ns: str, test: str | None = None) -> str:
    """Note ``ns`` as made by ``test`` (default: the test running now)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    ISSUED[ns] = test or current
    return ns


async def sweep(urls: dict[str, str]) -> dict[str, list[str]]:
    """Remove every noted namespace a broker still has; test -> ``broker:namespace`` removed."""
    finders: dict[str, Callable[[str], Awaitable[set[str]]]] = {
        "rabbitmq": _rabbitmq_left,
        "nats": _nats_left,
        "redis": _redis_left,
    }
    left: dict[str, list[str]] = {}
    for broker, url in urls.items():
        for ns in sorted(await finders[broker](url)):
            await _remove(with_option(url, "namespace", ns))
            left.setdefault(ISSUED[ns], []).append(f"{broker}:{ns}")
    return left


async def _remove(url: str) -> None:
    t = open_transport(url, open_store("memory://"))
    await t.open()
    try:
        await t.remove_namespace(t.namespace)
    finally:
        await t.close()


async def _rabbitmq_left(url: str) -> set[str]:
    import aio_pika
    import aiormq.exceptions

    conn = await aio_pika.connect(url)
    found = set()
    try:
        for ns in ISSUED:
            channel = await conn.channel()
            try:
                await channel.get_exchange(f"{ns}.events", ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            found.add(ns)
            with contextlib.suppress(Exception):
                await channel.close()
    finally:
        await conn.close()
    return found


async def _nats_left(url: str) -> set[str]:
    import nats

    nc = await nats.connect(url)
    try:
        streams = {s.config.name for s in await nc.jsm().streams_info()}
    finally:
        await nc.close()
    return {ns for ns in ISSUED if stream_for(ns) in streams}


async def _redis_left(url: str) -> set[str]:
    import redis.asyncio as aioredis

    raw = aioredis.Redis.from_url(url)
    try:
        return {ns for ns in ISSUED if [k async for k in raw.scan_iter(match=f"{ns}:*")]}
    finally:
        await raw.aclose()
