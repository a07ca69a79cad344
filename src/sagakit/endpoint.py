"""The hop: where a delivery becomes one committed local transaction.

Every handler — participant, coordinator, timers, local steps — runs through
the same hop. An :class:`Endpoint` consumes one queue; for each delivery it

1. decodes the envelope (bad input is dead-lettered with its reason);
2. refuses a message delivered more than ``max_deliveries`` times;
3. runs the route inside one transaction of its store, bounded by the
   handler timeout: the route admits the message through the inbox, runs the
   user handler or the pure decision, and fills a :class:`Scope`'s outbox;
4. writes the outgoing messages and acknowledges the delivery in that same
   transaction when the transport can (database transport), else right after
   the commit.

A business refusal rolls the transaction back and records the failure in a
fresh one. Technical failures are retried with backoff; when the policy gives
up, the message is dead-lettered and a command gets a failure reply, so no
saga waits forever. Every outcome for a command goes through the inbox, so a
copy that lost the race is answered with the outcome that won.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from .errors import (
    ConcurrencyConflict,
    DeliveryLimitExceeded,
    HandlerTimeout,
    LeaseLost,
    MessageError,
    NoHandler,
    OutcomeExists,
    Refusal,
    RoutingError,
    SagakitError,
    SagaVersionUnknown,
    StoreUnavailable,
    TransportError,
)
from .inbox import FAILURE, Admission, Inbox, Verdict
from .messages import Codec, Envelope, Failure, Headers, new_id, reply_headers
from .observe.hooks import BASE, Hooks
from .outbox import Outbox, OutboxWriter
from .policies import RetryPolicy
from .store.core import DEAD_LETTER_KEEP as DEAD_LETTER_KEEP
from .transport import attempt_of

if TYPE_CHECKING:
    from .store import InboxRow, Store, Tx
    from .transport import Delivery

log = logging.getLogger("sagakit.endpoint")

CANCELLED_CODE = "sagakit.Cancelled"


@dataclass(frozen=True, slots=True)
class HopPolicy:
    """How the hop treats slow, failing and repeated messages."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    handler_timeout: float | None = 60.0
    max_deliveries: int = 25
    #: how long a message for a saga version this process doesn't know is handed
    #: back for another process (a rolling upgrade) before it is dead-lettered
    version_grace: float = 300.0
    #: how long a store outage is waited out before a message fails
    outage_patience: float = 600.0


RACE_RETRIES = 3  #: immediate re-runs of a hop that lost an optimistic race
#: steps' hops a transaction may run after its own, at most, without sending their
#: commands (:mod:`sagakit.saga.inline`): bounds the transaction's length
CHAIN_MAX = 16
OUTAGE_MAX_BACKOFF = 5.0  #: seconds between tries while a store or broker is unavailable


#: decides on a command's reply inside the command's own transaction; False: send it
Fold = Callable[["Scope", Envelope], Awaitable[bool]]


