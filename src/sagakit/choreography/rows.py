"""The tracker's two tables: flows (state per correlation id) and their timelines.

SQL only; values always bound. Writes take the caller's transaction, reads go
outside any transaction (``Driver.read``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from .tracker import Entry, FlowState

if TYPE_CHECKING:
    from ..store import Store, Tx

_decode_state = msgspec.json.Decoder(FlowState).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One line of a flow's timeline."""

    seq: int
    at: float
    kind: str
    type: str | None
    step: str | None
    message_id: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class FlowRow:
    flow: str
    correlation_id: str
    status: str
    state: FlowState
    started_at: float | None
    updated_at: float


class FlowRows:
    """Reads and writes the tracker's rows in one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        p = store.prefix
        self.flows, self.timeline = f"{p}chor_flows", f"{p}chor_timeline"
        lock = " FOR UPDATE" if store.dialect == "postgresql" else ""
        self._load = f"SELECT state FROM {self.flows} WHERE flow = ? AND correlation_id = ?{lock}"

    async def lock(self, tx: Tx, flow: str, correlation_id: str, now: float) -> FlowState | None:
        """The flow's state, its row locked until ``tx`` ends (created empty if missing)."""
        await tx.execute(
            f"INSERT INTO {self.flows} (flow, correlation_id, status, state, updated_at) "
            "VALUES (?, ?, '', ?, ?) ON CONFLICT DO NOTHING",
            flow,
            correlation_id,
            b"",
            now,
        )
        row = await tx.fetchone(self._load, flow, correlation_id)
        data = bytes(row[0]) if row is not None else b""
        return _decode_state(data) if data else None

    async def save(self, tx: Tx, state: FlowState, status: str, now: float) -> None:
        await tx.execute(
            f"UPDATE {self.flows} SET status = ?, state = ?, started_at = ?, updated_at = ? "
            "WHERE flow = ? AND correlation_id = ?",
            status,
            _encode(state),
            state.started_at,
            now,
            state.flow,
            state.correlation_id,
        )

    async def write(
        self,
        tx: Tx,
        flow: str,
        correlation_id: str,
        now: float,
        entries: Sequence[Entry],
        data: bytes | None = None,
    ) -> None:
        """Append timeline rows (``data``: the bytes of a held message, kept on its row)."""
        await tx.executemany(
            f"INSERT INTO {self.timeline} (flow, correlation_id, at, kind, type, step, "
            "message_id, reason, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (flow, correlation_id, now, e.kind, e.type, e.step, e.message_id, e.reason, data)
                for e in entries
            ],
        )

    async def take_held(self, tx: Tx, flow: str, correlation_id: str) -> list[bytes]:
        """The held messages of a flow in arrival order, marked released."""
        rows = await tx.fetchall(
            f"SELECT seq, data FROM {self.timeline} WHERE flow = ? AND correlation_id = ? "
            "AND kind = 'held' ORDER BY seq",
            flow,
            correlation_id,
        )
        for seq, _ in rows:
            await tx.execute(
                f"UPDATE {self.timeline} SET kind = 'released', data = NULL WHERE seq = ?", seq
            )
        return [bytes(r[1]) for r in rows if r[1] is not None]

    # -- reads ---------------------------------------------------------------

    async def get(self, correlation_id: str, flow: str | None = None) -> list[FlowRow]:
        where, args = "correlation_id = ?", [correlation_id]
        if flow is not None:
            where, args = where + " AND flow = ?", [*args, flow]
        rows = await self.store.driver.read(
            f"SELECT flow, correlation_id, status, state, started_at, updated_at "
            f"FROM {self.flows} WHERE {where} AND status <> '' ORDER BY flow",
            *args,
        )
        return [_flow_row(r) for r in rows]

    async def history(self, flow: str, correlation_id: str) -> list[TimelineRow]:
        rows = await self.store.driver.read(
            f"SELECT seq, at, kind, type, step, message_id, reason FROM {self.timeline} "
            "WHERE flow = ? AND correlation_id = ? ORDER BY seq",
            flow,
            correlation_id,
        )
        return [TimelineRow(int(r[0]), float(r[1]), *r[2:]) for r in rows]

    async def list(
        self,
        *,
        flow: str | None = None,
        status: str | None = None,
        updated_before: float | None = None,
        limit: int = 100,
    ) -> list[FlowRow]:
        """Flows filtered by choreography, status and age, longest unchanged first."""
        where, args = ["status <> ''"], []
        for clause, value in (
            ("flow = ?", flow),
            ("status = ?", status),
            ("updated_at < ?", updated_before),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        rows = await self.store.driver.read(
            f"SELECT flow, correlation_id, status, state, started_at, updated_at "
            f"FROM {self.flows} WHERE {' AND '.join(where)} ORDER BY updated_at LIMIT ?",
            *args,
            limit,
        )
        return [_flow_row(r) for r in rows]

    async def counts(self, flow: str | None = None) -> dict[str, int]:
        where, args = ("status <> '' AND flow = ?", [flow]) if flow else ("status <> ''", [])
        rows = await self.store.driver.read(
            f"SELECT status, count(*) FROM {self.flows} WHERE {where} GROUP BY status", *args
        )
        return {str(r[0]): int(r[1]) for r in rows}


def _flow_row(r: Any) -> FlowRow:
    started = float(r[4]) if r[4] is not None else None
    return FlowRow(r[0], r[1], r[2], _decode_state(bytes(r[3])), started, float(r[5]))
