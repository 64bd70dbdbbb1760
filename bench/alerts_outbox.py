"""What the alert outbox costs the lifecycle when nobody asked for alerts: ``python bench/alerts_outbox.py``.

The outbox is two row triggers on ``runops.runs`` (sql/functions/alerts.sql) whose WHEN admits
only a move into a final status; for such a move in an environment without alert channels the
trigger probes the live-channel index and writes nothing. This measures ``finalize_run`` (to an
alerting status), ``complete_attempt`` and ``trigger_run`` (the INSERT trigger's WHEN) on the
run-ops store of two throwaway clusters (fsync on), in an environment with no channel while
another environment has one, with the outbox triggers disabled (A: the code before alerts) and
enabled (B), alternating A and B in rounds so both see the same machine load. Reported: the
backend's CPU µs per call (``/proc/<pid>/schedstat``): the median over the rounds, and the
median of the rounds' paired differences B − A (each pair ran back to back); the client's wall µs
per call; and, from ``pg_stat_user_functions`` (``track_functions = 'pl'``), the time spent
inside the outbox trigger function per call in B. docs/benchmarks.md, "Alerts: the outbox
trigger's cost", has a run.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up, _make_environment
from profile_trigger import backend_cpu_s
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps

TRIGGERS = ("runs_alert_outbox", "runs_alert_outbox_born_final")


def _set_outbox(admin: psycopg.Connection[Any], on: bool) -> None:
    for name in TRIGGERS:
        admin.execute(f"ALTER TABLE runops.runs {'ENABLE' if on else 'DISABLE'} TRIGGER {name}")


def _timed(url: str, calls: list[Callable[[psycopg.Connection[Any]], None]]) -> tuple[float, float]:
    """Backend CPU µs and client wall µs per call, each call its own transaction (autocommit)."""
    with psycopg.connect(url, autocommit=True) as conn:
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        for warm in calls[:20]:
            warm(conn)
        timed = calls[20:]
        cpu0, t0 = backend_cpu_s(pid), time.perf_counter()
        for call in timed:
            call(conn)
        wall = time.perf_counter() - t0
        cpu1 = backend_cpu_s(pid)
    assert cpu0 is not None and cpu1 is not None, "no /proc/<pid>/schedstat: run on the database host"
    return (cpu1 - cpu0) / len(timed) * 1e6, wall / len(timed) * 1e6


def _pending_runs(url: str, env: str, n: int) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT t.run_id FROM generate_series(1, %s) AS g, "
                            "LATERAL runops.trigger_run(%s, 'bench', jsonb_build_object('n', g), '{}'::jsonb) AS t",
                            [n, env]).fetchall()
    return [str(r[0]) for r in rows]


def _executing_runs(url: str, env: str, n: int) -> list[str]:
    queue = f"q{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT count(t.*) FROM generate_series(1, %s) AS g, "
                     "LATERAL runops.trigger_run(%s, 'bench', jsonb_build_object('n', g), "
                     "jsonb_build_object('queue', %s::text)) AS t",
                     [n, env, queue])
        rows = conn.execute("SELECT run_id FROM runops.dequeue_runs(%s, 'bench-worker', %s, "
                            "jsonb_build_object('queues', jsonb_build_array(%s::text)))",
                            [env, n, queue]).fetchall()
        assert len(rows) == n, f"{len(rows)} of {n} runs dequeued"
        for (run_id,) in rows:
            conn.execute("SELECT * FROM runops.start_attempt(%s, 'bench-worker')", [run_id])
    return [str(r[0]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="Calls per round and path (default 200).")
    parser.add_argument("--rounds", type=int, default=16, help="Rounds of A and B each (default 16).")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="runops-alerts-bench-"))
    home.chmod(0o755)
    stores = None
    try:
        print("starting two local clusters (fsync on)", file=sys.stderr, flush=True)
        stores = _bring_up(home)
        app, admin_urls = stores.app_urls(), stores.admin_urls()
        env = _make_environment(app)
        other = _make_environment(app)
        with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
            client.update_environment(env, maximum_concurrency_limit=5000)
            # Channels exist, only not in the measured environment: the probe finds none of its own.
            client.create_alert_channel(other, "WEBHOOK", "http://127.0.0.1:9/hook")
            assert client.wait_for_mirror()
        url = app[RUN_OPS]
        n = args.calls + 20
        paths: dict[str, Callable[[], list[Callable[[psycopg.Connection[Any]], None]]]] = {
            "finalize_run (COMPLETED_WITH_ERRORS)": lambda: [
                (lambda c, r=r: c.execute("SELECT * FROM runops.finalize_run(%s, 'COMPLETED_WITH_ERRORS', %s)",
                                          [r, Jsonb({"message": "bench"})], prepare=True).fetchall())
                for r in _pending_runs(url, env, n)],
            "complete_attempt": lambda: [
                (lambda c, r=r: c.execute("SELECT * FROM runops.complete_attempt(%s, 1, %s)",
                                          [r, Jsonb({"ok": True})], prepare=True).fetchall())
                for r in _executing_runs(url, env, n)],
            "trigger_run (no key)": lambda: [
                (lambda c: c.execute("SELECT * FROM runops.trigger_run(%s, 'bench', '{}'::jsonb, '{}'::jsonb)",
                                     [env], prepare=True).fetchall())
                for _ in range(n)],
        }
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        with psycopg.connect(admin_urls[RUN_OPS], autocommit=True) as admin:
            admin.execute("ALTER DATABASE runops SET track_functions = 'pl'")  # new sessions, A and B alike
            admin.execute("SELECT pg_stat_reset()")
            for i in range(args.rounds):
                for variant in (("A", "B") if i % 2 == 0 else ("B", "A")):
                    _set_outbox(admin, variant == "B")
                    for name, make in paths.items():
                        calls = make()
                        results.setdefault((name, variant), []).append(_timed(url, calls))
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            _set_outbox(admin, True)
            alerts = admin.execute("SELECT count(*) FROM runops.alerts").fetchone()
            time.sleep(1.0)  # the sessions' function statistics reach the cumulative view at exit
            admin.execute("SELECT pg_stat_clear_snapshot()")
            inside = admin.execute("SELECT calls, total_time FROM pg_stat_user_functions "
                                   "WHERE schemaname = 'runops' AND funcname = 'write_run_alerts'").fetchone()
        assert alerts == (0,), f"alerts were written: {alerts}"
        print(f"\n{args.rounds} rounds of {args.calls} calls per path and variant, run-ops store, "
              "an environment without alert channels (another has one)")
        print(f"{'call':<38} {'A: no outbox':>13} {'B: outbox':>10} {'median B-A':>11}"
              f" {'A wall µs':>10} {'B wall µs':>10}   (backend CPU µs per call, medians of rounds)")
        for name in paths:
            a, b = results[(name, "A")], results[(name, "B")]
            ca, cb = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
            wa, wb = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
            paired = statistics.median(y[0] - x[0] for x, y in zip(a, b, strict=True))
            print(f"{name:<38} {ca:>13.1f} {cb:>10.1f} {paired:>+11.1f} {wa:>10.0f} {wb:>10.0f}")
        if inside is not None and inside[0]:
            print(f"inside write_run_alerts (B): {inside[0]} calls, {inside[1] * 1000 / inside[0]:.1f} µs per call "
                  "(wall time in the function; the trigger fires only for finalize_run and complete_attempt)")
        return 0
    finally:
        if stores is not None:
            stores.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
