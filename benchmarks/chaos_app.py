"""The order-fulfillment demo as the chaos harness runs it in each worker.

``sagakit worker --app chaos_app:create`` (with ``benchmarks/`` on
``PYTHONPATH``) builds the demo exactly as ``sagakit.examples.order_fulfillment.worker:create``
does, plus two things the harness needs, both switched on by environment
variables so the same factory serves every process of a run:

* **An effect ledger.** Every command handler of every service, when it
  returns normally, also inserts one row into the service's own
  ``chaos_effects`` table, inside the handler's local transaction (so the row
  commits if and only if the business change commits). The table has no
  unique key: a handler whose effects were committed twice for the same saga
  step leaves two rows. That measures sagakit's effectively-once guarantee
  (inbox + barrier), independently of the demo's own idempotent SQL. The
  factories :func:`choreography` and :func:`mixed` also wrap the event
  handlers (:func:`record_event_effects`), keyed by correlation id and the
  contract step the handler performs.

* **Duplicated deliveries** (``SAGAKIT_CHAOS_DUP=0.2``): that fraction of
  the messages this process sends is sent twice, through the real transport.
  On the database transport the queue row is written twice (same message id,
  two rows: two independent deliveries, possibly to two consumers; an event
  is fanned out twice, two rows per subscriber); on a
  broker the message is published twice under two broker message ids (so
  JetStream's publish de-duplication does not swallow the copy). Each copy is
  counted, on commit, in ``$SAGAKIT_CHAOS_DIR/dup-<pid>``.

* **Slow handler runs** (``SAGAKIT_CHAOS_SLOW=0.02``): that fraction of the
  participant handler runs of this process, once the handler has done its
  work, sleeps 1.5-3 leases before returning (so before its transaction
  commits): the lease runs out while the handler still holds its effects, and
  the transport may deliver the command again meanwhile. Counted, when the
  sleep starts, in ``$SAGAKIT_CHAOS_DIR/slow-<pid>``.

* **Divergent duplicates** (``SAGAKIT_CHAOS_DIVERGE=0.1``): that fraction of
  the forward commands that call a flaky external service
  (:data:`FLAKY_COMMANDS`) is sent twice *in one go* (same message id, one
  send), so both copies are delivered at about the same moment. Their handler
  first calls :class:`FlakyService`, whose answer depends only on the message
  id and on how many times it was asked: of the first two calls one fails at
  once (mostly a business refusal, sometimes a technical error) and the other
  succeeds after a short delay. If both copies ran to the end they would
  reach different outcomes; the engine must let only one of them count. Which
  messages are chosen is a hash of the message id, so the sender and the
  handler agree without talking. Pairs are counted, on commit, in
  ``$SAGAKIT_CHAOS_DIR/diverge-<pid>``.

``SIGUSR1`` makes a worker cut its own broker connection(s) (NATS: the
client's socket), for transports whose server cannot close one client's
connection from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

import sagakit as sk
from sagakit.choreography.contract import ChoreographyDefinition
from sagakit.examples.order_fulfillment import worker
from sagakit.examples.order_fulfillment.app import OrderFulfillment
from sagakit.examples.order_fulfillment.saga import define
from sagakit.examples.order_fulfillment.service import Service
from sagakit.outbox import OUTBOX_QUEUE
from sagakit.transport import Outgoing

log = logging.getLogger("chaos_app")

DUP_ENV = "SAGAKIT_CHAOS_DUP"
SLOW_ENV = "SAGAKIT_CHAOS_SLOW"
DIVERGE_ENV = "SAGAKIT_CHAOS_DIVERGE"
DIR_ENV = "SAGAKIT_CHAOS_DIR"
#: "1": this process is of the new release, which also knows create-order v2
SAGA_V2_ENV = "SAGAKIT_CHAOS_SAGA_V2"
#: a slowed handler run sleeps this many leases (low, high) before it commits
SLOW_LEASES = (1.5, 3.0)
#: forward commands whose handler calls the flaky external service: the steps
#: before the pivot (a refusal compensates them) and the pivot itself
FLAKY_COMMANDS = frozenset(
    {"customers.ReserveCredit", "inventory.ReserveStock", "payments.ChargeCard"}
)
#: how long the external service takes to say yes (its failures are immediate)
FLAKY_SUCCESS_S = (0.2, 0.5)
#: fault kinds as counted in $SAGAKIT_CHAOS_DIR (``<kind>-<pid>`` files)
DUP, SLOW, DIVERGE = "dup", "slow", "diverge"
#: negative control of the harness: this fraction of ledger rows is written twice
FAKE_DOUBLE_ENV = "SAGAKIT_CHAOS_FAKE_DOUBLE"
#: the ledger's step for an event handler that completes a flow (approve or reject)
FINISH = "finish"
EFFECTS = "chaos_effects"
EFFECTS_COLUMNS = (
    "service TEXT NOT NULL, command TEXT NOT NULL, order_id TEXT, saga_id TEXT, "
    "step TEXT, phase TEXT, message_id TEXT NOT NULL, pid BIGINT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL"
)


def effects_table(of: OrderFulfillment, service: Service) -> str:
    """The ledger's name in the service's own database (schema on PostgreSQL)."""
    store = service.store
    assert store is not None
    if store.dialect == "postgresql":
        return f"{service.name}.{EFFECTS}"
    return f"{service.name}_{EFFECTS}" if store is of.app.store else EFFECTS


async def create_effect_tables(of: OrderFulfillment) -> None:
    """Create (empty) ledgers; the harness's parent does this before workers start."""
    for service in of.services:
        assert service.store is not None
        table = effects_table(of, service)
        async with service.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE IF NOT EXISTS {table} ({EFFECTS_COLUMNS})")
            await tx.execute(f"DELETE FROM {table}")


