"""The chaos harness: the order-fulfillment demo under crashes, duplicates and cuts.

::

    python benchmarks/chaos.py --store sqlite --runs 3 --sagas 300 --json
    python benchmarks/chaos.py --store postgresql://127.0.0.1:5432/test \\
        --transport amqp://guest:guest@127.0.0.1:5672/ --runs 3 --sagas 300 --json

Each run starts the demo's six services and two saga coordinators as separate
``sagakit worker`` processes (:class:`sagakit.examples.order_fulfillment.cluster.Cluster`,
factory :mod:`chaos_app`), places N orders (spread over ``--place-over``
seconds so that faults land while sagas are in flight) and, until every saga
is final, injects faults at random moments:

``kill_coordinator`` / ``kill_participant``
    SIGKILL of a coordinator / a service's worker, restarted a moment later;
``duplicate_delivery``
    ``--dup`` of every process's sends go out twice through the real
    transport (counted per copy; see :mod:`chaos_app`);
``broker_cut``
    RabbitMQ: the broker closes the run's connections (``rabbitmqctl
    close_connection``, only connections of the run's private virtual host);
    Redis: ``CLIENT KILL`` of the run's clients; NATS: a worker cuts its own
    socket (SIGUSR1);
``db_drop``
    PostgreSQL: ``pg_terminate_backend`` of the workers' backends (the
    workers connect with ``application_name=sagakit-chaos-worker``). On
    SQLite a kill is the equivalent fault.
``slow_handler``
    ``--slow`` of every participant handler run sleeps 1.5-3 leases after
    its work, before its transaction commits, so the lease runs out while it
    holds its effects (counted per slowed run; see :mod:`chaos_app`);
``divergent_duplicate``
    ``--diverge`` of the commands that call a flaky external service
    (``ReserveCredit``, ``ReserveStock``, ``ChargeCard``) are sent twice in
    one go; the service fails one of the two copies at once and accepts the
    other a little later, so the copies would reach different outcomes if
    both counted (counted per pair sent).

Every run gets fresh state: a new SQLite folder, or a new database on the
PostgreSQL server named by ``--store`` (dropped afterwards), a private RabbitMQ
virtual host, NATS stream or Redis key prefix. At the end the harness waits
(bounded by ``--timeout``) until every saga is final, lets late duplicates
drain, and checks:

* the demo's invariants across all services (credit, stock, payments,
  shipments, points, orders vs sagas, no dead letters);
* ``double_applied``: business effects committed more than once, counted from
  the services' own tables: the effect ledger (one row per committed handler
  run, no unique key), payments/shipments/awards per order, loyalty balances
  vs awards;
* ``lost``: sagas or orders that vanished, steps the coordinator counts as
  done whose effect is not in the service's tables, compensations that did
  not happen for an effect that did;
* ``outcome_mismatch``: sagas whose final state disagrees with what the
  participants committed (ledger and business tables): a completed saga
  without every step's effect exactly once, with a compensation, or whose
  order is not approved, charged, shipped and awarded once; a compensated
  saga with an effect not undone, an effect of the pivot or after, a
  compensation without its effect, or an order not rejected or still charged,
  shipped, awarded or holding credit. It overlaps ``lost`` and
  ``double_applied`` on purpose: they count effects, it counts sagas;
* ``max_recovery_s``: the longest time from a restarted worker being ready to
  the next step completed by its service (any step, for a coordinator).

With ``--json`` the last line is one JSON object: ``runs, sagas, terminal,
lost, double_applied, outcome_mismatch, invariants_ok, faults_injected,
max_recovery_s`` and details (``per_run``). Exit status 0 only if every run
is clean. Negative controls: ``--self-test-double F`` and
``--self-test-mismatch N`` tamper with the ledger on purpose and must be seen.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import chaos_app  # noqa: E402
import chaos_infra  # noqa: E402
from chaos_faults import (  # noqa: E402
    BROKER_CUT,
    BROKER_RESTART,
    DB_DROP,
    DB_OUTAGE,
    DIVERGENT,
    DUPLICATE,
    FAULTS,
    KILL_COORDINATOR,
    KILL_PARTICIPANT,
    PARTITION,
    ROLLING_UPGRADE,
    SHORT_FAULTS,
    SLOW_HANDLER,
    WORKER_APP_NAME,
    WORKER_FAULTS,
    Infra,
    Monkey,
    Restart,
    pg_exec,
)

import sagakit as sk  # noqa: E402
from sagakit.app import COORDINATOR  # noqa: E402
from sagakit.examples.order_fulfillment import demo  # noqa: E402
from sagakit.examples.order_fulfillment.app import OrderFulfillment, build  # noqa: E402
from sagakit.examples.order_fulfillment.cluster import SERVICES, Cluster  # noqa: E402
from sagakit.examples.order_fulfillment.customers import RESERVED  # noqa: E402
from sagakit.examples.order_fulfillment.orders import APPROVED, REJECTED  # noqa: E402
from sagakit.examples.order_fulfillment.saga import create_order, define  # noqa: E402
from sagakit.transport import redact  # noqa: E402

log = logging.getLogger("chaos")

TERMINAL = ("completed", "compensated", "failed", "aborted")
#: step name -> the service that runs it
STEP_SERVICE = {s.name: s.action.participant for s in create_order.steps if s.action}
COMPENSATED_BY = {s.name for s in create_order.steps if s.compensation is not None}
#: steps whose committed effect cannot be undone: the pivot and the steps after it
IRREVERSIBLE = {s.name for s in create_order.steps if s.action and s.kind != "compensatable"}
#: the demo's services whose handlers are all db_only (--colocate runs a coordinator in each)
COLOCATED = ("orders", "customers", "inventory", "loyalty")


# -- per-run infrastructure ----------------------------------------------------


def _with_query(url: str, **params: str) -> str:
    u = urlsplit(url)
    query = "&".join(p for p in (u.query, urlencode(params)) if p)
    return urlunsplit(u._replace(query=query))


async def prepare(
    store: str,
    transport: str,
    folder: Path,
    tag: str,
    faults: list[str] = (),  # type: ignore[assignment]
) -> Infra:
    folder.mkdir(parents=True, exist_ok=True)
    broker = await private_broker(transport, folder) if BROKER_RESTART in faults else None
    if broker is not None:
        query = urlsplit(transport).query
        transport = broker.url + (f"?{query}" if query else "")
    if store in ("sqlite", "sqlite:"):
        store_url = worker_store = f"sqlite:///{folder / 'db' / 'sagakit.db'}"
        (folder / "db").mkdir(exist_ok=True)
        pg_admin = pg_db = None
    elif store.startswith("sqlite:///"):
        base = Path(store[len("sqlite:///") :])
        run_dir = (base.parent if base.suffix else base) / f"chaos-{tag}"
        run_dir.mkdir(parents=True, exist_ok=True)
        store_url = worker_store = f"sqlite:///{run_dir / 'sagakit.db'}"
        pg_admin = pg_db = None
    elif store.startswith(("postgresql://", "postgres://")):
        pg_admin, pg_db = store, f"sagakit_chaos_{tag}"
        await pg_exec(pg_admin, f"CREATE DATABASE {pg_db}")
        store_url = urlunsplit(urlsplit(store)._replace(path=f"/{pg_db}"))
        worker_store = _with_query(store_url, application_name=WORKER_APP_NAME)
    else:
        raise sk.ConfigurationError(f"unsupported --store {store!r}")
    infra = Infra(store_url, worker_store, transport, "database", folder)
    infra.pg_admin, infra.pg_db, infra.broker = pg_admin, pg_db, broker
    scheme = transport.split(":", 1)[0]
    if scheme in ("amqp", "amqps"):
        infra.kind = "rabbitmq"
        u = urlsplit(transport)
        if shutil.which("rabbitmqctl") and u.path in ("", "/"):
            vhost = f"sagakit-chaos-{tag}"
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, infra.rabbitmqctl, "add_vhost", vhost)
            user = u.username or "guest"
            await loop.run_in_executor(
                None, infra.rabbitmqctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"
            )
            infra.vhost = vhost
            infra.transport = f"{transport.rstrip('/')}/{quote(vhost, safe='')}"
    elif scheme == "nats":
        infra.kind = "nats"
        stream = f"SAGAKIT_CHAOS_{tag.upper()}"
        infra.transport = _with_query(transport, stream=stream, prefix=f"sagakit-chaos-{tag}")
        infra.cleanups.append(("nats", transport, stream))
    elif scheme == "redis":
        infra.kind = "redis"
        infra.redis_prefix = f"sagakit-chaos-{tag}"
        infra.transport = _with_query(transport, prefix=infra.redis_prefix)
    elif scheme not in ("database", "db", ""):
        raise sk.ConfigurationError(f"unsupported --transport {transport!r}")
    return infra


async def private_broker(transport: str, folder: Path) -> chaos_infra.PrivateBroker | None:
    """A broker of the run's own, which ``broker_restart`` may kill (None: database transport)."""
    kind = {"amqp": "rabbitmq", "nats": "nats", "redis": "redis"}.get(transport.split(":", 1)[0])
    if kind is None:
        return None
    broker = chaos_infra.PrivateBroker(kind, folder / "broker")
    await broker.start()
    return broker


