"""An orchestrated step that waits for an event: where the two styles meet.

A ``.wait_for(Event, key=...)`` step sends :class:`AwaitEvent` to the internal
endpoint ``sagakit.awaits`` like any command, so the saga machine needs no
new rule: the step's reply is the event, its timeout and retries are the
step's own. The endpoint subscribes to every awaited event type and pairs
commands and events by (event type, key) in one row of the ``awaits`` table:

- a command finds the event already there (it arrived early): it is answered
  at once with the event as its reply;
- otherwise the command waits in the row, and the event, when it comes,
  answers it (a reply to the coordinator, recorded in the inbox under the
  command's key, so a repeated command gets the same answer).

Both sides lock the row first (an upsert), so a command and its event
arriving at the same moment cannot miss each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ..endpoint import Route, Scope
from ..errors import ConfigurationError
from ..inbox import SUCCESS
from ..messages import Envelope, command

if TYPE_CHECKING:
    from ..store import Store

AWAITS = "sagakit.awaits"


@command("sagakit.AwaitEvent")
class AwaitEvent(msgspec.Struct, frozen=True):
    """Answer me with the event of this type and key."""

    event_type: str
    key: str


class Awaits:
    """The endpoint behind every ``wait_for`` step of an App's sagas."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table = f"{store.prefix}awaits"
        #: awaited event type -> payload field holding its key (None: correlation_id)
        self.keys: dict[str, str | None] = {}

    def expect(self, event_type: str, field: str | None = None) -> None:
        """Subscribe to ``event_type``; its key is the payload's ``field`` if given."""
        known = self.keys.get(event_type, field)
        if known != field:
            raise ConfigurationError(f"{event_type!r} is awaited by {known!r} and by {field!r}")
        self.keys[event_type] = field

    def route(self, env: Envelope) -> Route | None:
        if env.kind == "command" and env.type == "sagakit.AwaitEvent":
            return Route(self.on_await)
        if env.kind == "event" and env.type in self.keys:
            return Route(self.on_event)
        return None

    async def on_await(self, scope: Scope) -> None:
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        want = scope.codec.payload(env, AwaitEvent)
        _, arrived = await self._lock(scope, want.event_type, want.key)
        if arrived is not None:
            event = scope.codec.decode(arrived, trusted=True)
            await scope.answer(scope.codec.payload(event), SUCCESS)
            return
        await self._set(scope, want.event_type, want.key, scope.codec.encode(env), None)

    async def on_event(self, scope: Scope) -> None:
        env = scope.env
        if await scope.settled_elsewhere(await scope.inbox.admit(scope.tx, env)):
            return
        key = self._key(scope)
        if key:
            waiting, _ = await self._lock(scope, env.type, key)
            await self._set(scope, env.type, key, None, scope.codec.encode(env))
            if waiting is not None:
                await self._answer(scope, scope.codec.decode(waiting, trusted=True))
        await scope.inbox.record(scope.tx, env, SUCCESS, None)

    async def _answer(self, scope: Scope, waiting: Envelope) -> None:
        """Reply to a waiting AwaitEvent with the event that just arrived."""
        codec, inbox = scope.codec, scope.inbox
        reply = codec.reply(waiting, codec.payload(scope.env), outcome=SUCCESS, sender=AWAITS)
        await inbox.store.inbox_admit(scope.tx, inbox.consumer, _key(waiting), 1)
        await inbox.record(scope.tx, waiting, SUCCESS, codec.encode(reply))
        if waiting.headers.reply_to:
            scope.out.send(reply, waiting.headers.reply_to)

    def _key(self, scope: Scope) -> str | None:
        env, field = scope.env, self.keys.get(scope.env.type)
        if field is None:
            return env.headers.correlation_id
        value = getattr(scope.codec.payload(env), field, None)
        return value if isinstance(value, str) else None

    async def _lock(self, scope: Scope, event_type: str, key: str) -> tuple[Any, Any]:
        await scope.tx.execute(
            f"INSERT INTO {self.table} (event_type, key, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (event_type, key) DO UPDATE SET updated_at = excluded.updated_at",
            event_type,
            key,
            self.store.clock.now(),
        )
        row = await scope.tx.fetchone(
            f"SELECT waiting, arrived FROM {self.table} WHERE event_type = ? AND key = ?",
            event_type,
            key,
        )
        return (_bytes(row[0]), _bytes(row[1])) if row is not None else (None, None)

    async def _set(
        self, scope: Scope, event_type: str, key: str, waiting: bytes | None, arrived: bytes | None
    ) -> None:
        await scope.tx.execute(
            f"UPDATE {self.table} SET waiting = ?, arrived = COALESCE(?, arrived) "
            "WHERE event_type = ? AND key = ?",
            waiting,
            arrived,
            event_type,
            key,
        )


def _bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def _key(env: Envelope) -> str:
    from ..inbox import key_of

    return key_of(env)
