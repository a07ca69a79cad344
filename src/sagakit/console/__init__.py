"""The operator console: one action model, tokens and roles, the audit, and the web UI.

- :mod:`.actions`: :class:`Operations` — check, queue and audit operator actions
  (single and bulk); extensions run at once with the same checks and audit
- :mod:`.timers`: ``timer.fire`` / ``timer.cancel`` on a process manager's timer
  (:class:`TimerActions`); :mod:`.processes`: finding instances, bulk timer actions
- :mod:`.twophase`: ``2pc.resolve`` on an in-doubt branch (:class:`TwoPhaseActions`)
- :mod:`.dead_letters`: :class:`DeadLetterOperations` — replay or purge dead
  letters (single and bulk) through the same checks, queue and audit;
  :class:`DeadLetterAuditLog`, the audit of ``app.dead_letters`` and the CLI
- :mod:`.commands`: the durable operator command and its executor (coordinator side)
- :mod:`.admissible`: whether an action fits an instance (pure)
- :mod:`.query`: :class:`SagaQuery`, the filter of the list, the CLI and bulk actions
- :mod:`.audit`: the append-only audit table
- :mod:`.tokens`: API tokens, hashed, scoped by role, revocable
- :mod:`.web`: the Starlette dashboard and JSON API (extra ``sagakit[console]``)
- :mod:`.cli`: ``sagakit console``, ``sagakit sagas <action>``, ``sagakit audit list``;
  :mod:`.processes_cli`: ``sagakit processes list|show|fire|cancel``
"""

from __future__ import annotations

from .actions import ActionRequest, BulkPlan, Operations, Submitted
from .audit import Audit, AuditEntry, AuditFilter
from .dead_letters import DeadLetterAuditLog, DeadLetterOperations, DeadLetterPlan
from .processes import ProcessQuery, TimerPlan, bulk_timers
from .query import SagaQuery
from .timers import TimerActions, TimerRef
from .tokens import TokenInfo, Tokens
from .twophase import TwoPhaseActions

__all__ = [
    "ActionRequest",
    "Audit",
    "AuditEntry",
    "AuditFilter",
    "BulkPlan",
    "DeadLetterAuditLog",
    "DeadLetterOperations",
    "DeadLetterPlan",
    "Operations",
    "ProcessQuery",
    "SagaQuery",
    "Submitted",
    "TimerActions",
    "TimerPlan",
    "TimerRef",
    "TokenInfo",
    "Tokens",
    "TwoPhaseActions",
    "bulk_timers",
]
