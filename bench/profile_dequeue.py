"""Where a dequeue's time goes: ``python bench/profile_dequeue.py [--backlog N] [--limit L] [--runs N]``.

Starts two throwaway local clusters (fsync on, as ``runops bench``), and lays out what the
bench's dequeue phases find: a backlog of ``--backlog`` PENDING runs in another environment (what
the trigger phases leave), an environment with ``maximum_concurrency_limit`` ``--limit`` (its
slots laid out by a first dequeue) and ``--runs`` runs queued in it. Then, for each of
``--clients`` (pgbench clients calling ``dequeue_runs(env, worker, 1)``, default 1 and 4):

1. the phase's server CPU, WAL and transactions per run, and ``pg_stat_user_functions`` self time
   per run (``track_functions = all`` for the phase);
2. every statement inside ``dequeue_runs`` for ``--explain`` more dequeues in one session
   (``auto_explain`` loaded in the session, nested statements, ``log_analyze`` with buffers and
   per-node timing off): ms per dequeue per statement text, its plan's top line and buffers.

With ``--ab DIR`` each client level runs twice on the same clusters: first with ``DIR``'s
``sql/functions/lifecycle.sql`` applied in place, then with this checkout's (a fresh environment
each time). Not a test; nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from harness import _TPS, _bring_up, find_pgbench, server_cpu_seconds
from nested_plans import explain_nested, statement_times
from worker_loop import DEQUEUE_ONE, _environment, _organization, _queue_runs, apply_functions

from runops.client import RUN_OPS

HERE = Path(__file__).resolve().parent


def _scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def prepare(stores: Any, app: dict[str, str], admin: dict[str, str], org: str, limit: int, runs: int,
            tag: str) -> str:
    env = _environment(app, org, f"dq-{tag}", limit=limit)
    with psycopg.connect(app[RUN_OPS], autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM runops.dequeue_runs(%s, 'warm', 1)", [env])  # lays the slots out

    class _B:  # what _queue_runs needs of a Bench
        pass

    b = _B()
    b.admin = admin  # type: ignore[attr-defined]
    _queue_runs(b, env, runs)  # type: ignore[arg-type]
    return env


def phase(stores: Any, app: dict[str, str], admin: dict[str, str], env: str, clients: int, runs: int) -> None:
    pgbench = find_pgbench()
    datadirs = [c.datadir for c in stores.clusters.values()]
    with psycopg.connect(admin[RUN_OPS], autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET track_functions = 'all'")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)
        conn.execute("SELECT pg_stat_reset()")
        wal0 = _scalar(conn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
        x0 = _scalar(conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        with tempfile.TemporaryDirectory(prefix="runops-dequeue-") as scratch:
            script = Path(scratch) / "dequeue_one.sql"
            script.write_text(DEQUEUE_ONE)
            cpu0 = sum(server_cpu_seconds(d) or 0.0 for d in datadirs)
            out = subprocess.run([str(pgbench), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)),
                                  "-t", str(runs // clients), "-f", str(script), "-D", f"env={env}", app[RUN_OPS]],
                                 capture_output=True, text=True, check=False, timeout=900)
            time.sleep(1.0)  # pgbench's backends exit and are reaped: their CPU is counted
            cpu = sum(server_cpu_seconds(d) or 0.0 for d in datadirs) - cpu0
        tps = _TPS.search(out.stdout)
        if out.returncode != 0 or tps is None:
            raise RuntimeError(f"pgbench failed: {out.stderr[-2000:]}")
        time.sleep(1.0)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        wal = _scalar(conn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn") - wal0
        xacts = _scalar(conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()") - x0
        taken = _scalar(conn, "SELECT count(*) FROM runops.runs WHERE environment_id = %s AND status = 'DEQUEUED'",
                        [env]) - 1
        done = runs // clients * clients
        print(f"  c={clients}: {float(tps.group(1)):,.0f} runs/s, server CPU {cpu / done * 1e6:,.0f} µs/run, "
              f"WAL {wal / done:,.0f} B/run, {xacts / done:.2f} xacts/run ({taken} dequeued)", flush=True)
        rows = conn.execute(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions WHERE schemaname = 'runops' "
            "ORDER BY self_time DESC LIMIT 8").fetchall()
        for name, n, total, self_time in rows:
            print(f"      {name:30} {n / done:6.2f} calls {total / done * 1000:8.0f} µs total "
                  f"{self_time / done * 1000:8.0f} µs self", flush=True)
        conn.execute("ALTER SYSTEM RESET track_functions")
        conn.execute("SELECT pg_reload_conf()")


def statements(admin_url: str, env: str, calls: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        notes = explain_nested(conn, min_ms=0, options=("log_buffers",))
        t0 = time.perf_counter()
        for i in range(calls):
            conn.execute("SELECT count(*) FROM runops.dequeue_runs(%s, %s, 1)", [env, f"explain-{i % 4}"])
        wall = (time.perf_counter() - t0) * 1000 / calls
    spent, detail = statement_times(notes, width=110, detail=("Buffers:", "Trigger"), most=3)
    print(f"    statements inside dequeue_runs, ms per dequeue (mean of {calls}; wall with auto_explain "
          f"{wall:.2f} ms):")
    for key, ms in sorted(spent.items(), key=lambda kv: -kv[1])[:14]:
        print(f"      {ms / calls:7.3f}  {key}\n               {detail[key][:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=30000)
    parser.add_argument("--limit", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=2400)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--explain", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ab", type=Path, help="another checkout whose lifecycle.sql is measured first")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="runops-profile-dequeue-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    try:
        app, admin = stores.app_urls(), stores.admin_urls()
        org = _organization(app)
        if args.backlog:
            other = _environment(app, org, "backlog")
            with psycopg.connect(admin[RUN_OPS], autocommit=True) as conn:
                for start in range(0, args.backlog, 5000):
                    conn.execute("SELECT runops.batch_trigger(%s, (SELECT jsonb_agg(jsonb_build_object('task', "
                                 "'bench-task', 'payload', '{\"n\": 1}'::jsonb)) FROM generate_series(1, %s)))",
                                 [other, min(5000, args.backlog - start)])
        variants = ([("before", args.ab)] if args.ab else []) + [("after", HERE.parent)]
        for round_ in range(1, args.rounds + 1):
            for clients in [int(c) for c in args.clients.split(",")]:
                for name, tree in variants:
                    if args.ab:
                        apply_functions(admin[RUN_OPS], tree)
                    env = prepare(stores, app, admin, org, args.limit, args.runs + args.explain,
                                  f"{name}-{round_}-{clients}-{secrets.token_hex(2)}")
                    print(f"round {round_} {name}: backlog {args.backlog}, limit {args.limit}, {args.runs} runs",
                          flush=True)
                    phase(stores, app, admin, env, clients, args.runs)
                    if args.explain:
                        statements(admin[RUN_OPS], env, args.explain)
        if args.ab:
            apply_functions(admin[RUN_OPS], HERE.parent)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
