"""Worker benchmark: ``python bench/worker_loop.py [--runs N] [--workers W] [--concurrency C] [--rounds R]``.

Starts two throwaway local clusters (fsync and synchronous_commit on, as ``runops bench``) and
measures runops's worker against Procrastinate's on the same cluster, in the same run:

1. **full loop**: W worker processes (``runops worker --app worker_loop:tasks``, C runs each at
   once) work a fresh environment while 4 threads trigger N runs of a no-op task through the
   Python client; the rate is N / (first trigger → last completion), i.e. trigger → dequeue →
   start → complete, all through the worker. Procrastinate: W ``procrastinate worker
   --concurrency C`` processes while 4 threads ``defer()`` N no-op jobs; N / (first defer → last
   job ``succeeded``), i.e. defer → fetch → finish;
2. **drain**: the same workers through N runs (jobs) queued before they start, from the first
   completion to the last;
3. **idle CPU**: one worker on an empty queue for 10 s; its CPU time (user + system, from
   /proc) over wall time.

The three are interleaved — runops, then Procrastinate, R rounds (default 3) — and the medians
reported, because a shared 2-core machine is noisy. ``--ab-base DIR`` adds "runops before" to
each loop phase, first: ``DIR``'s loop functions (``LOOP_FUNCTIONS``) installed in both stores and
``DIR``'s package run by its workers, then this checkout's again for "runops" (``--loop-only``: the
full loop alone). Each loop phase also records, per run, the worker processes' CPU, both
clusters' CPU (every backend, the checkpointer and WAL writer too), the WAL both clusters wrote,
and the transactions committed in the system's databases (``pg_stat_database``; the benchmark's
own progress polls subtracted): one per statement on runops's autocommit connections, which
makes it the count of SQL round trips.

Procrastinate lives in a third database of the run-ops cluster (where runops's runs live: same
cluster, same settings) and is installed on demand into a bench-only virtual environment
(``--peers-venv``, kept between runs; never a project dependency); ``procrastinate_app.py`` is
its app, task and deferrer. ``--skip-procrastinate`` measures runops alone. Then, once, the
yardstick without any worker: 4 threads of the client's ``dequeue_runs(1)`` → ``start_attempt``
→ ``complete_attempt`` over N pre-triggered runs, and the plain trigger rate of 4 threads.

Two more measurements, each on its own (``--dequeue-scaling``, ``--pickup``):

* **dequeue scaling**: pgbench clients (1, 4, 16 by default: ``--levels``) each calling
  ``dequeue_runs(env, worker, 1)`` on the run-ops store over N runs queued beforehand (a fresh
  environment per phase, limit 20,000); runs/s, both clusters' CPU per run, and what the
  backends waited on (``pg_stat_activity`` sampled every 20 ms). With ``--ab-main DIR`` each
  round measures the function files of another checkout (``DIR/sql/functions/`` ``LOOP_FUNCTIONS``,
  applied in place, then this checkout's again) before this checkout's, on the same clusters;
* **pickup latency**: one idle ``runops worker`` (concurrency 4); 100 runs triggered one at a
  time at random gaps (50–300 ms); per run, the time from its trigger's transaction to the
  dequeue that leased it (``started_at - created_at``, both the run-ops server's clock).

Prints the figures (docs/benchmarks.md, "Worker loop", "Dequeue scaling and pickup"). Not a test:
nothing here runs under pytest, and nothing asserts on the numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from harness import _TPS, _bring_up, find_pgbench, server_cpu_seconds
from peers import PEERS_HOME

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.dev_stores import DATABASE
from runops.ops.local_cluster import LocalStores
from runops.tasks import TaskContext, TaskRegistry

HERE = Path(__file__).resolve().parent
tasks = TaskRegistry()  # what the worker processes run (--app worker_loop:tasks)
PEERS_DATABASE = "peers"
POLL = 0.02  # seconds between the benchmark's progress polls
WORKER_LOG = Path(tempfile.gettempdir()) / "runops-worker-bench-workers.log"


@tasks.task("noop")
def noop(ctx: TaskContext, payload: Any) -> Any:
    return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` as evenly as it goes."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        w.wait(timeout=60)


@dataclass(frozen=True)
class Phase:
    """One timed loop: its rate and what each run cost."""

    runs: int
    seconds: float
    worker_cpu_us: float  # the worker processes' CPU per run
    server_cpu_us: float  # both clusters' CPU per run
    xacts: float          # transactions per run in the system's databases (polls subtracted)
    wal_bytes: float = 0.0  # WAL both clusters wrote per run

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


class Bench:
    """The clusters, and how a phase is metered on them."""

    def __init__(self, stores: LocalStores) -> None:
        self.stores = stores
        self.app = stores.app_urls()
        self.admin = stores.admin_urls()
        self.runops_dbs = [(CONTROL_PLANE, DATABASE), (RUN_OPS, DATABASE)]
        self.peers_dbs = [(RUN_OPS, PEERS_DATABASE)]

    def server_cpu(self) -> float:
        return sum(server_cpu_seconds(c.datadir) or 0.0 for c in self.stores.clusters.values())

    def wal(self) -> int:
        """WAL written so far by both clusters, in bytes."""
        total = 0
        for cluster in self.stores.clusters.values():
            with psycopg.connect(cluster.admin_url("postgres"), autocommit=True) as conn:
                total += int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])  # type: ignore[index]
        return total

    def xacts(self, databases: list[tuple[str, str]]) -> int:
        """Transactions so far in ``databases``, once every client of theirs has gone (a backend
        reports its counts when it exits, at the latest)."""
        total = 0
        for store, dbname in databases:
            with psycopg.connect(self.stores.clusters[store].admin_url("postgres"), autocommit=True) as conn:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                        "AND backend_type = 'client backend'", [dbname]).fetchone()[0]:  # type: ignore[index]
                    time.sleep(0.05)
                conn.execute("SELECT pg_stat_clear_snapshot()")
                total += conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                      "WHERE datname = %s", [dbname]).fetchone()[0]  # type: ignore[index]
        return total


class Meter:
    """CPU of the workers and of the clusters between :meth:`start` and :meth:`stop`."""

    def __init__(self, bench: Bench, workers: list[subprocess.Popen[bytes]]) -> None:
        self.bench, self.pids = bench, [w.pid for w in workers]

    def _now(self) -> tuple[float, float, float, int]:
        return (time.monotonic(), sum(_cpu_seconds(p) for p in self.pids), self.bench.server_cpu(), self.bench.wal())

    def start(self) -> None:
        self.began = self._now()

    def stop(self) -> None:
        self.ended = self._now()

    def phase(self, runs: int, xacts: int) -> Phase:
        (t0, w0, s0, b0), (t1, w1, s1, b1) = self.began, self.ended
        return Phase(runs, t1 - t0, (w1 - w0) / runs * 1e6, (s1 - s0) / runs * 1e6, xacts / runs, (b1 - b0) / runs)


# -- the two systems, behind one shape ---------------------------------------------------------------


class System:
    """What a loop phase needs from a system: workers, a producer of N runs, a count of finished ones."""

    name = ""
    databases: list[tuple[str, str]]

    def workers(self, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
        raise NotImplementedError

    def producer(self, runs: int) -> Producer:
        raise NotImplementedError

    def finished(self, poll: psycopg.Connection[Any]) -> int:
        raise NotImplementedError

    def poll_url(self) -> str:
        raise NotImplementedError

    def new_scope(self) -> None:
        """Called before each phase: a fresh environment (runops) or a fresh id range (Procrastinate)."""


class Producer:
    """``warm()`` triggers one run and returns; ``go()`` starts N more; ``join()`` waits for them."""

    def warm(self) -> None:
        raise NotImplementedError

    def go(self) -> None:
        raise NotImplementedError

    def join(self) -> None:
        raise NotImplementedError


class RunOpsSystem(System):
    name = "runops"

    def __init__(self, bench: Bench, organization: str, tree: Path | None = None, name: str = "runops") -> None:
        """``tree``: a checkout whose loop functions (``LOOP_FUNCTIONS``) each phase installs in
        both stores first, and whose package its workers run (``--ab-base``)."""
        self.bench, self.organization, self.tree, self.name = bench, organization, tree, name
        self.databases = bench.runops_dbs
        self.env = ""
        self.serial = 0

    def new_scope(self) -> None:
        if self.tree is not None:
            for url in self.bench.admin.values():
                apply_functions(url, self.tree)
        self.serial += 1
        self.env = _environment(self.bench.app, self.organization, f"loop-{self.serial}-{secrets.token_hex(2)}")

    def workers(self, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
        app = self.bench.app
        environ = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": app[RUN_OPS]}
        runops = Path(sys.executable).parent / "runops"  # the installed command, wherever its module lives
        # another checkout's package first on the path: its runops is the one imported
        package = [str(self.tree / "py_client")] if self.tree is not None and self.tree != HERE.parent else []
        return [subprocess.Popen([str(runops), "worker", "--app", "worker_loop:tasks", "--env", self.env,
                                  "--concurrency", str(concurrency), "--id", f"bench-{i}"],
                                 cwd=HERE, env={**environ, "PYTHONPATH": os.pathsep.join(
                                     [*package, str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])},
                                 stdout=subprocess.DEVNULL,
                                 stderr=_worker_log())
                for i in range(count)]

    def producer(self, runs: int) -> Producer:
        return _RunOpsProducer(self.bench.app, self.env, runs)

    def finished(self, poll: psycopg.Connection[Any]) -> int:
        row = poll.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                           "AND status = 'COMPLETED_SUCCESSFULLY'", [self.env]).fetchone()
        return int(row[0]) if row else 0

    def poll_url(self) -> str:
        return self.bench.admin[RUN_OPS]


class _RunOpsProducer(Producer):
    def __init__(self, app: dict[str, str], env: str, runs: int) -> None:
        self.client = RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=8)
        self.env = env
        self.threads = [threading.Thread(target=self._produce, args=(share,)) for share in _shares(runs, 4)]

    def _produce(self, count: int) -> None:
        for _ in range(count):
            self.client.trigger_run(self.env, "noop")

    def warm(self) -> None:
        self.client.trigger_run(self.env, "noop")  # fills the route cache

    def go(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        self.client.close()


class ProcrastinateSystem(System):
    name = "Procrastinate"

    def __init__(self, bench: Bench, python: Path, task: str = "noop") -> None:
        self.bench, self.python, self.task = bench, python, task
        self.databases = bench.peers_dbs
        self.url = bench.stores.clusters[RUN_OPS].admin_url(PEERS_DATABASE)
        self.first_id = 0

    def _environ(self) -> dict[str, str]:
        return {**os.environ, "PEERS_DATABASE_URL": self.url}

    def new_scope(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM procrastinate_jobs").fetchone()
        self.first_id = int(row[0]) if row else 0

    def workers(self, count: int, concurrency: int) -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([str(self.python), "-m", "procrastinate", "--app", "procrastinate_app.app",
                                  "worker", "--concurrency", str(concurrency), "--name", f"bench-{i}"],
                                 cwd=HERE, env=self._environ(), stdout=subprocess.DEVNULL,
                                 stderr=_worker_log())
                for i in range(count)]

    def producer(self, runs: int) -> Producer:
        return _DeferProducer(self.python, self._environ(), self.task, runs)

    def finished(self, poll: psycopg.Connection[Any]) -> int:
        row = poll.execute("SELECT count(*) FROM procrastinate_jobs WHERE id > %s AND status = 'succeeded'",
                           [self.first_id]).fetchone()
        return int(row[0]) if row else 0

    def poll_url(self) -> str:
        return self.url


class _DeferProducer(Producer):
    """``procrastinate_app.py defer``: one warm-up job, then N on a line on its stdin."""

    def __init__(self, python: Path, environ: dict[str, str], task: str, runs: int) -> None:
        self.proc = subprocess.Popen([str(python), "procrastinate_app.py", "defer", str(runs), "--threads", "4",
                                      "--task", task], cwd=HERE, env=environ, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def _expect(self, word: str) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"procrastinate_app.py defer said {line!r}, not {word!r}")

    def warm(self) -> None:
        self._expect("ready")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def join(self) -> None:
        self._expect("done")
        self.proc.wait(timeout=60)


# -- the phases ------------------------------------------------------------------------------------------


def _worker_log() -> Any:
    return WORKER_LOG.open("ab")  # each worker process writes its stderr here


def _wait_for(system: System, poll: psycopg.Connection[Any], count: int,
              workers: list[subprocess.Popen[bytes]], pause: float = POLL) -> int:
    """Polls until ``count`` runs finished; returns the number of polls. Fails when a worker died."""
    polls = 0
    while True:
        polls += 1
        if system.finished(poll) >= count:
            return polls
        if any(w.poll() is not None for w in workers):
            raise RuntimeError(f"a {system.name} worker exited; see {WORKER_LOG}")
        time.sleep(pause)


def full_loop(bench: Bench, system: System, runs: int, workers: int, concurrency: int) -> Phase:
    """Workers running while 4 threads produce ``runs``: N / (first trigger → last completion)."""
    system.new_scope()
    runs = runs // 4 * 4
    x0 = bench.xacts(system.databases)
    procs = system.workers(workers, concurrency)
    meter = Meter(bench, procs)
    time.sleep(2.0)  # let them import and connect
    producer = system.producer(runs)
    with psycopg.connect(system.poll_url(), autocommit=True) as poll:
        producer.warm()
        polls = _wait_for(system, poll, 1, procs)  # the warm-up run went all the way round
        meter.start()
        producer.go()
        polls += _wait_for(system, poll, 1 + runs, procs)
        meter.stop()
        producer.join()
    _stop(procs)
    return meter.phase(runs, bench.xacts(system.databases) - x0 - polls)


def drain(bench: Bench, system: System, runs: int, workers: int, concurrency: int) -> Phase:
    """Runs/s of the workers through N runs queued before they start (no trigger traffic), from
    the first completion to the last."""
    system.new_scope()
    runs = runs // 4 * 4
    producer = system.producer(runs - 1)  # with its warm-up run, `runs` in all
    producer.warm()
    producer.go()
    producer.join()
    x0 = bench.xacts(system.databases)
    procs = system.workers(workers, concurrency)
    meter = Meter(bench, procs)
    with psycopg.connect(system.poll_url(), autocommit=True) as poll:
        polls = _wait_for(system, poll, 1, procs, pause=0.005)
        meter.start()
        polls += _wait_for(system, poll, runs, procs)
        meter.stop()
    _stop(procs)
    return meter.phase(runs - 1, bench.xacts(system.databases) - x0 - polls)


def idle_cpu(system: System, seconds: float = 10.0) -> float:
    """One worker on an empty queue: its CPU time over wall time, past start-up."""
    system.new_scope()
    [proc] = system.workers(1, 4)
    time.sleep(3.0)  # past start-up and the poll interval's climb to its maximum
    cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
    time.sleep(seconds)
    share = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    _stop([proc])
    return share


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


# -- dequeue scaling and pickup latency ------------------------------------------------------------------

DEQUEUE_ONE = "SELECT count(*) FROM runops.dequeue_runs(:env, 'w' || :client_id, 1);\n"
# The function files an A/B (--ab-main) swaps: the lifecycle, and the environment's load it calls.
LOOP_FUNCTIONS = ("tenants.sql", "lifecycle.sql")
PREAMBLE = "SET LOCAL search_path = runops, pg_catalog, pg_temp;\nSET LOCAL check_function_bodies = off;\n"


def apply_functions(url: str, tree: Path) -> None:
    """Installs ``tree``'s functions of the loop (``LOOP_FUNCTIONS``, and its grants) into the store
    at ``url``, in place."""
    text = PREAMBLE + "".join((tree / "sql" / "functions" / name).read_text() + "\n" for name in LOOP_FUNCTIONS) \
        + (tree / "sql" / "after_functions.sql").read_text()
    with psycopg.connect(url) as conn:
        conn.execute(text.encode())


@dataclass(frozen=True)
class DequeuePhase:
    clients: int
    runs: int
    seconds: float
    server_cpu_us: float
    waits: dict[str, float]  # wait event -> backends waiting on it, on average

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


def _queue_runs(bench: Bench, env: str, runs: int) -> None:
    with psycopg.connect(bench.admin[RUN_OPS], autocommit=True) as conn:
        for start in range(0, runs, 1000):
            conn.execute("SELECT runops.batch_trigger(%s, (SELECT jsonb_agg(jsonb_build_object('task', 'noop', "
                         "'payload', '{}'::jsonb)) FROM generate_series(1, %s)))", [env, min(1000, runs - start)])
        conn.execute("VACUUM ANALYZE runops.runs")
        conn.execute("CHECKPOINT")


def dequeue_phase(bench: Bench, organization: str, pgbench: Path, clients: int, runs: int, serial: str) -> DequeuePhase:
    env = _environment(bench.app, organization, f"dq-{serial}", limit=20000)
    with psycopg.connect(bench.app[RUN_OPS], autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM runops.dequeue_runs(%s, 'warm', 1)", [env])  # lays the slots out
    _queue_runs(bench, env, runs)
    samples: list[dict[str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(bench.admin[RUN_OPS], autocommit=True) as conn:
            while not stop.wait(0.02):
                seen: dict[str, int] = {}
                for event, n in conn.execute(
                        "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND state = 'active' AND backend_type = 'client backend' "
                        "AND pid <> pg_backend_pid() GROUP BY 1").fetchall():
                    seen[str(event)] = int(n)
                samples.append(seen)

    with tempfile.TemporaryDirectory(prefix="runops-dequeue-") as scratch:
        script = Path(scratch) / "dequeue_one.sql"
        script.write_text(DEQUEUE_ONE)
        sampler = threading.Thread(target=sample)
        cpu0, t0 = bench.server_cpu(), time.monotonic()
        sampler.start()
        out = subprocess.run([str(pgbench), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)),
                              "-t", str(runs // clients), "-f", str(script), "-D", f"env={env}", bench.app[RUN_OPS]],
                             capture_output=True, text=True, check=False, timeout=600)
        stop.set()
        sampler.join()
        elapsed, cpu = time.monotonic() - t0, bench.server_cpu() - cpu0
        tps = _TPS.search(out.stdout)
        if out.returncode != 0 or tps is None:
            raise RuntimeError(f"pgbench failed: {out.stderr[-2000:]}")
    with psycopg.connect(bench.admin[RUN_OPS], autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s AND status = 'DEQUEUED'",
                           [env]).fetchone()
    taken = int(row[0]) if row else 0
    # pgbench's rate excludes its connection time: the calls' own time
    seconds = (runs // clients * clients) / float(tps.group(1)) if float(tps.group(1)) else elapsed
    waits: dict[str, float] = {}
    for seen in samples:
        for event, n in seen.items():
            waits[event] = waits.get(event, 0) + n / len(samples)
    return DequeuePhase(clients, taken, seconds, cpu / max(taken, 1) * 1e6, waits)


# Procrastinate's fetch, as its worker sends it: one job of any queue for a registered worker.
PROCRASTINATE_FETCH_ONE = "\\set w :first_worker + :client_id\nSELECT id FROM procrastinate_fetch_job_v2(NULL, :w);\n"


def procrastinate_dequeue_phase(bench: Bench, pgbench: Path, clients: int, runs: int) -> DequeuePhase:
    """The peer's side of :func:`dequeue_phase`: pgbench clients each fetching one job at a time
    from ``runs`` jobs deferred beforehand, in the Procrastinate database (``_peers_database``)."""
    url = bench.stores.clusters[RUN_OPS].admin_url(PEERS_DATABASE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE procrastinate_jobs CASCADE")
        workers = [int(conn.execute("SELECT worker_id FROM procrastinate_register_worker_v1()")  # type: ignore[index]
                       .fetchone()[0]) for _ in range(clients)]
        first = workers[0]
        if workers != list(range(first, first + clients)):
            raise RuntimeError(f"Procrastinate's worker ids are not consecutive: {workers}")
        conn.execute("SELECT procrastinate_defer_jobs_v1(array_agg(ROW('default', 'noop', 0, NULL, NULL, '{}', "
                     "NULL)::procrastinate_job_to_defer_v1)) FROM generate_series(1, %s)", [runs])
        conn.execute("VACUUM ANALYZE procrastinate_jobs")
        conn.execute("CHECKPOINT")
    with tempfile.TemporaryDirectory(prefix="runops-dequeue-") as scratch:
        script = Path(scratch) / "fetch_one.sql"
        script.write_text(PROCRASTINATE_FETCH_ONE)
        cpu0, t0 = bench.server_cpu(), time.monotonic()
        out = subprocess.run([str(pgbench), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)),
                              "-t", str(runs // clients), "-f", str(script), "-D", f"first_worker={first}",
                              url], capture_output=True, text=True, check=False, timeout=600)
        elapsed, cpu = time.monotonic() - t0, bench.server_cpu() - cpu0
        tps = _TPS.search(out.stdout)
        if out.returncode != 0 or tps is None:
            errors = [line for line in out.stderr.splitlines() if "ERROR" in line or "DETAIL" in line]
            raise RuntimeError(f"pgbench failed: {' / '.join(errors[:4]) or out.stderr[-2000:]}")
    with psycopg.connect(url, autocommit=True) as conn:
        taken = int(conn.execute("SELECT count(*) FROM procrastinate_jobs "  # type: ignore[index]
                                 "WHERE status = 'doing'").fetchone()[0])
    seconds = (runs // clients * clients) / float(tps.group(1)) if float(tps.group(1)) else elapsed
    return DequeuePhase(clients, taken, seconds, cpu / max(taken, 1) * 1e6, {})


def dequeue_scaling(bench: Bench, organization: str, args: argparse.Namespace) -> None:
    pgbench = find_pgbench()
    levels = [int(x) for x in args.levels.split(",")]
    here = HERE.parent
    variants: list[tuple[str, Path]] = ([("main", args.ab_main)] if args.ab_main else []) + [("this", here)]
    results: dict[tuple[str, int], list[DequeuePhase]] = {}
    for round_ in range(1, args.rounds + 1):
        for name, tree in variants:
            if len(variants) > 1:
                apply_functions(bench.admin[RUN_OPS], tree)
            for clients in levels:
                phase = dequeue_phase(bench, organization, pgbench, clients, args.dequeue_runs,
                                      f"{name}-{round_}-{clients}")
                results.setdefault((name, clients), []).append(phase)
                top = sorted(phase.waits.items(), key=lambda kv: -kv[1])[:3]
                print(f"round {round_}  dequeue  {name:<5} c={clients:<3} {phase.rate:>7,.0f} runs/s  "
                      f"server {phase.server_cpu_us:,.0f} µs/run  backends: "
                      + ", ".join(f"{event} {n:.1f}" for event, n in top)
                      + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    if len(variants) > 1:
        apply_functions(bench.admin[RUN_OPS], here)
    print()
    print(f"{'dequeue only, runs/s (server µs/run)':<40} " + "  ".join(f"{'c=' + str(c):>18}" for c in levels))
    for name, _ in variants:
        cells = []
        for clients in levels:
            phases = results[(name, clients)]
            rate, cpu = _median([p.rate for p in phases]), _median([p.server_cpu_us for p in phases])
            cells.append(f"{rate:>8,.0f} ({cpu:>6,.0f})")
        print(f"{name:<40} " + "  ".join(f"{c:>18}" for c in cells))
    print("(medians of the rounds)")


def pickup_round(bench: Bench, system: RunOpsSystem, runs: int, rng: random.Random) -> list[float]:
    """One idle ``runops worker`` (concurrency 4) in a fresh environment; ``runs`` runs triggered
    one at a time, 50-300 ms apart. Each run's ``started_at - created_at`` in ms, ascending."""
    system.new_scope()
    [proc] = system.workers(1, 4)
    try:
        time.sleep(3.0)  # past start-up: the worker is idle
        ids: list[str] = []
        with RunOps(bench.app[CONTROL_PLANE], bench.app[RUN_OPS]) as client:
            client.trigger_run(system.env, "noop")  # warms the route cache; not counted
            time.sleep(1.0)
            for _ in range(runs):
                time.sleep(rng.uniform(0.05, 0.3))
                ids.append(client.trigger_run(system.env, "noop").run_id)
        with psycopg.connect(bench.admin[RUN_OPS], autocommit=True) as poll:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and system.finished(poll) < len(ids) + 1:
                time.sleep(0.1)
            return sorted(float(ms) for (ms,) in poll.execute(
                "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM runops.runs "
                "WHERE 'run_' || id = ANY(%s) AND started_at IS NOT NULL", [ids]).fetchall())
    finally:
        _stop([proc])


