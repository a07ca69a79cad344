"""The consumer skeleton the broker and memory transports share.

Every transport feeds the deliveries it receives into a :class:`Consumer`,
which keeps the rules that are the same everywhere in one place:

- at most ``prefetch`` handlers run at once; a delivery that arrives while
  all slots are taken waits for one (pull-based transports ask for no more
  than :attr:`Consumer.free` and never wait);
- a handler that raises is logged and its delivery is nacked with a delay of
  one second;
- :meth:`Consumer.stop` takes no new deliveries, gives the handlers in
  flight ``grace`` seconds, then cancels the late ones and releases their
  deliveries at once (nack with no delay), so another consumer gets them now
  rather than after a lease;
- :meth:`Consumer.abort` vanishes like a crashed process, settling nothing.

:class:`BrokerDelivery` makes ack and nack settle a delivery exactly once.
What differs per broker (how messages arrive, how a nack is carried out,
leases and reconnects) stays in the transport, behind the hooks
:meth:`Consumer._halt`, :meth:`Consumer._finish` and friends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from ..store import Store, Tx
    from . import Handler

D = TypeVar("D", bound="BrokerDelivery")

CRASH_DELAY = 1.0  # seconds before a delivery whose handler raised comes back
CANCEL_WAIT = 1.0  # seconds a cancelled handler gets to unwind


class BrokerDelivery:
    """A received message that is settled (acked or nacked) at most once.

    Subclasses carry the message out with :meth:`_ack` and :meth:`_nack`;
    a second ack or nack, of either kind, does nothing.
    """

    __slots__ = ("attempt", "data", "settled")

    #: a broker counts deliveries only (see :class:`~sagakit.transport.Delivery`)
    failures: int | None = None

    def __init__(self, data: bytes, attempt: int) -> None:
        self.data, self.attempt = data, attempt
        self.settled = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self._ack()

    async def nack(self, delay: float, *, failed: bool = False) -> None:
        if not self.settled:
            self.settled = True
            await self._nack(delay)

    async def ack_in(self, store: Store, tx: Tx) -> bool:
        """A broker message is never in a store: ack it after the commit."""
        return False

    async def _ack(self) -> None:
        raise NotImplementedError

    async def _nack(self, delay: float) -> None:
        raise NotImplementedError


class Consumer(Generic[D]):
    """Runs a handler per delivery with bounded concurrency; stops with a grace period."""

    def __init__(self, queue: str, handler: Handler, prefetch: int, log: logging.Logger) -> None:
        self.queue, self.handler, self.log = queue, handler, log
        self.prefetch = max(1, prefetch)
        self.stopping = False
        self.running = 0  # handlers executing (not waiting for a slot)
        self._slots = asyncio.Semaphore(self.prefetch)
        self._tasks: dict[asyncio.Task[None], D] = {}
        self._changed = asyncio.Event()  # a slot was freed, or stopping began

    # -- intake ----------------------------------------------------------------

    @property
    def free(self) -> int:
        """Deliveries that could start right now (prefetch minus those taken)."""
        return self.prefetch - len(self._tasks)

    def deliveries(self) -> list[D]:
        """Deliveries taken and not yet finished with (waiting or running)."""
        return list(self._tasks.values())

    async def wait_free(self) -> None:
        """Return once at least one slot is free, or the consumer is stopping."""
        while self.free <= 0 and not self.stopping:
            self._changed.clear()
            await self._changed.wait()

    def spawn(self, delivery: D) -> None:
        """Handle ``delivery`` in a task of its own, once a slot is free."""
        task = asyncio.create_task(self._handle(delivery), name=f"sagakit-handle-{self.queue}")
        self._tasks[task] = delivery
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._changed.set()

    async def _handle(self, delivery: D) -> None:
        try:
            await self._slots.acquire()
        finally:
            self._dequeued(delivery)
        try:
            if self.stopping:  # arrived too late: let another consumer have it
                await self._release(delivery, 0)
                return
            await self._call(delivery)
        finally:
            self._slots.release()

    async def _call(self, delivery: D) -> None:
        self.running += 1
        try:
            await self.handler(delivery)
        except Exception:
            self.log.exception("handler crashed on %s; retrying later", self.queue)
            await self._release(delivery, CRASH_DELAY)
        finally:
            self.running -= 1
        if not delivery.settled:
            self._unsettled(delivery)

    async def _release(self, delivery: D, delay: float) -> None:
        try:
            await delivery.nack(delay)
        except Exception as exc:
            self.log.warning("could not release a delivery of %s: %r", self.queue, exc)

    # -- stopping ----------------------------------------------------------------

    async def stop(self, grace: float = 10.0) -> None:
        """Take no new messages; give in-flight handlers ``grace`` seconds.

        Handlers still running after that are cancelled and their deliveries
        released at once (nack with no delay), so a restarted worker gets them
        without waiting out a lease. A second call returns at once.
        """
        if self.stopping:
            return
        self._begin_stop()
        await self._halt()
        await self._drain(grace)
        await self._finish()

    async def abort(self) -> None:
        """Vanish like a crashed process: cancel handlers, settle nothing.

        The broker gives the deliveries to another consumer once their lease
        runs out (or the connection is gone). For tests.
        """
        self._begin_stop()
        await self._halt()
        await self._cancel(list(self._tasks))
        await self._finish()

    def _begin_stop(self) -> None:
        self.stopping = True
        self._changed.set()  # an intake loop waiting for a slot looks up

    async def _drain(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._tasks and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks), timeout=left)
        late = dict(self._tasks)
        if not late:
            return
        self.log.warning(
            "%d handler(s) of %s outlived the %.1fs grace period; cancelling and releasing",
            len(late),
            self.queue,
            grace,
        )
        await self._cancel(list(late))
        await asyncio.gather(*(self._release(d, 0) for d in late.values()))

    async def _cancel(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CANCEL_WAIT)
            if stuck:
                self.log.warning("%d handler(s) of %s ignore cancellation", len(stuck), self.queue)

    # -- hooks -------------------------------------------------------------------

    async def _halt(self) -> None:
        """Stop taking new deliveries (called once, before handlers are waited for)."""

    async def _finish(self) -> None:
        """Let go of the broker resources once no handler runs."""

    def _dequeued(self, delivery: D) -> None:
        """``delivery`` got a slot, or will never get one."""

    def _unsettled(self, delivery: D) -> None:
        """The handler returned without acking or nacking ``delivery``."""
        self.log.warning(
            "a handler of %s left a delivery unsettled; the broker will redeliver it",
            self.queue,
        )


__all__ = ["BrokerDelivery", "Consumer"]
