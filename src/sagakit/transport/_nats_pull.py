"""Pull requests on one JetStream durable consumer, with their own flow control.

A :class:`PullLoop` keeps requests for at most ``cap`` messages outstanding
(received or promised) on one consumer and hands what arrives to its
:class:`~sagakit.transport.nats.NatsSubscription`. Kept apart from
:mod:`sagakit.transport.nats`, which holds the transport, its deliveries and
subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from ._nats_link import BROKER_ERRORS

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSub

    from .nats import NatsSubscription

log = logging.getLogger("sagakit.transport.nats")

STATUS = "Status"


class _Request:
    """A pull request we sent and the messages it may still bring."""

    __slots__ = ("deadline", "remaining")

    def __init__(self, remaining: int, deadline: float) -> None:
        self.remaining, self.deadline = remaining, deadline


class PullLoop:
    """Keeps pull requests outstanding on one durable consumer."""

    def __init__(self, sub: NatsSubscription, consumer: str, cap: int) -> None:
        self.sub, self.consumer, self.cap = sub, consumer, cap
        t = sub.transport
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{t.stream}.{consumer}"
        self._requests: deque[_Request] = deque()
        self.waiting = 0  # received, waiting for a handler slot
        self._wake = asyncio.Event()
        self._closed = False
        self._nsub: NatsSub | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def outstanding(self) -> int:
        return sum(r.remaining for r in self._requests)

    async def start(self) -> None:
        nc = self.sub.transport.client
        self._inbox = nc.new_inbox()
        self._nsub = await nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._run(), name=f"sagakit-nats-pull-{self.consumer}")

    def wake(self) -> None:
        self._wake.set()

    def reset(self) -> None:
        """Forget outstanding requests (after a reconnect they are gone)."""
        self._requests.clear()
        self.wake()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is not None and not msg.data:
            if status in ("408", "409", "404"):
                # the oldest request ended (expired, or refused by the server)
                if self._requests:
                    self._requests.popleft()
                if status == "409":
                    log.debug("pull on %s refused: %s", self.consumer, msg.headers)
                self.wake()
            return  # 100 (heartbeat) or anything else: nothing to do
        while self._requests and self._requests[0].remaining <= 0:
            self._requests.popleft()
        if self._requests:
            self._requests[0].remaining -= 1
            if self._requests[0].remaining <= 0:
                self._requests.popleft()
        self.waiting += 1
        self.sub.dispatch(self, msg)

    async def _run(self) -> None:
        t = self.sub.transport
        backoff = 0.05
        while not self._closed:
            now = time.monotonic()
            while self._requests and self._requests[0].deadline <= now:
                self._requests.popleft()
            pending = self.waiting + self.outstanding
            want = self.cap - pending
            if want > 0 and (not self._requests or want >= max(1, self.cap // 2)):
                if t.connected:
                    try:
                        await self._pull(want)
                        backoff = 0.05
                    except BROKER_ERRORS as exc:
                        log.warning("pull on %s failed, will retry: %r", self.consumer, exc)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                    continue
                timeout = 0.25  # disconnected: reset() wakes us on reconnect
            else:
                nearest = min((r.deadline for r in self._requests), default=now + t.pull_expires)
                timeout = max(0.01, nearest - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _pull(self, batch: int) -> None:
        t = self.sub.transport
        expires = t.pull_expires
        request = {"batch": batch, "expires": int(expires * 1e9)}
        self._requests.append(_Request(batch, time.monotonic() + expires + 1.0))
        await t.client.publish(self._next_subject, json.dumps(request).encode(), reply=self._inbox)

    async def close(self) -> None:
        self._closed = True
        self.wake()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nsub is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await self._nsub.unsubscribe()