def pickup_latency(bench: Bench, organization: str, args: argparse.Namespace) -> None:
    rng = random.Random(7)
    system = RunOpsSystem(bench, organization)
    for round_ in range(1, args.rounds + 1):
        lat = pickup_round(bench, system, args.pickup_runs, rng)
        if len(lat) < args.pickup_runs:
            print(f"round {round_}  pickup: only {len(lat)} of {args.pickup_runs} runs were picked up", flush=True)
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"round {round_}  pickup latency, idle worker, {len(lat)} runs: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
              f"max {lat[-1]:.1f} ms  (load {os.getloadavg()[0]:.1f})", flush=True)


# -- set-up ----------------------------------------------------------------------------------------------


def _organization(app: dict[str, str]) -> str:
    """A ksuid organization, so its environments' root triggers belong to the run-ops store."""
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        client.enable_split()
        client.wait_for_mirror()
        return client.create_organization(f"bench-{secrets.token_hex(3)}", mint_kind="ksuid")


def _environment(app: dict[str, str], organization: str, name: str, limit: int = 1000) -> str:
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        env = client.create_environment(client.create_project(organization, name), "e", "PRODUCTION")
        client.update_environment(env, maximum_concurrency_limit=limit)
        if not client.wait_for_mirror() or client.trigger_route(env) != RUN_OPS:
            raise RuntimeError(f"root triggers of {env} do not route to the run-ops store")
    return env


