"""The same 3-step saga, written for each contender, and a closed-loop driver.

Workload: steps 1, 2 and 3 each run one small local transaction that inserts a
row into a table of their own (``t1``, ``t2``, ``t3``) in the same database.
In the ``compensate`` variant step 3 refuses (a business failure, rolled back)
and steps 2 then 1 are compensated by deleting their row.

Contenders:

- ``sagakit``: participants p1..p3 in this process, the database transport.
- ``sagakit-memory``: the same app on the in-memory transport (an upper bound;
  saga state, inbox and outbox are still in the database).
- ``dbos``: DBOS Transact, three ``@DBOS.step`` functions in a
  ``@DBOS.workflow``, compensation by try/except.
- ``handwritten``: a plain asyncio function that writes the saga's state row
  after each step (start, step, state, step, state, ...).

Run one measurement in its own process (so peak RSS is its own)::

    python benchmarks/contenders.py --contender sagakit --db sqlite --in-flight 32 \
        --duration 2 --workdir /tmp/x

It prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import logging
import os
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from benchlib import CommitCounter, RoundTripCounter, current_rss_mb, peak_rss_mb, percentile

EXPECTED = {"happy": "completed", "compensate": "compensated"}


class Refused(Exception):
    """Step 3's business failure in the compensate variant."""


def _ddl(dialect: str, p: str) -> list[str]:
    key = "INTEGER PRIMARY KEY" if dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
    out = []
    for i in (1, 2, 3):
        out.append(
            f"CREATE TABLE IF NOT EXISTS {p}t{i} (id {key}, saga_id TEXT NOT NULL, "
            "amount INTEGER NOT NULL)"
        )
        out.append(f"CREATE INDEX IF NOT EXISTS {p}t{i}_saga ON {p}t{i} (saga_id)")
    return out


# -- sagakit ---------------------------------------------------------------------


class Sagakit:
    """sagakit: three participants and the coordinator in one App."""

    def __init__(
        self,
        url: str,
        prefix: str,
        transport: str = "database",
        *,
        signing: bool = False,
        services: set[str] | None = None,
        held_writes: bool = True,
        **tuning: Any,
    ) -> None:
        """``tuning``: further :class:`sagakit.Settings` fields (retention.py sets retention).

        ``held_writes``: each step's write is ``ctx.db.later`` (sent with the hop's
        own writes, as docs/how-to/participant-databases.md shows) and its forward
        handlers are registered ``db_only=True`` (their only effect is that write, so
        the hop is one statement), rather than ``ctx.db.execute`` (a round trip of
        its own) admitted first: contender ``sagakit-execute``.

        ``services``: run only these in this process (``App.only``): ``p1``..``p3``
        and ``coordinator``; the empty set makes a pure client (start + wait).
        """
        import msgspec

        import sagakit as sk

        self.sk, self.url, self.prefix, self.transport = sk, url, prefix, transport
        p = prefix

        class Data(msgspec.Struct):
            n: int
            fail: bool = False

        self.Data = Data
        cmds = _message_types(sk, msgspec)
        step1, step2, step3, undo1, undo2 = cmds

        self.definition = (
            sk.Saga("bench", Data)
            .step("s1")
            .invoke("p1", lambda d: step1(d.n))
            .compensate("p1", lambda d: undo1(d.n))
            .step("s2")
            .invoke("p2", lambda d: step2(d.n))
            .compensate("p2", lambda d: undo2(d.n))
            .step("s3")
            .invoke("p3", lambda d: step3(d.n, d.fail))
            .pivot()
            .build()
        )
        keys = None
        if signing:  # every message signed and verified (HMAC-SHA256)
            from sagakit.signing import SigningKeys

            keys = SigningKeys.parse("bench:" + "k" * 40)
        settings = sk.Settings(prefix=prefix, signing=keys, **tuning)
        self.app = app = sk.App(url, transport, settings=settings)
        app.saga(self.definition)
        if services is not None:
            app.only(services)

        def insert(table: str) -> Callable[[Any, Any], Awaitable[None]]:
            sql = f"INSERT INTO {p}{table} (saga_id, amount) VALUES (?, ?)"

            async def handler(cmd: Any, ctx: Any) -> None:
                write = ctx.db.later if held_writes else ctx.db.execute
                await write(sql, ctx.saga_id, cmd.n)

            return handler

        def delete(table: str) -> Callable[[Any, Any], Awaitable[None]]:
            sql = f"DELETE FROM {p}{table} WHERE saga_id = ?"

            async def handler(cmd: Any, ctx: Any) -> None:
                write = ctx.db.later if held_writes else ctx.db.execute
                await write(sql, ctx.saga_id)

            return handler

        class Refuse(sk.BusinessError):
            code = "bench.Refused"

        do3 = insert("t3")

        async def step3_handler(cmd: Any, ctx: Any) -> None:
            if cmd.fail:
                raise Refuse("step 3 refuses")
            await do3(cmd, ctx)

        for name, table, cls, undo in (("p1", "t1", step1, undo1), ("p2", "t2", step2, undo2)):
            part = app.participant(name)
            part.command(cls, db_only=held_writes)(insert(table))
            part.command(undo, db_only=held_writes)(delete(table))
        app.participant("p3").command(step3, db_only=held_writes)(step3_handler)

    async def setup(self) -> None:
        app = self.app
        await app.store.open()
        async with app.store.transaction() as tx:
            for stmt in _ddl(app.store.dialect, self.prefix):
                await tx.execute(stmt)
        await app.start()

    async def one(self, i: int, fail: bool) -> str:
        """One saga through the README's API: start, then wait for its final state."""
        sagas = self.app.sagas
        view = await sagas.wait(await sagas.start(self.definition, self.Data(i, fail)), 60)
        return str(view.state)

    async def teardown(self) -> None:
        await self.app.stop()


