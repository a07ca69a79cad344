"""What a held write (``Tx.later``) may be: one ``INSERT``, ``UPDATE`` or ``DELETE``.

PostgreSQL sends a transaction's held writes as one statement of
data-modifying CTEs, each ending in its own ``RETURNING``; a write that is
not a plain statement of those three (a ``SELECT``, a ``WITH``, its own
``RETURNING``, a trailing semicolon) would break that statement for every
write in it. Both drivers refuse it up front with the same error, so a
handler behaves alike on SQLite, where held writes run at once.
"""

from __future__ import annotations

import functools
import re

from ..errors import StoreError

_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE)\s", re.IGNORECASE)
_RETURNING = re.compile(r"\bRETURNING\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _valid(sql: str) -> bool:
    return bool(_WRITE.match(sql)) and not _RETURNING.search(sql) and not sql.rstrip().endswith(";")


def check_held(sql: str) -> None:
    """Raise :class:`~sagakit.errors.StoreError` (not retryable) unless ``sql`` can be held."""
    if not _valid(sql):
        raise StoreError(
            "a held write (later) must be one INSERT, UPDATE or DELETE without RETURNING "
            f"or a trailing semicolon: {sql[:80]!r}",
            retryable=False,
        )
