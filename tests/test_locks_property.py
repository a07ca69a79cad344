"""Property: interleavings of reserve, confirm, release, expiry and crashes keep locks sound.

Hypothesis draws a sequence of operations by several sagas on one pool (with
the clock moving and the sweeper running in between) and some of them crash:
their transaction dies after the operation ran, before it committed. After
every operation the database must agree with a plain model of the rules, and:

* never oversold: available >= 0 and available + reserved + confirmed == total;
* a confirmed reservation stays confirmed (never released or expired later);
* a reservation is confirmed only before its expiry, and an expired one never.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import sagakit as sk
from sagakit.clock import FakeClock
from sagakit.locks import CONFIRMED, EXPIRED, RELEASED, RESERVED, Holder, Reservations
from sagakit.locks.rules import Reservation, confirm_refusal
from sagakit.store import open_store

UNITS = 5
SAGAS = ["a", "b", "c", "d"]


class Crash(Exception):
    """The process dies after the operation ran, before its transaction committed."""


@dataclass
class Model:
    available: int = UNITS
    rows: dict[str, Reservation] = field(default_factory=dict)

    def set(self, h: str, state: str) -> None:
        r = self.rows[h]
        self.rows[h] = Reservation(r.holder, r.step, r.resource, r.amount, state, r.expires_at)

    def expire_overdue(self, now: float) -> None:
        for h, r in list(self.rows.items()):
            if r.overdue(now):
                self.set(h, EXPIRED)
                self.available += r.amount

    def reserve(self, h: str, amount: int, ttl: float, now: float) -> bool:
        if h in self.rows:
            return True
        if self.available < amount:
            self.expire_overdue(now)
        if self.available < amount:
            return False
        self.available -= amount
        self.rows[h] = Reservation(h, "", "x", amount, RESERVED, now + ttl)
        return True

    def confirm(self, h: str, now: float) -> bool:
        if h not in self.rows or confirm_refusal(self.rows[h], now) is not None:
            return False
        self.set(h, CONFIRMED)
        return True

    def release(self, h: str) -> None:
        r = self.rows.get(h)
        if r is not None and r.state == RESERVED:
            self.set(h, RELEASED)
            self.available += r.amount


saga = st.sampled_from(SAGAS)
op = st.one_of(
    st.tuples(st.just("reserve"), saga, st.integers(1, 3), st.sampled_from([1.0, 2.0, 5.0])),
    st.tuples(st.just("confirm"), saga),
    st.tuples(st.just("release"), saga),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
    st.tuples(st.just("sweep")),
)
step = st.tuples(op, st.booleans())  # (operation, does its transaction crash?)


async def apply(locks: Reservations, o: tuple[Any, ...], crash: bool) -> bool | None:
    """Run one operation in its own transaction; True/False: it succeeded/was refused."""
    now = locks.store.clock.now()
    kind = o[0]
    if kind == "advance":
        assert isinstance(locks.store.clock, FakeClock)
        locks.store.clock.advance(o[1])
        return None
    if kind == "sweep":
        await locks.sweep()  # its own transactions; a crash there is a crash between them
        return None
    try:
        async with locks.store.transaction() as tx:
            h = Holder(o[1])
            try:
                if kind == "reserve":
                    await locks.take(tx, h, {"x": o[2]}, ttl=o[3], now=now)
                elif kind == "confirm":
                    await locks.confirm_held(tx, h, now=now)
                else:
                    await locks.release_held(tx, h, now=now)
            except (sk.ResourceUnavailable, sk.ReservationExpired):
                return False
            if crash:
                raise Crash
        return True
    except Crash:
        return None


def expect(model: Model, o: tuple[Any, ...], now: float, crash: bool) -> bool | None:
    kind = o[0]
    if kind == "sweep":
        model.expire_overdue(now)
        return None
    if kind == "advance":
        return None
    trial = Model(model.available, dict(model.rows))
    ok: bool | None = None
    if kind == "reserve":
        ok = trial.reserve(o[1], o[2], o[3], now)
    elif kind == "confirm":
        ok = trial.confirm(o[1], now)
    else:
        trial.release(o[1])
        ok = True
    if ok and crash:
        return None  # rolled back: the model stays as it was
    if ok:
        model.available, model.rows = trial.available, trial.rows
    return ok


async def run(steps: list[tuple[tuple[Any, ...], bool]], path: Path) -> None:
    store = open_store(f"sqlite:///{path}", prefix="p_", clock=FakeClock(1000.0))
    await store.open()
    try:
        locks = Reservations(store, "prop")
        async with store.transaction() as tx:
            await locks.add(tx, "x", UNITS)
        model = Model()
        confirmed: set[str] = set()
        for o, crash in steps:
            now = store.clock.now()
            want = expect(model, o, now, crash)
            got = await apply(locks, o, crash)
            assert got == want, (o, crash, got, want)
            await check(locks, model, confirmed)
    finally:
        await store.close()


async def check(locks: Reservations, model: Model, confirmed: set[str]) -> None:
    (books,) = await locks.audit()
    assert books.available >= 0 and books.conserved, books  # never oversold
    assert books.available == model.available, (books, model)
    rows = {r.holder: r for h in SAGAS for r in await locks.held_by(Holder(h))}
    assert rows == model.rows
    for h in confirmed:
        assert rows[h].state == CONFIRMED  # confirmed stays confirmed
    for h, r in rows.items():
        if r.state == CONFIRMED and h not in confirmed:
            confirmed.add(h)


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=30))
def test_interleavings_never_oversell_nor_undo_a_confirm(
    steps: list[tuple[tuple[Any, ...], bool]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(steps, Path(tmp) / "p.db"))


def test_a_confirm_is_never_accepted_at_or_after_expiry() -> None:
    """The model's own rule, pinned: the instant of expiry already refuses."""
    r = Reservation("h", "", "x", 1, RESERVED, 10.0)
    assert confirm_refusal(r, 9.999) is None
    assert confirm_refusal(r, 10.0) is not None
    assert confirm_refusal(Reservation("h", "", "x", 1, EXPIRED, 10.0), 5.0) is not None
