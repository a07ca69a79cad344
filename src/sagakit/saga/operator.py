"""Operator actions on saga instances, recorded in each instance's history and the audit.

Each action is one transaction through the coordinator shell: the machine
checks it fits the instance's state (:class:`~sagakit.InvalidOperatorAction`
otherwise), and the history records who did it (an :class:`~sagakit.Actor`,
never a free-text name) and why. These run at once, in this process; the
audit (``sagakit.console.audit``) gets the same line as for an action queued
by the console or the CLI — ``done`` in the action's transaction, ``denied``
or ``failed`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .machine import OperatorAction

if TYPE_CHECKING:
    from ..ops import Actor
    from .coordinator import Coordinator


async def _run(coordinator: Coordinator, saga_id: str, action: OperatorAction) -> None:
    from ..console.commands import run_inline  # the console imports the saga package

    await run_inline(coordinator, saga_id, action)


class SagaOperator:
    """Retry, skip, compensate, abort, resume or edit one instance."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def retry(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        """Re-send the step a ``failed`` instance is stuck on, or a step waiting for
        its next retry (at once, say after fixing the cause), with a fresh retry budget."""
        await _run(self.coordinator, saga_id, OperatorAction("retry", actor, reason))

    async def skip(
        self, saga_id: str, *, actor: Actor, reason: str, step: str | None = None
    ) -> None:
        """Pass over the step a ``failed`` instance is stuck on, or one waiting to
        retry, after dealing with it by hand: a forward step counts as done, a
        compensation as compensated, and the saga carries on. ``step`` (optional)
        guards against skipping another step than the one meant."""
        await _run(self.coordinator, saga_id, OperatorAction("skip", actor, reason, step))

    async def compensate(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        """Force compensation of a running instance before its pivot."""
        await _run(self.coordinator, saga_id, OperatorAction("compensate", actor, reason))

    async def resume(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        """Re-send the in-flight steps of a running or compensating instance under their
        own message ids (the participants' inboxes answer what they already did)."""
        await _run(self.coordinator, saga_id, OperatorAction("resume", actor, reason))

    async def edit(
        self, saga_id: str, patch: list[dict[str, Any]], *, actor: Actor, reason: str
    ) -> None:
        """Change an unfinished or failed instance's data with a JSON patch (RFC 6902
        add/remove/replace/test); the history keeps each path's value before and after."""
        action = OperatorAction("edit", actor, reason, patch=tuple(patch))
        await _run(self.coordinator, saga_id, action)

    async def abort(self, saga_id: str, *, actor: Actor, reason: str) -> None:
        """Stop an unfinished instance where it is, without compensating."""
        await _run(self.coordinator, saga_id, OperatorAction("abort", actor, reason))
