"""Logs that say which saga, step and message they are about.

While the hop handles a message, the message is bound to a context variable
(:class:`MessageContext`); :class:`ContextFilter` copies its saga id, step,
message id and correlation id onto every record logged meanwhile, by sagakit
or by the user's handler, as the record attributes ``saga_id``, ``step``,
``message_id`` and ``correlation_id`` (a value passed in ``extra=`` wins).

:func:`configure` is what the ``sagakit`` command uses: timestamps by
default, or one JSON object per line (``--log-format json``)::

    2026-12-02T05:01:02.345Z WARNING sagakit.saga: saga 0193… failed: … [saga=0193… step=ship]
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..messages import Envelope

#: the envelope being handled in this task, if any
current: ContextVar[Envelope | None] = ContextVar("sagakit_message", default=None)

FIELDS = ("saga_id", "step", "message_id", "correlation_id")
SHORT = {"saga_id": "saga", "step": "step", "message_id": "msg", "correlation_id": "corr"}


class MessageContext:
    """Binds one envelope to the log context for the duration of a ``with`` block."""

    __slots__ = ("env", "token")

    def __init__(self, env: Envelope) -> None:
        self.env = env
        self.token: Token[Envelope | None] | None = None

    def __enter__(self) -> MessageContext:
        self.token = current.set(self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            current.reset(self.token)


def ids(env: Envelope | None) -> dict[str, str | None]:
    """The ids a record about ``env`` carries."""
    if env is None:
        return dict.fromkeys(FIELDS)
    h = env.headers
    return {
        "saga_id": h.saga_id,
        "step": h.step,
        "message_id": env.id or None,
        "correlation_id": h.correlation_id,
    }


class ContextFilter(logging.Filter):
    """Puts the bound message's ids on every record (``extra=`` values win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in ids(current.get()).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """``ISO-time LEVEL logger: message [saga=… step=… msg=… corr=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{SHORT[k]}={v}" for k in FIELDS if (v := getattr(record, k, None))]
        return f"{text} [{' '.join(tags)}]" if tags else text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k in FIELDS if (v := getattr(record, k, None))})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def iso(created: float) -> str:
    """UTC ISO 8601 with milliseconds and a Z."""
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def configure(
    level: int = logging.WARNING, *, fmt: str = "text", force: bool = False
) -> logging.Handler | None:
    """Log to stderr with timestamps (``fmt="text"``) or as JSON lines (``"json"``).

    Like :func:`logging.basicConfig`, does nothing if the root logger already
    has handlers (the application configured logging), unless ``force``.
    """
    root = logging.getLogger()
    if root.handlers and not force:
        return None
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