async def partition_workers(infra: Infra, cluster: Cluster, tag: str) -> None:
    """Put every worker in a network namespace of its own, reaching the services
    through a forwarder on the host end of its veth pair."""
    parts = infra.partitions = chaos_infra.Partitions(tag[:3])
    ports = {
        chaos_infra.url_port(infra.worker_store, 5432),
        chaos_infra.url_port(infra.transport, _DEFAULT_PORTS.get(infra.kind, 0)),
    }
    for name in cluster.names:
        parts.add(name)
    await parts.start_proxy(sorted(p for p in ports if p), infra.folder / "proxy.log")
    for name in cluster.names:
        cluster.configure(
            name,
            wrap=parts.wrap(name),
            store=parts.url_for(name, infra.worker_store),
            transport=parts.url_for(name, infra.transport),
        )


_DEFAULT_PORTS = {"rabbitmq": 5672, "nats": 4222, "redis": 6379}


async def cleanup(infra: Infra) -> None:
    loop = asyncio.get_running_loop()
    if infra.partitions is not None:
        infra.partitions.close()
    if infra.vhost:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            await loop.run_in_executor(None, infra.rabbitmqctl, "delete_vhost", infra.vhost)
    if infra.kind == "nats":
        for _, url, stream in infra.cleanups:
            with contextlib.suppress(Exception):
                import nats

                nc = await nats.connect(url.split("?", 1)[0])
                try:
                    await nc.jsm().delete_stream(stream)
                finally:
                    await nc.close()
    if infra.kind == "redis" and infra.redis_prefix:
        with contextlib.suppress(Exception):
            import redis.asyncio as aioredis

            raw = aioredis.Redis.from_url(infra.transport.split("?", 1)[0])
            try:
                keys = [k async for k in raw.scan_iter(match=f"{infra.redis_prefix}:*")]
                if keys:
                    await raw.delete(*keys)
            finally:
                await raw.aclose()
    if infra.pg_admin and infra.pg_db:
        with contextlib.suppress(Exception):
            await pg_exec(infra.pg_admin, f"DROP DATABASE IF EXISTS {infra.pg_db} WITH (FORCE)")
    if infra.broker is not None:
        await infra.broker.close()
        shutil.rmtree(infra.broker.folder, ignore_errors=True)


