"""The action model: one way to act on sagas for Python, the CLI and the HTTP API.

:class:`Operations` checks who acts (an :class:`~sagakit.Actor` whose role may
act), why (a reason is required), and whether the action fits the instance
(:mod:`.admissible`), then queues an :class:`~.commands.OperatorCommand` for a
coordinator to execute (:mod:`.commands`). Every refusal is audited: a role
that may not act or a read-only console as ``denied``, an action that does
not fit as ``failed``. A bulk action takes a :class:`~.query.SagaQuery`; its
dry run returns the exact count and a sample of what it would take, and
changes and records nothing.

Extension points, for actions on other kinds of target: :meth:`Operations.extend`
registers a handler for a named action, and :meth:`Operations.perform` runs
it with the same checks and audit. A transactional handler gets a store
transaction and its ``done`` line is written in it (the change and its audit
commit together); one that acts outside the store (a database's prepared
branch) gets none and its line follows it. Dead letters are not an
extension: ``dead-letters.replay`` and ``dead-letters.purge`` are queued
commands like the saga actions (:mod:`.dead_letters`). The extensions:

- ``timer.fire`` / ``timer.cancel`` — fire a process manager's timer now, or
  cancel it, target ``timer:<process>/<key>/<timer>`` (:mod:`.timers`,
  registered by every console);
- ``2pc.resolve`` — commit or roll back an in-doubt two-phase-commit branch,
  target ``2pc:<gid>``, params ``{"outcome": "commit"}`` (:mod:`.twophase`,
  registered when the console is given the databases).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import (
    DuplicateRegistration,
    Forbidden,
    InvalidOperatorAction,
    SagaNotFound,
    UnknownAction,
)
from ..messages import new_id
from ..saga.state import SagaState, progress_decoder
from .admissible import SAGA_ACTIONS, refusal
from .audit import MAX_REASON, Audit, AuditEntry
from .commands import DEAD_LETTER_ACTIONS, OPERATOR_QUEUE, OperatorCommand, encode
from .query import SagaQuery, select

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import SagaRecord, Store, Tx

#: action names reserved for the extension points (see the module docstring)
RESERVED = ("2pc.resolve", "timer.fire", "timer.cancel")
SAMPLE = 10

#: ``handler(tx, actor, target, reason, params)`` -> a detail for the audit line;
#: ``tx`` is None for a handler registered with ``transactional=False``
Extension = Callable[["Tx | None", "Actor", str, str, dict[str, Any]], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """What an operator asks: an action, the reason, and its arguments."""

    action: str
    reason: str
    #: ``skip``: the step meant (a guard); None for the one the instance is stuck on
    step: str | None = None
    #: ``edit``: the JSON patch; ``skip``: the step's output, as a patch on the data
    patch: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """A queued command; its outcome is the audit line ``(command_id, saga_id)``."""

    command_id: str
    saga_id: str
    action: str


@dataclass(slots=True)
class BulkPlan:
    """What a bulk action takes (dry run) or took."""

    action: str
    dry_run: bool
    count: int
    sample: list[str] = field(default_factory=list)
    #: matching instances the action does not fit, left alone
    refused: int = 0
    command_id: str | None = None


class Operations:
    """Acting on one store's sagas, with checks and audit; ``read_only`` refuses all."""

    def __init__(self, store: Store, *, read_only: bool = False) -> None:
        self.store = store
        self.audit = Audit(store)
        self.read_only = read_only
        self.extensions: dict[str, tuple[Extension, bool]] = {}

    async def submit(
        self, saga_id: str, req: ActionRequest, *, actor: Actor, source: str | None = None
    ) -> Submitted:
        """Check and queue one action on one saga."""
        await self.allowed(actor, req, saga_id, source)
        rec = await self.store.saga_get(saga_id)
        if rec is None:
            await self.failed(actor, req, saga_id, source, "no such saga")
            raise SagaNotFound(f"no saga {saga_id!r}", saga_id=saga_id)
        if why := refusal_of(req, rec):
            await self.failed(actor, req, saga_id, source, why)
            raise InvalidOperatorAction(why, saga_id=saga_id)
        cmd = _command(new_id(), saga_id, req, actor, source)
        async with self.store.transaction() as tx:
            await self.store.queue.put(tx, OPERATOR_QUEUE, f"{cmd.id}/{saga_id}", encode(cmd))
        return Submitted(cmd.id, saga_id, req.action)

    async def bulk(
        self,
        query: SagaQuery,
        req: ActionRequest,
        *,
        actor: Actor,
        source: str | None = None,
        dry_run: bool = False,
    ) -> BulkPlan:
        """Act on every instance ``query`` selects that the action fits.

        The dry run counts exactly what the run would queue, given no change in
        between; the run audits one line for the bulk command, and each queued
        command its own line when it executes.
        """
        target = "query:" + msgspec.json.encode(query.as_dict()).decode()
        await self.allowed(actor, req, target, source, action=f"bulk-{req.action}")
        matching = await select(self.store, query)
        fit = [r.id for r in matching if not refusal_of(req, r)]
        plan = BulkPlan(req.action, dry_run, len(fit), fit[:SAMPLE], len(matching) - len(fit))
        if dry_run or not fit:
            return plan
        plan.command_id = cmd_id = new_id()
        line = self.audit.line(actor, f"bulk-{req.action}", target, req.reason, "done", source)
        cmds = {saga_id: _command(cmd_id, saga_id, req, actor, source) for saga_id in fit}
        await self.queue_bulk(line, cmd_id, plan.sample, cmds)
        return plan

    async def queue_bulk(
        self, line: AuditEntry, cmd_id: str, sample: list[Any], cmds: dict[str, OperatorCommand]
    ) -> None:
        """In one transaction: a bulk action's audit ``line`` and its commands, by target."""
        detail = msgspec.json.encode({"count": len(cmds), "sample": sample}).decode()
        async with self.store.transaction() as tx:
            await self.audit.record(tx, _with(line, detail=detail, command_id=cmd_id))
            for target, cmd in cmds.items():
                await self.store.queue.put(tx, OPERATOR_QUEUE, f"{cmd_id}/{target}", encode(cmd))

    async def outcome(
        self, command_id: str, saga_id: str, *, timeout: float = 0.0
    ) -> AuditEntry | None:
        """The audit line a command left once executed; waits up to ``timeout`` s."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while (line := await self.audit.outcome_of(command_id, saga_id)) is None:
            if loop.time() >= give_up:
                return None
            await asyncio.sleep(0.1)
        return line

    # -- extension points ------------------------------------------------------

    def extend(self, name: str, handler: Extension, *, transactional: bool = True) -> None:
        """Register the handler of an action on another kind of target (see module doc)."""
        if name in self.extensions or name in SAGA_ACTIONS or name in DEAD_LETTER_ACTIONS:
            raise DuplicateRegistration(f"operator action {name!r} is already registered")
        self.extensions[name] = (handler, transactional)

    async def perform(
        self,
        name: str,
        target: str,
        reason: str,
        params: dict[str, Any],
        *,
        actor: Actor,
        source: str | None = None,
    ) -> str | None:
        """Run a registered extension action with the checks and audit of the rest.

        Refused (role, read-only, no reason): audited ``denied``/``failed``, raised.
        The handler raising: its changes rolled back, audited ``failed``, raised.
        """
        found = self.extensions.get(name)
        if found is None:
            hint = " (reserved; its feature has not registered it)" if name in RESERVED else ""
            raise UnknownAction(f"no operator action {name!r}{hint}")
        handler, transactional = found
        req = ActionRequest(name, reason)
        await self.allowed(actor, req, target, source)
        try:
            if not transactional:
                detail = await handler(None, actor, target, reason, params)
                line = self.audit.line(actor, name, target, reason, "done", source, detail)
                await self.audit.append(line)
                return detail
            async with self.store.transaction() as tx:
                detail = await handler(tx, actor, target, reason, params)
                line = self.audit.line(actor, name, target, reason, "done", source, detail)
                await self.audit.record(tx, line)
        except Exception as exc:
            await self.failed(actor, req, target, source, f"{type(exc).__name__}: {exc}")
            raise
        return detail

    # -- checks and audit ----------------------------------------------------------

    async def allowed(
        self,
        actor: Actor,
        req: ActionRequest,
        target: str,
        source: str | None,
        *,
        action: str | None = None,
    ) -> None:
        """Refuse (and audit) an actor that may not act, a read-only console, no reason."""
        name = action or req.action
        known = (*SAGA_ACTIONS, *DEAD_LETTER_ACTIONS)
        if req.action not in known and req.action not in self.extensions:
            raise UnknownAction(f"no operator action {req.action!r}")
        why = None
        if not actor.may_act():
            why = f"role {actor.role} may not act"
        elif self.read_only:
            why = "the console is read-only"
        if why is not None:
            await self.deny(actor, name, target, req.reason, why, source)
        if not req.reason.strip() or len(req.reason) > MAX_REASON:
            await self.failed(actor, req, target, source, "a reason is required")
            raise InvalidOperatorAction(f"operator actions need a reason (1-{MAX_REASON} chars)")

    async def deny(
        self, actor: Actor, action: str, target: str, reason: str, why: str, source: str | None
    ) -> None:
        """Audit a refused attempt, then raise :class:`Forbidden`."""
        await self.audit.append(
            self.audit.line(actor, action, target, reason, "denied", source, why)
        )
        raise Forbidden(f"{actor}: {why}")

    async def failed(
        self, actor: Actor, req: ActionRequest, target: str, source: str | None, why: str
    ) -> None:
        await self.audit.refusal(actor, req.action, target, req.reason, why, source)


def refusal_of(req: ActionRequest, rec: SagaRecord) -> str | None:
    """Why ``req`` does not fit the stored instance ``rec`` (None: it does)."""
    if req.action == "edit" and not req.patch:
        return "edit needs a JSON patch"
    return refusal(req.action, SagaState(rec.state), progress_decoder.decode(rec.progress))


def _command(
    cmd_id: str, saga_id: str, req: ActionRequest, actor: Actor, source: str | None
) -> OperatorCommand:
    return OperatorCommand(
        cmd_id,
        req.action,
        saga_id,
        req.reason,
        actor.id,
        actor.role,
        actor.via,
        req.step,
        req.patch,
        source,
    )


def _with(line: AuditEntry, **changes: Any) -> AuditEntry:
    return dataclasses.replace(line, **changes)
