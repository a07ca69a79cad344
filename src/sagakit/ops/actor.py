"""Who performs an operator action.

Operator actions (retry, compensate, abort) take an :class:`Actor`, never a
free-text name: the identity is established by whoever calls the API — the
console's authentication, the CLI's token, or the application code that
builds one — and recorded with every action in the saga's history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidOperatorAction

Role = Literal["viewer", "operator", "admin"]
_NAME = re.compile(r"^[^\s\x00-\x1f]{1,200}$")


@dataclass(frozen=True, slots=True)
class Actor:
    """An identity that may act on sagas.

    ``id`` is who (a user name, an e-mail, a service account), ``role`` what
    they may do, ``via`` how the identity was established (``python``,
    ``cli``, ``console``, ...).
    """

    id: str
    role: Role = "operator"
    via: str = "python"

    def __post_init__(self) -> None:
        if not _NAME.match(self.id):
            raise InvalidOperatorAction(f"an actor needs an id without spaces, got {self.id!r}")
        if self.role not in ("viewer", "operator", "admin"):
            raise InvalidOperatorAction(f"unknown role {self.role!r}")

    def may_act(self) -> bool:
        """Viewers may look, not act."""
        return self.role in ("operator", "admin")

    def __str__(self) -> str:
        return f"{self.id} ({self.role}, via {self.via})"