# -- accounting ----------------------------------------------------------------


async def _rows(of: OrderFulfillment, service: Any, sql: str, *args: Any) -> list[Any]:
    return list(await service.query(sql, *args))


async def account(of: OrderFulfillment, saga_ids: list[str], plan: demo.Plan) -> dict[str, Any]:
    """lost / double_applied / outcome_mismatch from the services' own tables."""
    views = {}
    lost_detail: list[str] = []
    double_detail: list[str] = []
    for sid in saga_ids:
        try:
            views[sid] = await of.app.sagas.get(sid, history=False)
        except sk.SagaNotFound:
            lost_detail.append(f"saga {sid} vanished")
    # (saga, step, phase) -> rows
    ledger = await chaos_app.ledger_counts(of, "saga_id, step, phase", "saga_id IS NOT NULL")
    double = 0
    for key, n in ledger.items():
        if n > 1:
            double += n - 1
            double_detail.append(f"{key} applied {n} times")
    for sid, v in views.items():
        for step in STEP_SERVICE:
            fwd = ledger[(sid, step, "forward")]
            comp = ledger[(sid, step, "compensate")]
            if step in v.done and fwd == 0:
                lost_detail.append(f"{sid} {step}: done per the saga, no effect in the service")
            if v.state == "compensated" and step in COMPENSATED_BY and fwd and not comp:
                lost_detail.append(f"{sid} {step}: applied but never compensated")
            if comp and not fwd:
                double_detail.append(f"{sid} {step}: compensation ran without its effect")
                double += 1
            if v.state == "completed" and comp:
                double_detail.append(f"{sid} {step}: compensated in a completed saga")
                double += 1
    # the services' business tables, per order
    per_order = {
        "payments": (of.payments, "payments"),
        "shipments": (of.shipping, "shipments"),
        "awards": (of.loyalty, "awards"),
        "credit_reservations": (of.customers, "credit_reservations"),
    }
    for label, (service, table) in per_order.items():
        for order_id, n in await _rows(
            of,
            service,
            f"SELECT order_id, count(*) FROM {service.t(table)} GROUP BY order_id "
            "HAVING count(*) > 1",
        ):
            double += int(n) - 1
            double_detail.append(f"{label}: order {order_id} has {n} rows")
    awards = await _rows(
        of,
        of.loyalty,
        f"SELECT customer_id, SUM(points) FROM {of.loyalty.t('awards')} GROUP BY customer_id",
    )
    balances = await of.loyalty.balances()
    for customer_id, total in awards:
        have = balances.get(customer_id, 0)
        if have > int(total):
            double += 1
            double_detail.append(f"loyalty {customer_id}: balance {have} > awards {total}")
        elif have < int(total):
            lost_detail.append(f"loyalty {customer_id}: balance {have} < awards {total}")
    orders = {o.id for o in await of.orders.all()}
    missing = [o.order_id for o in plan.orders if o.order_id not in orders]
    missing_views = [v for v in views.values() if v.data.order_id in set(missing)]
    unrecorded = await demo.never_recorded(of, missing_views)
    lost_detail += [f"order {i} vanished" for i in missing if i not in unrecorded]
    mismatch, mismatch_detail = await mismatch_count(of, views, ledger)
    return {
        "lost": len(lost_detail),
        "double_applied": double,
        "outcome_mismatch": mismatch,
        "lost_detail": lost_detail[:20],
        "double_detail": double_detail[:20],
        "mismatch_detail": mismatch_detail[:20],
        "ledger_rows": sum(ledger.values()),
        "views": views,
    }


