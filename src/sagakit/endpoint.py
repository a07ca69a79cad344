"""Where a delivery becomes a committed local transaction.

An :class:`Endpoint` consumes one queue. For each delivery it decodes the
envelope, finds the route for its type, and runs the route inside one local
transaction together with the outgoing messages and (on the database
transport) the acknowledgement. Bad input is dead-lettered with its reason;
technical failures are retried with backoff, then dead-lettered, and a command
that gives up still gets a failure reply so no saga waits forever.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import MessageError, NoHandler, RoutingError, SagakitError
from .messages import Codec, Envelope, Failure, caused_by
from .policies import RetryPolicy
from .store.core import InboxRow
from .transport.database import DbDelivery

if TYPE_CHECKING:
    from .store import Store, Tx
    from .transport import Delivery, Transport

log = logging.getLogger("sagakit.endpoint")

OUTBOX_QUEUE = "sagakit.outbox"


class RaceLost(SagakitError):
    """A concurrent transaction recorded this key first; roll back and retry."""

    retryable = True


class Refusal(Exception):
    """A handler refused its command with a business error: record it anew."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class LeaseLost(SagakitError):
    """Another consumer took over this delivery; roll back and let it finish."""

    retryable = True


@dataclass(slots=True)
class Outbox:
    """Messages a transaction will send; written to the store on flush."""

    messages: list[tuple[Envelope, str]] = field(default_factory=list)
    scheduled: list[tuple[Envelope, str, float]] = field(default_factory=list)

    def send(self, envelope: Envelope, destination: str) -> None:
        """Send a command or reply to the queue ``destination``."""
        self.messages.append((envelope, destination))

    def publish(self, envelope: Envelope) -> None:
        """Publish an event to every group subscribed to its type."""
        self.messages.append((envelope, envelope.type))

    def schedule(self, envelope: Envelope, queue: str, delay: float) -> None:
        """Put a message on one of the store's own queues (timers, local steps)."""
        self.scheduled.append((envelope, queue, delay))


Route = Callable[[Envelope, "Tx", Outbox, "Endpoint"], Awaitable[None]]