def _message_types(sk: Any, msgspec: Any) -> tuple[Any, ...]:
    @sk.command("bench.Step1")
    class Step1(msgspec.Struct):
        n: int

    @sk.command("bench.Step2")
    class Step2(msgspec.Struct):
        n: int

    @sk.command("bench.Step3")
    class Step3(msgspec.Struct):
        n: int
        fail: bool = False

    @sk.command("bench.Undo1")
    class Undo1(msgspec.Struct):
        n: int

    @sk.command("bench.Undo2")
    class Undo2(msgspec.Struct):
        n: int

    return Step1, Step2, Step3, Undo1, Undo2


# -- hand-written ------------------------------------------------------------------


class HandSqlite:
    """A hand-written asyncio saga on sqlite3 that saves its state after each step."""

    def __init__(self, path: str, prefix: str) -> None:
        self.path, self.p = path, prefix

    async def setup(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        self.conn = conn
        p = self.p
        self._tx(
            f"CREATE TABLE IF NOT EXISTS {p}hand_sagas (id TEXT PRIMARY KEY, state TEXT NOT NULL,"
            " step INTEGER NOT NULL, data TEXT NOT NULL, updated_at REAL NOT NULL)",
            *_ddl("sqlite", p),
        )

    def _tx(self, *stmts: Any) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for s in stmts:
                if isinstance(s, str):
                    conn.execute(s)
                else:
                    conn.execute(*s)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _save(self, sid: str, state: str, step: int) -> None:
        sql = f"UPDATE {self.p}hand_sagas SET state = ?, step = ?, updated_at = ? WHERE id = ?"
        self._tx((sql, (state, step, time.time(), sid)))

    def _step(self, sid: str, step: int, n: int, fail: bool) -> None:
        sql = f"INSERT INTO {self.p}t{step} (saga_id, amount) VALUES (?, ?)"

        def body() -> None:
            if fail:
                raise Refused
            self.conn.execute(sql, (sid, n))

        self.conn.execute("BEGIN IMMEDIATE")
        try:
            body()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    async def one(self, i: int, fail: bool) -> str:
        sid = str(uuid.uuid4())
        data = json.dumps({"n": i, "fail": fail})
        self._tx(
            (
                f"INSERT INTO {self.p}hand_sagas VALUES (?, 'running', 0, ?, ?)",
                (sid, data, time.time()),
            )
        )
        for step in (1, 2, 3):
            await asyncio.sleep(0)  # a real async saga yields between steps
            try:
                self._step(sid, step, i, fail and step == 3)
            except Refused:
                self._save(sid, "compensating", step - 1)
                for undo in (2, 1):
                    await asyncio.sleep(0)
                    self._tx((f"DELETE FROM {self.p}t{undo} WHERE saga_id = ?", (sid,)))
                    self._save(sid, "compensated" if undo == 1 else "compensating", undo - 1)
                return "compensated"
            self._save(sid, "completed" if step == 3 else "running", step)
        return "completed"

    async def teardown(self) -> None:
        self.conn.close()


class HandPostgres:
    """The same hand-written saga on asyncpg."""

    def __init__(self, url: str, prefix: str, pool_size: int) -> None:
        self.url, self.p, self.pool_size = url, prefix, pool_size

    async def setup(self) -> None:
        import asyncpg

        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size)
        p = self.p
        async with self.pool.acquire() as c:
            await c.execute(
                f"CREATE TABLE IF NOT EXISTS {p}hand_sagas (id TEXT PRIMARY KEY, "
                "state TEXT NOT NULL, step INTEGER NOT NULL, data TEXT NOT NULL, "
                "updated_at DOUBLE PRECISION NOT NULL)"
            )
            for stmt in _ddl("postgresql", p):
                await c.execute(stmt)

    def _saved(self, effect: str | None) -> str:
        """One statement: the step's effect (if any) and the saga's new state, atomically."""
        save = f"UPDATE {self.p}hand_sagas SET state = $1, step = $2, updated_at = $3 WHERE id = $4"
        if effect is None:
            return save
        return f"WITH effect AS ({effect}) {save}"

    async def one(self, i: int, fail: bool) -> str:
        """One pooled connection per saga; every state change is one statement (one commit).

        A careful engineer's version: a step's insert and the saga's new state
        go in one statement (a data-modifying CTE), so each step costs one
        round trip and one commit, and a crash between them is impossible.
        """
        sid = str(uuid.uuid4())
        data = json.dumps({"n": i, "fail": fail})
        p = self.p
        ins = f"INSERT INTO {p}t{{}} (saga_id, amount) VALUES ($4, $5)"
        async with self.pool.acquire() as c:
            await c.execute(
                f"INSERT INTO {p}hand_sagas VALUES ($1, 'running', 0, $2, $3)",
                sid,
                data,
                time.time(),
            )
            for step in (1, 2, 3):
                if fail and step == 3:  # the step refuses: nothing of it commits
                    await c.execute(self._saved(None), "compensating", 2, time.time(), sid)
                    for undo in (2, 1):
                        gone = f"DELETE FROM {p}t{undo} WHERE saga_id = $4"
                        state = "compensated" if undo == 1 else "compensating"
                        await c.execute(self._saved(gone), state, undo - 1, time.time(), sid)
                    return "compensated"
                state = "completed" if step == 3 else "running"
                sql = self._saved(ins.format(step))
                await c.execute(sql, state, step, time.time(), sid, i)
        return "completed"

    async def teardown(self) -> None:
        await self.pool.close()