@dataclass(frozen=True)
class OrderBooks:
    """What the services committed for one order, from their business tables."""

    status: str | None = None  # orders
    credit: str | None = None  # customers: the reservation's state
    payments: int = 0
    shipments: int = 0
    awards: int = 0


def outcome_mismatches(
    state: str, ledger: dict[tuple[str, str], int], books: OrderBooks
) -> list[str]:
    """Why a saga's final state disagrees with what the participants committed.

    ``ledger`` maps (step, phase) to the number of effect rows. A completed
    saga must have every step's effect exactly once, no compensation, and the
    order approved, charged, shipped and awarded once. A compensated saga must
    have undone every effect it can undo, have no effect it cannot undo (the
    pivot and after), no compensation without its effect, and the order
    rejected (or never recorded, if its create never took effect: the barrier
    cancelled it) with nothing charged (or the charge refunded), shipped, awarded
    or still reserved. Other
    states are not judged here (they are not final, or need an operator).
    """
    if state == "completed":
        why = [
            f"{step}: forward x{ledger.get((step, 'forward'), 0)}, "
            f"compensate x{ledger.get((step, 'compensate'), 0)} in a completed saga"
            for step in STEP_SERVICE
            if ledger.get((step, "forward"), 0) != 1 or ledger.get((step, "compensate"), 0)
        ]
        books_ok = books == OrderBooks(APPROVED, RESERVED, 1, 1, 1)
    elif state == "compensated":
        why = [f"{step}: {w}" for step in STEP_SERVICE if (w := _undo_mismatch(step, ledger))]
        # no order row is right only if the create never took effect (null compensation)
        never = books.status is None and not ledger.get(("create-order", "forward"), 0)
        books_ok = (books.status == REJECTED or never) and books.credit != RESERVED
        books_ok = books_ok and books.payments == books.shipments == books.awards == 0
    else:
        return []
    if not books_ok:
        why.append(f"order books {books} in a {state} saga")
    return why


def _undo_mismatch(step: str, ledger: dict[tuple[str, str], int]) -> str | None:
    """A compensated saga's step: what is wrong with its effects, if anything."""
    fwd, comp = ledger.get((step, "forward"), 0), ledger.get((step, "compensate"), 0)
    if comp and not fwd:
        return "compensated but its effect never committed"
    if fwd and step in IRREVERSIBLE:
        return "an effect that cannot be undone in a compensated saga"
    if fwd and not comp and step in COMPENSATED_BY:
        return "effect committed, never compensated"
    return None


async def order_books(of: OrderFulfillment) -> dict[str, OrderBooks]:
    """Every order's :class:`OrderBooks`, read from the services' own tables."""
    books: dict[str, dict[str, Any]] = {}
    for o in await of.orders.all():
        books.setdefault(o.id, {})["status"] = o.status
    credit = f"SELECT order_id, state FROM {of.customers.t('credit_reservations')}"
    for order_id, state in await _rows(of, of.customers, credit):
        books.setdefault(order_id, {})["credit"] = state
    counted = {
        "payments": (of.payments, "payments"),
        "shipments": (of.shipping, "shipments"),
        "awards": (of.loyalty, "awards"),
    }
    for key, (service, table) in counted.items():
        sql = f"SELECT order_id, count(*) FROM {service.t(table)} GROUP BY order_id"
        for order_id, n in await _rows(of, service, sql):
            books.setdefault(order_id, {})[key] = int(n)
    # A charge refunded in full (the compensation of charge-card) no longer counts.
    pay, ref = of.payments.t("payments"), of.payments.t("refunds")
    refunded = (
        f"SELECT p.order_id FROM {pay} p WHERE p.amount <= "
        f"(SELECT COALESCE(SUM(r.amount), 0) FROM {ref} r WHERE r.payment_id = p.id)"
    )
    for (order_id,) in await _rows(of, of.payments, refunded):
        books[order_id]["payments"] -= 1
    return {order_id: OrderBooks(**b) for order_id, b in books.items()}


