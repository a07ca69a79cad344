"""A two-service App for ``sagakit worker --service`` tests, in both forms the
CLI loads: the ready-made ``app`` (store from ``SAGAKIT_STORE``) and the
factory ``create``.

Each saga has one step, on one service: a test that runs only ``payments``
sees ``pay`` complete while ``reserve`` waits for a ``customers`` consumer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

import sagakit as sk

SERVICES = ("customers", "payments")


@sk.command("cli.Reserve")
class Reserve(msgspec.Struct, frozen=True):
    key: str


@sk.command("cli.Pay")
class Pay(msgspec.Struct, frozen=True):
    key: str


@dataclass
class Job:
    key: str


reserve = sk.Saga("reserve", Job).step("reserve").invoke("customers", lambda j: Reserve(j.key))
pay = sk.Saga("pay", Job).step("pay").invoke("payments", lambda j: Pay(j.key))
RESERVE, PAY = reserve.build(), pay.build()


def create(store: str, run: Iterable[str] | None = None) -> sk.App:
    """The App on ``store``, consuming only for ``run`` (None: everything)."""
    app = sk.App(store, settings=sk.Settings(lease=1.0, max_poll=0.05), run=run)

    @app.participant("customers").command(Reserve)
    async def on_reserve(cmd: Reserve, ctx: sk.Context) -> None:
        """Nothing to record: the reply is what the test waits for."""

    @app.participant("payments").command(Pay)
    async def on_pay(cmd: Pay, ctx: sk.Context) -> None:
        """Nothing to record: the reply is what the test waits for."""

    app.saga(RESERVE)
    app.saga(PAY)
    return app


#: the README's form: ``sagakit worker --app tests.workers.cli_app:app``
app = create(os.environ.get("SAGAKIT_STORE") or "memory://")