def record_effects(of: OrderFulfillment) -> None:
    """Wrap every command handler so a committed effect leaves a ledger row."""
    pid = os.getpid()
    fake = float(os.environ.get(FAKE_DOUBLE_ENV, "0") or 0)
    for service in of.services:
        p = service.participant
        assert p is not None
        table = effects_table(of, service)
        p.wrap(partial(_recording, service.name, table=table, pid=pid, fake_double=fake))


def record_event_effects(of: OrderFulfillment, contract: ChoreographyDefinition) -> None:
    """Wrap every event handler so a committed effect leaves a ledger row.

    The row is keyed like a command's, by what the choreography says the
    handler does: ``order_id`` is the correlation id, ``step`` and ``phase``
    the contract step whose done (or failed) event it publishes (forward), whose
    undo it confirms (compensate), or ``finish`` for a completion event; a
    handler outside the contract's steps is keyed by the event type it handles.
    """
    pid = os.getpid()
    fake = float(os.environ.get(FAKE_DOUBLE_ENV, "0") or 0)
    roles = event_roles(contract)
    for service in of.services:
        p = service.participant
        assert p is not None
        table = effects_table(of, service)
        for kind, name, publishes in p.handlers():
            if kind != "event":
                continue
            step, phase = next(
                (roles[e] for e in sorted(publishes or ()) if e in roles), (name, "forward")
            )
            reg = p.events[name]
            wrapped = _recording(
                service.name, name, reg.handler, table, pid, fake, key=_event_key(step, phase)
            )
            p.events[name] = dataclasses.replace(reg, handler=wrapped)


def event_roles(contract: ChoreographyDefinition) -> dict[str, tuple[str, str]]:
    """Event type -> (step, phase) of the handler that publishes it."""
    roles = dict.fromkeys(contract.completions, (FINISH, "forward"))
    for u in contract.undos:
        roles[u.done] = (u.step, "compensate")
    for s in contract.steps:
        roles |= {e: (s.name, "forward") for e in (s.done, s.failed) if e}
    return roles


Key = Callable[[Any, sk.Context], tuple[str | None, str | None, str | None, str]]


def _command_key(cmd: Any, ctx: sk.Context) -> tuple[str | None, str | None, str | None, str]:
    h = ctx.envelope.headers
    return getattr(cmd, "order_id", None), h.saga_id, h.step, h.phase or "forward"


def _event_key(step: str, phase: str) -> Key:
    return lambda _event, ctx: (ctx.envelope.headers.correlation_id, None, step, phase)