# -- DBOS --------------------------------------------------------------------------


class Dbos:
    """DBOS Transact: three @DBOS.step functions in a @DBOS.workflow; try/except undoes."""

    def __init__(self, db: str, url: str, workdir: str, prefix: str, pool_size: int) -> None:
        self.db, self.url, self.workdir, self.p, self.pool_size = (
            db,
            url,
            workdir,
            prefix,
            pool_size,
        )

    async def setup(self) -> None:
        from dbos import DBOS

        p = self.p
        if self.db == "sqlite":
            path = os.path.join(self.workdir, "dbos.db")
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            for stmt in _ddl("sqlite", p):
                conn.execute(stmt)
            self.conn = conn

            def run(sql: str, *args: Any) -> None:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(sql, args)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

            async def tx(sql: str, *args: Any, fail: bool = False) -> None:
                if fail:
                    raise Refused("step 3 refuses")
                run(sql.replace("$1", "?").replace("$2", "?"), *args)

            config: dict[str, Any] = {"name": "bench", "system_database_url": f"sqlite:///{path}"}
        else:
            import asyncpg

            self.pool = pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size
            )
            async with pool.acquire() as c:
                for stmt in _ddl("postgresql", p):
                    await c.execute(stmt)

            async def tx(sql: str, *args: Any, fail: bool = False) -> None:
                async with pool.acquire() as c, c.transaction():
                    if fail:
                        raise Refused("step 3 refuses")
                    await c.execute(sql, *args)

            config = {
                "name": "bench",
                "system_database_url": self.url,
                "dbos_system_schema": f"{p}dbos",
            }
        config["log_level"] = "WARNING"

        @DBOS.step()
        async def step1(sid: str, n: int) -> None:
            await tx(f"INSERT INTO {p}t1 (saga_id, amount) VALUES ($1, $2)", sid, n)

        @DBOS.step()
        async def step2(sid: str, n: int) -> None:
            await tx(f"INSERT INTO {p}t2 (saga_id, amount) VALUES ($1, $2)", sid, n)

        @DBOS.step()
        async def step3(sid: str, n: int, fail: bool) -> None:
            await tx(f"INSERT INTO {p}t3 (saga_id, amount) VALUES ($1, $2)", sid, n, fail=fail)

        @DBOS.step()
        async def undo1(sid: str) -> None:
            await tx(f"DELETE FROM {p}t1 WHERE saga_id = $1", sid)

        @DBOS.step()
        async def undo2(sid: str) -> None:
            await tx(f"DELETE FROM {p}t2 WHERE saga_id = $1", sid)

        @DBOS.workflow()
        async def bench_saga(sid: str, n: int, fail: bool) -> str:
            await step1(sid, n)
            try:
                await step2(sid, n)
            except Exception:
                await undo1(sid)
                return "compensated"
            try:
                await step3(sid, n, fail)
            except Exception:
                await undo2(sid)
                await undo1(sid)
                return "compensated"
            return "completed"

        self.workflow = bench_saga
        self.DBOS = DBOS
        DBOS(config=config)  # type: ignore[arg-type]
        DBOS.launch()

    async def one(self, i: int, fail: bool) -> str:
        return await self.workflow(str(uuid.uuid4()), i, fail)  # type: ignore[no-any-return]

    async def teardown(self) -> None:
        self.DBOS.destroy()
        if self.db == "sqlite":
            self.conn.close()
        else:
            await self.pool.close()


