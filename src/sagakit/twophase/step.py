"""An atomic group as one saga step: ``.step("verify").atomic(["customers", "enrollments"], fn)``.

The coordinator runs it like a local step: ``await fn(data, tx)`` inside one
atomic group, its return value (if not None) the saga's new data. The step's
key (saga id and step name) is written with the commit record, together with
the result, so a step run again — the coordinator crashed before it saw the
outcome, or the step was redelivered — returns the stored result instead of
committing twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import NotStarted
from ..messages import encode_json

if TYPE_CHECKING:
    from .coordinator import TwoPhase
    from .protocol import AtomicTx


@dataclass(frozen=True, slots=True)
class AtomicStep:
    """The local function of a saga step that runs an atomic group."""

    resources: tuple[str, ...]
    fn: Callable[[Any, AtomicTx], Awaitable[Any]]

    async def __call__(self, data: Any) -> Any:
        raise NotStarted("an atomic step runs in an App's coordinator (app.saga(...))")

    def bind(self, tp: TwoPhase | None, key: str) -> Callable[[Any], Awaitable[Any]]:
        """The step's function for one run, under ``key``."""
        if tp is None:
            raise NotStarted("an atomic step needs the App's two-phase coordinator")

        async def run(data: Any) -> Any:
            stored = await tp.records.result_of(key)
            if stored is not None:
                return msgspec.Raw(stored) if stored else None
            group = tp.atomic(*self.resources, key=key)
            async with group as tx:
                result = await self.fn(data, tx)
                group.result = encode_json(result) if result is not None else b""
            return result

        return run