def peers_python(venv: Path) -> Path:
    """The bench-only venv's python with Procrastinate (and psycopg's binary build, as the project
    uses), made on first use with ``python -m venv`` and ``pip install``."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import procrastinate, psycopg; assert psycopg.pq.__impl__ == 'binary'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing Procrastinate into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "procrastinate", "psycopg[binary,pool]"], check=True)
    return python


def _peers_database(bench: Bench, python: Path) -> str:
    """Creates the Procrastinate database, applies its schema; returns Procrastinate's version."""
    bench.stores.clusters[RUN_OPS].create_database(PEERS_DATABASE)
    url = bench.stores.clusters[RUN_OPS].admin_url(PEERS_DATABASE)
    out = subprocess.run([str(python), "procrastinate_app.py", "schema"], cwd=HERE, check=True, text=True,
                         capture_output=True, env={**os.environ, "PEERS_DATABASE_URL": url})
    return out.stdout.strip()


def _settings(bench: Bench) -> dict[str, str]:
    with psycopg.connect(bench.stores.clusters[RUN_OPS].admin_url(PEERS_DATABASE), autocommit=True) as conn:
        return {name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
                for name in ("server_version", "fsync", "synchronous_commit")}


# -- the report ------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return "–".join(fmt.format(v) for v in (min(values), max(values))) if values else ""


