"""The product catalogue: names and unit prices (in cents).

Prices are configuration the API uses to price an order; stock levels belong
to the Inventory service.
"""

from __future__ import annotations

from typing import NamedTuple


class Product(NamedTuple):
    name: str
    price: int


CATALOG: dict[str, Product] = {
    "KB-01": Product("mechanical keyboard", 8900),
    "MS-02": Product("wireless mouse", 2900),
    "HD-03": Product("noise-cancelling headphones", 19900),
    "CB-04": Product("usb-c cable", 900),
    "MN-05": Product("27-inch monitor", 31900),
    "LE-06": Product("limited-edition desk mat", 4900),
}
