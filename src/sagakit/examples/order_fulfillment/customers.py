"""Customers: each customer has a credit limit; orders reserve part of it.

``available`` is what is left to reserve. A reservation per order keeps the
amount, so releasing it (compensation) is exact and idempotent, and the
invariant ``available + reserved == credit_limit`` can be checked at any time.
"""

from __future__ import annotations

from dataclasses import dataclass

import sagakit as sk

from .messages import (
    CreditLimitExceeded,
    CreditReserved,
    ReleaseCredit,
    ReserveCredit,
    UnknownCustomer,
)
from .service import Service

RESERVED, RELEASED = "reserved", "released"


@dataclass(frozen=True)
class CreditAudit:
    customer_id: str
    credit_limit: int
    available: int
    reserved: int

    @property
    def balanced(self) -> bool:
        return self.available >= 0 and self.available + self.reserved == self.credit_limit


class Customers(Service):
    name = "customers"
    tables = {
        "customers": (
            "id TEXT PRIMARY KEY, name TEXT NOT NULL, credit_limit BIGINT NOT NULL, "
            "available BIGINT NOT NULL CHECK (available >= 0)"
        ),
        "credit_reservations": (
            "order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, amount BIGINT NOT NULL, "
            "state TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL"
        ),
    }
    indexes = [("credit_reservations", "customer_id, state")]

    def register(self, p: sk.Participant) -> None:
        # db_only: every effect is in this service's tables (see Participant.command)
        p.command(ReserveCredit, db_only=True)(self.reserve_credit)
        p.command(ReleaseCredit, db_only=True)(self.release_credit)

    async def add_customer(self, customer_id: str, name: str, credit_limit: int) -> None:
        async with self._store().transaction() as tx:
            await tx.execute(
                f"INSERT INTO {self.t('customers')} (id, name, credit_limit, available) "
                "VALUES (?, ?, ?, ?)",
                customer_id,
                name,
                credit_limit,
                credit_limit,
            )

    async def reserve_credit(self, cmd: ReserveCredit, ctx: sk.Context) -> CreditReserved:
        customers, reservations = self.t("customers"), self.t("credit_reservations")
        row = await ctx.db.fetchone(
            f"SELECT available FROM {customers} WHERE id = ?", cmd.customer_id
        )
        if row is None:
            raise UnknownCustomer(f"no customer {cmd.customer_id!r}")
        # A conditional update: never below zero, even with concurrent orders.
        n = await ctx.db.execute(
            f"UPDATE {customers} SET available = available - ? WHERE id = ? AND available >= ?",
            cmd.amount,
            cmd.customer_id,
            cmd.amount,
        )
        if n != 1:
            raise CreditLimitExceeded(
                f"order needs {money(cmd.amount)}, customer {cmd.customer_id} has "
                f"{money(row[0])} of credit left"
            )
        await ctx.db.execute(
            f"INSERT INTO {reservations} (order_id, customer_id, amount, state, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            cmd.order_id,
            cmd.customer_id,
            cmd.amount,
            RESERVED,
            ctx.now,
            ctx.now,
        )
        return CreditReserved(cmd.order_id, int(row[0]) - cmd.amount)

    async def release_credit(self, cmd: ReleaseCredit, ctx: sk.Context) -> None:
        # Compensation: give the amount back once, whatever the redeliveries.
        reservations = self.t("credit_reservations")
        row = await ctx.db.fetchone(
            f"SELECT amount FROM {reservations} WHERE order_id = ? AND state = ?",
            cmd.order_id,
            RESERVED,
        )
        if row is None:
            return
        await ctx.db.execute(
            f"UPDATE {reservations} SET state = ?, updated_at = ? WHERE order_id = ?",
            RELEASED,
            ctx.now,
            cmd.order_id,
        )
        await ctx.db.execute(
            f"UPDATE {self.t('customers')} SET available = available + ? WHERE id = ?",
            row[0],
            cmd.customer_id,
        )

    async def audit(self) -> list[CreditAudit]:
        """Per customer: limit, available, and the total of live reservations."""
        rows = await self.query(
            f"SELECT c.id, c.credit_limit, c.available, "
            f"(SELECT COALESCE(SUM(r.amount), 0) FROM {self.t('credit_reservations')} r "
            f"WHERE r.customer_id = c.id AND r.state = ?) FROM {self.t('customers')} c",
            RESERVED,
        )
        return [CreditAudit(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows]


def money(cents: int) -> str:
    return f"{cents / 100:,.2f}"
