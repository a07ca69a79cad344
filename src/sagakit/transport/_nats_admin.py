"""JetStream administration: the namespace's stream and its durable consumers.

:class:`StreamAdmin` creates the stream and the consumers behind queues and
topic bindings, lists the consumers of a queue (their descriptions name it),
and deletes the stream when the namespace is removed. Kept apart from
:mod:`sagakit.transport.nats`, which holds the transport itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nats.js import api
from nats.js.errors import APIError, NotFoundError

from ..errors import ConfigurationError, ForeignNamespace, TransportError
from ._nats_link import BROKER_ERRORS
from ._nats_names import consumer_name

if TYPE_CHECKING:
    from nats.js.manager import JetStreamManager

    from .nats import NatsTransport

log = logging.getLogger("sagakit.transport.nats")


class StreamAdmin:
    """Creates, lists and deletes the JetStream objects of one transport's namespace."""

    def __init__(self, transport: NatsTransport) -> None:
        self.transport = transport
        self.declared: set[str] = set()  # consumers known to exist on this connection

    def _manager(self) -> JetStreamManager:
        return self.transport.link.manager()

    async def ensure_stream(self) -> None:
        """Create the namespace's stream, or check that the one there holds its subjects."""
        t = self.transport
        jsm = self._manager()
        subjects = f"{t.prefix}.>"
        try:
            info = await jsm.stream_info(t.stream)
        except NotFoundError:
            config = api.StreamConfig(
                name=t.stream,
                subjects=[subjects],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType(t.storage),
                max_age=t.max_age or None,
                duplicate_window=t.duplicate_window,
                description="sagakit messages",
            )
            try:
                await jsm.add_stream(config)
                return
            except APIError:  # created concurrently by another process?
                info = await jsm.stream_info(t.stream)
        if subjects not in (info.config.subjects or []):
            raise ConfigurationError(
                f"JetStream stream {t.stream!r} exists without subjects {subjects!r}"
            )

    async def ensure_consumer(self, queue: str, topic: str | None) -> str:
        """The durable consumer feeding ``queue`` with its commands, or with ``topic``."""
        t = self.transport
        name = consumer_name(queue, topic)
        if name in self.declared:
            return name
        subject = t.queue_subject(queue) if topic is None else t.topic_subject(topic)
        description = json.dumps({"sagakit": 1, "queue": queue, "topic": topic})
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=description,
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.ALL if topic is None else api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=t.ack_wait,
            max_deliver=-1,
        )
        jsm = self._manager()
        try:
            try:
                await jsm.add_consumer(t.stream, config)
            except APIError as exc:
                # exists with a config that cannot be changed in place: keep it
                info = await jsm.consumer_info(t.stream, name)
                log.warning("kept existing NATS consumer %s (%r): %r", name, info.config, exc)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot declare NATS consumer {name!r}: {exc!r}") from exc
        self.declared.add(name)
        return name

    async def consumers_of(self, queue: str) -> list[str]:
        """Names of the durable consumers that feed ``queue``."""
        t = self.transport
        jsm = self._manager()
        names: list[str] = []
        offset = 0
        try:
            while True:
                page = await jsm.consumers_info(t.stream, offset=offset)
                for info in page:
                    if _queue_of(info) == queue and info.name:
                        names.append(info.name)
                if len(page) < 256:
                    break
                offset += len(page)
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot list NATS consumers: {exc!r}") from exc
        return sorted(names)

    async def remove_stream(self) -> None:
        """Delete the stream (if there is one) after checking that it is the namespace's own."""
        t = self.transport
        jsm = self._manager()
        try:
            info = await jsm.stream_info(t.stream)
        except NotFoundError:
            info = None
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot look up NATS stream {t.stream!r}: {exc!r}") from exc
        if info is not None:
            self._require_own_stream(info.config.subjects or [])
            await self._delete_stream()
        self.declared.clear()

    def _require_own_stream(self, subjects: Sequence[str]) -> None:
        t = self.transport
        if list(subjects) != [f"{t.prefix}.>"]:
            raise ForeignNamespace(
                f"refusing to delete NATS stream {t.stream!r}: its subjects {subjects!r} "
                f"are not only namespace {t.namespace!r}'s"
            )

    async def _delete_stream(self) -> None:
        t = self.transport
        try:
            await self._manager().delete_stream(t.stream)
        except NotFoundError:
            pass  # deleted meanwhile: the same outcome
        except BROKER_ERRORS as exc:
            raise TransportError(f"cannot delete NATS stream {t.stream!r}: {exc!r}") from exc


def _queue_of(info: api.ConsumerInfo) -> str | None:
    description = info.config.description if info.config else None
    if not description or not description.startswith("{"):
        return None
    try:
        data = json.loads(description)
    except ValueError:
        return None
    queue = data.get("queue") if isinstance(data, dict) and data.get("sagakit") else None
    return queue if isinstance(queue, str) else None
