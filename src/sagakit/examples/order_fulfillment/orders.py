"""Orders: the order and its status, from ``pending`` to ``approved`` or ``rejected``.

The saga creates the order first and rejects it as its last compensation, so
a rejected order keeps the reason the business gave (credit limit, stock,
card). Approval records the shipment and the loyalty points awarded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

import sagakit as sk

from .messages import ApproveOrder, CreateOrder, Line, RejectOrder
from .service import Service

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


@dataclass(frozen=True)
class OrderView:
    """An order as the API shows it."""

    id: str
    customer_id: str
    status: str
    total: int
    lines: list[Line]
    reason_code: str | None
    reason: str | None
    shipment_id: str | None
    points: int | None
    created_at: float
    updated_at: float


class Orders(Service):
    name = "orders"
    tables = {
        "orders": (
            "id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, status TEXT NOT NULL, "
            "total BIGINT NOT NULL, lines TEXT NOT NULL, reason_code TEXT, reason TEXT, "
            "shipment_id TEXT, points BIGINT, created_at DOUBLE PRECISION NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL"
        ),
    }
    indexes = [("orders", "status")]

    def register(self, p: sk.Participant) -> None:
        # db_only: every effect is in this service's tables (see Participant.command)
        p.command(CreateOrder, db_only=True)(self.create)
        p.command(RejectOrder, db_only=True)(self.reject)
        p.command(ApproveOrder, db_only=True)(self.approve)

    async def create(self, cmd: CreateOrder, ctx: sk.Context) -> None:
        # ON CONFLICT: creating the same order twice changes nothing.
        await ctx.db.execute(
            f"INSERT INTO {self.t('orders')} (id, customer_id, status, total, lines, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            cmd.order_id,
            cmd.customer_id,
            PENDING,
            cmd.total,
            msgspec.json.encode(cmd.lines).decode(),
            ctx.now,
            ctx.now,
        )

    async def reject(self, cmd: RejectOrder, ctx: sk.Context) -> None:
        # Compensation of "create-order": idempotent, only a pending order moves.
        # If the create timed out and never landed, the order is recorded as
        # rejected (its late CreateOrder is then refused by the barrier).
        await ctx.db.execute(
            f"INSERT INTO {self.t('orders')} AS o (id, customer_id, status, total, lines, "
            "reason_code, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "reason_code = excluded.reason_code, reason = excluded.reason, "
            "updated_at = excluded.updated_at WHERE o.status = ?",
            cmd.order_id,
            cmd.customer_id,
            REJECTED,
            cmd.total,
            msgspec.json.encode(cmd.lines).decode(),
            cmd.reason_code,
            cmd.reason,
            ctx.now,
            ctx.now,
            PENDING,
        )

    async def approve(self, cmd: ApproveOrder, ctx: sk.Context) -> None:
        await ctx.db.execute(
            f"UPDATE {self.t('orders')} SET status = ?, shipment_id = ?, points = ?, "
            "updated_at = ? WHERE id = ? AND status = ?",
            APPROVED,
            cmd.shipment_id,
            cmd.points,
            ctx.now,
            cmd.order_id,
            PENDING,
        )

    # -- queries -----------------------------------------------------------

    async def get(self, order_id: str) -> OrderView | None:
        rows = await self.query(f"{_SELECT} FROM {self.t('orders')} WHERE id = ?", order_id)
        return _view(rows[0]) if rows else None

    async def all(self) -> list[OrderView]:
        return [_view(r) for r in await self.query(f"{_SELECT} FROM {self.t('orders')}")]


_SELECT = (
    "SELECT id, customer_id, status, total, lines, reason_code, reason, shipment_id, points, "
    "created_at, updated_at"
)


def _view(r: Any) -> OrderView:
    lines = msgspec.json.decode(r[4], type=list[Line])
    points = int(r[8]) if r[8] is not None else None
    return OrderView(r[0], r[1], r[2], int(r[3]), lines, r[5], r[6], r[7], points, r[9], r[10])
