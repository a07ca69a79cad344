"""The transport contract: what every :class:`~sagakit.transport.Transport` must do.

The tests live in one mixin per topic; :class:`TransportContract` composes them.
"""

from __future__ import annotations

from ._contract import TransportHooks
from .app_level import AppLevelContract, ContractPing
from .delivery import DeliveryContract
from .fanout import FanOutContract
from .lifecycle import LifecycleContract
from .redelivery import RedeliveryContract
from .removal import RemovalContract


class TransportContract(
    DeliveryContract,
    RedeliveryContract,
    FanOutContract,
    LifecycleContract,
    AppLevelContract,
    TransportHooks,
    RemovalContract,
):
    """The contract every :class:`~sagakit.transport.Transport` keeps.

    Subclass it in a test module and provide the fixture ``transport``: an
    opened transport, closed (and its queues removed) at teardown. Override
    as needed:

    - :meth:`open_peer`: a *second* opened transport on the same broker or
      database (another process, in effect); by default the same object. The
      tests close the peers they open;
    - :meth:`crash`: abandon a subscription like a process that died, without
      settling its deliveries (default: skip the test);
    - :meth:`cut_connection`: cut the transport's connection to its broker or
      restart the broker (default: skip the test);
    - :meth:`app_store`: the store of the app-level tests (default: a new
      in-memory SQLite store; the database transport gives its own store);
    - :meth:`new_queue`: a unique queue name (the fixture can clean up after
      the names it hands out);
    - :meth:`leftovers`: what the broker itself still reports of the
      namespace after ``remove_namespace`` (:class:`.removal.RemovalContract`).

    Hooks are methods rather than fixtures so this module imports without
    pytest; ``pytest.skip`` is only imported by the default hooks that skip.
    """


__all__ = ["ContractPing", "TransportContract"]