def report(results: dict[tuple[str, str], list[Phase]], idle: dict[str, list[float]], args: argparse.Namespace) -> None:
    names = sorted({s for s, _ in results}, key=lambda s: s != "runops")
    print()
    print(f"{'workload':<44} {'system':<26} {'runs/s':>8} {'range':>13} {'ratio':>6} "
          f"{'worker µs':>9} {'server µs':>9} {'xacts':>5} {'WAL B':>6}")
    for workload in ("full loop", "drain"):
        ours = [p.rate for p in results.get(("runops", workload), [])]
        for name in names:
            phases = results.get((name, workload), [])
            if not phases:
                continue
            rate = _median([p.rate for p in phases])
            ratio = f"{_median(ours) / rate:.2f}" if name != "runops" and ours else ""
            print(f"{workload + ' (' + str(args.workers) + ' x ' + str(args.concurrency) + ')':<44} {name:<26} "
                  f"{rate:>8,.0f} {_spread([p.rate for p in phases]):>13} {ratio:>6} "
                  f"{_median([p.worker_cpu_us for p in phases]):>9,.0f} "
                  f"{_median([p.server_cpu_us for p in phases]):>9,.0f} {_median([p.xacts for p in phases]):>5.2f} "
                  f"{_median([p.wal_bytes for p in phases]):>6,.0f}")
    for name in sorted(idle, key=lambda s: s != "runops"):
        shares = idle[name]
        print(f"{'idle worker, empty queue (% of a core)':<44} {name:<26} {_median(shares) * 100:>7.2f}% "
              f"{_spread([s * 100 for s in shares], '{:.2f}'):>13}")
    print("(medians of the rounds; ratio = runops / the system; worker µs, server µs, xacts, WAL: per run)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-procrastinate", action="store_true")
    parser.add_argument("--procrastinate-sync-task", action="store_true",
                        help="also measure Procrastinate with a plain-function task (run in a thread, as runops's)")
    parser.add_argument("--peers-venv", type=Path, default=PEERS_HOME)
    parser.add_argument("--dequeue-scaling", action="store_true", help="measure dequeue_runs alone (and nothing else)")
    parser.add_argument("--levels", default="1,4,16", help="dequeuers per phase of --dequeue-scaling")
    parser.add_argument("--dequeue-runs", type=int, default=4800, help="runs queued per --dequeue-scaling phase")
    parser.add_argument("--ab-main", type=Path, help="another checkout whose lifecycle functions are measured too")
    parser.add_argument("--ab-base", type=Path, help="the loop phases also run another checkout's loop functions and "
                        "worker package ('runops before'), alternating with this checkout's, on the same clusters")
    parser.add_argument("--loop-only", action="store_true", help="the full loop only (no drain, idle worker or "
                        "client yardstick)")
    parser.add_argument("--pickup", action="store_true", help="measure an idle worker's pickup latency (only)")
    parser.add_argument("--pickup-runs", type=int, default=100)
    args = parser.parse_args()
    if args.dequeue_scaling or args.pickup:
        return focused(args)
    python = None if args.skip_procrastinate else peers_python(args.peers_venv)
    home = Path(tempfile.mkdtemp(prefix="runops-worker-bench-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    try:
        bench = Bench(stores)
        organization = _organization(bench.app)
        ours = RunOpsSystem(bench, organization, tree=HERE.parent if args.ab_base else None)
        systems: list[System] = [RunOpsSystem(bench, organization, tree=args.ab_base, name="runops before")] \
            if args.ab_base else []
        systems.append(ours)
        if python is not None:
            version = _peers_database(bench, python)
            systems.append(ProcrastinateSystem(bench, python))
            if args.procrastinate_sync_task:
                sync = ProcrastinateSystem(bench, python, task="noop_sync")
                sync.name = "Procrastinate (sync task)"
                systems.append(sync)
            print(f"Procrastinate {version}", flush=True)
        settings = _settings(bench) if python is not None else {}
        print(f"PostgreSQL {settings.get('server_version', '?')}, fsync {settings.get('fsync', '?')}, "
              f"synchronous_commit {settings.get('synchronous_commit', '?')}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        results: dict[tuple[str, str], list[Phase]] = {}
        idle: dict[str, list[float]] = {}
        phases: list[tuple[str, Callable[[System], Phase]]] = [
            ("full loop", lambda s: full_loop(bench, s, args.runs, args.workers, args.concurrency)),
            *([] if args.loop_only else [("drain", lambda s: drain(bench, s, args.runs, args.workers,
                                                                      args.concurrency))]),
        ]
        for round_ in range(1, args.rounds + 1):
            for workload, measure in phases:
                for system in systems:
                    phase = measure(system)
                    results.setdefault((system.name, workload), []).append(phase)
                    print(f"round {round_}  {workload:<10} {system.name:<26} {phase.rate:>7,.0f} runs/s  "
                          f"worker {phase.worker_cpu_us:,.0f} µs/run  server {phase.server_cpu_us:,.0f} µs/run  "
                          f"{phase.xacts:.2f} xacts/run  WAL {phase.wal_bytes:,.0f} B/run  "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            for system in [] if args.loop_only else [s for s in systems if s.name in ("runops", "Procrastinate")]:
                share = idle_cpu(system)
                idle.setdefault(system.name, []).append(share)
                print(f"round {round_}  idle       {system.name:<26} {share * 100:.2f}% of a core", flush=True)
        if args.loop_only:
            report(results, idle, args)
            return 0
        env = _environment(bench.app, ours.organization, "bare")
        triggers, bare = bare_loop(bench.app, env, args.runs)
        report(results, idle, args)
        both = 1 / (1 / triggers + 1 / bare)  # the two bare phases back to back, per run
        loop = _median([p.rate for p in results[("runops", "full loop")]])
        drained = _median([p.rate for p in results[("runops", "drain")]])
        print(f"yardstick, no worker: triggers alone {triggers:,.0f} runs/s; dequeue -> start -> complete "
              f"{bare:,.0f} runs/s; the two back to back {both:,.0f} runs/s "
              f"(runops full loop {loop / both:.2f} x, drain {drained / bare:.2f} x the bare client loop)")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def focused(args: argparse.Namespace) -> int:
    """--dequeue-scaling and --pickup: runops alone, on clusters of their own."""
    home = Path(tempfile.mkdtemp(prefix="runops-worker-bench-"))
    home.chmod(0o755)
    stores = _bring_up(home)
    try:
        bench = Bench(stores)
        organization = _organization(bench.app)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        if args.dequeue_scaling:
            dequeue_scaling(bench, organization, args)
        if args.pickup:
            pickup_latency(bench, organization, args)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
