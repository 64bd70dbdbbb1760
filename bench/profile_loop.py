"""Server CPU and WAL per run of each call of the worker's loop: ``python bench/profile_loop.py
[--ab DIR] [--runs N] [--batch B] [--rounds R]``.

Starts two throwaway local clusters (fsync on, as ``runops bench``) and, on one app-role
connection to the run-ops store, takes ``--runs`` runs round the loop ``--batch`` at a time:
``trigger_run`` × B, ``dequeue_runs(B)``, then per run ``start_attempt`` (unless the dequeue
started it) and ``complete_attempt``. Each call's CPU is its backend's (``/proc/<pid>/schedstat``
read around the call: the backend does nothing else) and its WAL the store's insert position
around it; both are summed per kind of call and divided by the runs. With ``--ab DIR`` every
round measures ``DIR``'s loop functions first (``worker_loop.LOOP_FUNCTIONS``, installed in
place; dequeue without the start option, as that release's worker calls it), then this
checkout's with it, on the same clusters, a fresh environment each. Not a test.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up
from psycopg.types.json import Jsonb
from worker_loop import _environment, _organization, apply_functions

from runops.client import RUN_OPS

HERE = Path(__file__).resolve().parent


def _cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def measure(app_url: str, env: str, runs: int, batch: int, start: bool) -> dict[str, tuple[float, float]]:
    """µs of backend CPU and bytes of WAL per run, per kind of call."""
    cpu: dict[str, int] = defaultdict(int)
    wal: dict[str, int] = defaultdict(int)
    options = Jsonb({"start": True} if start else {})
    with psycopg.connect(app_url, autocommit=True) as conn:
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]

        def timed(kind: str, sql: str, params: Any) -> list[tuple[Any, ...]]:
            c0 = _cpu_ns(pid)
            w0 = int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])  # type: ignore[index]
            rows = conn.execute(sql, params, prepare=True).fetchall()
            c1 = _cpu_ns(pid)
            w1 = int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])  # type: ignore[index]
            cpu[kind] += c1 - c0
            wal[kind] += w1 - w0
            return rows

        done = 0
        while done < runs:
            for _ in range(batch):
                timed("trigger_run", "SELECT run_id FROM runops.trigger_run(%s, 'noop', '{}', '{}')", [env])
            taken = timed("dequeue_runs",
                          "SELECT run_id, status, attempt_number FROM runops.dequeue_runs(%s, 'w', %s, %s)",
                          [env, batch, options])
            for run_id, status, number in taken:
                if status != "EXECUTING":
                    [(run_id, status, number)] = timed(
                        "start_attempt", "SELECT run_id, status, attempt_number FROM runops.start_attempt(%s, 'w')",
                        [run_id])
                timed("complete_attempt", "SELECT status FROM runops.complete_attempt(%s, %s, '{}')", [run_id, number])
            done += len(taken)
    return {kind: (cpu[kind] / done / 1e3, wal[kind] / done) for kind in cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ab", type=Path, help="another checkout whose loop functions are measured first")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="runops-profile-loop-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    results: dict[str, list[dict[str, tuple[float, float]]]] = defaultdict(list)
    try:
        app, admin = stores.app_urls(), stores.admin_urls()
        org = _organization(app)
        variants = ([("before", args.ab, False)] if args.ab else []) + [("after", HERE.parent, True)]
        for round_ in range(1, args.rounds + 1):
            for name, tree, start in variants:
                if args.ab:
                    apply_functions(admin[RUN_OPS], tree)
                env = _environment(app, org, f"loop-{name}-{round_}-{secrets.token_hex(2)}")
                figures = measure(app[RUN_OPS], env, args.runs, args.batch, start)
                results[name].append(figures)
                total = sum(c for c, _ in figures.values())
                print(f"round {round_} {name}: " + ", ".join(f"{k} {c:,.0f} µs {w:,.0f} B" for k, (c, w) in
                                                             figures.items()) + f"; total {total:,.0f} µs/run",
                      flush=True)
        if args.ab:
            apply_functions(admin[RUN_OPS], HERE.parent)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    print(f"\nper run, medians of {args.rounds} rounds ({args.batch} runs per dequeue): backend CPU µs / WAL bytes")
    kinds = ["trigger_run", "dequeue_runs", "start_attempt", "complete_attempt"]
    print(f"{'':8}" + "".join(f"{k:>22}" for k in [*kinds, "total"]))
    for name, rounds in results.items():
        cells = []
        for kind in kinds:
            cs = [r[kind][0] for r in rounds if kind in r]
            ws = [r[kind][1] for r in rounds if kind in r]
            cells.append(f"{statistics.median(cs):>10,.0f} / {statistics.median(ws):>7,.0f}" if cs else f"{'—':>20}")
        tc = statistics.median([sum(c for c, _ in r.values()) for r in rounds])
        tw = statistics.median([sum(w for _, w in r.values()) for r in rounds])
        print(f"{name:8}" + "".join(f"{c:>22}" for c in cells) + f"{tc:>12,.0f} / {tw:>7,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