@dataclass(slots=True)
class Scope:
    """What a route gets for one message: its transaction, outbox and inbox."""

    env: Envelope
    tx: Tx
    inbox: Inbox
    codec: Codec
    out: Outbox = field(default_factory=Outbox)
    hooks: Hooks = BASE
    #: the route may run its handler before admitting the message (a bet that it
    #: is the first copy, see :class:`~sagakit.inbox.Deferred`); a lost bet raises
    #: :class:`~sagakit.errors.OutcomeExists` and the hop runs again without it
    optimistic: bool = False
    #: the coordinator's decision on a reply, taken in this transaction instead of
    #: sending the reply; set on a hop's first try only, where the coordinator runs
    #: in this process on this store (see :mod:`sagakit.saga.inline`)
    fold: Fold | None = None
    #: how many steps' hops that decision may run in this transaction after this one
    #: (lower on a try after one of them failed, see :class:`_InlineHopFailed`)
    chain: int = CHAIN_MAX
    #: the route ran its handler before admitting the message (set by the bet)
    bet: bool = False
    #: the decision on its reply ran steps' hops in this transaction (set by the coordinator)
    inlined: bool = False

    async def answer(
        self, payload: Any, outcome: str, *, unadmitted: bool = False, fold: bool = False
    ) -> None:
        """Record this command's outcome in the inbox and send it as the reply.

        ``unadmitted``: the message was not admitted in this transaction; the
        outcome is stored only if none is (see :meth:`Inbox.record_first`).
        ``fold``: the reply may be decided on in this transaction instead of
        sent, where the scope allows it; only for a hop that may run again
        (its handler ``db_only``, or no handler in it), since a decision that
        lost to another hop of its saga rolls the whole transaction back.
        """
        env = self.env
        reply = self.codec.reply(env, payload, outcome=outcome, sender=self.inbox.consumer)
        record = self.inbox.record_first if unadmitted else self.inbox.record
        await record(self.tx, env, outcome, self.codec.encode(reply))
        to = env.headers.reply_to
        if to and not (fold and self.fold is not None and await self.fold(self, reply)):
            self.out.send(reply, to)

    def resend(self, stored: InboxRow) -> None:
        """Answer a copy with the stored reply, re-addressed to this copy.

        The re-sent reply gets a message id of its own: brokers that dedupe by
        id (NATS JetStream) would otherwise drop it as the first reply's twin.
        """
        h = self.env.headers
        if stored.reply is None or not h.reply_to:
            return
        reply = self.codec.decode(stored.reply, trusted=True)
        reply.id = new_id()
        reply.headers = reply_headers(self.env, reply.headers.outcome, self.inbox.consumer)
        self.out.send(reply, h.reply_to)

    def refuse(self) -> None:
        """Answer a command barred by its compensation: a failure, no effect."""
        if self.env.headers.reply_to:
            failure = Failure(CANCELLED_CODE, "the step was already compensated")
            reply = self.codec.reply(self.env, failure, outcome=FAILURE, sender=self.inbox.consumer)
            self.out.send(reply, self.env.headers.reply_to)

    async def settled_elsewhere(self, admission: Admission) -> bool:
        """Answer a duplicate or a refused copy; True if that was the whole job."""
        if admission.verdict is Verdict.REFUSED:
            self.refuse()
        elif admission.verdict is Verdict.DUPLICATE and admission.stored is not None:
            self.hooks.duplicate(self.inbox.consumer)
            self.resend(admission.stored)
        return admission.verdict is not Verdict.NEW


class _BetFailed(Exception):
    """A first try that ran its handler before admitting the message failed (a write
    refused at commit, say): the message may be a copy of one already settled, whose
    handler meets its own effects, so the hop runs again admitted first before the
    failure counts (internal to the endpoint)."""


