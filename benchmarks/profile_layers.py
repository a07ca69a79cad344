"""Summarise a py-spy raw profile by layer (the table in docs/performance.md).

    .venv/bin/pip install py-spy
    .venv/bin/py-spy record -f raw -r 1000 -o /tmp/sq.txt -- .venv/bin/python \
        benchmarks/contenders.py --contender sagakit --db sqlite --in-flight 32 \
        --duration 5 --workdir /tmp/p
    .venv/bin/python benchmarks/profile_layers.py /tmp/sq.txt

Each sample is attributed to its innermost frame; start-up (imports) is left
out. ``--functions`` lists sagakit functions by inclusive share instead.
"""

from __future__ import annotations

import argparse
from collections import Counter

import sagakit.store.sqlite


def _commit_lines() -> set[str]:
    """``sqlite.py:N`` for each line of the driver that runs COMMIT."""
    with open(sagakit.store.sqlite.__file__) as f:
        return {f"sqlite.py:{i})" for i, line in enumerate(f, 1) if 'execute("COMMIT")' in line}


COMMIT_LINES = _commit_lines()


def layer(frames: list[str]) -> str:
    leaf = frames[-1]
    if "sagakit/store/sqlite.py" in leaf:
        if any(mark in leaf for mark in COMMIT_LINES):
            return "SQLite COMMIT (WAL writes, automatic checkpoints)"
        return "SQLite statements, BEGIN IMMEDIATE"
    if "selector_events.py" in leaf:
        return "socket send" if "write" in leaf else "socket receive"
    if "selectors.py" in leaf:
        return "waiting in epoll"
    if "asyncpg/" in leaf:
        return "asyncpg protocol and pool"
    if "sagakit/messages.py" in leaf:
        return "sagakit codec and ids (messages.py)"
    if "sagakit/coordinator.py" in leaf or "sagakit/saga.py" in leaf:
        return "sagakit coordinator"
    if "sagakit/" in leaf:
        return "sagakit endpoint, participant, store, transport"
    if "contenders.py" in leaf:
        return "benchmark client"
    if "asyncio/" in leaf or "contextlib" in leaf:
        return "asyncio loop, tasks, context managers"
    return "other Python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy output recorded with -f raw")
    ap.add_argument("--functions", action="store_true", help="sagakit functions, inclusive")
    args = ap.parse_args()
    shares: Counter[str] = Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not n.isdigit() or any("importlib" in x or "<frozen" in x for x in frames):
                continue
            total += int(n)
            if args.functions:
                names = {x.split(" (")[0] for x in frames if "sagakit/" in x}
                for name in names:
                    shares[name] += int(n)
            else:
                shares[layer(frames)] += int(n)
    for name, n in shares.most_common(25):
        print(f"| {name} | {100 * n / max(1, total):.0f}% |")


if __name__ == "__main__":
    main()