async def mismatch_count(
    of: OrderFulfillment, views: dict[str, Any], ledger: Counter[tuple[str, str, str]]
) -> tuple[int, list[str]]:
    """``outcome_mismatch``: sagas whose final state disagrees with the effects."""
    books = await order_books(of)
    by_saga: dict[str, dict[tuple[str, str], int]] = {}
    for (sid, step, phase), n in ledger.items():
        by_saga.setdefault(sid, {})[(step, phase)] = n
    detail: list[str] = []
    count = 0
    for sid, v in views.items():
        steps = by_saga.get(sid, {})
        why = outcome_mismatches(v.state, steps, books.get(v.data.order_id, OrderBooks()))
        if why:
            count += 1
            detail += [f"{sid} ({v.state}) {w}" for w in why]
    return count, detail


async def tamper(of: OrderFulfillment, saga_ids: list[str], n: int) -> int:
    """Negative control: delete one compensation's ledger row in ``n`` compensated sagas.

    Each such saga then has an effect that was, per the books, never undone;
    :func:`mismatch_count` must report exactly those sagas. Returns how many
    were tampered with (fewer if the run had fewer compensated sagas).
    """
    victims = []
    for sid in saga_ids:
        if len(victims) < n and (await of.app.sagas.get(sid, history=False)).state == "compensated":
            victims.append(sid)
    orders = of.orders
    assert orders.store is not None
    table = chaos_app.effects_table(of, orders)
    for sid in victims:
        async with orders.store.transaction() as tx:
            await tx.execute(
                f"DELETE FROM {table} WHERE saga_id = ? AND step = ? AND phase = 'compensate'",
                sid,
                "create-order",
            )
    return len(victims)


async def completions(of: OrderFulfillment) -> list[tuple[float, str]]:
    """(time, service) of every successful step reply the coordinators processed."""
    p = of.app.store.prefix
    async with of.app.store.transaction() as tx:
        rows = await tx.fetchall(
            f"SELECT at, step, detail FROM {p}saga_log WHERE entry = 'reply' ORDER BY at"
        )
    return [
        (float(at), STEP_SERVICE.get(step, "?"))
        for at, step, detail in rows
        if detail and detail.endswith("(success)")
    ]


def recovery_times(restarts: list[Restart], done: list[tuple[float, str]]) -> list[float]:
    out = []
    for r in restarts:
        if r.ready_at is None:
            continue
        nxt = next(
            (
                t
                for t, svc in done
                if t >= r.ready_at and (r.service == COORDINATOR or svc == r.service)
            ),
            None,
        )
        if nxt is not None:
            out.append(nxt - r.ready_at)
    return out


def counted(folder: Path, kind: str) -> int:
    """The total of one fault kind over every process's ``<kind>-<pid>`` file."""
    total = 0
    for f in folder.glob(f"{kind}-*"):
        with contextlib.suppress(OSError, ValueError):
            total += int(f.read_text() or 0)
    return total


# -- one run -------------------------------------------------------------------


async def place_paced(
    of: OrderFulfillment, plan: demo.Plan, over: float, concurrency: int = 32
) -> list[str]:
    """Start the sagas spread evenly over ``over`` seconds; saga ids in plan order."""
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = len(plan.orders)

    async def place(i: int, o: demo.PlannedOrder) -> str:
        await asyncio.sleep(max(0.0, start + over * i / n - loop.time()))
        async with gate:
            for attempt in range(20):
                try:
                    return await demo.place_planned(of, o)
                except sk.StoreError:  # e.g. SQLite busy under load: try again
                    await asyncio.sleep(0.1 * (attempt + 1))
            raise RuntimeError(f"could not place order {o.order_id}")

    return list(await asyncio.gather(*(place(i, o) for i, o in enumerate(plan.orders))))


async def drain(of: OrderFulfillment, infra: Infra, settle: float, bound: float = 30.0) -> None:
    """Let late duplicates, redeliveries and slowed handlers finish before the books are read."""
    await asyncio.sleep(settle)
    if infra.kind != "database":
        return
    end = time.monotonic() + bound
    p = of.app.store.prefix
    while time.monotonic() < end:
        async with of.app.store.transaction() as tx:
            row = await tx.fetchone(
                f"SELECT count(*) FROM {p}messages WHERE queue NOT LIKE 'sagakit.%'"
            )
        if int(row[0]) == 0:
            return
        await asyncio.sleep(0.25)


