"""The operator console: one action model, tokens and roles, the audit, and the web UI.

- :mod:`.actions`: :class:`Operations` — check, queue and audit operator actions
  (single and bulk); extension points for 2PC and process-manager actions
- :mod:`.dead_letters`: :class:`DeadLetterOperations` — replay or purge dead
  letters (single and bulk) through the same checks, queue and audit
- :mod:`.commands`: the durable operator command and its executor (coordinator side)
- :mod:`.admissible`: whether an action fits an instance (pure)
- :mod:`.query`: :class:`SagaQuery`, the filter of the list, the CLI and bulk actions
- :mod:`.audit`: the append-only audit table
- :mod:`.tokens`: API tokens, hashed, scoped by role, revocable
- :mod:`.web`: the Starlette dashboard and JSON API (extra ``sagakit[console]``)
- :mod:`.cli`: ``sagakit console``, ``sagakit sagas <action>``, ``sagakit audit list``
"""

from __future__ import annotations

from .actions import ActionRequest, BulkPlan, Operations, Submitted
from .audit import Audit, AuditEntry, AuditFilter
from .dead_letters import DeadLetterOperations, DeadLetterPlan
from .query import SagaQuery
from .tokens import TokenInfo, Tokens

__all__ = [
    "ActionRequest",
    "Audit",
    "AuditEntry",
    "AuditFilter",
    "BulkPlan",
    "DeadLetterOperations",
    "DeadLetterPlan",
    "Operations",
    "SagaQuery",
    "Submitted",
    "TokenInfo",
    "Tokens",
]
