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
branch and the action is not registered.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidOperatorAction
from ..twophase.operator import in_doubt, resolve

if TYPE_CHECKING:
    from ..ops import Actor
    from ..store import Tx
    from ..twophase import TwoPhase
    from .actions import Operations

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

    def register(self, ops: Operations) -> None:
        ops.extend(RESOLVE, self.resolve, transactional=False)

    async def branches(self) -> list[dict[str, Any]]:
        """Every node's branches in doubt, oldest first, as the API lists them."""
        return [asdict(b) for b in await in_doubt(self.tp)]

    async def resolve(
        self, tx: Tx | None, actor: Actor, target: str, reason: str, params: dict[str, Any]
    ) -> str:
        gid, outcome = str(params.get("gid", "")), str(params.get("outcome", ""))
        if outcome not in OUTCOMES:
            raise InvalidOperatorAction("outcome is commit or rollback")
        how: Literal["commit", "rollback"] = "commit" if outcome == "commit" else "rollback"
        force = bool(params.get("force", False))
        done = await resolve(self.tp, gid, how, actor=actor, reason=reason, force=force)
        return f"{outcome}: {done}"
