"""Wiring: the six services and the create-order saga in one sagakit App.

``build(store, transport)`` gives an :class:`OrderFulfillment` whose App runs
every participant and the coordinator in this process:

* ``sqlite:///dir/sagakit.db`` (embedded): the coordinator's state and the
  message queues live in that file; each service gets its own database file
  next to it (``dir/customers.db`` ...). The App relays their outboxes.
* ``postgresql://...``: one database; sagakit's tables in ``public`` and each
  service's tables in a schema of its own (``customers.credit_reservations``).

``run=["shipping"]`` (or ``["coordinator"]``...) makes the App consume only
for those services in this process: that is how ``sagakit worker`` and the
multi-process demo (``sagakit.examples.order_fulfillment.cluster``) split the application.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sagakit as sk

from .catalog import CATALOG
from .customers import Customers
from .inventory import DEFAULT_TTL, Inventory, lock_timing
from .loyalty import Loyalty
from .messages import Line
from .orders import Orders
from .payments import FakeCardGateway, Payments
from .saga import OrderData, create_order
from .service import Service
from .shipping import FakeCarrier, Shipping


class UnknownProduct(ValueError):
    """An order line names a SKU that is not in the catalogue."""


@dataclass
class OrderFulfillment:
    """The application: an App plus handles on each service."""

    app: sk.App
    orders: Orders
    customers: Customers
    inventory: Inventory
    payments: Payments
    shipping: Shipping
    loyalty: Loyalty
    #: the saga version new orders start (a rolling upgrade moves it on)
    saga: sk.SagaDefinition[OrderData] = create_order

    @property
    def services(self) -> list[Service]:
        return [
            self.orders,
            self.customers,
            self.inventory,
            self.payments,
            self.shipping,
            self.loyalty,
        ]

    async def start(self) -> None:
        """Create the services' tables, then start the App (and so the stock sweeper,
        which the App runs in the processes that run the inventory service)."""
        for service in self.services:
            await service.create_tables()
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    async def __aenter__(self) -> OrderFulfillment:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def place_order(
        self,
        customer_id: str,
        items: list[tuple[str, int]],
        *,
        card_token: str,
        address: str,
        order_id: str | None = None,
    ) -> tuple[str, str]:
        """Price the items from the catalogue and start the saga: (order id, saga id)."""
        lines = []
        for sku, quantity in items:
            product = CATALOG.get(sku)
            if product is None:
                raise UnknownProduct(sku)
            lines.append(Line(sku, quantity, product.price))
        order_id = order_id or sk.new_id()
        data = OrderData(
            order_id=order_id,
            customer_id=customer_id,
            lines=lines,
            total=sum(line.amount for line in lines),
            card_token=card_token,
            address=address,
        )
        saga_id = await self.app.sagas.start(self.saga, data, correlation_id=order_id)
        return order_id, saga_id


def service_stores(store: str) -> dict[str, str | None]:
    """Where each service keeps its tables for the App store ``store``."""
    names = ["orders", "customers", "inventory", "payments", "shipping", "loyalty"]
    if store.startswith("sqlite:///") and not store.endswith(":memory:"):
        folder = Path(store[len("sqlite:///") :]).parent
        return {n: f"sqlite:///{folder / (n + '.db')}" for n in names}
    return dict.fromkeys(names)  # the App's own database (schemas on PostgreSQL)


def build(
    store: str = "sqlite:///.sagakit/sagakit.db",
    transport: str = "database",
    *,
    clock: sk.Clock | None = None,
    settings: sk.Settings | None = None,
    carrier: FakeCarrier | None = None,
    gateway: FakeCardGateway | None = None,
    stock_ttl: float = DEFAULT_TTL,
    sweep_interval: float = 1.0,
    lock_ttl: float | None = None,
    run: Iterable[str] | None = None,
) -> OrderFulfillment:
    """The order-fulfillment application on ``store`` and ``transport``.

    ``run`` selects the services (and/or ``"coordinator"``) this process
    consumes for; None runs them all, ``[]`` none (a process that only places
    orders and reads the books). ``stock_ttl`` is how long stock reservations
    live; ``sweep_interval`` how often expired ones are swept (0: never);
    ``lock_ttl`` (``sagakit demo --lock-ttl``) sets both.
    """
    if lock_ttl is not None:
        stock_ttl, sweep_interval = lock_timing(lock_ttl)
    app = sk.App(store, transport, settings=settings, clock=clock, run=run)
    where = service_stores(store)
    services = {
        "orders": Orders(),
        "customers": Customers(),
        "inventory": Inventory(stock_ttl, sweep_interval or None),
        "payments": Payments(gateway),
        "shipping": Shipping(carrier),
        "loyalty": Loyalty(),
    }
    for name, service in services.items():
        service.install(app, where[name])
    app.saga(create_order)
    return OrderFulfillment(app, **services)  # type: ignore[arg-type]