# -- the driver ----------------------------------------------------------------------


def make(contender: str, db: str, url: str, workdir: str, prefix: str, in_flight: int) -> Any:
    """Build a contender; ``url`` is the PostgreSQL URL (ignored for SQLite)."""
    pool = max(2, min(in_flight, 16))  # DBOS's step pool
    hand_pool = max(2, in_flight)  # the hand-written saga: one connection per saga in flight
    store = f"sqlite:///{os.path.join(workdir, 'bench.db')}" if db == "sqlite" else url
    if contender == "sagakit":
        return Sagakit(store, prefix)
    if contender == "sagakit-execute":
        return Sagakit(store, prefix, held_writes=False)
    if contender == "sagakit-memory":
        return Sagakit(store, prefix, transport="memory://")
    if contender == "handwritten":
        if db == "sqlite":
            return HandSqlite(os.path.join(workdir, "bench.db"), prefix)
        return HandPostgres(url, prefix, hand_pool)
    if contender == "dbos":
        return Dbos(db, url, workdir, prefix, pool)
    raise SystemExit(f"unknown contender {contender!r}")


async def drive(
    c: Any,
    *,
    variant: str,
    in_flight: int,
    duration: float | None,
    count: int | None,
    warmup: float,
    rss_every: int = 0,
) -> dict[str, Any]:
    """Closed loop: ``in_flight`` clients each run one saga after another."""
    fail = variant == "compensate"
    await c.setup()
    states: Counter[str] = Counter()
    rss: list[tuple[int, float]] = []
    total = 0
    lat: array.array[float] = array.array("d")
    lat_n = 0

    def record(seconds: float) -> None:
        nonlocal lat_n
        if lat_n < len(lat):
            lat[lat_n] = seconds
        else:
            lat.append(seconds)
        lat_n += 1

    async def phase(seconds: float | None, n: int | None, measure: bool) -> float:
        nonlocal total
        started = time.perf_counter()
        end = started + seconds if seconds is not None else None
        issued = 0

        async def client() -> None:
            nonlocal issued, total
            while True:
                if n is not None and issued >= n:
                    return
                if end is not None and time.perf_counter() >= end:
                    return
                issued += 1
                i = total + issued
                t0 = time.perf_counter()
                state = await c.one(i, fail)
                if measure:
                    record(time.perf_counter() - t0)
                    states[state] += 1
                    if rss_every and lat_n % rss_every == 0:
                        rss.append((lat_n, current_rss_mb()))

        await asyncio.gather(*(client() for _ in range(in_flight)))
        total += issued
        return time.perf_counter() - started

    try:
        if warmup > 0:
            await phase(warmup, None, False)
        # latencies as unboxed doubles, preallocated when the count is known, so
        # that the client's own bookkeeping does not show up as memory growth
        lat = array.array("d", bytes(8 * count)) if count else array.array("d")
        commits0, trips0 = CommitCounter.count, RoundTripCounter.count
        cpu0 = time.process_time()
        elapsed = await phase(duration, count, True)
        cpu = time.process_time() - cpu0
        commits = CommitCounter.count - commits0
        trips = RoundTripCounter.count - trips0
        peak = peak_rss_mb()  # before the statistics below allocate their own lists
    finally:
        await c.teardown()
    n = lat_n
    del lat[n:]
    expected = EXPECTED[variant]
    return {
        "sagas": n,
        "total_sagas": total,
        "elapsed_s": round(elapsed, 4),
        "sagas_per_s": n / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "cpu_ms_per_saga": cpu * 1000 / n if n else float("nan"),
        "commits_per_saga": commits / n if n and CommitCounter.installed else None,
        "statements_per_saga": trips / n if n and RoundTripCounter.installed else None,
        "peak_rss_mb": peak,
        "rss_samples": rss,
        "wrong_state": n - states[expected],
        "states": dict(states),
    }


