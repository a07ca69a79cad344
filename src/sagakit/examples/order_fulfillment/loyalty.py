"""Loyalty: points for shipped orders, one point per whole unit of currency.

The saga awards points only after the parcel is booked, past the pivot, so an
award is never taken back: this service has no compensation at all.
"""

from __future__ import annotations

import sagakit as sk

from .messages import AwardPoints, PointsAwarded
from .service import Service


def points_for(amount: int) -> int:
    return amount // 100


class Loyalty(Service):
    name = "loyalty"
    tables = {
        "accounts": "customer_id TEXT PRIMARY KEY, points BIGINT NOT NULL",
        "awards": (
            "order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, points BIGINT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL"
        ),
    }

    def register(self, p: sk.Participant) -> None:
        # db_only: every effect is in this service's tables (see Participant.command)
        p.command(AwardPoints, db_only=True)(self.award)

    async def award(self, cmd: AwardPoints, ctx: sk.Context) -> PointsAwarded:
        points = points_for(cmd.amount)
        n = await ctx.db.execute(
            f"INSERT INTO {self.t('awards')} (order_id, customer_id, points, created_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            cmd.order_id,
            cmd.customer_id,
            points,
            ctx.now,
        )
        if n == 1:
            await ctx.db.execute(
                f"INSERT INTO {self.t('accounts')} AS a (customer_id, points) VALUES (?, ?) "
                "ON CONFLICT (customer_id) DO UPDATE SET points = a.points + excluded.points",
                cmd.customer_id,
                points,
            )
        row = await ctx.db.fetchone(
            f"SELECT points FROM {self.t('accounts')} WHERE customer_id = ?", cmd.customer_id
        )
        return PointsAwarded(points, int(row[0]))

    async def awards(self) -> dict[str, int]:
        rows = await self.query(f"SELECT order_id, points FROM {self.t('awards')}")
        return {r[0]: int(r[1]) for r in rows}

    async def balances(self) -> dict[str, int]:
        rows = await self.query(f"SELECT customer_id, points FROM {self.t('accounts')}")
        return {r[0]: int(r[1]) for r in rows}