def _recording(
    service: str,
    command: str,
    fn: Callable[[Any, sk.Context], Awaitable[Any]],
    table: str,
    pid: int,
    fake_double: float = 0.0,
    key: Key = _command_key,
) -> Callable[[Any, sk.Context], Awaitable[Any]]:
    sql = (
        f"INSERT INTO {table} (service, command, order_id, saga_id, step, phase, message_id, "
        "pid, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    async def handler(cmd: Any, ctx: sk.Context) -> Any:
        result = await fn(cmd, ctx)
        row = (service, command, *key(cmd, ctx), ctx.envelope.id, pid, ctx.now)
        times = 2 if fake_double and random.random() < fake_double else 1
        for _ in range(times):
            await ctx.db.execute(sql, *row)
        return result

    return handler


async def ledger_counts(of: OrderFulfillment, columns: str, where: str) -> Counter[tuple[Any, ...]]:
    """Ledger rows of every service, counted per ``columns`` (no unique key: n > 1 is a
    double)."""
    counts: Counter[tuple[Any, ...]] = Counter()
    for service in of.services:
        table = effects_table(of, service)
        sql = f"SELECT {columns}, count(*) FROM {table} WHERE {where} GROUP BY {columns}"
        for *key, n in await service.query(sql):
            counts[tuple(key)] += int(n)
    return counts


class FaultCounter:
    """Counts one kind of injected fault of this process into a file the harness reads.

    A file per process (``<kind>-<pid>``), rewritten with the running total,
    survives the process being SIGKILLed: what was injected before stays counted.
    """

    def __init__(self, folder: str | None, kind: str = "dup") -> None:
        self.path = Path(folder) / f"{kind}-{os.getpid()}" if folder else None
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.write_text(str(self.count))


def duplicate_sends(of: OrderFulfillment, fraction: float, counter: FaultCounter) -> None:
    """Send ``fraction`` of this process's outgoing messages twice, for real."""
    if fraction <= 0:
        return
    rng = random.Random()
    _send_twice(of, lambda _data: rng.random() < fraction, counter, "dup")


def _send_twice(
    of: OrderFulfillment, chosen: Callable[[bytes], bool], counter: FaultCounter, tag: str
) -> None:
    """Send the chosen outgoing messages twice through the real transport.

    On the database transport both copies are rows on the queue (same message
    id, like a re-sent row); on a broker the copy is published under its own id.
    """
    transport = of.app.transport
    if transport.direct_writer(of.app.store) is not None:
        queue = of.app.store.queue
        original, fan_out = queue.put, queue.fan_out

        async def put(tx: Any, queue_name: str, message_id: str, data: bytes, **kw: Any) -> None:
            await original(tx, queue_name, message_id, data, **kw)
            if queue_name != OUTBOX_QUEUE and chosen(data):
                await original(tx, queue_name, message_id, data, **kw)
                tx.on_commit(counter.add)

        async def fan_out_twice(tx: Any, topic: str, message_id: str, data: bytes) -> None:
            await fan_out(tx, topic, message_id, data)  # events: a row per subscriber
            if chosen(data):
                await fan_out(tx, topic, message_id, data)
                tx.on_commit(counter.add)

        queue.put = put  # type: ignore[method-assign]
        queue.fan_out = fan_out_twice  # type: ignore[method-assign]
        return
    publish = transport.publish

    async def publish_twice(messages: Sequence[Outgoing]) -> None:
        copies = [
            Outgoing(f"{m.id}-{tag}", m.kind, m.destination, m.data)
            for m in messages
            if chosen(m.data)
        ]
        await publish(list(messages) + copies)
        if copies:
            counter.add(len(copies))

    transport.publish = publish_twice  # type: ignore[method-assign]


# -- slow handlers -------------------------------------------------------------


def slow_down(of: OrderFulfillment, fraction: float, counter: FaultCounter) -> None:
    """Make ``fraction`` of this process's participant handler runs outlive the lease."""
    if fraction <= 0:
        return
    lease = of.app.settings.lease
    rng = random.Random()
    for service in of.services:
        p = service.participant
        assert p is not None
        p.wrap(lambda _name, fn: _slowed(fn, fraction, lease, rng, counter))


def _slowed(
    fn: Callable[[Any, sk.Context], Awaitable[Any]],
    fraction: float,
    lease: float,
    rng: random.Random,
    counter: FaultCounter,
) -> Callable[[Any, sk.Context], Awaitable[Any]]:
    async def handler(cmd: Any, ctx: sk.Context) -> Any:
        result = await fn(cmd, ctx)
        if rng.random() < fraction:
            counter.add()
            await asyncio.sleep(lease * rng.uniform(*SLOW_LEASES))
        return result

    return handler


# -- divergent duplicates --------------------------------------------------------


class ExternalRefusal(sk.BusinessError):
    """The flaky external service said no: a business refusal, the saga compensates."""

    code = "chaos.ExternalRefusal"


class ExternalOutage(RuntimeError):
    """The flaky external service failed technically: the delivery is retried."""


def _unit(key: str, salt: str = "") -> float:
    """A number in [0, 1) that depends only on ``key``: the same in every process."""
    digest = hashlib.blake2b(f"{salt}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def diverges(message_id: str, fraction: float) -> bool:
    """Whether this message is one whose copies are made to disagree."""
    return fraction > 0 and _unit(message_id) < fraction


@dataclass
class FlakyService:
    """A fake external API (a card gateway, a credit bureau) that is not idempotent.

    Its answer to a request depends only on the request's key and on how many
    times this process has asked: of the first two calls, one fails at once
    (a refusal, or for a quarter of the keys an outage) and the other says yes
    after 0.2-0.5 s; later calls say yes at once. So two concurrent copies of
    one command get different answers, and the copy that fails is done first.
    """

    calls: Counter[str] = field(default_factory=Counter)
    refusals: int = 0

    async def call(self, key: str) -> None:
        self.calls[key] += 1
        n = self.calls[key]
        if n > 2:
            return
        if n == (1 if _unit(key, "order") < 0.5 else 2):
            self.refusals += 1
            if _unit(key, "kind") < 0.25:
                raise ExternalOutage(f"external service unavailable (call {n} for {key})")
            raise ExternalRefusal(f"external service refused (call {n} for {key})")
        low, high = FLAKY_SUCCESS_S
        await asyncio.sleep(low + (high - low) * _unit(key, "delay"))


def flaky_calls(of: OrderFulfillment, fraction: float) -> FlakyService:
    """Make the handlers of :data:`FLAKY_COMMANDS` call a :class:`FlakyService` first,
    for the messages :func:`diverges` chooses (those are the ones sent twice)."""
    service = FlakyService()
    if fraction <= 0:
        return service
    for svc in of.services:
        p = svc.participant
        assert p is not None
        p.wrap(lambda name, fn: _calling(fn, service, fraction) if name in FLAKY_COMMANDS else fn)
    return service


def _calling(
    fn: Callable[[Any, sk.Context], Awaitable[Any]], service: FlakyService, fraction: float
) -> Callable[[Any, sk.Context], Awaitable[Any]]:
    async def handler(cmd: Any, ctx: sk.Context) -> Any:
        if diverges(ctx.envelope.id, fraction):
            await service.call(ctx.envelope.id)
        return await fn(cmd, ctx)

    return handler


class _Head(msgspec.Struct):
    """The part of an envelope the sender needs to choose divergent pairs."""

    id: str
    type: str
    kind: str


def _flaky_pair(data: bytes, fraction: float) -> bool:
    try:
        head = msgspec.json.decode(data, type=_Head)
    except msgspec.DecodeError:
        return False
    return head.type in FLAKY_COMMANDS and head.kind == "command" and diverges(head.id, fraction)


def divergent_sends(of: OrderFulfillment, fraction: float, counter: FaultCounter) -> None:
    """Send the chosen flaky commands twice in one go: two concurrent deliveries."""
    if fraction <= 0:
        return
    _send_twice(of, lambda data: _flaky_pair(data, fraction), counter, "div")


# -- connections ---------------------------------------------------------------


def cut_own_connection(of: OrderFulfillment) -> None:
    """Close this process's broker socket(s) abruptly; the transport must reconnect."""
    t: Any = of.app.transport
    client = getattr(t, "client", None)  # NATS
    sock = getattr(client, "_transport", None)
    if sock is not None:
        log.warning("chaos: cutting the NATS connection")
        sock.close()


def instrument(
    of: OrderFulfillment,
    *,
    fraction: float | None = None,
    contract: ChoreographyDefinition | None = None,
) -> FaultCounter:
    """All the harness's instrumentation on ``of``, configured from the environment.

    The flaky external call wraps the business handler, the ledger row comes
    after it and the slow sleep last, so a slowed run holds its effects *and*
    its ledger row uncommitted while it sleeps.
    """
    folder = os.environ.get(DIR_ENV)
    flaky_calls(of, _env_fraction(DIVERGE_ENV))
    record_effects(of)
    if contract is not None:
        record_event_effects(of, contract)
    slow_down(of, _env_fraction(SLOW_ENV), FaultCounter(folder, SLOW))
    frac = _env_fraction(DUP_ENV) if fraction is None else fraction
    counter = FaultCounter(folder, DUP)
    duplicate_sends(of, frac, counter)
    divergent_sends(of, _env_fraction(DIVERGE_ENV), FaultCounter(folder, DIVERGE))
    start = of.start

    async def start_and_listen() -> None:
        await start()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, cut_own_connection, of)

    of.start = start_and_listen  # type: ignore[method-assign]
    return counter


def _env_fraction(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def create(
    store: str | None = None,
    transport: str | None = None,
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """``sagakit.examples.order_fulfillment.worker:create`` with the harness's instrumentation."""
    of = worker.create(store, transport, run, settings)
    if os.environ.get(SAGA_V2_ENV) == "1":
        of.app.saga(define(2))
    instrument(of)
    return of


def choreography(
    store: str | None = None,
    transport: str | None = None,
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """The choreographed demo (``...order_fulfillment.choreography:application``),
    instrumented like :func:`create`, event handlers included."""
    return _styled("choreography", store, transport, run, settings)


def mixed(
    store: str | None = None,
    transport: str | None = None,
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """The mixed demo, instrumented like :func:`choreography`."""
    return _styled("mixed", store, transport, run, settings)


def _styled(
    style: str,
    store: str | None,
    transport: str | None,
    run: Iterable[str] | None,
    settings: sk.Settings | None,
) -> OrderFulfillment:
    if not store:
        raise sk.ConfigurationError(f"chaos_app:{style} needs a store: --store URL")
    module = importlib.import_module(f"sagakit.examples.order_fulfillment.{style}")
    of: OrderFulfillment = module.application(store, transport or "database", run, settings)
    instrument(of, contract=module.place_order)
    return of
