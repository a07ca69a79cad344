"""PostgreSQL driver on asyncpg: a connection pool, one connection per transaction.

asyncpg was chosen over psycopg 3 by measurement (see ``docs/performance.md``,
"PostgreSQL driver choice"). sagakit's SQL uses ``?`` placeholders on every
backend; they are rewritten once per statement text to ``$1..$n`` and asyncpg
prepares and caches the statement per connection, so values are always bound.
PostgreSQL-native SQL that needs a literal ``?`` (the jsonb operators ``?``,
``?|``, ``?&``) writes it doubled, ``??``; text inside quotes is never touched.

The store URL takes sagakit's pool options in its query (``min_size``,
``max_size``, ``acquire_timeout``) next to libpq's connection parameters
(``sslmode``, ``sslrootcert``, ``application_name``, ...), e.g.
``postgresql://app@db/orders?sslmode=verify-full&max_size=20``; any other name
is a :class:`~sagakit.errors.ConfigurationError` naming the valid ones.

Consumers in other processes are woken with LISTEN/NOTIFY: a transaction that
enqueued messages sends one ``pg_notify(channel, queue)`` per queue just before
COMMIT (PostgreSQL delivers it only if the commit succeeds), and a dedicated
listening connection turns notifications into wake-ups, reconnecting if it
drops. Commits in this process wake local consumers directly.

Every asyncpg or socket error is translated into :class:`~sagakit.errors.StoreError`
here, marked retryable when a retry can succeed (lost connection, serialization
failure, deadlock, too many connections) and not for broken SQL or constraints.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal, NamedTuple

from ..errors import ConfigurationError, StoreError, StoreUnavailable
from ..transport._url import Option, count, parse_url, redact, seconds
from .held import check_held

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "the PostgreSQL store needs asyncpg: pip install 'sagakit[postgres]'"
    ) from exc

log = logging.getLogger("sagakit.store.postgres")

_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?\?|\?")
_COUNTED = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})
_NOTIFY_SQL = "SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q"
# SQLSTATEs after which the same work can succeed if tried again.
_RETRYABLE_STATES = frozenset({"40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03"})
_RETRYABLE_CLASSES = ("08", "53")
# Connection exceptions, insufficient resources (too many clients), and the
# server shutting down or starting up: the database is unavailable.
_OUTAGE_CLASSES = ("08", "53")
_OUTAGE_STATES = frozenset({"57P01", "57P02", "57P03"})
_HEALTH_EVERY_S = 10.0
_RECONNECT_MAX_S = 5.0

DEFAULT_MIN_SIZE = 1  # connections are opened as work needs them, up to max_size
# sagakit's own options in the store URL's query (keyword arguments win).
URL_OPTIONS: dict[str, Option[Any]] = {
    "min_size": Option(count, None),  # default: 1, or max_size if that is smaller
    "max_size": Option(count, 10),
    "acquire_timeout": Option(seconds, 30.0),
}
# Query parameters asyncpg reads as libpq does, and session settings it sends
# to the server; a misspelt name fails here rather than as a server error.
LIBPQ_OPTIONS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "dbname",
        "database",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "application_name",
        "search_path",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "timezone",
    }
)

# create_pool() options that asyncpg.connect() (used for LISTEN) does not take.
_POOL_ONLY = ("init", "setup", "reset", "max_queries", "max_inactive_connection_lifetime")

# InternalClientError: asyncpg's connection state machine after the server
# dropped the connection mid-operation ("cannot switch to state ...; another
# operation is in progress"); we never share a connection between tasks, so
# for us it means a lost connection.
DBError = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)


@functools.lru_cache(maxsize=4096)
def to_dollar(sql: str) -> str:
    """Rewrite ``?`` placeholders to ``$1..$n``, leaving quoted text alone.

    ``??`` is a literal ``?`` (PostgreSQL's jsonb operators), so handlers can
    write native SQL without the rewrite mistaking an operator for a value.
    """
    if "?" not in sql:
        return sql
    n = 0

    def number(m: re.Match[str]) -> str:
        nonlocal n
        if m.group() == "??":
            return "?"
        if m.group() != "?":
            return m.group()
        n += 1
        return f"${n}"

    return _TOKEN.sub(number, sql)


def retryable(exc: BaseException) -> bool:
    """Whether the failed operation may succeed when run again."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state in _RETRYABLE_STATES or state.startswith(_RETRYABLE_CLASSES)
    if isinstance(exc, asyncpg.InterfaceError):
        return _connection_lost(exc)
    return isinstance(exc, OSError)


def _connection_lost(exc: BaseException) -> bool:
    """An InterfaceError that says the connection went away under the caller.

    When the server ends a session (a restart, ``pg_terminate_backend``, an
    idle timeout) asyncpg closes the connection and detaches it from the pool
    entry in use, so the *next* call on it says "released back to the pool":
    that too is a lost connection, not a programming error.
    """
    text = str(exc)
    return "closed" in text or "closing" in text or "released back to the pool" in text


def unavailable(exc: BaseException) -> bool:
    """Whether the server is out of reach or refusing work (an outage), not the statement wrong."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        if state == "55000" and "accepting connections" in str(exc):
            return True  # the database was closed to connections (ALLOW_CONNECTIONS false)
        return state.startswith(_OUTAGE_CLASSES) or state in _OUTAGE_STATES
    if isinstance(exc, asyncpg.InterfaceError):
        return _connection_lost(exc)
    return isinstance(exc, (OSError, asyncpg.exceptions.InternalClientError))


def translate(exc: BaseException) -> StoreError:
    """The sagakit error for a driver or socket error."""
    state = getattr(exc, "sqlstate", None)
    detail = f"[{state}] {exc}" if state else f"{type(exc).__name__}: {exc}"
    if unavailable(exc):
        return StoreUnavailable(f"postgresql: {detail}", retryable=True)
    return StoreError(f"postgresql: {detail}", retryable=retryable(exc))


def rowcount(status: str) -> int:
    """Affected rows from a command status such as ``UPDATE 3`` or ``INSERT 0 1``."""
    verb, _, rest = status.partition(" ")
    count = rest.rpartition(" ")[2]
    return int(count) if verb in _COUNTED and count.isdigit() else 0


class _Held(NamedTuple):
    """A write held for the next batch (:meth:`PostgresTx.later`)."""

    sql: str
    args: tuple[Any, ...]
    #: gets the write's row count, or the value of ``returning`` (one row)
    check: Callable[[int], None] | None
    returning: str | None = None


class PostgresTx:
    """A transaction on one pooled connection; handlers see it as ``ctx.db``.

    Writes given to :meth:`later` are held and sent together, as one statement
    of data-modifying CTEs, just before the next statement or the COMMIT: a
    hop's inbox outcome, outgoing messages, acknowledgement, saga update and
    history cost one round trip instead of one each.

    BEGIN is sent with the first statement that needs it, followed by the
    step given to :meth:`on_begin` if any. A transaction whose only work is
    its held writes (a saga start, an acknowledgement, a participant hop
    whose handler only holds writes) never sends BEGIN or COMMIT: its batch
    goes alone as one autocommit statement, atomic by itself, with its
    checks enforced by the server (a failed check fails the statement, so
    nothing of it stays) and its NOTIFYs inside it.
    """

    serial = False  # transactions run side by side

    def __init__(self, conn: Any, hop_tables: frozenset[str] = frozenset()) -> None:
        self.connection = conn
        self._hop_tables = hop_tables
        self._callbacks: list[Callable[[], None]] = []
        self._undos: list[Callable[[], None]] = []
        self.queues: set[str] = set()
        self._savepoints = 0
        #: savepoints open now
        self.depth = 0
        self._held: list[_Held] = []
        #: tables written by the held writes, -> the hop that wrote them first (see separate)
        self._touched: dict[str, int] = {}
        self._hop = 0
        #: BEGIN has been sent: statements run inside the transaction
        self.begun = False
        self._prelude: Callable[[], Awaitable[None]] | None = None

    async def execute(self, sql: str, *args: Any) -> int:
        await self._ready()
        try:
            return rowcount(await self.connection.execute(to_dollar(sql), *args))
        except DBError as exc:
            raise translate(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._ready()
        try:
            await self.connection.executemany(to_dollar(sql), rows)
        except DBError as exc:
            raise translate(exc) from exc

    async def fetchone(self, sql: str, *args: Any) -> Any:
        await self._ready()
        try:
            return await self.connection.fetchrow(to_dollar(sql), *args)
        except DBError as exc:
            raise translate(exc) from exc

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        await self._ready()
        try:
            return list(await self.connection.fetch(to_dollar(sql), *args))
        except DBError as exc:
            raise translate(exc) from exc

    async def peek(self, sql: str, *args: Any) -> Any:
        """An optimistic read (see :meth:`Tx.peek`): before BEGIN, a statement of its own."""
        if self.begun or self._held:
            return await self.fetchone(sql, *args)
        return await self._send(self.connection.fetchrow, sql, args)

    async def later(self, sql: str, *args: Any, check: Callable[[int], None] | None = None) -> None:
        """Hold a write for the next batch (see :class:`PostgresTx`)."""
        check_held(sql)
        await self._keep_apart(sql)
        self._held.append(_Held(sql, args, check))

    def separate(self) -> None:
        """Writes held from now on belong to another hop (see :meth:`Tx.separate`)."""
        self._hop += 1

    async def _keep_apart(self, sql: str) -> None:
        """Send the writes held so far first if ``sql`` could depend on an earlier hop's.

        All held writes share one statement, hence one snapshot: a write that
        reads or changes a table an earlier hop's held write touched would not
        see that write. Anything but a plain ``INSERT ... VALUES`` that names
        such a table sends the held writes first (BEGIN, then the batch), so
        it runs after them, as it would have in a transaction of its own.
        """
        table, plain = held_target(sql)
        if table in self._hop_tables:  # the store's own, composed by design
            return
        touched = self._touched
        if not plain and any(
            hop != self._hop and _names(sql, name) for name, hop in touched.items()
        ):
            await self._ready()
        touched.setdefault(table, self._hop)

    def on_begin(self, step: Callable[[], Awaitable[None]] | None) -> bool:
        """Run ``step`` right after BEGIN, before anything else (see :meth:`Tx.on_begin`)."""
        if self.begun:
            return False
        self._prelude = step
        return True

    async def _ready(self) -> None:
        """Open the transaction if it is not yet, then send the held writes."""
        if not self.begun:
            self.begun = True
            await self._simple("BEGIN")
            if self._prelude is not None:
                step, self._prelude = self._prelude, None
                await self._first_step(step)
        await self.flush()

    async def _first_step(self, step: Callable[[], Awaitable[None]]) -> None:
        """The :meth:`on_begin` step, ahead of the writes held before it."""
        held, self._held = self._held, []
        try:
            await step()
        finally:
            self._held = held + self._held

    async def later_returning(
        self, sql: str, column: str, *args: Any, got: Callable[[int], None]
    ) -> None:
        """:meth:`later` for an ``INSERT`` of one row: ``got`` gets its ``column`` (the batch
        returns it), before the next statement or the COMMIT."""
        await self._keep_apart(sql)
        self._held.append(_Held(sql, args, got, column))

    async def flush(self) -> None:
        """Send the held writes: one alone as it is, several as one statement."""
        held, self._held = self._held, []
        self._touched.clear()
        if len(held) == 1 and held[0].returning is None:
            only = held[0]
            n = rowcount(await self._send(self.connection.execute, only.sql, only.args))
            if only.check is not None:
                only.check(n)
        elif held:
            sql, args = batch_sql(held)
            counts = await self._send(self.connection.fetchrow, sql, args)
            for h, n in zip(held, counts, strict=True):
                if h.check is not None:
                    h.check(n)

    async def send_alone(self, channel: str) -> None:
        """Commit a transaction that never began: its held writes as one autocommit statement."""
        held, self._held = self._held, []
        if not held and not self.queues:
            return
        sql, args = batch_sql(held, enforce=True, notify=bool(self.queues))
        if self.queues:
            args += [channel, sorted(self.queues)]
        try:
            counts = await self.connection.fetchrow(to_dollar(sql), *args)
        except asyncpg.InvalidTextRepresentationError as exc:
            _failed_check(held, exc)
            raise translate(exc) from exc
        except DBError as exc:
            raise translate(exc) from exc
        for h, n in zip(held, counts, strict=False):
            if h.check is not None:
                h.check(n)

    async def _send(self, method: Callable[..., Any], sql: str, args: Sequence[Any]) -> Any:
        try:
            return await method(to_dollar(sql), *args)
        except DBError as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction: rolled back alone if the block raises.

        Writes held inside the block are sent before it ends, so their checks
        fail the block, and dropped unsent if it raises.
        """
        await self._ready()
        self._savepoints += 1
        name = f"sagakit_sp{self._savepoints}"
        await self._simple(f"SAVEPOINT {name}")
        self.depth += 1
        try:
            yield
            await self.flush()
        except BaseException:
            self._held.clear()
            await _quietly(partial(self.connection.execute, f"ROLLBACK TO SAVEPOINT {name}"))
            raise
        finally:
            self.depth -= 1
        await self._simple(f"RELEASE SAVEPOINT {name}")

    async def _simple(self, sql: str) -> None:
        try:
            await self.connection.execute(sql)
        except DBError as exc:
            raise translate(exc) from exc

    def on_commit(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def notify(self, queue: str) -> None:
        self.queues.add(queue)

    def on_rollback(self, callback: Callable[[], None]) -> None:
        self._undos.append(callback)

    def committed(self, on_notify: Callable[[str], None] | None) -> None:
        """After COMMIT: wake local consumers and run commit callbacks."""
        if on_notify is not None:
            for queue in self.queues:
                on_notify(queue)
        for cb in self._callbacks:
            cb()

    def rolled_back(self) -> None:
        """After a rollback: run the rollback callbacks (once)."""
        undos, self._undos = self._undos, []
        for cb in undos:
            cb()


_TARGET = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+([\w.\"]+)", re.IGNORECASE)
_PLAIN_INSERT = re.compile(r"\s*INSERT\s+INTO\s+[\w.\"]+\s*\([^)]*\)\s*VALUES\s*\(", re.IGNORECASE)
_READS = re.compile(r"\b(SELECT|DO\s+UPDATE)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def held_target(sql: str) -> tuple[str, bool]:
    """A held write's table (lower case, unquoted), and whether it is a plain
    ``INSERT ... VALUES`` (it reads nothing and changes no existing row)."""
    m = _TARGET.match(sql)
    table = m.group(1).replace('"', "").lower() if m else ""
    return table, bool(_PLAIN_INSERT.match(sql)) and not _READS.search(sql)


@functools.lru_cache(maxsize=4096)
def _names(sql: str, table: str) -> bool:
    """Whether ``sql`` names ``table`` (or its unqualified name)."""
    name = table.rpartition(".")[2]
    return re.search(rf"(?<![\w.]){re.escape(name)}\b", sql, re.IGNORECASE) is not None or (
        "." in table and table in sql.lower()
    )


_CHECK_MARK = "sagakit-check"
_CHECK_FAILED = re.compile(_CHECK_MARK + r" (\d+) (\d+)")


@functools.lru_cache(maxsize=256)
def _batch_text(
    texts: tuple[str, ...],
    enforced: tuple[bool, ...],
    notify: bool,
    returning: tuple[str | None, ...] = (),
) -> str:
    """The batch statement; ``enforced`` writes fail it unless they changed one row.

    A failed check casts a marked text to int, so the whole statement fails
    (and with it every write in it) with the write's index and row count in
    the error; the cast is not constant, so the planner cannot fold it early.
    A write with a ``returning`` column gives that column's value instead of
    its count (:meth:`PostgresTx.later_returning`).
    """
    cols = returning or (None,) * len(texts)
    ctes = ", ".join(
        f"w{i} AS ({t} RETURNING {c or 1})"
        for i, (t, c) in enumerate(zip(texts, cols, strict=True))
    )
    counts = []
    for i, strict in enumerate(enforced):
        if cols[i] is not None:
            counts.append(f"(SELECT max({cols[i]}) FROM w{i})")
        elif strict:
            fail = f"('{_CHECK_MARK} {i} ' || n)::int"
            counts.append(
                f"(SELECT CASE WHEN n = 1 THEN n ELSE {fail} END "
                f"FROM (SELECT count(*)::int FROM w{i}) AS c(n))"
            )
        else:
            counts.append(f"(SELECT count(*) FROM w{i})::int")
    if notify:
        # the channel and the queue names are the last two arguments
        counts.append("(SELECT count(pg_notify(?, q)) FROM unnest(?::text[]) AS q)::int")
    return f"WITH {ctes} SELECT {', '.join(counts)}" if texts else f"SELECT {counts[0]}"


def batch_sql(
    held: Sequence[_Held], *, enforce: bool = False, notify: bool = False
) -> tuple[str, list[Any]]:
    """Several writes as one statement that returns each one's row count.

    ``enforce``: checked writes must change exactly one row, or the statement
    fails (for a batch sent alone in autocommit mode, where a check raised
    after the statement could no longer undo it). ``notify``: the statement
    also sends a NOTIFY per queue given as the last two arguments (channel,
    queue names).
    """
    args: list[Any] = []
    for h in held:
        args.extend(h.args)
    enforced = tuple(enforce and h.check is not None and h.returning is None for h in held)
    returning = tuple(h.returning for h in held)
    if not any(returning):
        returning = ()
    return _batch_text(tuple(h.sql for h in held), enforced, notify, returning), args


def _failed_check(held: Sequence[_Held], exc: BaseException) -> None:
    """Raise the error of the held write whose enforced check failed the statement."""
    m = _CHECK_FAILED.search(str(exc))
    if m is None:
        return
    check = held[int(m.group(1))].check
    if check is not None:
        check(int(m.group(2)))


class PostgresDriver:
    """The PostgreSQL store driver: an asyncpg pool plus one listening connection."""

    dialect: Literal["postgresql"] = "postgresql"
    #: the store's own hop tables (set by the Store; see PostgresTx.separate)
    hop_tables: frozenset[str] = frozenset()

    def __init__(
        self,
        url: str,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        channel: str = "sagakit",
        acquire_timeout: float | None = None,
        **connect_options: Any,
    ) -> None:
        given = {"min_size": min_size, "max_size": max_size, "acquire_timeout": acquire_timeout}
        o = (parsed := parse_url(url, URL_OPTIONS, given=given, foreign=LIBPQ_OPTIONS)).values
        if not _CHANNEL.match(channel):
            raise ConfigurationError(f"invalid notification channel {channel!r}")
        if o["min_size"] is None:
            o["min_size"] = min(DEFAULT_MIN_SIZE, o["max_size"])
        if not 0 <= o["min_size"] <= o["max_size"] or o["max_size"] < 1:
            raise ConfigurationError(
                f"invalid pool size {o['min_size']}..{o['max_size']} for {redact(url)}"
            )
        #: the DSN for asyncpg: sagakit's own options taken out
        self.url = parsed.base
        self.channel = channel
        self.min_size: int = o["min_size"]
        self.max_size: int = o["max_size"]
        self.acquire_timeout: float = o["acquire_timeout"]
        self.pool_options: dict[str, Any] = {"reset": _keep_session}
        self.pool_options.update(
            (k, connect_options.pop(k)) for k in _POOL_ONLY if k in connect_options
        )
        self.connect_options = connect_options
        self._pool: Any = None
        self._on_notify: Callable[[str], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self.listener_pid: int | None = None
        # Backends of our own pool: their NOTIFYs echo commits already woken locally.
        self._own_pids: set[int] = set()

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                **self.pool_options,
                **self.connect_options,
            )
        except DBError as exc:
            raise translate(exc) from exc
        except (ValueError, asyncpg.ClientConfigurationError) as exc:
            # a malformed DSN; asyncpg's message may quote it, password and all
            reason = redact(str(exc))
            raise ConfigurationError(f"bad PostgreSQL URL {redact(self.url)}: {reason}") from None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (TimeoutError, *DBError):
                pool.terminate()

    def _opened(self) -> Any:
        if self._pool is None:
            raise StoreError("store is closed", retryable=False)
        return self._pool

    async def _acquire(self, pool: Any) -> Any:
        """A pooled connection, waited for at most ``acquire_timeout``.

        The wait is bounded by ``asyncio.timeout`` rather than asyncpg's own
        ``timeout=``, which runs every acquire as a task of its own (a turn of
        the event loop each) and bounds the release the same way, for a wait
        that almost never happens (performance.md, round 7: +9-22% sagas/s at
        32 in flight).
        """
        try:
            async with asyncio.timeout(self.acquire_timeout):
                conn = await pool.acquire()
        except DBError as exc:
            raise translate(exc) from exc
        self._own_pids.add(conn.get_server_pid())
        return conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        pool = self._opened()
        conn = await self._acquire(pool)
        tx, ok = PostgresTx(conn, self.hop_tables), False
        try:
            async with _transaction(conn, self.channel, tx):
                yield tx
            ok = True
        finally:
            try:
                await _quietly(partial(pool.release, conn))
            finally:  # one of the two always runs, even if the release is cancelled
                if ok:
                    tx.committed(self._on_notify)
                else:
                    tx.rolled_back()

    async def fetch_single(self, sql: str, *args: Any) -> list[Any]:
        """One statement in autocommit mode: a single round trip, no BEGIN/COMMIT."""
        pool = self._opened()
        conn = await self._acquire(pool)
        try:
            return list(await conn.fetch(to_dollar(sql), *args))
        except DBError as exc:
            raise translate(exc) from exc
        finally:
            await _quietly(partial(pool.release, conn))

    async def read(self, sql: str, *args: Any) -> list[Any]:
        """A read-only query: one round trip in autocommit mode, like :meth:`fetch_single`."""
        return await self.fetch_single(sql, *args)

    async def listen(self, on_notify: Callable[[str], None], *, remote: bool = True) -> None:
        """Start waking ``on_notify`` for local commits and (``remote``) NOTIFYs of others.

        With ``remote`` a dedicated connection LISTENs; this returns once it is
        in place (or after a bounded wait if the server cannot be reached; the
        listener keeps reconnecting in the background). Without it, no
        connection is spent: commits in this process still wake its consumers.
        """
        self._on_notify = on_notify
        if self._listener is not None or not remote:
            return
        ready = asyncio.Event()
        self._listener = asyncio.create_task(
            self._listen_forever(on_notify, ready), name="sagakit-pg-listen"
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 10.0)

    async def _listen_forever(self, on_notify: Callable[[str], None], ready: asyncio.Event) -> None:
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(self.url, **self.connect_options)
            except DBError as exc:
                log.warning("LISTEN connection failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
                continue
            delay = 0.1
            try:
                await self._hold(conn, on_notify, ready)
            except DBError as exc:
                log.warning("LISTEN connection lost (%s); reconnecting", exc)
            finally:
                await _quietly(partial(conn.close, timeout=2.0))

    async def _hold(
        self, conn: Any, on_notify: Callable[[str], None], ready: asyncio.Event
    ) -> None:
        """LISTEN on ``conn`` until it drops; probe it now and then to notice silent loss."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        own = self._own_pids

        def woken(_conn: Any, pid: int, _channel: str, queue: str) -> None:
            if pid not in own:  # our own commits already woke local consumers
                on_notify(queue)

        await conn.add_listener(self.channel, woken)
        self.listener_pid = conn.get_server_pid()
        ready.set()
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), _HEALTH_EVERY_S)
                return
            await conn.execute("SELECT 1", timeout=5.0)


@asynccontextmanager
async def _transaction(conn: Any, channel: str, tx: PostgresTx) -> AsyncIterator[None]:
    """The body, then: NOTIFY the touched queues and COMMIT in one round trip.

    BEGIN goes out with the body's first statement (:meth:`PostgresTx._ready`);
    a body that only held writes ends as one autocommit statement.
    """
    try:
        yield
        if not tx.begun:
            await tx.send_alone(channel)
            return
        await tx.flush()
    except BaseException:
        if tx.begun:
            await _quietly(partial(conn.execute, "ROLLBACK"))
        raise
    try:
        await conn.execute(_commit_sql(channel, tx.queues))
    except DBError as exc:
        await _quietly(partial(conn.execute, "ROLLBACK"))
        raise translate(exc) from exc


def _commit_sql(channel: str, queues: set[str]) -> str:
    """``SELECT pg_notify(...), ...; COMMIT`` as one simple query (no parameters).

    NOTIFY is delivered only if the COMMIT succeeds, so listeners never wake
    for work that was rolled back.
    """
    if not queues:
        return "COMMIT"
    notes = ", ".join(f"pg_notify({_literal(channel)}, {_literal(q)})" for q in sorted(queues))
    return f"SELECT {notes}; COMMIT"


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings: only quotes need doubling)."""
    if "\x00" in text:
        raise StoreError(f"NUL in queue or channel name {text!r}", retryable=False)
    return "'" + text.replace("'", "''") + "'"


async def _keep_session(conn: Any) -> None:
    """Pool reset that skips asyncpg's per-release ``RESET ALL``/``UNLISTEN`` round trip.

    asyncpg still rolls back a transaction left open. sagakit keeps no session
    state on pooled connections (LISTEN has its own connection, advisory locks
    are transaction-scoped); handlers should use ``SET LOCAL``, not ``SET``.
    Pass ``reset=None`` to restore asyncpg's full reset.
    """


async def _quietly(step: Callable[[], Any]) -> None:
    """Run a cleanup step whose failure must not hide the original error.

    A thunk, not an awaitable: asyncpg raises some errors (a connection already
    released to the pool) when the method is *called*, before anything is
    awaited, and those must be caught here too.
    """
    try:
        await step()
    except DBError as exc:
        log.debug("cleanup failed: %r", exc)