class Endpoint:
    """Consumes one queue into one store."""

    def __init__(
        self,
        name: str,
        store: Store,
        transport: Transport,
        codec: Codec,
        router: Callable[[Envelope], Route | None],
        *,
        retry: RetryPolicy,
    ) -> None:
        self.name = name
        self.store = store
        self.transport = transport
        self.codec = codec
        self.router = router
        self.retry = retry
        self.local = transport.local_store is store

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery to the end: committed, retried or dead-lettered."""
        try:
            env = self.codec.decode(delivery.data)
        except MessageError as exc:
            await self.dead_letter(delivery, None, exc)
            return
        route = self.router(env)
        try:
            if route is None:
                raise NoHandler(f"no handler for {env.type!r} ({env.kind}) at {self.name!r}")
            await self.in_transaction(delivery, lambda tx, out: route(env, tx, out, self))
        except LeaseLost:
            log.info("lease lost on %s; another consumer has it", env.id)
        except Refusal as refusal:
            await self.refuse(delivery, env, refusal.error)
        except (MessageError, RoutingError) as exc:
            await self.dead_letter(delivery, env, exc)
        except Exception as exc:
            await self.technical_failure(delivery, env, exc)

    async def in_transaction(
        self, delivery: Delivery | None, body: Callable[[Tx, Outbox], Awaitable[None]]
    ) -> None:
        """Run ``body`` and flush its outbox in one transaction, then ack."""
        out = Outbox()
        async with self.store.transaction() as tx:
            await body(tx, out)
            await self.flush(tx, out)
            if isinstance(delivery, DbDelivery) and delivery.store is self.store:
                delivery.settled = True
                if not await self.store.ack(tx, delivery.item):
                    raise LeaseLost("lease lost")
        if delivery is not None:
            await delivery.ack()

    async def flush(self, tx: Tx, out: Outbox) -> None:
        """Write outgoing messages: straight to their queues, or to the outbox."""
        store = self.store
        for env, dest in out.messages:
            data = self.codec.encode(env)
            if not self.local:
                await store.enqueue(
                    tx, OUTBOX_QUEUE, env.id, data, destination=f"{env.kind}:{dest}"
                )
            elif env.kind == "event":
                await store.enqueue_event(tx, dest, env.id, data)
            else:
                await store.enqueue(tx, dest, env.id, data)
        for env, queue, delay in out.scheduled:
            await store.enqueue(tx, queue, env.id, self.codec.encode(env), delay=delay)

    async def refuse(self, delivery: Delivery, env: Envelope, error: Exception) -> None:
        """Answer a refused command with a failure reply, kept in the inbox."""

        async def body(tx: Tx, out: Outbox) -> None:
            await self.fail_command(tx, out, env, error, technical=False)

        await self.settle(delivery, body)

    async def settle(
        self, delivery: Delivery, body: Callable[[Tx, Outbox], Awaitable[None]]
    ) -> None:
        """Record an outcome for ``delivery`` unless someone else already did.

        A lost lease means another consumer has the message. A lost inbox race
        means a concurrent copy recorded its outcome first (its unique key is
        often what failed here): deliver it again and the inbox answers.
        """
        try:
            await self.in_transaction(delivery, body)
        except LeaseLost:
            pass
        except RaceLost:
            await delivery.nack(0.05)

    async def technical_failure(self, delivery: Delivery, env: Envelope, exc: Exception) -> None:
        """Retry with backoff; when the policy gives up, dead-letter and reply."""
        attempt = delivery.attempt
        if not self.retry.gives_up_after(attempt) and getattr(exc, "retryable", True):
            log.info("retrying %s (%s) after attempt %d: %r", env.type, env.id, attempt, exc)
            await delivery.nack(self.retry.delay(attempt))
            return
        log.warning("giving up on %s (%s) after %d attempts: %r", env.type, env.id, attempt, exc)
        await self.dead_letter(delivery, env, exc, technical=True)

    async def dead_letter(
        self, delivery: Delivery, env: Envelope | None, exc: Exception, *, technical: bool = False
    ) -> None:
        """Store the message with its reason (and answer a command with a failure)."""
        reason = f"{type(exc).__name__}: {exc}"

        async def body(tx: Tx, out: Outbox) -> None:
            await self.store.dead_letter(
                tx,
                self.name,
                delivery.data,
                reason,
                type(exc).__name__,
                message_id=env.id if env else None,
                saga_id=env.headers.saga_id if env else None,
            )
            if env is not None and env.kind == "command" and env.headers.reply_to:
                await self.fail_command(tx, out, env, exc, technical=technical)

        await self.settle(delivery, body)

    async def fail_command(
        self, tx: Tx, out: Outbox, env: Envelope, exc: Exception, *, technical: bool
    ) -> None:
        """Answer ``env`` with a failure reply and remember it in the inbox."""
        code = getattr(exc, "code", "") or type(exc).__name__
        failure = Failure(code=code, message=str(exc), technical=technical)
        reply_env = self.make_reply(env, failure, outcome="failure")
        await self.remember(tx, env, "failure", reply_env)
        if env.headers.reply_to:
            out.send(reply_env, env.headers.reply_to)

    def make_reply(self, env: Envelope, payload: object, *, outcome: str) -> Envelope:
        h = env.headers
        headers = caused_by(env, step=h.step, phase=h.phase, outcome=outcome, attempt=h.attempt)
        return self.codec.make(payload, headers, kind="reply")

    async def remember(self, tx: Tx, env: Envelope, outcome: str, reply: Envelope | None) -> None:
        """Record the outcome of ``env`` under its inbox key (replacing a failure)."""
        data = self.codec.encode(reply) if reply is not None else None
        row = InboxRow(outcome, data, env.headers.reply_to, env.headers.attempt)
        if not await self.store.inbox_put(tx, self.name, inbox_key(env), row, replace=True):
            raise RaceLost(
                f"{inbox_key(env)} was settled concurrently", saga_id=env.headers.saga_id
            )


def inbox_key(env: Envelope) -> str:
    """Saga commands dedupe by (saga, step, phase); everything else by message id."""
    h = env.headers
    if env.kind == "command" and h.saga_id and h.step:
        return f"saga:{h.saga_id}:{h.step}:{h.phase or 'forward'}"
    return env.id
