"""The Python client's call path against pgbench: ``python bench/profile_client.py [--seconds S]
[--rounds R] [--ab DIR] [--profile]``.

Brings up two throwaway clusters as ``runops bench`` does (fsync on, wired, split, a ksuid
organization's environment) and, in each round, measures on the same store:

* ``pgbench``: ``trigger_no_key.sql`` (``runops.trigger_run`` without a key), 4 clients, prepared;
* ``client``: ``RunOps.trigger_run`` from 4 threads on one client, in a process of its own — this
  checkout's package, and with ``--ab DIR`` first the package of another checkout
  (``DIR/py_client``), so the two alternate in the same sitting.

Per phase: calls/s, the client process's CPU µs per call and the run-ops cluster's CPU µs per
call; the medians of the rounds and the client's rate as a fraction of pgbench's. ``--profile``
then runs this checkout's client on one thread under cProfile and prints where its time goes.
Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
THREADS = 4


def _rate(call: Callable[[int], object], seconds: float, threads: int) -> dict[str, float]:
    """``threads`` threads each repeating ``call(i)`` for ``seconds`` after a one-second warm-up:
    calls/s and this process's CPU µs per call."""
    counts = [0] * threads
    go, stop = threading.Event(), threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            call(i)
            if go.is_set():
                counts[i] += 1

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(1.0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    go.set()
    time.sleep(seconds)
    done, cpu1, t1 = sum(counts), time.process_time(), time.perf_counter()
    stop.set()
    for t in pool:
        t.join()
    return {"calls_per_s": done / (t1 - t0), "client_cpu_us": (cpu1 - cpu0) / max(done, 1) * 1e6, "calls": done}


def measure(cp: str, ro: str, env: str, seconds: float, threads: int) -> dict[str, float]:
    """``threads`` threads calling ``RunOps.trigger_run`` on one client for ``seconds``, after a
    one-second warm-up: calls/s and this process's CPU µs per call."""
    from runops.client import RunOps

    with RunOps(cp, ro, max_pool_size=threads) as client:
        return _rate(lambda i: client.trigger_run(env, "bench-task", {"n": 1}), seconds, threads)


def measure_bare(ro: str, env: str, seconds: float, threads: int) -> dict[str, float]:
    """The floor under the client: the same call as ``RunOps.trigger_run`` sends (statement,
    parameters, prepared), each thread on a psycopg connection of its own, no pool, no runops
    code; calls/s and this process's CPU µs per call."""
    import psycopg
    from psycopg.types.json import Jsonb

    from runops import queries

    conns = [psycopg.connect(ro, autocommit=True) for _ in range(threads)]
    try:
        def call(i: int) -> None:
            params = {"e": env, "t": "bench-task", "p": Jsonb({"n": 1}), "o": Jsonb({})}
            conns[i].execute(queries.TRIGGER_RUN, params, prepare=True).fetchall()

        return _rate(call, seconds, threads)
    finally:
        for conn in conns:
            conn.close()


def profile(cp: str, ro: str, env: str, calls: int) -> None:
    from runops.client import RunOps

    with RunOps(cp, ro, max_pool_size=1) as client:
        for _ in range(200):
            client.trigger_run(env, "bench-task", {"n": 1})
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            client.trigger_run(env, "bench-task", {"n": 1})
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def _child(tree: Path, *args: str) -> dict[str, Any]:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "py_client"), str(HERE)])}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=environ,
                         capture_output=True, text=True, check=False, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the client process failed: {out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ab", type=Path, help="another checkout whose client is measured too, alternately")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--measure", nargs=3, metavar=("CP", "RO", "ENV"), help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help="also measure plain psycopg, a connection per thread")
    parser.add_argument("--measure-bare", nargs=2, metavar=("RO", "ENV"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-only", nargs=3, metavar=("CP", "RO", "ENV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.seconds, THREADS)))
        return 0
    if args.measure_bare:
        print(json.dumps(measure_bare(*args.measure_bare, args.seconds, THREADS)))
        return 0
    if args.profile_only:
        profile(*args.profile_only, 3000)
        return 0

    import harness
    import psycopg

    from runops.client import CONTROL_PLANE, RUN_OPS

    home = Path(tempfile.mkdtemp(prefix="runops-client-bench-"))
    home.chmod(0o755)
    stores = harness._bring_up(home)
    try:
        app, admin_url = stores.app_urls(), stores.admin_urls()[RUN_OPS]
        env = harness._make_environment(app)
        datadir = stores.clusters[RUN_OPS].datadir
        pgbench = harness.find_pgbench()
        variants: list[tuple[str, Any]] = ([("ab", args.ab)] if args.ab else []) + [("this", HERE.parent)]
        if args.bare:
            variants.append(("psycopg", "bare"))
        results: dict[str, list[dict[str, float]]] = {}
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(harness.BASELINE_DDL + harness.BATCH_BASELINE_DDL)
            for round_ in range(1, args.rounds + 1):
                phases: list[tuple[str, Any]] = [("pgbench", None), *variants]
                for name, tree in phases:
                    admin.execute(harness.RESET_RUN_OPS)
                    admin.execute("CHECKPOINT")
                    cpu0 = harness.server_cpu_seconds(datadir) or 0.0
                    if tree is None:
                        child0 = harness._children_cpu()
                        w = harness.run_pgbench(pgbench, app[RUN_OPS], harness.scripts_dir() / "trigger_no_key.sql",
                                                int(args.seconds), {"env": env}, clients=THREADS)
                        figs = {"calls_per_s": w.calls_per_s, "calls": w.all_calls,
                                "client_cpu_us": (harness._children_cpu() - child0) / max(w.all_calls, 1) * 1e6}
                    elif tree == "bare":
                        figs = _child(HERE.parent, "--seconds", str(args.seconds), "--measure-bare", app[RUN_OPS], env)
                    else:
                        figs = _child(tree, "--seconds", str(args.seconds), "--measure",
                                      app[CONTROL_PLANE], app[RUN_OPS], env)
                    harness._wait_for_backends_to_exit(admin)
                    calls = int(figs["calls"]) if tree is None else \
                        int(admin.execute("SELECT count(*) FROM runops.runs").fetchone()[0])  # type: ignore[index]
                    figs["server_cpu_us"] = ((harness.server_cpu_seconds(datadir) or 0.0) - cpu0) / max(calls, 1) * 1e6
                    results.setdefault(name, []).append(figs)
                    print(f"round {round_} {name:<8} {figs['calls_per_s']:>7,.0f}/s  client "
                          f"{figs['client_cpu_us']:>6,.0f} us/call  server {figs['server_cpu_us']:>6,.0f} us/call  "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        print()
        base = statistics.median(r["calls_per_s"] for r in results["pgbench"])
        for name, figs in results.items():
            rate = statistics.median(r["calls_per_s"] for r in figs)
            print(f"{name:<8} {rate:>7,.0f}/s ({rate / base:.2f} x pgbench)  client "
                  f"{statistics.median(r['client_cpu_us'] for r in figs):>6,.0f} us/call  server "
                  f"{statistics.median(r['server_cpu_us'] for r in figs):>6,.0f} us/call  (medians of "
                  f"{len(figs)} rounds; rates {', '.join(str(round(r['calls_per_s'])) for r in figs)})")
        if args.profile:
            environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "py_client"), str(HERE)])}
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--profile-only",
                            app[CONTROL_PLANE], app[RUN_OPS], env], env=environ, check=False, timeout=600)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
