"""Onboarding, both ways: one atomic group, or a saga, over two databases.

The last step of onboarding a customer sets the customer ``VERIFIED`` (the
customers database) and removes the pending enrollment (the enrollments
database): both or neither. As an atomic group (two-phase commit)::

    async with app.atomic("customers", "enrollments") as tx:
        await verify(tx, "ada")

or as a saga whose first step is undone (the status restored) when the
second is refused, or as a saga step that runs the atomic group. Run it::

    python -m sagakit.examples.onboarding        # starts its own PostgreSQL cluster
    python -m sagakit.examples.onboarding --customers postgresql://... \\
        --enrollments mysql://root@127.0.0.1:3306/test --store sqlite:///onboarding.db

``benchmarks/twophase.py`` measures the two against each other.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

import sagakit as sk
from sagakit.twophase import AtomicTx, BranchTx, TwoPhaseOptions

CUSTOMERS = "ob_customers"
PENDING = "ob_pending_enrollments"


class NotPending(sk.BusinessError):
    code = "onboarding.NotPending"


class NotEnrolled(sk.BusinessError):
    code = "onboarding.NotEnrolled"


@sk.command("onboarding.Verify")
class Verify(msgspec.Struct):
    customer: str


@sk.command("onboarding.Unverify")
class Unverify(msgspec.Struct):
    customer: str


@sk.command("onboarding.Unenroll")
class Unenroll(msgspec.Struct):
    customer: str


@dataclass
class Onboard:
    customer: str


# -- the two local changes, shared by every variant ---------------------------


async def set_verified(db: BranchTx, customer: str) -> None:
    n = await db.execute(
        f"UPDATE {CUSTOMERS} SET status = 'VERIFIED', verified = verified + 1 "
        "WHERE id = ? AND status = 'PENDING'",
        customer,
    )
    if n != 1:
        raise NotPending(f"customer {customer} is not pending")


async def remove_enrollment(db: BranchTx, customer: str) -> None:
    if await db.execute(f"DELETE FROM {PENDING} WHERE customer = ?", customer) != 1:
        raise NotEnrolled(f"customer {customer} has no pending enrollment")


async def verify(tx: AtomicTx, customer: str) -> None:
    """The onboarding transaction as one atomic group."""
    await set_verified(tx["customers"], customer)
    await remove_enrollment(tx["enrollments"], customer)


async def verify_step(data: Onboard, tx: AtomicTx) -> None:
    await verify(tx, data.customer)


# -- the sagas ------------------------------------------------------------------

onboard_saga = (
    sk.Saga("onboard", Onboard)
    .step("verify")
    .invoke("customers", lambda d: Verify(d.customer))
    .compensate("customers", lambda d: Unverify(d.customer))
    .step("unenroll")
    .invoke("enrollments", lambda d: Unenroll(d.customer))
    .pivot()
    .build()
)

onboard_atomic = (
    sk.Saga("onboard-atomic", Onboard)
    .step("verify-and-unenroll")
    .atomic(["customers", "enrollments"], verify_step)
    .build()
)


def build_app(
    store: str, customers: str, enrollments: str, *, node: str = "main", **options: Any
) -> sk.App:
    """The onboarding App: two resources and the atomic saga; with two PostgreSQL
    databases also the plain saga, its participants' stores on the same databases."""
    settings = sk.Settings(twophase=TwoPhaseOptions(node=node, **options))
    app = sk.App(store, settings=settings)
    app.resource("customers", customers)
    app.resource("enrollments", enrollments)
    app.saga(onboard_atomic)
    if _postgres(customers) and _postgres(enrollments):
        _participants(app, customers, enrollments)
    return app


def _postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _participants(app: sk.App, customers: str, enrollments: str) -> None:
    c = app.participant("customers", store=customers)
    e = app.participant("enrollments", store=enrollments)
    app.saga(onboard_saga)

    @c.command(Verify)
    async def on_verify(cmd: Verify, ctx: sk.Context) -> None:
        await set_verified(ctx.db, cmd.customer)

    @c.command(Unverify)
    async def on_unverify(cmd: Unverify, ctx: sk.Context) -> None:
        await ctx.db.execute(
            f"UPDATE {CUSTOMERS} SET status = 'PENDING', verified = verified - 1 "
            "WHERE id = ? AND status = 'VERIFIED'",
            cmd.customer,
        )

    @e.command(Unenroll)
    async def on_unenroll(cmd: Unenroll, ctx: sk.Context) -> None:
        await remove_enrollment(ctx.db, cmd.customer)


