"""Two-phase commit in the action model: resolve an in-doubt branch by hand.

``2pc.resolve`` commits or rolls back one prepared branch (target
``2pc:<gid>``, params ``{"gid": ..., "outcome": "commit" | "rollback",
"force": false}``) through :func:`sagakit.twophase.operator.resolve` — the
same rules as ``sagakit 2pc resolve``: rolling back a branch whose group has
a commit record is refused unless forced, a commit that finds no branch and
no record is ambiguous (raised, audited ``failed``). The branch lives in
another database, so the action cannot share a transaction with the store:
the resource commits or rolls back first, then the ``done`` line is
written (the 2PC log keeps its own line as well). Resolving twice is
harmless: the second finds the branch finished (``already finished``).

The console needs the databases to look in (``sagakit console --resource
NAME=URL``, or ``create_app(..., twophase=tp)``); without them it lists no
branch and the action is not registered. A database that cannot be reached
does not keep the console from starting: it is listed as unreachable, with
its typed error (``/api/2pc`` ``unreachable``, the 2PC page), and tried again
at the next request that needs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidOperatorAction, SagakitError, StoreUnavailable
from ..twophase.decision import parse
from ..twophase.operator import in_doubt, resolve

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import Tx
    from ..twophase import TwoPhase
    from ..twophase.resource import Resource
    from .actions import Operations

OPEN_TIMEOUT = 5.0  #: seconds a resource may take to open before it counts as unreachable

RESOLVE = "2pc.resolve"
OUTCOMES = ("commit", "rollback")


def target_of(gid: str) -> str:
    return f"2pc:{gid}"


def params_of(gid: str, outcome: str, force: bool = False) -> dict[str, Any]:
    """The params of one resolution; ValueError for an outcome that is neither."""
    if outcome not in OUTCOMES:
        raise ValueError("outcome is commit or rollback")
    if not gid or len(gid) > 200:
        raise ValueError("a branch's global id is 1 to 200 characters")
    return {"gid": gid, "outcome": outcome, "force": bool(force)}


class TwoPhaseActions:
    """``2pc.resolve`` and the in-doubt list, over one :class:`TwoPhase` (started)."""

    def __init__(self, tp: TwoPhase) -> None:
        self.tp = tp
        #: resources that could not be reached, with why (tried again when next needed)
        self.unreachable: dict[str, SagakitError] = {}

    def register(self, ops: Operations) -> None:
        ops.extend(RESOLVE, self.resolve, transactional=False)

    async def open(self) -> None:
        """Open every resource; one that cannot be reached is noted, not fatal."""
        for name, r in self.tp.resources.items():
            await self._open(name, r)

    async def retry(self) -> None:
        """Try the unreachable resources again."""
        for name in list(self.unreachable):
            await self._open(name, self.tp.resources[name])

    async def _open(self, name: str, r: Resource) -> None:
        try:
            await asyncio.wait_for(r.open(), OPEN_TIMEOUT)
        except (SagakitError, OSError, TimeoutError) as exc:
            self.unreachable[name] = _typed(name, exc)
        else:
            self.unreachable.pop(name, None)

    async def branches(self) -> list[dict[str, Any]]:
        """Every node's branches in doubt on the reachable resources, oldest first."""
        await self.retry()
        found = []
        for name in self.tp.resources:
            if name not in self.unreachable:
                try:
                    found += await in_doubt(self.tp, only=(name,))
                except (SagakitError, OSError) as exc:
                    self.unreachable[name] = _typed(name, exc)
        return [asdict(b) for b in sorted(found, key=lambda b: -(b.age or 0.0))]

    def unreachable_json(self) -> dict[str, dict[str, str]]:
        """The unreachable resources as the API lists them: the error's type and text."""
        return {
            n: {"error": type(e).__name__, "message": str(e)} for n, e in self.unreachable.items()
        }

    async def resolve(
        self, tx: Tx | None, actor: Actor, target: str, reason: str, params: dict[str, Any]
    ) -> str:
        gid, outcome = str(params.get("gid", "")), str(params.get("outcome", ""))
        if outcome not in OUTCOMES:
            raise InvalidOperatorAction("outcome is commit or rollback")
        how: Literal["commit", "rollback"] = "commit" if outcome == "commit" else "rollback"
        force = bool(params.get("force", False))
        await self._reachable(gid)
        done = await resolve(self.tp, gid, how, actor=actor, reason=reason, force=force)
        return f"{outcome}: {done}"

    async def _reachable(self, gid: str) -> None:
        """Raise the typed error of the branch's resource if it still cannot be reached."""
        await self.retry()
        g = parse(gid)
        if g is not None and g.resource in self.unreachable:
            raise self.unreachable[g.resource]


def _typed(name: str, exc: BaseException) -> SagakitError:
    """Our error for a resource that failed to open or answer (sagakit's own kept)."""
    if isinstance(exc, SagakitError):
        return exc
    return StoreUnavailable(f"2PC resource {name!r} is unreachable: {exc!r}", retryable=True)
