"""sagakit side by side with DBOS, a hand-written saga and the commit limit (issue #7).

One run, one machine, one database server: the same 3-step saga (see
``contenders.py``) through every contender, on SQLite and PostgreSQL, happy
and compensating, 1 and 32 sagas in flight. Each measurement runs in its own
process, so its peak RSS is its own; contenders alternate (A B C D, A B C D,
...) over the repetitions and the table shows medians.

Figures per row: sagas/s, p50 and p99 latency of one whole saga, commits per
saga (PostgreSQL: ``pg_stat_database.xact_commit`` of a scratch database made
for this run; SQLite: write transactions counted by an instrumented sqlite3
connection in a separate counting run), peak RSS of the contender's process,
client CPU per saga, and throughput relative to DBOS on the same row.
Statements per saga (PostgreSQL) are counted client-side, one per call of an
asyncpg connection (``benchlib.RoundTripCounter``: the shared server has no
``pg_stat_statements``), so BEGIN and COMMIT count; DBOS talks to its system
database through SQLAlchemy, which that count does not see, so its column is
left empty.
``pgbench`` with a one-INSERT script gives PostgreSQL's commit limit.

    python benchmarks/compare.py            # full run (about 10 minutes)
    python benchmarks/compare.py --quick    # smoke run (about 1-2 minutes)
    python benchmarks/compare.py --json     # last line: {"rows": [...]}
    python benchmarks/compare.py --scaling  # 10k then 100k sagas, sagakit on SQLite
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any
from urllib.parse import urlparse

import benchlib as bl

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "contenders.py")
CONTENDERS = ("sagakit", "sagakit-memory", "dbos", "handwritten")
#: row order; sagakit-execute (each step's write a round trip of its own) runs on request
ORDER = ("sagakit", "sagakit-execute", "sagakit-memory", "dbos", "handwritten", "pgbench")
VARIANTS = ("happy", "compensate")
IN_FLIGHT = (1, 32)
PGBENCH_CLIENTS = (1, 8, 32)
#: transactions of one saga: start, then command and reply per step (compensate:
#: step 3's refusal and the two compensations with their replies)
HOPS = {"happy": 7, "compensate": 11}


class RunFailed(Exception):
    """A measurement failed three times; its row is left out and a note printed."""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="sagakit-bench-")
        self.run_no = 0
        self.notes: list[str] = []
        self.scratch: bl.ScratchDatabase | None = None
        self.baselines: dict[tuple[str, int], float] = {}

    def log(self, msg: str) -> None:
        if not self.args.json or self.args.verbose:
            print(msg, file=sys.stderr, flush=True)

    # -- one measurement in its own process ------------------------------------

    def worker(
        self,
        contender: str,
        db: str,
        variant: str,
        in_flight: int,
        *,
        duration: float | None = None,
        count: int | None = None,
        warmup: float = 0.0,
        count_commits: bool = False,
        rss_every: int = 0,
    ) -> dict[str, Any]:
        self.run_no += 1
        workdir = os.path.join(self.tmp, f"run{self.run_no}")
        cmd = [
            sys.executable,
            WORKER,
            f"--contender={contender}",
            f"--db={db}",
            f"--variant={variant}",
            f"--in-flight={in_flight}",
            f"--warmup={warmup}",
            f"--workdir={workdir}",
            f"--prefix=r{self.run_no}_",
        ]
        if duration is not None:
            cmd.append(f"--duration={duration}")
        if count is not None:
            cmd.append(f"--count={count}")
        if count_commits:
            cmd.append("--count-commits")
        if rss_every:
            cmd.append(f"--rss-every={rss_every}")
        if db == "postgresql":
            assert self.scratch is not None
            cmd.append(f"--url={self.scratch.url}")
        for attempt in range(3):  # the server is shared: e.g. "too many clients" now and then
            if db == "postgresql":
                assert self.scratch is not None
                before = self.scratch.xact_commit()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
            shutil.rmtree(workdir, ignore_errors=True)
            if proc.returncode == 0 and proc.stdout.strip():
                break
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            why = f"{contender}/{db}/{variant}/{in_flight} failed: {' | '.join(tail)}"
            self.log(why + ("; retrying" if attempt < 2 else ""))
            time.sleep(2)
        else:
            raise RunFailed(why)
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        if db == "postgresql":
            assert self.scratch is not None
            out["server_commits"] = self.scratch.xact_commit() - before
        return out

    # -- PostgreSQL commit counting --------------------------------------------

    def baseline(self, contender: str, in_flight: int) -> float:
        """Commits of starting and stopping a contender with no saga (median of 2)."""
        key = (contender, in_flight)
        if key not in self.baselines:
            runs = []
            for _ in range(1 if self.args.quick else 2):
                try:
                    out = self.worker(contender, "postgresql", "happy", in_flight, count=0)
                except RunFailed as exc:
                    self.notes.append(f"baseline: {exc}")
                    continue
                runs.append(out["server_commits"])
            self.baselines[key] = bl.median(runs)
        return self.baselines[key]

    def pg_commits_per_saga(self, contender: str, in_flight: int, out: dict[str, Any]) -> float:
        total = out["total_sagas"]
        if not total:
            return float("nan")
        return (out["server_commits"] - self.baseline(contender, in_flight)) / total

    # -- pgbench -----------------------------------------------------------------

    def pgbench(self, clients: int, seconds: int) -> dict[str, Any]:
        assert self.scratch is not None
        exe = shutil.which("pgbench")
        assert exe is not None
        self.run_no += 1
        table = f"r{self.run_no}_pgbench"
        bl.admin(self.scratch.url, f"CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, v INT)")
        workdir = os.path.join(self.tmp, f"pgbench{self.run_no}")
        os.makedirs(workdir)
        script = os.path.join(workdir, "insert.sql")
        with open(script, "w") as f:
            f.write(f"INSERT INTO {table} (v) VALUES (1);\n")
        u = urlparse(self.scratch.url)
        cmd = [
            exe,
            "-n",
            "-f",
            script,
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            "-T",
            str(seconds),
            "-l",
            f"--log-prefix={os.path.join(workdir, 'log')}",
            "-h",
            u.hostname or "127.0.0.1",
            "-p",
            str(u.port or 5432),
            "-U",
            u.username or "postgres",
            self.scratch.name,
        ]
        env = dict(os.environ)
        if u.password:
            env["PGPASSWORD"] = u.password
        before = self.scratch.xact_commit()
        with open(os.path.join(workdir, "out.txt"), "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            rss = 0.0
            while True:  # its peak RSS, read while it runs (VmHWM is gone once it exits)
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                rss = max(rss, bl.peak_rss_mb(proc.pid))
                time.sleep(0.05)
            proc.returncode = os.waitstatus_to_exitcode(status)
        with open(os.path.join(workdir, "out.txt")) as f:
            text = f.read()
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed: {text[-500:]}")
        commits = self.scratch.xact_commit() - before
        lat: list[float] = []
        for name in os.listdir(workdir):
            if name.startswith("log"):
                with open(os.path.join(workdir, name)) as f:
                    lat.extend(int(line.split()[2]) / 1000 for line in f if line.strip())
        shutil.rmtree(workdir, ignore_errors=True)
        bl.admin(self.scratch.url, f"DROP TABLE {table}")
        tps = next(
            float(line.split("=")[1].split()[0])
            for line in text.splitlines()
            if line.startswith("tps =")
        )
        return {
            "sagas_per_s": tps,
            "p50_ms": bl.percentile(lat, 50),
            "p99_ms": bl.percentile(lat, 99),
            "commits_per_saga": commits / len(lat) if lat else float("nan"),
            "peak_rss_mb": rss,
            "cpu_ms_per_saga": (usage.ru_utime + usage.ru_stime) * 1000 / max(1, len(lat)),
        }

    # -- the comparison ------------------------------------------------------------

    def available(self) -> tuple[list[str], list[str]]:
        args = self.args
        dbs = [d for d in args.databases]
        contenders = [c for c in args.contenders]
        if "dbos" in contenders and importlib.util.find_spec("dbos") is None:
            contenders.remove("dbos")
            self.notes.append("dbos is not installed (pip install -e '.[bench]'): no DBOS rows")
        if "postgresql" in dbs:
            url = bl.pg_url()
            if not bl.reachable(url):
                dbs.remove("postgresql")
                self.notes.append(f"PostgreSQL not reachable at {url}: no PostgreSQL rows")
            elif (why := bl.sagakit_postgres()) is not None:
                self.notes.append(why + ": no sagakit rows on PostgreSQL")
        return dbs, contenders

    def compare(self) -> list[dict[str, Any]]:
        args = self.args
        dbs, contenders = self.available()
        runs: dict[tuple[str, str, str, int], list[dict[str, Any]]] = defaultdict(list)
        pgb: dict[int, list[dict[str, Any]]] = defaultdict(list)
        sqlite_commits: dict[tuple[str, str, int], float] = {}
        has_pgbench = "postgresql" in dbs and not args.no_pgbench and shutil.which("pgbench")
        if "postgresql" in dbs and not args.no_pgbench and not has_pgbench:
            self.notes.append("pgbench not found (apt-get install postgresql-client): no pgbench")
        sk_pg = bl.sagakit_postgres() is None
        with bl.ScratchDatabase(bl.pg_url()) if "postgresql" in dbs else _Null() as scratch:
            self.scratch = scratch
            if scratch is not None and not scratch.private:
                self.notes.append("commits on PostgreSQL counted on a shared database: inexact")
            for rep in range(args.reps):
                order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
                for db in dbs:
                    for variant in args.variants:
                        for inf in args.in_flight:
                            for c in order:
                                if db == "postgresql" and c.startswith("sagakit") and not sk_pg:
                                    continue
                                self.log(f"rep {rep + 1}/{args.reps}: {c} {db} {variant} {inf}")
                                try:
                                    out = self.worker(
                                        c,
                                        db,
                                        variant,
                                        inf,
                                        duration=args.duration,
                                        warmup=args.warmup,
                                    )
                                except RunFailed as exc:
                                    self.notes.append(str(exc))
                                    continue
                                if out["wrong_state"]:
                                    self.notes.append(f"{c} {db} {variant}: {out['states']}")
                                runs[(c, db, variant, inf)].append(out)
                    if db == "postgresql" and has_pgbench:
                        for clients in PGBENCH_CLIENTS:
                            self.log(f"rep {rep + 1}/{args.reps}: pgbench {clients} clients")
                            try:
                                pgb[clients].append(self.pgbench(clients, args.pgbench_seconds))
                            except (RuntimeError, StopIteration) as exc:
                                self.notes.append(f"pgbench {clients}: {exc}")
            # commits per saga
            for (c, db, variant, inf), outs in runs.items():
                if db == "postgresql":
                    for out in outs:
                        out["commits_per_saga"] = self.pg_commits_per_saga(c, inf, out)
                else:
                    self.log(f"counting commits: {c} {db} {variant} {inf}")
                    try:
                        out = self.worker(
                            c, db, variant, inf, duration=args.count_seconds, count_commits=True
                        )
                    except RunFailed as exc:
                        self.notes.append(f"counting: {exc}")
                        out = {"commits_per_saga": float("nan")}
                    sqlite_commits[(c, variant, inf)] = out["commits_per_saga"]
        rows = []
        for (c, db, variant, inf), outs in runs.items():
            row = {
                "contender": c,
                "database": db,
                "variant": variant,
                "in_flight": inf,
                **{
                    k: bl.median([o[k] for o in outs])
                    for k in ("sagas_per_s", "p50_ms", "p99_ms", "cpu_ms_per_saga", "peak_rss_mb")
                },
                "commits_per_saga": (
                    bl.median([o["commits_per_saga"] for o in outs])
                    if db == "postgresql"
                    else sqlite_commits[(c, variant, inf)]
                ),
                "statements_per_saga": _statements(c, outs),
                "reps": len(outs),
            }
            rows.append(row)
        for clients, outs in pgb.items():
            row = {
                "contender": "pgbench",
                "database": "postgresql",
                "variant": "happy",
                "in_flight": clients,
                **{k: bl.median([o[k] for o in outs]) for k in outs[0]},
                "statements_per_saga": 1.0,
                "reps": len(outs),
            }
            rows.append(row)
        dbos = {
            (r["database"], r["variant"], r["in_flight"]): r["sagas_per_s"]
            for r in rows
            if r["contender"] == "dbos"
        }
        for r in rows:
            base = dbos.get((r["database"], r["variant"], r["in_flight"]))
            r["ratio_to_dbos"] = r["sagas_per_s"] / base if base else None
        order = {c: i for i, c in enumerate(ORDER)}
        rows.sort(
            key=lambda r: (
                r["database"] != "sqlite",
                r["variant"] != "happy",
                r["in_flight"],
                order[r["contender"]],
            )
        )
        return rows

    # -- brokers ------------------------------------------------------------------

    def brokers(self) -> list[dict[str, Any]]:
        """sagakit over RabbitMQ, NATS and Redis, services in worker processes (brokers.py)."""
        self.log("brokers: participants and coordinator in worker processes, 32 in flight")
        cmd = [sys.executable, os.path.join(HERE, "brokers.py"), "--json"]
        cmd += ["--only=rabbitmq,nats,redis", f"--duration={self.args.duration}"]
        cmd += [f"--warmup={self.args.warmup}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=HERE)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            self.notes.append(f"brokers.py failed: {' | '.join(tail)}")
            return []
        self.notes += [ln[len("note: ") :] for ln in lines if ln.startswith("note: ")]
        return [_broker_row(r) for r in json.loads(lines[-1])["rows"]]

    # -- scaling ------------------------------------------------------------------

    def scaling(self) -> list[dict[str, Any]]:
        sizes = (1_000, 10_000) if self.args.quick else (10_000, 100_000)
        rows = []
        for n in sizes:
            self.log(f"scaling: {n} sagas through sagakit on SQLite, 32 in flight")
            out = self.worker("sagakit", "sqlite", "happy", 32, count=n, rss_every=max(1, n // 10))
            samples = [round(mb, 1) for _, mb in out["rss_samples"]]
            rows.append(
                {
                    "sagas": out["sagas"],
                    "seconds": out["elapsed_s"],
                    "sagas_per_s": out["sagas_per_s"],
                    "cpu_ms_per_saga": out["cpu_ms_per_saga"],
                    "peak_rss_mb": out["peak_rss_mb"],
                    "rss_mb_every_tenth": samples,
                }
            )
        return rows


def _broker_row(r: dict[str, Any]) -> dict[str, Any]:
    nan = float("nan")
    return {
        "contender": f"sagakit/{r['transport']}",
        "database": "postgresql",
        "variant": "happy",
        "in_flight": r["in_flight"],
        "sagas_per_s": r["sagas_per_s"],
        "p50_ms": r["p50_ms"],
        "p99_ms": r["p99_ms"],
        "commits_per_saga": nan,
        "statements_per_saga": None,
        "cpu_ms_per_saga": nan,  # the client's alone would flatter: the work is in the workers
        "peak_rss_mb": nan,
        "ratio_to_dbos": None,
        "reps": 1,
    }


def _statements(contender: str, outs: list[dict[str, Any]]) -> float | None:
    """Median statements per saga, where the client-side count sees them all."""
    counts = [o.get("statements_per_saga") for o in outs]
    if contender == "dbos" or None in counts or not counts:
        return None
    return bl.median([float(c) for c in counts if c is not None])


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        pass


HEADERS = (
    "contender",
    "database",
    "variant",
    "in flight",
    "sagas/s",
    "p50 ms",
    "p99 ms",
    "commits/saga",
    "statements/saga",
    "CPU ms/saga",
    "peak RSS MB",
    "x DBOS",
)


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["contender"],
            r["database"],
            r["variant"],
            r["in_flight"],
            r["sagas_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r["commits_per_saga"],
            r.get("statements_per_saga"),
            r["cpu_ms_per_saga"],
            r["peak_rss_mb"],
            r["ratio_to_dbos"],
        ]
        for r in rows
    ]


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue #11's goals, checked against this run (reported, never asserted)."""

    def get(c: str, db: str, v: str, inf: int) -> dict[str, Any] | None:
        for r in rows:
            if (r["contender"], r["database"], r["variant"], r["in_flight"]) == (c, db, v, inf):
                return r
        return None

    out = []
    for db in ("postgresql", "sqlite"):
        for v in VARIANTS:
            sk, db_, hw = (
                get("sagakit", db, v, 32),
                get("dbos", db, v, 32),
                get("handwritten", db, v, 32),
            )
            if sk and db_:
                x = sk["sagas_per_s"] / db_["sagas_per_s"]
                out.append(
                    f"{'met ' if x >= 10 else 'MISS'} sagakit >= 10x DBOS, {db} {v} 32: {x:.1f}x"
                )
            if sk and hw:
                x = sk["sagas_per_s"] / hw["sagas_per_s"]
                out.append(
                    f"{'met ' if x >= 0.5 else 'MISS'} sagakit >= 0.5x hand-written, {db} {v} 32: "
                    f"{x:.2f}x"
                )
    sk, pgb8 = get("sagakit", "postgresql", "happy", 32), get("pgbench", "postgresql", "happy", 8)
    if sk and pgb8 and sk["commits_per_saga"] == sk["commits_per_saga"]:
        target = 0.5 * pgb8["sagas_per_s"] / sk["commits_per_saga"]
        out.append(
            f"{'met ' if sk['sagas_per_s'] >= target else 'MISS'} sagakit PG 32 >= half of "
            f"pgbench(8) / commits: {sk['sagas_per_s']:.0f}/s vs target {target:.0f}/s "
            f"({pgb8['sagas_per_s']:.0f} commits/s / {sk['commits_per_saga']:.1f} / 2)"
        )
    for v, hops in HOPS.items():
        r = get("sagakit", "postgresql", v, 32)
        if r and r.get("statements_per_saga"):
            per_hop = r["statements_per_saga"] / hops
            out.append(
                f"{'met ' if per_hop <= 3 else 'MISS'} sagakit <= 3 statements per hop, "
                f"postgresql {v} 32: {per_hop:.1f} ({r['statements_per_saga']:.1f} / {hops} hops)"
            )
    r = get("sagakit", "postgresql", "happy", 32)
    if r:
        cpu = r["cpu_ms_per_saga"]
        out.append(
            f"{'met ' if cpu < 1 else 'MISS'} sagakit client CPU < 1 ms/saga, postgresql 32: "
            f"{cpu:.2f} ms"
        )
    for r in rows:
        if r["contender"].startswith("sagakit/"):
            ok = r["sagas_per_s"] >= 500
            out.append(
                f"{'met ' if ok else 'MISS'} {r['contender']} (worker processes) >= 500 "
                f"sagas/s at 32: {r['sagas_per_s']:.0f}"
            )
    for db, limit in (("postgresql", 5.0), ("sqlite", 2.0)):
        r = get("sagakit", db, "happy", 1)
        if r:
            ok = r["p50_ms"] < limit
            out.append(
                f"{'met ' if ok else 'MISS'} sagakit p50 at 1 in flight on {db} < {limit:g} ms: "
                f"{r['p50_ms']:.2f} ms"
            )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 repetition)")
    ap.add_argument("--json", action="store_true", help="last line: the table as JSON")
    ap.add_argument("--scaling", action="store_true", help="run only the scaling run")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="seconds measured per run")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--in-flight", default=",".join(map(str, IN_FLIGHT)))
    ap.add_argument("--no-pgbench", action="store_true")
    ap.add_argument(
        "--no-brokers", action="store_true", help="leave out the RabbitMQ, NATS and Redis rows"
    )
    ap.add_argument("--verbose", action="store_true", help="progress on stderr even with --json")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.databases = [d for d in args.databases.split(",") if d]
    args.variants = [v for v in args.variants.split(",") if v]
    args.in_flight = [int(x) for x in args.in_flight.split(",") if x]
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.8 if args.quick else 2.5
    if args.warmup is None:
        args.warmup = 0.2 if args.quick else 0.5
    args.pgbench_seconds = 1 if args.quick else 3
    args.count_seconds = 0.5 if args.quick else 1.0

    bench = Bench(args)
    hw = bl.hardware()
    started = time.monotonic()
    try:
        if args.scaling:
            srows = bench.scaling()
            headers = (
                "sagas",
                "seconds",
                "sagas/s",
                "CPU ms/saga",
                "peak RSS MB",
                "RSS MB each 10%",
            )
            bl.print_table(
                "sagakit on SQLite, 32 in flight: scaling",
                headers,
                [
                    [
                        r["sagas"],
                        r["seconds"],
                        r["sagas_per_s"],
                        r["cpu_ms_per_saga"],
                        r["peak_rss_mb"],
                        " ".join(map(str, r["rss_mb_every_tenth"])),
                    ]
                    for r in srows
                ],
            )
            if args.json:
                print(json.dumps({"scaling": srows}))
            return
        rows = bench.compare()
        if "postgresql" in args.databases and not args.no_brokers:
            rows += bench.brokers()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    title = (
        f"3-step saga, medians of {args.reps} run(s) of {args.duration:g}s per row; "
        f"{hw['cpus']} CPUs, {hw['cpu']}; load {hw['load']} -> "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {elapsed:.0f}s"
    )
    bl.print_table(title, HEADERS, table_rows(rows))
    for line in goals(rows):
        print(line)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{title}\n\n{bl.markdown_table(HEADERS, table_rows(rows))}\n\n")
            f.write("\n".join(f"- {line}" for line in goals(rows)) + "\n")
    for note in dict.fromkeys(bench.notes):
        print("note:", note)
    if args.json:
        keys = (
            "contender",
            "database",
            "variant",
            "in_flight",
            "sagas_per_s",
            "p50_ms",
            "p99_ms",
            "commits_per_saga",
            "peak_rss_mb",
            "ratio_to_dbos",
            "statements_per_saga",
            "cpu_ms_per_saga",
        )
        js = [{k: _clean(r[k]) for k in keys} for r in rows if r["in_flight"] in (1, 32)]
        print(json.dumps({"rows": js}))


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if v != v else round(v, 3)
    return v


if __name__ == "__main__":
    main()
