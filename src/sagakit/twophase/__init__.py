"""Two-phase commit where it fits: atomic groups over databases you own.

``app.resource(name, url)`` registers a database (PostgreSQL through
``PREPARE TRANSACTION``, MariaDB through XA); ``async with app.atomic(...)``
runs one group over several of them, presumed abort, with the commit record
in the App's own store (:mod:`.protocol`); ``.step(...).atomic(...)`` runs a
group as one saga step. Recovery (:mod:`.recovery`) finishes what a crashed
coordinator left prepared; the operator view (:mod:`.operator`) lists
in-doubt branches with their age and locks and resolves one, audited.
The decisions themselves are pure (:mod:`.decision`).
"""

from .coordinator import TwoPhase, TwoPhaseOptions, open_resource
from .decision import Gid, Plan
from .operator import Gauges, InDoubt
from .protocol import Atomic, AtomicTx
from .record import AuditLine
from .resource import Branch, BranchTx, Prepared, Resource

__all__ = [
    "Atomic",
    "AtomicTx",
    "AuditLine",
    "Branch",
    "BranchTx",
    "Gauges",
    "Gid",
    "InDoubt",
    "Plan",
    "Prepared",
    "Resource",
    "TwoPhase",
    "TwoPhaseOptions",
    "open_resource",
]