async def serve(url: str, transport: str, prefix: str, services: set[str]) -> None:
    """Run some of the saga's services until SIGTERM; print ``ready`` once started."""
    import signal

    c = Sagakit(url, prefix, transport, services=services)
    await c.setup()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await c.teardown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contender", required=True)
    ap.add_argument("--db", choices=("sqlite", "postgresql"), required=True)
    ap.add_argument("--variant", choices=("happy", "compensate"), default="happy")
    ap.add_argument("--in-flight", type=int, default=1)
    ap.add_argument("--duration", type=float, default=None, help="measure for this long")
    ap.add_argument("--count", type=int, default=None, help="or run exactly this many sagas")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--url", default="", help="PostgreSQL URL")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prefix", default="bench_")
    ap.add_argument("--count-commits", action="store_true", help="SQLite: count commits")
    ap.add_argument("--rss-every", type=int, default=0)
    ap.add_argument("--transport", default="database", help="sagakit's transport URL")
    ap.add_argument("--serve", default=None, help="run only these services until SIGTERM")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.serve is not None:
        services = {s for s in args.serve.split(",") if s}
        asyncio.run(serve(args.url, args.transport, args.prefix, services))
        return
    if args.count_commits:
        CommitCounter.install()
    if args.db == "postgresql":
        RoundTripCounter.install()
    if args.duration is None and args.count is None:
        args.duration = 2.0
    os.makedirs(args.workdir, exist_ok=True)
    c = make(args.contender, args.db, args.url, args.workdir, args.prefix, args.in_flight)
    out = asyncio.run(
        drive(
            c,
            variant=args.variant,
            in_flight=args.in_flight,
            duration=args.duration,
            count=args.count,
            warmup=args.warmup,
            rss_every=args.rss_every,
        )
    )
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