async def create_tables(customers: str, enrollments: str) -> None:
    """The two business tables (PostgreSQL, or MariaDB for the enrollments)."""
    await _ddl(customers, f"CREATE TABLE IF NOT EXISTS {CUSTOMERS} (id VARCHAR(40) PRIMARY KEY, "
               "status VARCHAR(16) NOT NULL, verified INTEGER NOT NULL DEFAULT 0)")  # fmt: skip
    await _ddl(enrollments, f"CREATE TABLE IF NOT EXISTS {PENDING} (customer VARCHAR(40) "
               "PRIMARY KEY, plan VARCHAR(40) NOT NULL)")  # fmt: skip


async def add_customers(app: sk.App, ids: Sequence[str], *, enrolled: bool = True) -> None:
    """Pending customers, each with a pending enrollment unless ``enrolled`` is False."""
    async with app.atomic("customers", "enrollments") as tx:
        for cid in ids:
            await tx["customers"].execute(
                f"INSERT INTO {CUSTOMERS} (id, status, verified) VALUES (?, 'PENDING', 0)", cid
            )
            if enrolled:
                await tx["enrollments"].execute(
                    f"INSERT INTO {PENDING} (customer, plan) VALUES (?, 'basic')", cid
                )


async def state(app: sk.App, customer: str) -> tuple[str, int, bool]:
    """(status, times verified, still enrolled) of one customer, read in a fresh group."""
    async with app.atomic("customers", "enrollments") as tx:
        row = await tx["customers"].fetchone(
            f"SELECT status, verified FROM {CUSTOMERS} WHERE id = ?", customer
        )
        pending = await tx["enrollments"].fetchone(
            f"SELECT customer FROM {PENDING} WHERE customer = ?", customer
        )
    return str(row[0]), int(row[1]), pending is not None


async def _ddl(url: str, sql: str) -> None:
    if url.startswith("postgres"):
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return
    from sagakit.twophase.mariadb import MariaDBResource

    conn = await MariaDBResource("ddl", url).connect()
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
    finally:
        conn.close()


# -- the walk-through -------------------------------------------------------------


async def tour(store: str, customers: str, enrollments: str) -> dict[str, Any]:
    await create_tables(customers, enrollments)
    app = build_app(store, customers, enrollments)
    async with app:
        ids = [f"c{sk.new_id()[-12:]}" for _ in range(4)]
        await add_customers(app, ids[:3])
        await add_customers(app, ids[3:], enrolled=False)
        async with app.atomic("customers", "enrollments") as tx:
            await verify(tx, ids[0])
        refused = ""
        try:
            async with app.atomic("customers", "enrollments") as tx:
                await verify(tx, ids[3])  # no enrollment: neither change happens
        except NotEnrolled as exc:
            refused = str(exc)
        step = await app.sagas.wait(await app.sagas.start(onboard_atomic, Onboard(ids[1])))
        result: dict[str, Any] = {
            "atomic": await state(app, ids[0]),
            "refused": (refused, await state(app, ids[3])),
            "atomic_step": (step.state.value, await state(app, ids[1])),
        }
        if ("onboard", 1) in app.sagas.definitions:
            saga = await app.sagas.wait(await app.sagas.start(onboard_saga, Onboard(ids[2])))
            undone = await app.sagas.wait(await app.sagas.start(onboard_saga, Onboard(ids[3])))
            result["saga"] = (saga.state.value, await state(app, ids[2]))
            result["saga_undone"] = undone.state.value
        result["in_doubt"] = (await app.twophase.gauges()).in_doubt
    return result


def check(r: dict[str, Any]) -> None:
    assert r["atomic"] == ("VERIFIED", 1, False), r
    assert r["refused"][1] == ("PENDING", 0, False), r
    assert r["atomic_step"] == ("completed", ("VERIFIED", 1, False)), r
    assert r["in_doubt"] == 0, r
    if "saga" in r:
        assert r["saga"] == ("completed", ("VERIFIED", 1, False)), r
        assert r["saga_undone"] == "compensated", r


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sagakit.examples.onboarding")
    p.add_argument("--customers", help="PostgreSQL URL (default: a throwaway cluster)")
    p.add_argument("--enrollments", help="PostgreSQL or MariaDB URL")
    p.add_argument("--store", default="memory://", help="the coordinator's store")
    args = p.parse_args(argv)
    if args.customers and args.enrollments:
        result = asyncio.run(tour(args.store, args.customers, args.enrollments))
    else:
        from sagakit.testing.pgcluster import PgCluster

        with PgCluster() as cluster:
            urls = cluster.create_database("customers"), cluster.create_database("enrollments")
            result = asyncio.run(tour(args.store, *urls))
    for key, value in result.items():
        print(f"{key:12} {value}")
    check(result)
    print("every group all-or-nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