class _InlineHopFailed(Exception):
    """A hop run inside another's transaction (:meth:`Endpoint.run_in`) failed.

    The transaction writes nothing; whoever ran it runs it again with that
    message sent instead (the hops before it still inline), so the failure is
    the message's own hop's: retried, counted and dead-lettered there, never
    charged to the hop that carried it. A business refusal too: it rolls back
    only its own hop, which a shared transaction cannot do.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        #: which of the transaction's inline hops failed (1: the first; set by whoever
        #: ran it, the innermost first)
        self.at: int | None = None

    @property
    def before(self) -> int:
        """How many inline hops the next try may run: those before the one that failed."""
        return max((self.at or 1) - 1, 0)


#: failures of an inlined hop that keep their meaning for the hop carrying it
_OWN = (ConcurrencyConflict, OutcomeExists, StoreUnavailable)
#: failures that say nothing about whether the message is a copy
_SETTLED = (Refusal, LeaseLost, _InlineHopFailed, *_OWN)


class Route(NamedTuple):
    """A message's handler in the hop, with its own timeout (None: the policy's)."""

    run: Callable[[Scope], Awaitable[None]]
    timeout: float | None = None


Router = Callable[[Envelope], Route | None]


class Endpoint:
    """Consumes one queue into one store."""

    hooks: Hooks = BASE  #: set by the App (sagakit.observe)
    #: decides on replies in the hop that makes them (set by the App where it can)
    fold: Fold | None = None

    def __init__(
        self,
        name: str,
        writer: OutboxWriter,
        router: Router,
        *,
        policy: HopPolicy,
        consumer: str | None = None,
        trusted: bool = False,
    ) -> None:
        self.name = name
        self.writer = writer
        self.store: Store = writer.store
        self.codec: Codec = writer.codec
        self.router = router
        self.policy = policy
        self.inbox = Inbox(self.store, consumer or name)
        #: the store's own queues (timers, local steps): written only by this deployment
        self.trusted = trusted

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery to the end: committed, retried or dead-lettered."""
        try:
            env = self.codec.decode(delivery.data, trusted=self.trusted)
        except MessageError as exc:
            await self.dead_letter(delivery, None, exc)
            return
        if delivery.attempt > self.policy.max_deliveries:
            await self._over_limit(delivery, env)
            return
        with self.hooks.processing(env, self.name):
            await self._dispatch(delivery, env)

    async def _dispatch(self, delivery: Delivery, env: Envelope) -> None:
        try:
            route = self.router(env)
            if route is None:
                raise NoHandler(f"no handler for {env.type!r} ({env.kind}) at {self.name!r}")
            await self._patiently(lambda: self._bounded(delivery, env, route))
        except LeaseLost:
            log.info("lease lost on %s; another consumer has it", env.id)
        except Refusal as refusal:
            await self.fail_command(
                delivery, env, refusal.error, technical=False, after=refusal.after
            )
        except (MessageError, RoutingError) as exc:
            await self.dead_letter(delivery, env, exc)
        except SagaVersionUnknown as exc:
            await self._hand_back(delivery, env, exc)
        except Exception as exc:
            await self.technical_failure(delivery, env, exc)

    async def _hand_back(self, delivery: Delivery, env: Envelope, exc: SagaVersionUnknown) -> None:
        """A newer (or older) definition runs elsewhere: let another process take it.

        During a rolling upgrade some coordinators know a saga version and some
        don't; the message goes back to the queue for a bounded time
        (``version_grace``, from the message's creation) before it is treated as
        undeliverable.
        """
        age = time.time() - (env.headers.created_at or time.time())
        if age > self.policy.version_grace:
            log.warning("%s: still no process knows it after %.0fs", exc, age)
            await self.dead_letter(delivery, env, exc)
            return
        log.info("%s: handing %s back for another process", exc, env.id)
        await delivery.nack(min(self.policy.retry.delay(delivery.attempt), 5.0))

    async def _bounded(self, delivery: Delivery, env: Envelope, route: Route) -> None:
        timeout = route.timeout if route.timeout is not None else self.policy.handler_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._racing(env, route.run, delivery)
        except TimeoutError as exc:
            h = env.headers
            raise HandlerTimeout(
                f"handler of {env.type!r} ran past its {timeout}s timeout",
                saga_id=h.saga_id,
                step=h.step,
                attempt=delivery.attempt,
            ) from exc

    async def transact(
        self,
        env: Envelope,
        body: Callable[[Scope], Awaitable[None]],
        delivery: Delivery | None = None,
        *,
        optimistic: bool = False,
        fold: bool = False,
        chain: int = CHAIN_MAX,
    ) -> None:
        """Run ``body`` and flush its outbox in one transaction, then ack.

        ``optimistic``: a first try (see :attr:`Scope.optimistic`); ``fold``: its
        replies may be decided on here (:attr:`Endpoint.fold`), running at most
        ``chain`` further steps' hops (:attr:`Scope.chain`).
        """
        acked, scope = False, None
        try:
            async with self.store.transaction() as tx:
                scope = Scope(env, tx, self.inbox, self.codec, hooks=self.hooks)
                scope.optimistic, scope.fold = optimistic, self.fold if fold else None
                scope.chain = chain
                await body(scope)
                await self.writer.flush(tx, scope.out)
                if delivery is not None:
                    if delivery.failures is None and delivery.attempt > 1:
                        await self.store.clear_failures(tx, self.inbox.consumer, env.id)
                    acked = await delivery.ack_in(self.store, tx)
        except _SETTLED:
            raise
        except Exception as exc:
            if scope is not None and scope.inlined:  # maybe a step run in it: find out
                msg = f"{env.type} ({env.id}) with steps run in it: {exc!r}"
                raise _InlineHopFailed(msg) from exc
            if scope is not None and scope.bet:  # maybe a copy: find out, admitted first
                raise _BetFailed(f"{env.type} ({env.id}): {exc!r}") from exc
            raise
        if delivery is not None and not acked:
            await self._ack_committed(delivery, env)

    async def run_in(self, tx: Tx, env: Envelope, fold: Fold) -> None:
        """Run ``env``'s route in ``tx``: a hop for a message that was never sent.

        For a saga's command decided on in this process (inside its start, or in
        the previous step's hop), whose reply is decided on at once (``fold``);
        no delivery, no retries here: a failure raises :class:`_InlineHopFailed`
        (an outage, a lost race or a lost bet as themselves), and the caller
        sends the command instead.
        """
        try:
            await self._inline(tx, env, fold)
        except (_InlineHopFailed, *_OWN):
            raise
        except Exception as exc:
            raise _InlineHopFailed(f"{env.type} ({env.id}) at {self.name}: {exc!r}") from exc

    async def _inline(self, tx: Tx, env: Envelope, fold: Fold) -> None:
        route = self.router(env)
        if route is None:
            raise NoHandler(f"no handler for {env.type!r} ({env.kind}) at {self.name!r}")
        timeout = route.timeout if route.timeout is not None else self.policy.handler_timeout
        with self.hooks.processing(env, self.name):
            scope = Scope(env, tx, self.inbox, self.codec, hooks=self.hooks, optimistic=True)
            scope.fold = fold
            tx.separate()  # its held writes must not miss those of the hops before it
            async with asyncio.timeout(timeout):
                await route.run(scope)
            await self.writer.flush(tx, scope.out)

    async def _racing(
        self, env: Envelope, body: Callable[[Scope], Awaitable[None]], delivery: Delivery
    ) -> None:
        """:meth:`transact`, run again at once when it lost an optimistic race.

        A coordinator decides on an instance read without a lock; a hop that
        another hop overtook wrote nothing (:class:`ConcurrencyConflict`), so
        it is repeated on the new state, not backed off as a failure. A
        participant's first try runs its handler before admitting the message;
        if another copy's outcome was there (:class:`OutcomeExists`), nothing
        was written and the hop runs again the safe way: admitted first. A
        step's hop run in this one that failed (:class:`_InlineHopFailed`) has
        its command sent instead on the next try.
        """
        optimistic, fold, chain = True, True, CHAIN_MAX
        for _ in range(RACE_RETRIES):
            try:
                return await self.transact(
                    env, body, delivery, optimistic=optimistic, fold=fold, chain=chain
                )
            except _InlineHopFailed as exc:  # that step's command is sent this time
                log.debug("%s: %s; sending its command", self.name, exc)
                chain = exc.before
                continue
            except ConcurrencyConflict as exc:
                log.debug("%s: %s; deciding again", self.name, exc)
            except (OutcomeExists, _BetFailed) as exc:
                log.debug("%s: %s; admitting it first", self.name, exc)
                optimistic = False
            fold = False  # a decision taken in this hop lost, or its bet did: reply instead
        await self.transact(env, body, delivery)

    async def _ack_committed(self, delivery: Delivery, env: Envelope) -> None:
        """Acknowledge a delivery whose work has committed.

        If the broker can't take the ack (it is away), the work still stands:
        the message comes again and the inbox answers the copy with the stored
        outcome. Counting that as the handler's failure would use up the
        message's retries, and dead-letter it, for a broker outage.
        """
        try:
            await delivery.ack()
        except TransportError as exc:
            if not exc.retryable:
                raise
            log.warning(
                "%s: %s (%s) committed but not acknowledged (%s); its copy will be "
                "answered from the inbox",
                self.name,
                env.type,
                env.id,
                exc,
            )

    async def technical_failure(self, delivery: Delivery, env: Envelope, exc: Exception) -> None:
        """Retry with backoff; when the policy gives up, dead-letter and reply.

        The policy's attempts are the handler's runs that failed, never its
        deliveries: a message whose workers were killed under it has not used
        its retries up. The database queue counts them itself; for a broker's
        message the store does (:meth:`_failed_runs`).
        """
        retry, retryable = self.policy.retry, getattr(exc, "retryable", True)
        attempt = await self._failed_runs(delivery, env) if retryable else attempt_of(delivery)
        if retryable and not retry.gives_up_after(attempt):
            log.info("retrying %s (%s) after attempt %d: %r", env.type, env.id, attempt, exc)
            await delivery.nack(retry.delay(attempt), failed=True)
            return
        log.warning("giving up on %s (%s) after %d attempts: %r", env.type, env.id, attempt, exc)
        await self.dead_letter(delivery, env, exc, technical=True)

    async def _failed_runs(self, delivery: Delivery, env: Envelope) -> int:
        """This failure's number among the handler's failed runs of the message.

        Where the transport does not count them (``failures`` is None), the
        store counts them under the message id. If it cannot (it is away),
        this failure goes uncounted, as a first one: deliveries, crashes
        included, never stand in (``max_deliveries`` bounds those).
        """
        if delivery.failures is not None:
            return attempt_of(delivery)
        try:
            return await self.store.count_failure(self.inbox.consumer, env.id)
        except SagakitError as exc:
            log.warning("%s: could not count a failure of %s: %s", self.name, env.id, exc)
            return 1

    async def _over_limit(self, delivery: Delivery, env: Envelope) -> None:
        limit = self.policy.max_deliveries
        log.warning(
            "message %s (%s) delivered %d times, over the limit of %d; dead-lettering it",
            env.id,
            env.type,
            delivery.attempt,
            limit,
        )
        h = env.headers
        exc = DeliveryLimitExceeded(
            f"delivered {delivery.attempt} times (limit {limit}): the handler never finished",
            saga_id=h.saga_id,
            step=h.step,
            attempt=delivery.attempt,
        )
        await self.dead_letter(delivery, env, exc, technical=True)

    async def dead_letter(
        self, delivery: Delivery, env: Envelope | None, exc: Exception, *, technical: bool = False
    ) -> None:
        """Store the message with its reason (and answer a command with a failure)."""
        if env is not None and env.kind == "command":
            await self.fail_command(delivery, env, exc, technical=technical, dead=True)
            return

        async def body(scope: Scope) -> None:
            await self._store_dead_letter(scope.tx, delivery.data, env, exc)

        await self._settle(delivery, env, body)

    async def fail_command(
        self,
        delivery: Delivery,
        env: Envelope,
        exc: Exception,
        *,
        technical: bool,
        dead: bool = False,
        after: Callable[[Scope], None] | None = None,
    ) -> None:
        """Record a failure as the command's outcome, unless another copy's outcome won.

        ``after`` adds to the same transaction (an event handler's failure event).
        The first try stores the failure without admitting the message (one
        statement on PostgreSQL); only if an outcome is already stored does a
        second transaction admit it and answer as a duplicate would be.
        """

        async def body(scope: Scope, admit: bool) -> None:
            if dead:
                await self._store_dead_letter(scope.tx, delivery.data, env, exc)
            if admit and await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
                return
            failure = _failure(exc, technical)
            await scope.answer(failure, FAILURE, unadmitted=not admit, fold=True)
            if after is not None:
                after(scope)

        unadmitted = partial(body, admit=False)
        try:
            try:
                await self._settle(delivery, env, unadmitted, fold=True)
            except (ConcurrencyConflict, _InlineHopFailed):  # the decision taken here lost,
                await self._settle(delivery, env, unadmitted)  # or a step run in it: reply
        except OutcomeExists:
            await self._settle(delivery, env, partial(body, admit=True))

    async def _settle(
        self,
        delivery: Delivery,
        env: Envelope | None,
        body: Callable[[Scope], Awaitable[None]],
        *,
        fold: bool = False,
    ) -> None:
        known = env or _NO_ENVELOPE
        try:
            await self._patiently(lambda: self.transact(known, body, delivery, fold=fold))
        except LeaseLost:
            log.info("lease lost while settling; another consumer has the message")

    async def _patiently(self, attempt: Callable[[], Awaitable[None]]) -> None:
        """Run ``attempt``, waiting out an outage of the store.

        An unavailable database says nothing about the message, so
        it must not use up the message's retries or dead-letter it: the
        delivery is held (its lease kept alive), the attempt repeated with
        backoff, and only an outage longer than ``outage_patience`` gives up.
        Holding the delivery also stops this consumer taking more work
        meanwhile.
        """
        loop = asyncio.get_running_loop()
        give_up, delay = loop.time() + self.policy.outage_patience, 0.1
        while True:
            try:
                return await attempt()
            except StoreUnavailable as exc:  # a broker's outage ends this delivery anyway
                if loop.time() + delay > give_up:
                    raise
                self._outage(exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, OUTAGE_MAX_BACKOFF)

    def _outage(self, exc: StoreUnavailable, delay: float) -> None:
        if delay == 0.1:  # once per message and outage, not per try
            self.hooks.outage(self.name)
            log.warning("%s: unavailable (%s); waiting it out", self.name, exc)

    async def _store_dead_letter(
        self, tx: Tx, data: bytes, env: Envelope | None, exc: Exception
    ) -> None:
        if env is not None:  # a replay starts with every retry
            await self.store.clear_failures(tx, self.inbox.consumer, env.id)
        await self.store.dead_letter(
            tx,
            self.name,
            data,
            f"{type(exc).__name__}: {exc}",
            type(exc).__name__,
            message_id=env.id if env else None,
            saga_id=env.headers.saga_id if env else None,
            kind=env.kind if env else None,
        )


def _failure(exc: Exception, technical: bool) -> Failure:
    code = getattr(exc, "code", "") or type(exc).__name__
    return Failure(code=code, message=str(exc), technical=technical)


#: stands in for the envelope of bytes that could not be decoded (dead letters only)
_NO_ENVELOPE = Envelope("", "", "event", msgspec.Raw(b"null"), Headers())
