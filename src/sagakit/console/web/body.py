"""Request bodies: bounded in size, decoded against declared schemas, clear 4xx otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qs

import msgspec

from ...errors import ConsoleError

if TYPE_CHECKING:
    from starlette.requests import Request

T = TypeVar("T")


class QueryBody(msgspec.Struct, forbid_unknown_fields=True):
    """The saga query of a bulk action (see :class:`~sagakit.console.SagaQuery`)."""

    type: str | None = None
    state: str | None = None
    step: str | None = None
    older_than: float | None = None
    stuck_for: float | None = None
    correlation_id: str | None = None
    version: int | None = None
    limit: int = 1000


class ActionBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/sagas/{id}/{action}``."""

    reason: str
    step: str | None = None
    patch: list[dict[str, Any]] | None = None
    #: seconds to wait for the command to run (0: return once queued)
    wait: float = 0.0


class BulkBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/bulk/{action}``."""

    reason: str
    query: QueryBody = msgspec.field(default_factory=QueryBody)
    dry_run: bool = True
    step: str | None = None
    patch: list[dict[str, Any]] | None = None


class DeadLetterActionBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/dead-letters/{seq}/{action}``."""

    reason: str
    #: seconds to wait for the command to run (0: return once queued)
    wait: float = 0.0


class DeadLetterFilterBody(msgspec.Struct, forbid_unknown_fields=True):
    """Which dead letters a bulk action takes (see :class:`~sagakit.ops.DeadLetterFilter`)."""

    queue: str | None = None
    error_type: str | None = None
    saga_id: str | None = None
    older_than: Annotated[float, msgspec.Meta(ge=0)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100


class DeadLetterBulkBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/dead-letters/bulk/{action}``."""

    reason: str
    filter: DeadLetterFilterBody = msgspec.field(default_factory=DeadLetterFilterBody)
    dry_run: bool = True


class ReasonBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/processes/{process}/{key}/timers/{timer}/{fire|cancel}``."""

    reason: str


class ResolveBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/2pc/{gid}/resolve``."""

    reason: str
    outcome: Literal["commit", "rollback"]
    #: roll back even a branch whose group has a commit record (splits the group)
    force: bool = False


class TimerBulkBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/timers/bulk/{fire|cancel}``: this timer of every matching instance."""

    reason: str
    timer: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    process: str | None = None
    status: str | None = None
    correlation_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    dry_run: bool = True


class TokenBody(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /api/tokens``."""

    role: str
    name: str = ""


async def raw(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise http_error(413, f"the body is larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise http_error(413, f"the body is larger than {limit} bytes")
    return bytes(data)


async def json_body(request: Request, cls: type[T], limit: int) -> T:
    """A JSON body of type ``cls``: 415 if not JSON, 400 if malformed, 422 if off-schema."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/json":
        raise http_error(415, "send the body as application/json")
    data = await raw(request, limit)
    try:
        return msgspec.json.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise http_error(422, f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise http_error(400, f"malformed JSON: {exc}") from None


async def form_body(request: Request, limit: int) -> dict[str, str]:
    """A urlencoded form (the dashboard's), first value of each field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/x-www-form-urlencoded":
        raise http_error(415, "send the form as application/x-www-form-urlencoded")
    data = await raw(request, limit)
    try:
        fields = parse_qs(data.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise http_error(400, "the form is not UTF-8") from None
    return {k: v[0] for k, v in fields.items()}


def http_error(status: int, message: str) -> ConsoleError:
    """A :class:`ConsoleError` answered with ``status``."""
    exc = ConsoleError(message)
    exc.status = status
    return exc
