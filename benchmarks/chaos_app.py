"""The order-fulfillment demo as the chaos harness runs it in each worker.

``sagakit worker --app chaos_app:create`` (with ``benchmarks/`` on
``PYTHONPATH``) builds the demo exactly as ``order_fulfillment.worker:create``
does, plus two things the harness needs, both switched on by environment
variables so the same factory serves every process of a run:

* **An effect ledger.** Every command handler of every service, when it
  returns normally, also inserts one row into the service's own
  ``chaos_effects`` table, inside the handler's local transaction (so the row
  commits if and only if the business change commits). The table has no
  unique key: a handler whose effects were committed twice for the same saga
  step leaves two rows. That measures sagakit's effectively-once guarantee
  (inbox + barrier), independently of the demo's own idempotent SQL.

* **Duplicated deliveries** (``SAGAKIT_CHAOS_DUP=0.2``): that fraction of
  the messages this process sends is sent twice, through the real transport.
  On the database transport the queue row is written twice (same message id,
  two rows: two independent deliveries, possibly to two consumers); on a
  broker the message is published twice under two broker message ids (so
  JetStream's publish de-duplication does not swallow the copy). Each copy is
  counted, on commit, in ``$SAGAKIT_CHAOS_DIR/dup-<pid>``.

``SIGUSR1`` makes a worker cut its own broker connection(s) (NATS: the
client's socket), for transports whose server cannot close one client's
connection from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from order_fulfillment import worker
from order_fulfillment.app import OrderFulfillment
from order_fulfillment.service import Service

import sagakit as sk
from sagakit.outbox import OUTBOX_QUEUE
from sagakit.transport import Outgoing

log = logging.getLogger("chaos_app")

DUP_ENV = "SAGAKIT_CHAOS_DUP"
DIR_ENV = "SAGAKIT_CHAOS_DIR"
#: negative control of the harness: this fraction of ledger rows is written twice
FAKE_DOUBLE_ENV = "SAGAKIT_CHAOS_FAKE_DOUBLE"
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
        for name, fn in list(p.commands.items()):
            p.commands[name] = _recording(service.name, name, fn, table, pid, fake)


def _recording(
    service: str,
    command: str,
    fn: Callable[[Any, sk.Context], Awaitable[Any]],
    table: str,
    pid: int,
    fake_double: float = 0.0,
) -> Callable[[Any, sk.Context], Awaitable[Any]]:
    sql = (
        f"INSERT INTO {table} (service, command, order_id, saga_id, step, phase, message_id, "
        "pid, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    async def handler(cmd: Any, ctx: sk.Context) -> Any:
        result = await fn(cmd, ctx)
        h = ctx.envelope.headers
        row = (service, command, getattr(cmd, "order_id", None), h.saga_id, h.step)
        times = 2 if fake_double and random.random() < fake_double else 1
        for _ in range(times):
            await ctx.db.execute(sql, *row, h.phase or "forward", ctx.envelope.id, pid, ctx.now)
        return result

    return handler


class DupCounter:
    """Counts duplicated sends of this process into a file the harness reads."""

    def __init__(self, folder: str | None) -> None:
        self.path = Path(folder) / f"dup-{os.getpid()}" if folder else None
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.write_text(str(self.count))


def duplicate_sends(of: OrderFulfillment, fraction: float, counter: DupCounter) -> None:
    """Send ``fraction`` of this process's outgoing messages twice, for real."""
    if fraction <= 0:
        return
    rng = random.Random()
    transport = of.app.transport
    local = transport.local_store
    if local is not None:
        original = local.enqueue

        async def enqueue(
            tx: Any,
            queue: str,
            message_id: str,
            data: bytes,
            *,
            delay: float = 0.0,
            destination: str | None = None,
        ) -> None:
            await original(tx, queue, message_id, data, delay=delay, destination=destination)
            if queue != OUTBOX_QUEUE and rng.random() < fraction:
                await original(tx, queue, message_id, data, delay=delay, destination=destination)
                tx.on_commit(counter.add)

        local.enqueue = enqueue  # type: ignore[method-assign]
        return
    publish = transport.publish

    async def publish_twice(messages: Sequence[Outgoing]) -> None:
        copies = [
            Outgoing(f"{m.id}-dup", m.kind, m.destination, m.data)
            for m in messages
            if rng.random() < fraction
        ]
        await publish(list(messages) + copies)
        if copies:
            counter.add(len(copies))

    transport.publish = publish_twice  # type: ignore[method-assign]


def cut_own_connection(of: OrderFulfillment) -> None:
    """Close this process's broker socket(s) abruptly; the transport must reconnect."""
    t: Any = of.app.transport
    client = getattr(t, "client", None)  # NATS
    sock = getattr(client, "_transport", None)
    if sock is not None:
        log.warning("chaos: cutting the NATS connection")
        sock.close()


def instrument(of: OrderFulfillment, *, fraction: float | None = None) -> DupCounter:
    """Effects ledger + duplicated sends (+ SIGUSR1 connection cut) on ``of``."""
    record_effects(of)
    frac = float(os.environ.get(DUP_ENV, "0") or 0) if fraction is None else fraction
    counter = DupCounter(os.environ.get(DIR_ENV))
    duplicate_sends(of, frac, counter)
    start = of.start

    async def start_and_listen() -> None:
        await start()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, cut_own_connection, of)

    of.start = start_and_listen  # type: ignore[method-assign]
    return counter


def create(
    store: str | None = None,
    transport: str | None = None,
    run: Iterable[str] | None = None,
    settings: sk.Settings | None = None,
) -> OrderFulfillment:
    """``order_fulfillment.worker:create`` with the harness's instrumentation."""
    of = worker.create(store, transport, run, settings)
    instrument(of)
    return of
