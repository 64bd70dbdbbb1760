"""Where a batch_trigger's time goes: ``python bench/profile_batches.py RESULTS_JSON [--calls N]``.

Runs on the clusters that ``python bench/run.py --only batches --keep`` left running (RESULTS_JSON
is the file that run wrote) and nowhere else: it sets ``track_functions = all`` with ALTER SYSTEM
(reset at the end). For 10,000-item batch_trigger calls without and with keys it prints

1. ``pg_stat_user_functions``: calls, total and self time per batch_trigger call, per function;
2. every statement inside them (nested statements through ``auto_explain``, loaded in the
   session, ``log_analyze`` with per-node timing off, ``log_min_duration = 1 ms``; foreign-key
   checks are single-row statements below that and show in their INSERT's time), summed per
   statement text over the calls, with its plan's top line and WAL.

Stop the clusters afterwards (docs/benchmarks.md, "Reproducing the investigation"). Not a test.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from nested_plans import explain_nested, statement_times

N = 10_000


def items(keyed: bool) -> str:
    p = secrets.token_hex(4)
    return json.dumps([{"task": "bench-task", "payload": {"n": i},
                        **({"options": {"idempotency_key": f"p{p}-{i}"}} if keyed else {})} for i in range(N)])


def functions(admin: psycopg.Connection[Any], app_url: str, env: str, keyed: bool, calls: int) -> None:
    admin.execute("SELECT pg_stat_reset()")
    with psycopg.connect(app_url, autocommit=True) as app:
        for _ in range(calls):
            admin.execute("CHECKPOINT")
            app.execute("SELECT * FROM runops.batch_trigger(%s, %s::jsonb, '{}')", (env, items(keyed))).fetchone()
    time.sleep(1.5)  # the backend has exited; its function counters are flushed
    rows = admin.execute(
        "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions WHERE schemaname = 'runops' "
        "ORDER BY total_time DESC LIMIT 15").fetchall()
    print(f"\npg_stat_user_functions, batch_trigger of {N} items {'with' if keyed else 'without'} keys, "
          f"per call (mean of {calls}):")
    print(f"  {'function':28} {'calls':>7} {'total ms':>9} {'self ms':>8}")
    for name, n, total, self_time in rows:
        print(f"  {name:28} {n / calls:7.0f} {total / calls:9.1f} {self_time / calls:8.1f}")


def statements(admin_url: str, env: str, keyed: bool, calls: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        notes = explain_nested(conn, min_ms=1, options=("log_wal",))
        walls = []
        for _ in range(calls):
            conn.execute("CHECKPOINT")
            payload = items(keyed)
            t0 = time.perf_counter()
            conn.execute("SELECT * FROM runops.batch_trigger(%s, %s::jsonb, '{}')", (env, payload)).fetchone()
            walls.append((time.perf_counter() - t0) * 1000)
    spent, detail = statement_times(notes, width=90, detail=("WAL:", "Trigger"))
    print(f"\nstatements inside batch_trigger of {N} items {'with' if keyed else 'without'} keys, ms per call "
          f"(mean of {calls}; wall with auto_explain {sum(walls) / len(walls):.0f} ms):")
    for key, ms in sorted(spent.items(), key=lambda kv: -kv[1]):
        if ms / calls >= 1.0:
            print(f"  {ms / calls:7.1f}  {key}\n           {detail[key][:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="The JSON of a `bench/run.py --keep` run.")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    kept = json.loads(args.results.read_text()).get("kept")
    if not kept:
        raise SystemExit(f"{args.results} names no kept clusters: run `python bench/run.py --only batches --keep`")
    admin_url, app_url = kept["admin_urls"]["RUN_OPS"], kept["app_urls"]["RUN_OPS"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        row = admin.execute("SELECT environment_id FROM runops.batches ORDER BY created_at DESC LIMIT 1").fetchone()
        if row is None:
            raise SystemExit("no batch in the run-ops store: keep the clusters of a run with the batch phases")
        env = row[0]
        admin.execute("ALTER SYSTEM SET track_functions = 'all'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            for keyed in (False, True):
                functions(admin, app_url, env, keyed, args.calls)
        finally:
            admin.execute("ALTER SYSTEM RESET track_functions")
            admin.execute("SELECT pg_reload_conf()")
    for keyed in (False, True):
        statements(admin_url, env, keyed, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