async def one_run(args: argparse.Namespace, k: int, root: Path) -> dict[str, Any]:
    tag = f"{uuid.uuid4().hex[:8]}"
    folder = root / f"run-{k + 1}"
    infra = await prepare(args.store, args.transport, folder, tag, args.faults)
    rng = random.Random(args.seed * 1000 + k)
    settings = sk.Settings(lease=args.lease)
    try:
        plan = demo.make_plan(args.sagas, args.seed + k)
        of = build(infra.store, infra.transport, run=[], settings=settings)
        v2 = define(2)
        if ROLLING_UPGRADE in args.faults:
            of.app.saga(v2)  # this process places the orders: it learns v2 first
        parent_dups = chaos_app.FaultCounter(str(folder), chaos_app.DUP)
        chaos_app.duplicate_sends(of, args.dup, parent_dups)
        await of.start()
        try:
            await chaos_app.create_effect_tables(of)
            await demo.seed(of, plan)
            if infra.pg_db is None:
                infra.sqlite_files = sorted(
                    Path(infra.store[len("sqlite:///") :]).parent.glob("*.db")
                )
            layout = _layout(args)
            env = {
                "PYTHONPATH": os.pathsep.join(
                    [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                chaos_app.DUP_ENV: str(args.dup),
                chaos_app.SLOW_ENV: str(args.slow),
                chaos_app.DIVERGE_ENV: str(args.diverge),
                chaos_app.DIR_ENV: str(folder),
                chaos_app.FAKE_DOUBLE_ENV: str(args.self_test_double),
            }
            cluster = Cluster(
                infra.worker_store,
                infra.transport,
                layout,
                app="chaos_app:create",
                lease=args.lease,
                log_dir=folder / "logs",
                env=env,
            )
            networked = infra.kind != "database" or infra.pg_db is not None
            if PARTITION in args.faults and networked and not chaos_infra.netns_unavailable():
                await partition_workers(infra, cluster, tag)
            kinds = [k for k in args.faults if _applies(k, infra)]
            monkey = Monkey(
                cluster, infra, rng, kinds, (args.min_gap, args.max_gap), args.min_kills
            )
            monkey.on_upgrade = lambda: setattr(of, "saga", v2)
            monkey.upgrade_at = args.place_over * 0.1
            try:
                await cluster.start(timeout=90.0)
                started = time.perf_counter()
                chaos = asyncio.create_task(monkey.run())
                saga_ids = await place_paced(of, plan, args.place_over)
                await wait_all(of, saga_ids, args.timeout)
                await monkey.stop(chaos)
                # anything still down is brought back before the books are read
                for name in cluster.names:
                    if not cluster.alive(name):
                        await cluster.restart(name, timeout=90.0)
                await wait_all(of, saga_ids, args.timeout)
                elapsed = time.perf_counter() - started
                await drain(of, infra, settle_time(args))
                ns = SimpleNamespace(store=infra.store, transport=infra.transport, seed=args.seed)
                result = await demo.check(of, plan, saga_ids, elapsed, ns)
                tampered = await tamper(of, saga_ids, args.self_test_mismatch)
                acc = await account(of, saga_ids, plan)
                done = await completions(of)
            finally:
                codes = cluster.stop()
        finally:
            await of.stop()
    finally:
        if infra.partitions is not None:  # namespaces and the forwarder go, even with --keep
            infra.partitions.close()
            infra.partitions = None
        if not args.keep:
            await cleanup(infra)
    views = acc.pop("views")
    states = Counter(v.state for v in views.values())
    faults = Counter(monkey.counts)
    for kind, file_kind in WORKER_FAULTS.items():
        if kind in kinds:
            faults[kind] = counted(folder, file_kind)
    recov = recovery_times(monkey.restarts, done)
    kills = faults[KILL_COORDINATOR] + faults[KILL_PARTICIPANT]
    return {
        "run": k + 1,
        "sagas": len(saga_ids),
        "terminal": sum(states[s] for s in TERMINAL),
        "states": dict(states),
        "by_version": dict(Counter(f"v{v.version}" for v in views.values())),
        "lost": acc["lost"],
        "double_applied": acc["double_applied"],
        "outcome_mismatch": acc["outcome_mismatch"],
        "invariants_ok": result.ok,
        "invariants": result.invariants,
        "as_planned": result.as_planned,
        "outcomes": result.to_json()["outcomes"],
        "faults_injected": {f: faults[f] for f in FAULTS if f in kinds or faults[f]},
        "kills": kills,
        "restarts": sum(1 for r in monkey.restarts if r.ready_at is not None),
        "max_recovery_s": round(max(recov), 3) if recov else 0.0,
        "mean_recovery_s": round(sum(recov) / len(recov), 3) if recov else 0.0,
        "elapsed_s": round(elapsed, 2),
        "ledger_rows": acc["ledger_rows"],
        "lost_detail": acc["lost_detail"],
        "double_detail": acc["double_detail"],
        "mismatch_detail": acc["mismatch_detail"],
        "self_test_mismatch": tampered,
        "fault_errors": monkey.errors[:10],
        "failed_starts": monkey.failed_starts[:10],
        "worker_exit_codes": codes,
        "log_dir": str(folder / "logs"),
    }


def _layout(args: argparse.Namespace) -> dict[str, list[str]]:
    """One worker per service, and the coordinators: processes of their own, or
    (``--colocate``) one inside each database-only service's worker, or
    (``--together``) one worker running every database-only service and a
    coordinator, so consecutive steps of those run inside one transaction."""
    if args.together:
        others = [s for s in SERVICES if s not in COLOCATED]
        layout = Cluster.layout(per_service=1, coordinators=0, services=others)
        layout["together-1"] = [*COLOCATED, COORDINATOR]
        return layout
    if not args.colocate:
        return Cluster.layout(per_service=1, coordinators=args.coordinators)
    layout = Cluster.layout(per_service=1, coordinators=0)
    for service in COLOCATED:
        layout[f"{service}-1"].append(COORDINATOR)
    return layout


def settle_time(args: argparse.Namespace) -> float:
    """How long a late copy can still be running once every saga is final.

    A redelivery comes within a lease; a slowed handler run may sleep up to
    ``SLOW_LEASES[1]`` leases on top of that.
    """
    slow = chaos_app.SLOW_LEASES[1] if args.slow > 0 else 0.0
    return args.lease * (1 + slow) + 1.0


def _applies(kind: str, infra: Infra) -> bool:
    if kind == BROKER_CUT:
        return infra.kind != "database" and (infra.kind != "rabbitmq" or infra.vhost is not None)
    if kind == DB_DROP:
        return infra.pg_db is not None
    if kind == DB_OUTAGE:
        return infra.pg_db is not None or bool(infra.sqlite_files)
    if kind == BROKER_RESTART:
        return infra.broker is not None
    if kind == PARTITION:
        return infra.partitions is not None
    return True


async def wait_all(of: OrderFulfillment, saga_ids: list[str], timeout: float) -> None:
    """``demo.wait_all``, riding out a database outage as any client must."""
    end = time.monotonic() + timeout
    while True:
        try:
            return await demo.wait_all(of, saga_ids, max(0.0, end - time.monotonic()), None)
        except sk.StoreUnavailable:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.5)


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    faults: Counter[str] = Counter()
    for r in runs:
        faults.update(r["faults_injected"])
    return {
        "runs": len(runs),
        "sagas": sum(r["sagas"] for r in runs),
        "terminal": sum(r["terminal"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "double_applied": sum(r["double_applied"] for r in runs),
        "outcome_mismatch": sum(r["outcome_mismatch"] for r in runs),
        "invariants_ok": all(r["invariants_ok"] for r in runs),
        "faults_injected": dict(faults),
        "max_recovery_s": max((r["max_recovery_s"] for r in runs), default=0.0),
        "kills_per_run": [r["kills"] for r in runs],
        "store": redact(args.store),
        "transport": redact(args.transport),
        "dup_fraction": args.dup,
        "slow_fraction": args.slow,
        "diverge_fraction": args.diverge,
        "lease_s": args.lease,
        "elapsed_s": round(sum(r["elapsed_s"] for r in runs), 2),
        "per_run": runs,
    }


def clean(summary: dict[str, Any]) -> bool:
    return (
        summary["lost"] == 0
        and summary["double_applied"] == 0
        and summary["outcome_mismatch"] == 0
        and summary["invariants_ok"]
        and summary["terminal"] == summary["sagas"]
    )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="sagakit-chaos-"))
    runs = []
    for k in range(args.runs):
        r = await one_run(args, k, root)
        runs.append(r)
        if not args.json:
            print(_line(r), flush=True)
    if (
        not args.log_dir
        and not args.keep
        and all(
            r["lost"] == 0
            and r["double_applied"] == 0
            and r["outcome_mismatch"] == 0
            and r["invariants_ok"]
            for r in runs
        )
    ):
        shutil.rmtree(root, ignore_errors=True)
    return summarize(runs, args)


def _line(r: dict[str, Any]) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in r["faults_injected"].items())
    return (
        f"run {r['run']}: {r['terminal']}/{r['sagas']} terminal {r['states']}, "
        f"lost {r['lost']}, double-applied {r['double_applied']}, "
        f"outcome mismatches {r['outcome_mismatch']}, "
        f"invariants {'ok' if r['invariants_ok'] else 'VIOLATED'}; faults: {faults}; "
        f"max recovery {r['max_recovery_s']} s; {r['elapsed_s']} s"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--style",
        choices=STYLES,
        default="orchestration",
        help="choreography and mixed run benchmarks/chaos_choreography.py (its own options)",
    )
    p.add_argument("--store", default="sqlite", help="sqlite (fresh files) or a PostgreSQL URL")
    p.add_argument("--transport", default="database", help="database, amqp://, nats://, redis://")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--sagas", type=int, default=100, help="orders per run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dup", type=float, default=0.1, help="fraction of sends duplicated (0.1)")
    p.add_argument(
        "--slow",
        type=float,
        default=0.02,
        help="fraction of participant handler runs that sleep 1.5-3 leases before "
        "committing (0.02)",
    )
    p.add_argument(
        "--diverge",
        type=float,
        default=0.1,
        help="fraction of flaky forward commands sent as a pair whose copies get "
        "different answers from the external service (0.1)",
    )
    p.add_argument("--coordinators", type=int, default=2)
    p.add_argument(
        "--colocate",
        action="store_true",
        help="run the coordinator inside the workers of the database-only services "
        f"({', '.join(COLOCATED)}) instead of --coordinators processes of its own, so "
        "their steps' replies are decided on in the steps' own transactions",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help=f"run the database-only services ({', '.join(COLOCATED)}) and a coordinator "
        "in one worker, so their consecutive steps run inside one transaction",
    )
    p.add_argument("--lease", type=float, default=2.0, help="consumer lease in seconds (2)")
    p.add_argument(
        "--place-over",
        type=float,
        default=None,
        help="seconds over which the orders are placed (default: sagas/15, at least 8)",
    )
    p.add_argument(
        "--min-kills", type=int, default=5, help="prefer kills until this many per run (5)"
    )
    p.add_argument("--min-gap", type=float, default=0.5, help="min seconds between faults")
    p.add_argument("--max-gap", type=float, default=2.0, help="max seconds between faults")
    p.add_argument(
        "--faults",
        default=",".join(SHORT_FAULTS),
        help="comma-separated fault kinds (default the short ones that apply: "
        f"{','.join(SHORT_FAULTS)}; also {','.join(k for k in FAULTS if k not in SHORT_FAULTS)})",
    )
    p.add_argument("--timeout", type=float, default=240.0, help="bound on waiting per run (s)")
    p.add_argument("--log-dir", default=None, help="keep worker logs here")
    p.add_argument("--keep", action="store_true", help="keep databases and queues afterwards")
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    self_test_double_option(p)
    p.add_argument(
        "--self-test-mismatch",
        type=int,
        default=0,
        metavar="N",
        help="negative control: before the books are read, delete one compensation's "
        "ledger row in N compensated sagas, so the run must report outcome_mismatch == N",
    )
    return p


