"""Worker benchmark: ``python bench/worker_loop.py [--runs N] [--workers W] [--concurrency C]``.

Starts two throwaway local clusters (fsync and synchronous_commit on, as ``runops bench``), then

1. **full loop**: W worker processes (``runops worker --app worker_loop:tasks``, C runs each at
   once) work an environment while 4 threads trigger N runs of a no-op task through the Python
   client; the rate is N / (first trigger → last completion), i.e. trigger → dequeue → start →
   complete, all through the worker;
2. **drain**: the same workers through N runs triggered before they start;
3. **the same loop without the worker**, as a yardstick in the same run: 4 threads of the
   client's ``dequeue_runs(1)`` → ``start_attempt`` → ``complete_attempt`` over N pre-triggered
   runs, and the plain trigger rate of 4 threads; the worker's full loop is compared with the
   two back to back (1 / (1/triggers + 1/loop)), since it does both;
4. **idle CPU**: one worker on an empty queue for 10 s; its CPU time (user + system, from
   /proc) over wall time.

Prints the figures (docs/benchmarks.md, "Worker loop"). Not a test: nothing here runs under
pytest, and nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.tasks import TaskContext, TaskRegistry

HERE = Path(__file__).resolve().parent
tasks = TaskRegistry()  # what the worker processes run (--app worker_loop:tasks)


@tasks.task("noop")
def noop(ctx: TaskContext, payload: Any) -> Any:
    return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _workers(app: dict[str, str], env: str, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
    environ = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": app[RUN_OPS]}
    return [subprocess.Popen([sys.executable, "-m", "runops.cli", "worker", "--app", "worker_loop:tasks",
                              "--env", env, "--concurrency", str(concurrency), "--id", f"bench-{i}"],
                             cwd=HERE, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(count)]


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        w.wait(timeout=60)


def _completed(admin: psycopg.Connection[Any], env: str) -> int:
    row = admin.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                        "AND status = 'COMPLETED_SUCCESSFULLY'", [env]).fetchone()
    return int(row[0]) if row else 0


def full_loop(app: dict[str, str], admin_url: str, env: str, runs: int, workers: int, concurrency: int) -> float:
    procs = _workers(app, env, workers, concurrency)
    time.sleep(2.0)  # let them import and connect
    per_thread = runs // 4
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=8) as client, \
            psycopg.connect(admin_url, autocommit=True) as admin:
        client.trigger_run(env, "noop")  # warm the route cache
        while _completed(admin, env) < 1:
            time.sleep(0.05)
        began = time.monotonic()

        def produce() -> None:
            for _ in range(per_thread):
                client.trigger_run(env, "noop")

        producers = [threading.Thread(target=produce) for _ in range(4)]
        for p in producers:
            p.start()
        while _completed(admin, env) < 1 + per_thread * 4:
            time.sleep(0.02)
        elapsed = time.monotonic() - began
        for p in producers:
            p.join()
    _stop(procs)
    return per_thread * 4 / elapsed


def drain(app: dict[str, str], admin_url: str, env: str, runs: int, workers: int, concurrency: int) -> float:
    """Runs/s of the workers through N runs triggered before they start (no trigger traffic)."""
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=8) as client, \
            psycopg.connect(admin_url, autocommit=True) as admin:
        done = _completed(admin, env)

        def produce() -> None:
            for _ in range(runs // 4):
                client.trigger_run(env, "noop")

        producers = [threading.Thread(target=produce) for _ in range(4)]
        for p in producers:
            p.start()
        for p in producers:
            p.join()
        procs = _workers(app, env, workers, concurrency)
        while _completed(admin, env) < done + 1:
            time.sleep(0.01)
        began = time.monotonic()
        while _completed(admin, env) < done + runs // 4 * 4:
            time.sleep(0.01)
        rate = (runs // 4 * 4 - 1) / (time.monotonic() - began)
    _stop(procs)
    return rate


def bare_loop(app: dict[str, str], env: str, runs: int) -> tuple[float, float]:
    """(trigger rate, dequeue-start-complete rate) of 4 client threads, no worker."""
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=8) as client:
        def produce() -> None:
            for _ in range(runs // 4):
                client.trigger_run(env, "noop")

        def consume(i: int) -> None:
            while taken := client.dequeue_runs(env, f"bare-{i}", 1):
                started = client.start_attempt(taken[0].run_id, f"bare-{i}")
                client.complete_attempt(started.run_id, started.attempt_number, None)

        rates = []
        for work in (produce, consume):
            threads = [threading.Thread(target=work, args=() if work is produce else (i,)) for i in range(4)]
            began = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rates.append(runs // 4 * 4 / (time.monotonic() - began))
    return rates[0], rates[1]


def idle_cpu(app: dict[str, str], env: str, seconds: float = 10.0) -> float:
    [proc] = _workers(app, env, 1, 4)
    time.sleep(3.0)  # past start-up and the poll interval's climb to its maximum
    cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
    time.sleep(seconds)
    share = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    _stop([proc])
    return share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    from runops.bench import _bring_up, _make_environment

    home = Path(tempfile.mkdtemp(prefix="runops-worker-bench-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    try:
        app = stores.app_urls()
        env = _make_environment(app)
        with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
            client.update_environment(env, maximum_concurrency_limit=1000)
            idle_env = client.create_environment(client.create_project(
                client.get_run(client.trigger_run(env, "noop").run_id).organization_id,  # type: ignore[union-attr]
                "idle"), "e", "PRODUCTION")
            client.wait_for_mirror()
        rate = full_loop(app, stores.admin_urls()[RUN_OPS], env, args.runs, args.workers, args.concurrency)
        drained = drain(app, stores.admin_urls()[RUN_OPS], env, args.runs, args.workers, args.concurrency)
        triggers, bare = bare_loop(app, env, args.runs)
        idle = idle_cpu(app, idle_env)
        print(f"drain of {args.runs} pre-triggered runs through the workers: {drained:,.0f} runs/s "
              f"({drained / bare:.2f} x the bare client loop)")
        both = 1 / (1 / triggers + 1 / bare)  # the two bare phases back to back, per run
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"triggers alone, 4 client threads: {triggers:,.0f} runs/s")
        print(f"dequeue -> start -> complete, 4 client threads, no worker: {bare:,.0f} runs/s")
        print(f"full loop (trigger -> dequeue -> start -> complete), {args.workers} workers x concurrency "
              f"{args.concurrency}, {args.runs} runs: {rate:,.0f} runs/s "
              f"({rate / both:.2f} x the bare phases back to back, {both:,.0f} runs/s)")
        print(f"idle worker on an empty queue: {idle * 100:.2f}% of a core")
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
