"""Where the worker loop's server time goes: ``python bench/worker_profile.py [--runs N] [--peers-venv DIR]``.

Not a benchmark of its own: the attribution behind docs/benchmarks.md, "Worker loop". Starts
throwaway clusters as ``worker_loop.py`` does, turns on ``track_functions = 'pl'`` (which costs a
little time itself, so the rates printed here are not the benchmark's), runs the full loop once
(W workers × C, 4 producer threads, N runs) for runops and, with ``--peers-venv``, for
Procrastinate, and prints per run: the PL/pgSQL functions' calls, total and self time in µs
(``pg_stat_user_functions``, both clusters), with the loop's transactions and CPU per run.
Function time is wall time inside the function (lock waits included; the commit's WAL flush,
which follows the function, is not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from worker_loop import (
    Bench,
    ProcrastinateSystem,
    RunOpsSystem,
    System,
    _bring_up,
    _organization,
    _peers_database,
    full_loop,
    peers_python,
)


def _functions(bench: Bench, system: System) -> dict[tuple[str, str], tuple[int, float, float]]:
    """(store, schema.function) → (calls, total ms, self ms) so far, in the system's databases."""
    bench.xacts(system.databases)  # waits for the phase's backends to exit, so their counts are in
    out: dict[tuple[str, str], tuple[int, float, float]] = {}
    for store, dbname in system.databases:
        with psycopg.connect(bench.stores.clusters[store].admin_url(dbname), autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            rows: list[Any] = conn.execute("SELECT schemaname || '.' || funcname, sum(calls), sum(total_time), "
                                           "sum(self_time) FROM pg_stat_user_functions GROUP BY 1").fetchall()
        for name, calls, total, self_ in rows:
            out[(store, name)] = (int(calls), float(total), float(self_))
    return out


def profile(bench: Bench, system: System, runs: int, workers: int, concurrency: int) -> None:
    before = _functions(bench, system)
    phase = full_loop(bench, system, runs, workers, concurrency)
    after = _functions(bench, system)
    print(f"\n{system.name}: full loop {phase.rate:,.0f} runs/s (with track_functions), {phase.xacts:.2f} "
          f"transactions/run, worker CPU {phase.worker_cpu_us:,.0f} µs/run, "
          f"server CPU {phase.server_cpu_us:,.0f} µs/run")
    print(f"  {'store':<14} {'function':<48} {'calls/run':>9} {'total µs':>9} {'self µs':>8}")
    deltas = []
    for key, (calls, total, self_) in after.items():
        c0, t0, s0 = before.get(key, (0, 0.0, 0.0))
        if calls > c0:
            deltas.append((key, (calls - c0) / phase.runs, (total - t0) * 1000 / phase.runs,
                           (self_ - s0) * 1000 / phase.runs))
    for (store, name), calls, total, self_ in sorted(deltas, key=lambda d: -d[3])[:14]:
        print(f"  {store:<14} {name:<48} {calls:>9.2f} {total:>9,.0f} {self_:>8,.0f}")
    print(f"  self time of all functions: {sum(d[3] for d in deltas):,.0f} µs/run")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--peers-venv", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="runops-worker-profile-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    try:
        bench = Bench(stores)
        for cluster in stores.clusters.values():
            with psycopg.connect(cluster.admin_url(), autocommit=True) as admin:
                admin.execute("ALTER SYSTEM SET track_functions = 'pl'")
                admin.execute("SELECT pg_reload_conf()")
        systems: list[System] = [RunOpsSystem(bench, _organization(bench.app))]
        if args.peers_venv:
            python = peers_python(args.peers_venv)
            _peers_database(bench, python)
            systems.append(ProcrastinateSystem(bench, python))
        for system in systems:
            profile(bench, system, args.runs, args.workers, args.concurrency)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
