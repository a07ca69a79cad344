"""The one interface through which the engine tells observers what happens.

The hop, the outbox, the relay and the coordinator each call a :class:`Hooks`
method at one place (a one-line call). The base class costs next to nothing:
it binds the message being handled to the log context and warns once when a
saga ends ``failed``. :class:`~sagakit.observe.telemetry.Telemetry` overrides
the same methods to add OpenTelemetry spans and Prometheus metrics, so a
process with telemetry off pays for neither.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .logging import MessageContext

if TYPE_CHECKING:
    from ..messages import Envelope
    from ..outbox import Outbox
    from ..saga.definition import SagaDefinition
    from ..saga.machine import Decision, Event, Instance
    from ..saga.state import Progress
    from ..store import Tx
    from ..store.core import SagaRecord

log = logging.getLogger("sagakit.saga")

FAILED = "failed"  #: SagaState.FAILED (a StrEnum), without importing the saga package


@dataclass(frozen=True, slots=True)
class Finished:
    """A tracked choreography's flow or a process manager's instance that ended.

    ``kind``: ``flow`` or ``process``; ``key``: the flow's correlation id or the
    instance key; ``trace``: the ``traceparent`` stored when it began;
    ``started``/``ended``: seconds since the epoch, from the stored rows.
    """

    kind: str
    name: str
    key: str
    correlation_id: str | None
    outcome: str | None
    error: bool
    trace: str | None
    started: float
    ended: float


class Hooks:
    """Called by the engine; the base binds log context and warns on failed sagas."""

    def processing(self, env: Envelope, endpoint: str) -> AbstractContextManager[Any]:
        """Around the handling of one delivery (its log context; a span in Telemetry)."""
        return MessageContext(env)

    def sending(self, out: Outbox) -> None:
        """Before an outbox is written: Telemetry injects trace context here."""

    def saga_starting(
        self, defn: SagaDefinition[Any], saga_id: str, progress: Progress
    ) -> AbstractContextManager[Any]:
        """Around a saga's start; Telemetry records its trace in ``progress``."""
        return nullcontext()

    def decided(
        self,
        tx: Tx,
        rec: SagaRecord,
        defn: SagaDefinition[Any],
        before: Instance,
        decision: Decision,
        event: Event,
    ) -> None:
        """The coordinator decided ``decision`` for ``event`` in ``tx`` (not yet committed)."""
        after = decision.instance
        if after.state == FAILED and before.state != FAILED:
            tx.on_commit(lambda: warn_failed(after))

    def finished(self, tx: Tx, what: Finished) -> None:
        """A flow or a process-manager instance ended in ``tx`` (not yet committed)."""

    def duplicate(self, consumer: str) -> None:
        """A copy of a message already handled by ``consumer`` arrived."""

    def outage(self, endpoint: str) -> None:
        """``endpoint`` started waiting out a store outage for one message."""

    def relayed(self, count: int) -> None:
        """The relay published ``count`` outbox rows to the broker."""


def warn_failed(inst: Instance) -> None:
    """Log a saga that stopped in ``failed`` (once: on the commit that failed it)."""
    log.warning(
        "saga %s (%s v%d) failed: %s",
        inst.id,
        inst.type,
        inst.version,
        inst.error or "no reason recorded",
        extra={"saga_id": inst.id, "correlation_id": inst.progress.correlation_id},
    )


#: the hooks of an App with no telemetry
BASE = Hooks()