STYLES = ("orchestration", "choreography", "mixed")


def self_test_double_option(p: argparse.ArgumentParser) -> None:
    """``--self-test-double F``, shared with chaos_choreography."""
    p.add_argument(
        "--self-test-double",
        type=float,
        default=0.0,
        metavar="F",
        help="negative control: workers write F of their ledger rows twice, so the run "
        "must report double_applied > 0 (checks the harness, not sagakit)",
    )


def main(argv: list[str] | None = None) -> int:
    style = argparse.ArgumentParser(add_help=False)
    style.add_argument("--style", choices=STYLES, default="orchestration")
    if style.parse_known_args(argv)[0].style != "orchestration":
        import chaos_choreography  # its own faults, books and tracker checks

        return chaos_choreography.main(argv)
    args = parser().parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(args.faults) - set(FAULTS)
    if unknown or args.runs < 1 or args.sagas < 1:
        print(f"chaos: bad arguments ({sorted(unknown)})", file=sys.stderr)
        return 2
    if DUPLICATE not in args.faults:
        args.dup = 0.0
    if SLOW_HANDLER not in args.faults:
        args.slow = 0.0
    if DIVERGENT not in args.faults:
        args.diverge = 0.0
    if args.place_over is None:
        args.place_over = max(8.0, args.sagas / 15)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for noisy in ("aio_pika", "aiormq", "nats", "redis"):  # cuts are on purpose here
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    summary = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(summary))
    else:
        s = {k: v for k, v in summary.items() if k != "per_run"}
        print(json.dumps(s, indent=1))
    return 0 if clean(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
