"""`runops bench`: one table of what runops's calls cost against a plain INSERT baseline (SPEC §7)
and against its peers, Procrastinate and graphile-worker, all measured in the same run on the same
cluster (issue 11), and batches against a set-based INSERT ... SELECT (issue 4).

Two fresh local clusters (fsync and synchronous_commit on) are started in a temporary
directory, migrated, wired and split, exactly as `runops dev up` does, and the control plane is
ticked every second (the tenant mirror's heartbeat). The peers are installed on demand into a
bench-only place and get a database each on the run-ops cluster (``bench/peers.py``; never
project dependencies). The workloads, rows of the table (``WORKLOADS``):

* 4 clients: ``baseline`` (a plain single-row INSERT into ``bench.bench_baseline``, the SPEC's
  shape and indexes); ``trigger_no_key``, ``trigger_new_key``, ``trigger_repeated_key``
  (``runops.trigger_run`` without a key, with a key no run holds, with one of 1,000 keys live
  runs hold: the cached path); ``python_client`` (``RunOps.trigger_run``, 4 threads);
  Procrastinate's ``procrastinate_defer_jobs_v1`` without and with a queueing lock;
  graphile-worker's ``add_job`` without and with a ``job_key``; reads by id: ``read_local``
  (``runops.get_run`` of a NEW run on the run-ops store), ``read_fdw`` (``get_run`` of a LEGACY
  run asked of the run-ops store: through postgres_fdw) and ``read_client`` (``RunOps.get_run``
  of a NEW run, routed by the id's shape);
* 1 client: the baseline, ``trigger_no_key`` and the three reads again;
* batches (one connection): ``batch_baseline`` (INSERT ... SELECT of 10,000 rows),
  ``batch_trigger`` of 10,000 items without and with keys, ``stream_batch`` of 100,000 items in
  chunks of 1,000;
* the worker's side (the "loop" section, measured by ``bench/worker_loop.py``, the one home of
  those measurements): ``full_loop`` (4 ``runops worker`` processes × 4 while 4 threads trigger:
  trigger → dequeue → start → complete) against ``procrastinate_loop`` (the same with
  Procrastinate's workers and ``defer()``), rate and server CPU per run; ``dequeue_c1/4/16``
  (pgbench clients calling ``dequeue_runs(env, worker, 1)`` over queued runs of one environment)
  against ``procrastinate_dequeue_c16`` (16 clients of ``procrastinate_fetch_job_v2``);
  ``pickup`` (an idle worker, runs triggered one at a time: p50/p99 of trigger → lease); and
  ``trigger_no_ticker`` (the no-key trigger with the control plane's ticker stopped past the
  run-ops store's freshness bound) against ``trigger_ticker_on`` (the same, ticking), in
  interleaved rounds. ``LoopSettings`` sizes them; ``QUICK`` runs every one small (and lowers
  the freshness bound to 2 s so the no-ticker phase need not wait a minute: its figure then
  says nothing about the default bound).

Every pgbench phase is ``pgbench -n -M prepared -c <clients> -j <threads> -T <seconds>`` as
``runops_app`` over TCP, with a per-transaction log for the latency percentiles. Before each
phase every table the workloads write is emptied (runops's run graph, the baseline tables, the
peers' job tables) and a CHECKPOINT runs. The call phases run in ``rounds`` (default 3) rounds,
round-robin through every call workload in each; the rate reported is the median of the rounds,
with their spread. Each row's ratio is to its own yardstick (the baseline at the same number of
clients; the set INSERT for batches; the local read for the other reads) and, for the 4-client
enqueue rows, to each peer. ``TARGETS`` (issue 11) are data here and the table marks each met or
missed; ``CEILINGS`` bound figures other than rates (pickup p50/p99, the loop's server CPU per
run against Procrastinate's). ``bench/chart.py`` draws the same rows (beside the JSON in ``bench/results/``).

Exit codes of :func:`main`: 0 every target measured was met, 4 the benchmark ran but missed a
target, 1 it could not run. A peer that cannot be installed is reported in its rows and its
targets are not measured.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg
from peers import Peer, PeerUnavailable, chart_python, procrastinate_python, setup_peers

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import RunOpsError
from runops.ops import migrate
from runops.ops.local_cluster import LocalStores, find_bindir
from runops.ops.output import table

HERE = Path(__file__).resolve().parent

CLIENTS = 4
THREADS = 2
PYTHON_THREADS = 4
ROUNDS = 3
REPEATED_KEYS = 1000
TASK = "bench-task"
PAYLOAD: dict[str, Any] = {"n": 1}
EXIT_TARGET_MISSED = 4
T = TypeVar("T")
SECTIONS = ("calls", "batches", "loop")
BATCH_ITEMS = 10_000
BATCH_REPS = 5
STREAM_ITEMS = 100_000
STREAM_CHUNK = 1000
STREAM_REPS = 3

def baseline_ddl(table: str) -> str:
    """The SPEC §7 baseline table (bench_baseline's shape and indexes) under a given name."""
    return f"""
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE IF NOT EXISTS bench.{table} (
  id              text COLLATE "C" PRIMARY KEY,
  friendly_id     text UNIQUE,
  environment_id  text,
  task_identifier text,
  status          text,
  idempotency_key text,
  payload         jsonb,
  created_at      timestamptz DEFAULT now(),
  UNIQUE (environment_id, task_identifier, idempotency_key)
);
CREATE INDEX IF NOT EXISTS {table}_environment_created_idx
  ON bench.{table} (environment_id, created_at DESC, id DESC);
GRANT USAGE ON SCHEMA bench TO runops_app;
GRANT INSERT ON bench.{table} TO runops_app;
"""


BASELINE_DDL = baseline_ddl("bench_baseline")
# The batch baseline has a table of its own, so that it grows only with its own rows.
BATCH_BASELINE_DDL = baseline_ddl("bench_batch_baseline")

# Fresh ids and keys in every repetition: a random prefix per statement, then the row number.
BATCH_BASELINE_INSERT = """
INSERT INTO bench.bench_batch_baseline
  (id, friendly_id, environment_id, task_identifier, status, idempotency_key, payload)
SELECT 'b' || %(p)s || g, 'run_b' || %(p)s || g, %(env)s, 'bench-task', 'PENDING', 'k' || %(p)s || g,
       jsonb_build_object('n', g)
FROM generate_series(1, %(n)s) AS g
"""
BATCH_TRIGGER = "SELECT * FROM runops.batch_trigger(%(env)s, %(items)s::jsonb, '{}')"
# What the workloads write on the run-ops store, emptied before each phase (the run graph with
# its idempotency claims, and both baseline tables; the peers empty their own job tables).
RESET_RUN_OPS = """
TRUNCATE runops.runs, runops.attempts, runops.checkpoints, runops.batches, runops.batch_items,
         runops.waitpoints, runops.run_waitpoints, runops.idempotency_claims,
         bench.bench_baseline, bench.bench_batch_baseline
"""


class BenchError(RunOpsError):
    """The benchmark could not run (missing pgbench or scripts, a phase failed)."""


# -- what is measured, and against what --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A row of the table: the workload, its clients, and the row its ratio is taken against."""

    name: str
    label: str
    clients: int
    unit: str                  # "calls" or "rows" (per second)
    reference: str | None      # the row's own yardstick
    versus_peers: bool = False  # a 4-client enqueue: its ratio to each peer is shown too
    section: str = "calls"     # which part of the run measures it (SECTIONS)


PEER_WORKLOADS = ("procrastinate_defer", "procrastinate_defer_lock", "graphile_add_job", "graphile_add_job_key")
READS = ("read_local", "read_fdw", "read_client")

WORKLOADS = (
    Workload("baseline", "baseline: INSERT (SPEC 7)", CLIENTS, "calls", None, True),
    Workload("trigger_no_key", "trigger_run, no key", CLIENTS, "calls", "baseline", True),
    Workload("trigger_new_key", "trigger_run, new key", CLIENTS, "calls", "baseline", True),
    Workload("trigger_repeated_key", "trigger_run, cached (repeated key)", CLIENTS, "calls", "baseline", True),
    Workload("python_client", "Python RunOps.trigger_run, no key", CLIENTS, "calls", "baseline", True),
    Workload("procrastinate_defer", "Procrastinate defer", CLIENTS, "calls", "baseline", True),
    Workload("procrastinate_defer_lock", "Procrastinate defer, queueing lock", CLIENTS, "calls", "baseline", True),
    Workload("graphile_add_job", "graphile-worker add_job", CLIENTS, "calls", "baseline", True),
    Workload("graphile_add_job_key", "graphile-worker add_job, job_key", CLIENTS, "calls", "baseline", True),
    Workload("read_local", "get_run NEW, on run-ops (local)", CLIENTS, "calls", None),
    Workload("read_fdw", "get_run LEGACY, on run-ops (FDW)", CLIENTS, "calls", "read_local"),
    Workload("read_client", "Python RunOps.get_run NEW (routed)", CLIENTS, "calls", "read_local"),
    Workload("baseline_c1", "baseline: INSERT (SPEC 7)", 1, "calls", None),
    Workload("trigger_no_key_c1", "trigger_run, no key", 1, "calls", "baseline_c1"),
    Workload("read_local_c1", "get_run NEW, on run-ops (local)", 1, "calls", None),
    Workload("read_fdw_c1", "get_run LEGACY, on run-ops (FDW)", 1, "calls", "read_local_c1"),
    Workload("read_client_c1", "Python RunOps.get_run NEW (routed)", 1, "calls", "read_local_c1"),
    Workload("batch_baseline", f"set INSERT ... SELECT, {BATCH_ITEMS:,} rows", 1, "rows", None),
    Workload("batch_trigger_no_key", f"batch_trigger, {BATCH_ITEMS:,} items, no keys", 1, "rows", "batch_baseline"),
    Workload("batch_trigger_keys", f"batch_trigger, {BATCH_ITEMS:,} items, keys", 1, "rows", "batch_baseline"),
    Workload("stream_batch", f"stream_batch, {STREAM_ITEMS:,} items streamed", 1, "rows", "batch_baseline"),
    # the worker's side (bench/worker_loop.py measures them; the "loop" section)
    Workload("full_loop", "full loop: trigger->dequeue->start->complete, 4 workers x 4", 4, "runs", None,
             section="loop"),
    Workload("procrastinate_loop", "Procrastinate loop: defer->fetch->finish, 4 x 4", 4, "runs", None,
             section="loop"),
    Workload("dequeue_c1", "dequeue_runs only, one environment", 1, "runs", None, section="loop"),
    Workload("dequeue_c4", "dequeue_runs only, one environment", 4, "runs", "dequeue_c1", section="loop"),
    Workload("dequeue_c16", "dequeue_runs only, one environment", 16, "runs", "dequeue_c1", section="loop"),
    Workload("procrastinate_dequeue_c16", "Procrastinate fetch_job only", 16, "runs", None, section="loop"),
    Workload("pickup", "pickup latency, idle worker (ms)", 1, "ms", None, section="loop"),
    Workload("trigger_ticker_on", "trigger_run, no key, ticker on", CLIENTS, "calls", None, section="loop"),
    Workload("trigger_no_ticker", "trigger_run, no key, ticker stopped past bound", CLIENTS, "calls",
             "trigger_ticker_on", section="loop"),
)
WORKLOAD = {w.name: w for w in WORKLOADS}
# Short names of the yardsticks, for the table's headers and target cells.
SHORT = {"baseline": "baseline", "baseline_c1": "baseline", "batch_baseline": "set INSERT",
         "trigger_no_key": "pgbench trigger", "read_local": "local read", "read_local_c1": "local read",
         "procrastinate_defer": "procr", "procrastinate_defer_lock": "procr+lock",
         "graphile_add_job": "graphile", "graphile_add_job_key": "graphile+key",
         "procrastinate_loop": "procr loop", "dequeue_c1": "1 dequeuer", "trigger_ticker_on": "ticker on",
         "procrastinate_dequeue_c16": "procr fetch c16"}


@dataclass(frozen=True)
class Target:
    """The least ratio of ``name``'s rate to ``against``'s that passes (issue 11)."""

    name: str
    against: str
    minimum: float


TARGETS = (
    Target("trigger_no_key", "baseline", 0.70),
    Target("trigger_no_key", "procrastinate_defer", 1.25),
    Target("trigger_no_key", "graphile_add_job", 2.0),
    Target("trigger_new_key", "baseline", 0.58),
    Target("trigger_new_key", "procrastinate_defer_lock", 1.15),
    Target("trigger_new_key", "graphile_add_job_key", 2.0),
    Target("trigger_repeated_key", "baseline", 1.50),
    Target("python_client", "trigger_no_key", 0.85),
    Target("batch_trigger_no_key", "batch_baseline", 0.50),
    Target("batch_trigger_keys", "batch_baseline", 0.35),
    Target("stream_batch", "batch_baseline", 0.40),
    Target("full_loop", "procrastinate_loop", 1.20),
    Target("dequeue_c16", "dequeue_c1", 3.0),
    Target("dequeue_c16", "procrastinate_dequeue_c16", 1.0),
    Target("trigger_no_ticker", "trigger_ticker_on", 0.90),
)


@dataclass(frozen=True)
class Ceiling:
    """The most a figure of ``name``'s phase (``metric``: p50_ms, server_cpu_us_per_call, ...) may
    be: absolute, or with ``against`` as a ratio to the same figure of that phase."""

    name: str
    metric: str
    maximum: float
    against: str | None = None


CEILINGS = (
    Ceiling("full_loop", "server_cpu_us_per_call", 1.0, "procrastinate_loop"),
    Ceiling("pickup", "p50_ms", 15.0),
    Ceiling("pickup", "p99_ms", 100.0),
)
LOOP_PEERS = ("procrastinate_loop", "procrastinate_dequeue_c16")


def _ratio(rates: dict[str, float], name: str, against: str | None) -> float | None:
    if against is None or rates.get(name) is None or not rates.get(against):
        return None
    return rates[name] / rates[against]


def _ceiling(c: Ceiling, figures: dict[str, dict[str, Any]], unavailable: dict[str, str]) -> dict[str, Any]:
    value = figures.get(c.name, {}).get(c.metric)
    if c.against is not None:
        base = figures.get(c.against, {}).get(c.metric)
        value = None if value is None or not base else value / base
    return {"metric": c.metric, "maximum": c.maximum, "against": c.against, "value": value,
            "met": None if value is None else value <= c.maximum,
            **({"not_measured": unavailable[c.against]} if c.against in unavailable else {})}


def report_rows(rates: dict[str, float], unavailable: dict[str, str] | None = None,
                figures: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The table's rows from the median rates (workload → per second) and the phases' other
    figures (workload → p50_ms, server_cpu_us_per_call, ...): each workload measured (or
    unavailable, with the reason), its ratio to its yardstick and to each peer, and its targets
    (least ratios, then ceilings), each met (True), missed (False) or not measured (None). Pure:
    no I/O."""
    unavailable = unavailable or {}
    figures = figures or {}
    rows: list[dict[str, Any]] = []
    for w in WORKLOADS:
        if w.name not in rates and w.name not in unavailable and w.name not in figures:
            continue
        rate = rates.get(w.name)
        targets = []
        for t in TARGETS:
            if t.name == w.name:
                r = _ratio(rates, w.name, t.against)
                targets.append({"against": t.against, "minimum": t.minimum, "ratio": r,
                                "met": None if r is None else r >= t.minimum,
                                **({"not_measured": unavailable[t.against]} if t.against in unavailable else {})})
        targets += [_ceiling(c, figures, unavailable) for c in CEILINGS if c.name == w.name]
        rows.append({"name": w.name, "label": w.label, "clients": w.clients, "unit": w.unit, "rate": rate,
                     "reference": w.reference, "ratio": _ratio(rates, w.name, w.reference),
                     "peers": {p: _ratio(rates, w.name, p) for p in PEER_WORKLOADS} if w.versus_peers else {},
                     "targets": targets, "unavailable": unavailable.get(w.name)})
    return rows


def verdict(rows: list[dict[str, Any]]) -> bool:
    """Every target measured was met (one not measured, a peer missing, neither fails nor passes)."""
    return all(t["met"] is not False for r in rows for t in r["targets"])


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """One call phase, one round."""

    calls_per_s: float
    calls: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    wal_bytes_per_call: float | None
    server_cpu_us_per_call: float | None   # the run-ops cluster (both clusters for reads via the FDW)
    client_cpu_us_per_call: float | None   # pgbench, or the Python process, per call
    rows_created: int | None               # rows the phase left in the tables it writes
    seconds: float


@dataclass(frozen=True)
class PhaseResult:
    """A call workload over its rounds: medians, and each round's rate."""

    name: str
    tool: str                  # "pgbench" or "python"
    clients: int
    calls_per_s: float         # median of the rounds
    rounds_calls_per_s: list[float]
    spread: float              # (max - min) / median of the rounds' rates
    p50_ms: float | None       # medians of the rounds' figures from here on
    p99_ms: float | None
    wal_bytes_per_call: float | None
    server_cpu_us_per_call: float | None
    client_cpu_us_per_call: float | None
    calls: int                 # over all rounds
    failed: int
    rows_created: list[int | None]
    seconds: float
    rounds: list[dict[str, Any]]


@dataclass(frozen=True)
class BatchPhaseResult:
    """A batch phase: the median over its repetitions (rates in rows per second, costs per row)."""

    name: str
    tool: str                  # "sql" (one statement over psycopg) or "python" (RunOps.stream_batch)
    rows_per_s: float          # median of the repetitions
    rows: int                  # rows per repetition
    reps_rows_per_s: list[float]
    reps_seconds: list[float]
    wal_bytes_per_row: float | None
    server_cpu_us_per_row: float | None    # every process of the run-ops cluster, per row
    client_cpu_us_per_row: float | None    # the Python process, per row
    batch_ids: list[str]                   # the batches made (empty for the baseline)


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def aggregate(name: str, tool: str, clients: int, rounds: list[RoundResult]) -> PhaseResult:
    rates = [r.calls_per_s for r in rounds]
    mid = statistics.median(rates)
    return PhaseResult(
        name, tool, clients, mid, rates, (max(rates) - min(rates)) / mid if mid else 0.0,
        _median([r.p50_ms for r in rounds]), _median([r.p99_ms for r in rounds]),
        _median([r.wal_bytes_per_call for r in rounds]), _median([r.server_cpu_us_per_call for r in rounds]),
        _median([r.client_cpu_us_per_call for r in rounds]), sum(r.calls for r in rounds),
        sum(r.failed for r in rounds), [r.rows_created for r in rounds], sum(r.seconds for r in rounds),
        [asdict(r) for r in rounds])


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(rank) - 1]


# -- running the calls --------------------------------------------------------------------------------


def scripts_dir() -> Path:
    """The pgbench scripts, beside this harness in bench/pgbench/."""
    return HERE / "pgbench"


def find_pgbench() -> Path:
    for c in (find_bindir() / "pgbench", Path(shutil.which("pgbench") or "/nonexistent")):
        if c.exists():
            return c
    raise BenchError("pgbench not found next to the PostgreSQL server binaries or on PATH")


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


@dataclass(frozen=True)
class Work:
    calls_per_s: float
    calls: int                 # calls in the timed window
    failed: int
    latency_ms: float | None
    all_calls: int             # with any warm-up: what the CPU and WAL figures are divided by
    latencies_us: list[float] = field(default_factory=list)   # each call's, ascending (when logged)


def _read_pgbench_logs(directory: Path) -> list[float]:
    """Every transaction's latency (µs) from pgbench's per-transaction logs (``-l``): the third
    field of each line."""
    out: list[float] = []
    for log in directory.iterdir():
        with log.open() as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    out.append(float(parts[2]))
    out.sort()
    return out


def run_pgbench(pgbench: Path, url: str, script: Path, seconds: int, variables: dict[str, str], *,
                clients: int = CLIENTS, threads: int = THREADS, latencies: bool = False) -> Work:
    """One pgbench run of ``script`` (its tps excludes the initial connection time); with
    ``latencies`` each transaction's latency, from its per-transaction log."""
    with tempfile.TemporaryDirectory(prefix="runops-pgbench-") as logs:
        cmd = [str(pgbench), "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(threads, clients)),
               "-T", str(seconds), "-f", str(script)]
        if latencies:
            cmd += ["-l", f"--log-prefix={logs}/tx"]
        for k, v in variables.items():
            cmd += ["-D", f"{k}={v}"]
        cmd.append(url)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 120)
        tps, done = _TPS.search(out.stdout), _DONE.search(out.stdout)
        if out.returncode != 0 or tps is None or done is None:
            raise BenchError(f"pgbench {script.name} failed (exit {out.returncode}):\n"
                             f"{out.stderr.strip()[-2000:]}\n{out.stdout.strip()[-1000:]}")
        failed, latency = _FAILED.search(out.stdout), _LATENCY.search(out.stdout)
        return Work(float(tps.group(1)), int(done.group(1)), int(failed.group(1)) if failed else 0,
                    float(latency.group(1)) if latency else None, int(done.group(1)),
                    _read_pgbench_logs(Path(logs)) if latencies else [])


def run_python_calls(client: RunOps, call: Callable[[RunOps], object], threads: int, seconds: int) -> Work:
    """``threads`` threads making ``call`` in a loop on one shared client, after a one-second
    warm-up (the pool grows to one connection per thread and psycopg prepares the statement after
    five executions); each counted call is timed."""
    counts = [0] * threads
    warm = [0] * threads
    failures = [0] * threads
    times: list[list[float]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    measuring = threading.Event()
    stop = threading.Event()

    def worker(i: int) -> None:
        try:
            while not stop.is_set():
                counting = measuring.is_set()
                t0 = time.perf_counter()
                try:
                    call(client)
                except RunOpsError:
                    if counting:
                        failures[i] += 1
                    continue
                if counting:
                    counts[i] += 1
                    times[i].append(time.perf_counter() - t0)
                else:
                    warm[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    time.sleep(1.0)
    measuring.set()
    t_start = time.perf_counter()
    time.sleep(seconds)
    total = sum(counts)
    elapsed = time.perf_counter() - t_start
    stop.set()
    for t in pool:
        t.join(timeout=30)
    if errors:
        raise BenchError(f"the Python client harness failed: {errors[0]!r}")
    latencies = sorted(1e6 * s for ts in times for s in ts)
    return Work(total / elapsed, total, sum(failures),
                statistics.fmean(latencies) / 1000 if latencies else None, sum(counts) + sum(warm), latencies)


def run_python_client(control_plane_url: str, run_ops_url: str, environment_id: str, seconds: int) -> Work:
    """PYTHON_THREADS threads calling RunOps.trigger_run (no key) in a loop on one shared client
    (a pool of PYTHON_THREADS connections), after a one-second warm-up."""
    with RunOps(control_plane_url, run_ops_url, max_pool_size=PYTHON_THREADS) as client:
        return run_python_calls(client, lambda c: c.trigger_run(environment_id, TASK, PAYLOAD),
                                PYTHON_THREADS, seconds)


def _scalar(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def server_cpu_seconds(datadir: str) -> float | None:
    """CPU time of a cluster so far: its postmaster's reaped children (exited backends) plus the
    live ones (from /proc/<pid>/schedstat). None where /proc cannot tell (not Linux)."""
    try:
        pm = int(Path(datadir, "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pm}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[13]) + int(fields[14])) / _TICK        # cutime, cstime
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pm:
                    total += int((stat.parent / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # the process ended meanwhile
        return total
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_backends_to_exit(admin: psycopg.Connection[Any], timeout: float = 10.0,
                               others: list[psycopg.Connection[Any]] | None = None) -> None:
    """Until the phase's connections are gone, so that their CPU time has been reaped: every
    client backend of ``admin``'s cluster but its own (any database: the peers' too), and those
    postgres_fdw opened on the clusters of ``others``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (_scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                   "AND pid <> pg_backend_pid()") > 0 or any(_scalar(
            o, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
               "AND application_name = 'postgres_fdw'") > 0 for o in others or [])):
        time.sleep(0.05)
    time.sleep(0.1)  # the postmaster reaps an exited backend asynchronously


def _machine(admin: psycopg.Connection[Any]) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    settings = {name: _scalar(admin, f"SHOW {name}") for name in (
        "server_version", "fsync", "synchronous_commit", "wal_sync_method", "full_page_writes",
        "wal_level", "shared_buffers", "max_wal_size", "checkpoint_timeout")}
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "settings": settings}


def _source(admin: psycopg.Connection[Any]) -> dict[str, Any]:
    """Which SQL was measured: the checkout's commit and uncommitted changes, and a digest of the
    function definitions installed in the run-ops store."""
    info: dict[str, Any] = {"functions_md5": _scalar(
        admin, "SELECT md5(string_agg(pg_get_functiondef(p.oid), '' ORDER BY p.oid::regprocedure::text)) "
               "FROM pg_proc AS p WHERE p.pronamespace = 'runops'::regnamespace AND p.prokind = 'f'")}
    try:
        root = scripts_dir().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "sql", "migrations"],
                               capture_output=True, text=True, check=False, timeout=10)
        if head.returncode == 0:
            info["git_head"] = head.stdout.strip()
            info["sql_uncommitted_changes"] = bool(dirty.stdout.strip())
    except (BenchError, OSError, subprocess.SubprocessError):
        pass
    return info


def _bring_up(home: Path) -> LocalStores:
    stores, _ = LocalStores.create(home / ".runops", fsync=True)
    stores.start()
    admin = stores.admin_urls()
    migrate.migrate(admin[CONTROL_PLANE], admin[RUN_OPS])
    for url in admin.values():
        migrate.set_app_password(url, stores.app_password)
    _tick_control_plane(admin[CONTROL_PLANE])
    return stores


# Set while the no-ticker phase runs: the ticker thread skips its ticks, as a stopped ticker would.
TICKER_PAUSED = threading.Event()


def _tick_control_plane(url: str, every: float = 1.0) -> None:
    """Ticks the control plane every second for the rest of the process, as a deployment does.
    Its tick is the tenant mirror's heartbeat: without it the run-ops store's mirror is stale 60 s
    after wiring, and every trigger reads its environment through the FDW instead (SPEC §4 [1.2];
    that measured 3.4 ms a call against 0.9 ms). The control plane is not the store under
    measurement; an idle one's tick costs it a few ms a second."""

    def tick() -> None:
        while True:
            try:
                with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                    while True:
                        if not TICKER_PAUSED.is_set():
                            conn.execute("SELECT runops.tick()")
                        time.sleep(every)
            except psycopg.Error:
                time.sleep(every)  # the clusters are gone (the run is over) or restarting

    threading.Thread(target=tick, name="control-plane-tick", daemon=True).start()


def _make_environment(app: dict[str, str]) -> str:
    """A ksuid organization's PRODUCTION environment, so its root triggers belong to run-ops."""
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        client.enable_split()
        if not client.wait_for_mirror():
            raise BenchError("the tenant mirror did not catch up after enabling the split")
        org = client.create_organization(f"bench-{secrets.token_hex(3)}", mint_kind="ksuid")
        env = client.create_environment(client.create_project(org, "bench"), "e", "PRODUCTION")
        if not client.wait_for_mirror():
            raise BenchError("the tenant mirror did not catch up with the benchmark environment")
        if client.trigger_route(env) != RUN_OPS:
            raise BenchError(f"root triggers of {env} do not route to the run-ops store")
    return env


@dataclass(frozen=True)
class _Rep:
    """One timed batch call: wall seconds of the call alone, and what it cost around it."""

    seconds: float
    wal_bytes: int
    server_cpu_s: float | None
    client_cpu_s: float


def _wal_lsn(admin: psycopg.Connection[Any]) -> int:
    return int(_scalar(admin, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def _timed_rep(admin: psycopg.Connection[Any], datadir: str, call: Callable[[], T]) -> tuple[T, _Rep]:
    """A CHECKPOINT (each repetition starts with the same full-page-write debt), then ``call``
    timed on its own; the WAL and CPU readings are taken outside the timed window."""
    admin.execute("CHECKPOINT")
    wal0, cpu0, client0 = _wal_lsn(admin), server_cpu_seconds(datadir), time.process_time()
    t0 = time.perf_counter()
    out = call()
    elapsed = time.perf_counter() - t0
    client1 = time.process_time()
    cpu1, wal1 = server_cpu_seconds(datadir), _wal_lsn(admin)
    return out, _Rep(elapsed, wal1 - wal0, None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                     client1 - client0)


def _batch_phase(name: str, tool: str, rows: int, reps: list[_Rep], batch_ids: list[str]) -> BatchPhaseResult:
    def per_row(values: list[float | None], scale: float) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) * scale / rows if len(known) == len(values) and known else None

    return BatchPhaseResult(
        name, tool, statistics.median(rows / r.seconds for r in reps), rows,
        [rows / r.seconds for r in reps], [r.seconds for r in reps],
        per_row([float(r.wal_bytes) for r in reps], 1.0), per_row([r.server_cpu_s for r in reps], 1e6),
        per_row([r.client_cpu_s for r in reps], 1e6), batch_ids)


def _check_batch(admin: psycopg.Connection[Any], client: RunOps, batch_id: str, rows: int, keyed: bool,
                 run_ids: list[str] | None = None) -> None:
    """The batch as get_batch reports it (sealed, ``rows`` items, one distinct run each, in the
    order the call returned), and its runs in runops.runs (each holding a key when ``keyed``)."""
    got = client.get_batch(batch_id)
    if got is None:
        raise BenchError(f"{batch_id}: get_batch found nothing")
    problems = []
    if got.item_count != rows or got.expected_count != rows or len(got.run_ids) != rows:
        problems.append(f"item_count {got.item_count}, expected_count {got.expected_count}, "
                        f"{len(got.run_ids)} run ids; expected {rows}")
    if not got.is_sealed or got.status != "PROCESSING":
        problems.append(f"status {got.status}, sealed {got.is_sealed}; expected PROCESSING, sealed")
    if len(set(got.run_ids)) != len(got.run_ids):
        problems.append("the items share runs")
    if run_ids is not None and run_ids != got.run_ids:
        problems.append("the call returned other run ids than get_batch")
    runs, with_key = admin.execute(
        "SELECT count(*), count(idempotency_key_hash) FROM runops.runs WHERE batch_id = %s",
        (batch_id.removeprefix("batch_"),)).fetchone() or (0, 0)
    if runs != rows or with_key != (rows if keyed else 0):
        problems.append(f"{runs} runs in runops.runs ({with_key} holding a key); expected {rows} "
                        f"({rows if keyed else 0})")
    if problems:
        raise BenchError(f"{batch_id}: " + "; ".join(problems))


def run_batch_phases(admin: psycopg.Connection[Any], app: dict[str, str], env: str, datadir: str, *,
                     reps: int = BATCH_REPS, stream_reps: int = STREAM_REPS,
                     say: Callable[[str], None] = lambda _m: None,
                     reset: Callable[[], None] = lambda: None) -> dict[str, BatchPhaseResult]:
    """The batch phases on the run-ops store (issue 4), one repetition after another:
    ``reps`` rounds of (baseline, batch_trigger without keys, with keys), then ``stream_reps``
    rounds of (baseline, stream_batch). ``reset`` runs before each repetition (it empties the
    tables); each batch is checked after its call."""
    if reps < 1 or stream_reps < 0:
        raise BenchError("the batch phases need at least one repetition")
    admin.execute(BATCH_BASELINE_DDL)
    admin.execute("VACUUM ANALYZE runops.runs, runops.batches, runops.batch_items, bench.bench_batch_baseline")
    n = BATCH_ITEMS
    timings: dict[str, list[_Rep]] = {"batch_baseline": [], "batch_trigger_no_key": [], "batch_trigger_keys": [],
                                      "stream_batch": []}
    batches: dict[str, list[str]] = {name: [] for name in timings}
    no_key_items = json.dumps([{"task": TASK, "payload": {"n": i}} for i in range(n)])
    stream_items = [{"task": TASK, "payload": {"n": i}} for i in range(STREAM_ITEMS)]
    with psycopg.connect(app[RUN_OPS], autocommit=True) as conn, \
            RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        conn.execute("SELECT 1")

        def baseline(rep: int) -> None:
            reset()
            prefix = secrets.token_hex(6)
            _, r = _timed_rep(admin, datadir, lambda: conn.execute(
                BATCH_BASELINE_INSERT, {"p": prefix, "env": env, "n": n}))
            stored = _scalar(admin, "SELECT count(*) FROM bench.bench_batch_baseline WHERE id LIKE %s",
                             (f"b{prefix}%",))
            if stored != n:
                raise BenchError(f"the batch baseline stored {stored} rows, expected {n}")
            timings["batch_baseline"].append(r)
            say(f"  batch_baseline #{rep}: {n / r.seconds:.0f} rows/s")

        def trigger(name: str, items: str, keyed: bool, rep: int) -> None:
            reset()
            row, r = _timed_rep(admin, datadir, lambda: conn.execute(
                BATCH_TRIGGER, {"env": env, "items": items}).fetchone())
            if row is None or row[1]:
                raise BenchError(f"{name}: batch_trigger returned {row!r}, expected a new batch")
            _check_batch(admin, client, str(row[0]), n, keyed, list(row[2]))
            timings[name].append(r)
            batches[name].append(str(row[0]))
            say(f"  {name} #{rep}: {n / r.seconds:.0f} rows/s ({row[0]})")

        say(f"batches: {reps} rounds of INSERT ... SELECT of {n} rows, batch_trigger of {n} items without "
            "keys, with keys")
        for rep in range(1, reps + 1):
            baseline(rep)
            trigger("batch_trigger_no_key", no_key_items, False, rep)
            keyed = json.dumps([{"task": TASK, "payload": {"n": i},
                                 "options": {"idempotency_key": f"bk-{secrets.token_hex(6)}-{i}"}}
                                for i in range(n)])
            trigger("batch_trigger_keys", keyed, True, rep)
        if stream_reps:
            say(f"batches: {stream_reps} rounds of INSERT ... SELECT of {n} rows, stream_batch of "
                f"{STREAM_ITEMS} items in chunks of {STREAM_CHUNK}")
            client.trigger_route(env)  # the pool is open and the route known before timing
        for rep in range(1, stream_reps + 1):
            baseline(reps + rep)
            reset()
            created, r = _timed_rep(admin, datadir, lambda: client.stream_batch(
                env, stream_items, expected_count=STREAM_ITEMS, chunk_size=STREAM_CHUNK))
            _check_batch(admin, client, created.batch_id, STREAM_ITEMS, False)
            timings["stream_batch"].append(r)
            batches["stream_batch"].append(created.batch_id)
            say(f"  stream_batch #{rep}: {STREAM_ITEMS / r.seconds:.0f} rows/s ({created.batch_id})")
    tools = {"batch_baseline": "sql", "batch_trigger_no_key": "sql", "batch_trigger_keys": "sql",
             "stream_batch": "python"}
    return {name: _batch_phase(name, tools[name], STREAM_ITEMS if name == "stream_batch" else n, reps_, batches[name])
            for name, reps_ in timings.items() if reps_}




# -- the call phases ------------------------------------------------------------------------------------


@dataclass
class CallPhase:
    """How one call workload is run and metered (one round: :meth:`Calls.measure`)."""

    name: str
    tool: str                              # "pgbench" or "python"
    clients: int
    run: Callable[[], Work]
    client_cpu: Callable[[], float]
    prepare: Callable[[], None] = lambda: None          # after the tables are emptied
    count: Callable[[], int] | None = None              # rows the workload's tables hold
    check: Callable[[RoundResult], None] = lambda _r: None
    fdw: bool = False                      # reads through the FDW: both clusters' CPU counts
    finish: Callable[[], None] = lambda: None           # after the phase is metered


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Calls:
    """The call workloads on one pair of clusters: set up once, then measured round by round."""

    def __init__(self, stores: LocalStores, admin: psycopg.Connection[Any], cp_admin: psycopg.Connection[Any],
                 env: str, pgbench: Path, seconds: int, peers: list[Peer], say: Callable[[str], None],
                 names: set[str] | None = None, freshness_bound: int | None = None) -> None:
        """``names``: the phases to run (all when None); ``freshness_bound``: the run-ops store's
        mirror freshness bound for the no-ticker phase (its own setting when None)."""
        self.stores, self.admin, self.cp_admin, self.env = stores, admin, cp_admin, env
        self.freshness_bound = freshness_bound
        self.app = stores.app_urls()
        self.pgbench, self.seconds, self.peers, self.say = pgbench, seconds, peers, say
        self.datadirs = {store: c.datadir for store, c in stores.clusters.items()}
        self.new_run = ""     # the NEW run the reads read: made again after each reset
        admin.execute(BASELINE_DDL)
        admin.execute(BATCH_BASELINE_DDL)
        with RunOps(self.app[CONTROL_PLANE], self.app[RUN_OPS]) as client:
            org = client.create_organization(f"bench-legacy-{secrets.token_hex(3)}", mint_kind="cuid")
            env_legacy = client.create_environment(client.create_project(org, "bench"), "e", "PRODUCTION")
            self.legacy_run = client.trigger_run(env_legacy, TASK, PAYLOAD).run_id
            if client.trigger_route(env_legacy) != CONTROL_PLANE:
                raise BenchError(f"root triggers of {env_legacy} do not route to the control plane")
        self.phases = [p for p in self._phases() if names is None or p.name in names]

    # -- resetting and preparing

    def reset(self) -> None:
        """Empties every table the workloads write, on the run-ops store and in the peers' databases."""
        self.admin.execute(RESET_RUN_OPS)
        for peer in self.peers:
            if peer.calls:
                with psycopg.connect(self.stores.clusters[RUN_OPS].admin_url(peer.database), autocommit=True) as c:
                    c.execute(peer.calls[0].reset_sql)

    def _prefill_repeated_keys(self) -> None:
        with psycopg.connect(self.app[RUN_OPS], autocommit=True) as ro:
            ro.execute("SELECT count(t.*) FROM generate_series(1, %s) AS g, "
                       "LATERAL runops.trigger_run(%s, %s, %s::jsonb, "
                       "jsonb_build_object('idempotency_key', 'r' || g)) AS t",
                       (REPEATED_KEYS, self.env, TASK, json.dumps(PAYLOAD)))

    def _make_new_run(self) -> None:
        with psycopg.connect(self.app[RUN_OPS], autocommit=True) as ro:
            row = ro.execute("SELECT run_id, residency FROM runops.trigger_run(%s, %s, %s::jsonb, '{}')",
                             (self.env, TASK, json.dumps(PAYLOAD))).fetchone()
        if row is None or row[1] != "NEW":
            raise BenchError(f"trigger_run on the run-ops store made {row!r}, not a NEW run")
        self.new_run = str(row[0])

    def _runs(self) -> int:
        return int(_scalar(self.admin, "SELECT count(*) FROM runops.runs"))

    def _stop_ticker(self) -> None:
        """Stops the control plane's tick and waits past the freshness bound: the heartbeats are
        then older than the bound, and the trigger must find the mirror fresh some other way."""
        if self.freshness_bound is not None:
            self.admin.execute("UPDATE runops.store_config SET mirror_freshness_seconds = %s",
                               [self.freshness_bound])
        bound = int(_scalar(self.admin, "SELECT mirror_freshness_seconds FROM runops.store_config"))
        TICKER_PAUSED.set()
        self.say(f"ticker stopped; waiting {bound + 2} s, past the freshness bound")
        time.sleep(bound + 2)

    def _start_ticker(self) -> None:
        TICKER_PAUSED.clear()
        time.sleep(2.0)  # the next tick has replicated: the mirror is fresh by its heartbeat again
        if self.freshness_bound is not None:
            self.admin.execute("UPDATE runops.store_config SET mirror_freshness_seconds = DEFAULT")

    # -- the workloads

    def _pg(self, name: str, script: str, clients: int, url: str | None = None,
            variables: Callable[[], dict[str, str]] = dict, **kw: Any) -> CallPhase:
        def run() -> Work:
            return run_pgbench(self.pgbench, url or self.app[RUN_OPS], scripts_dir() / script, self.seconds,
                               {"env": self.env, "keys": str(REPEATED_KEYS), **variables()},
                               clients=clients, latencies=True)
        return CallPhase(name, "pgbench", clients, run, _children_cpu, **kw)

    def _py(self, name: str, threads: int, call: Callable[[RunOps], object], **kw: Any) -> CallPhase:
        def run() -> Work:
            with RunOps(self.app[CONTROL_PLANE], self.app[RUN_OPS], max_pool_size=threads) as client:
                return run_python_calls(client, call, threads, self.seconds)
        return CallPhase(name, "python", threads, run, time.process_time, **kw)

    def _phases(self) -> list[CallPhase]:
        env = self.env

        def no_runs_made(r: RoundResult) -> None:
            if r.rows_created:
                raise BenchError(f"the repeated-key phase created {r.rows_created} runs")

        def read(suffix: str, clients: int) -> list[CallPhase]:
            return [
                self._pg(f"read_local{suffix}", "get_run.sql", clients, variables=lambda: {"run": self.new_run},
                         prepare=self._make_new_run),
                self._pg(f"read_fdw{suffix}", "get_run.sql", clients, variables=lambda: {"run": self.legacy_run},
                         fdw=True),
                self._py(f"read_client{suffix}", clients, lambda c: c.get_run(self.new_run),
                         prepare=self._make_new_run),
            ]

        def baseline_rows() -> int:
            return int(_scalar(self.admin, "SELECT count(*) FROM bench.bench_baseline"))

        phases = [
            self._pg("baseline", "baseline.sql", CLIENTS, count=baseline_rows),
            self._pg("trigger_no_key", "trigger_no_key.sql", CLIENTS, count=self._runs),
            self._pg("trigger_new_key", "trigger_new_key.sql", CLIENTS, count=self._runs),
            self._pg("trigger_repeated_key", "trigger_repeated_key.sql", CLIENTS, count=self._runs,
                     prepare=self._prefill_repeated_keys, check=no_runs_made),
            self._py("python_client", PYTHON_THREADS, lambda c: c.trigger_run(env, TASK, PAYLOAD), count=self._runs),
        ]
        for peer in self.peers:
            for call in peer.calls:
                def count(sql: str = call.count_sql, db: str = peer.database) -> int:
                    with psycopg.connect(self.stores.clusters[RUN_OPS].admin_url(db), autocommit=True) as c:
                        return int(_scalar(c, sql))
                phases.append(self._pg(call.name, call.script, CLIENTS, url=call.url, count=count))
        phases += read("", CLIENTS)
        phases += [self._pg("baseline_c1", "baseline.sql", 1, count=baseline_rows),
                   self._pg("trigger_no_key_c1", "trigger_no_key.sql", 1, count=self._runs)]
        phases += read("_c1", 1)
        phases += [self._pg("trigger_ticker_on", "trigger_no_key.sql", CLIENTS, count=self._runs),
                   self._pg("trigger_no_ticker", "trigger_no_key.sql", CLIENTS, count=self._runs,
                            prepare=self._stop_ticker, finish=self._start_ticker)]
        return phases

    # -- one round of one phase

    def measure(self, phase: CallPhase) -> RoundResult:
        """Empties the tables, prepares, CHECKPOINTs, then runs the phase once, metered."""
        others = [self.cp_admin] if phase.fdw else []
        self.reset()
        phase.prepare()
        self.admin.execute("CHECKPOINT")
        _wait_for_backends_to_exit(self.admin, others=others)
        rows0 = phase.count() if phase.count else None
        wal0 = _wal_lsn(self.admin)
        servers = [self.datadirs[RUN_OPS]] + ([self.datadirs[CONTROL_PLANE]] if phase.fdw else [])
        cpu0, client0, t0 = _cpu(servers), phase.client_cpu(), time.perf_counter()
        w = phase.run()
        elapsed = time.perf_counter() - t0
        client1 = phase.client_cpu()
        wal1 = _wal_lsn(self.admin)
        _wait_for_backends_to_exit(self.admin, others=others)
        cpu1 = _cpu(servers)
        rows1 = phase.count() if phase.count else None
        phase.finish()
        per_call = 1e6 / w.all_calls if w.all_calls else None
        result = RoundResult(
            w.calls_per_s, w.calls, w.failed,
            None if not w.latencies_us else (percentile(w.latencies_us, 50) or 0) / 1000,
            None if not w.latencies_us else (percentile(w.latencies_us, 99) or 0) / 1000,
            (wal1 - wal0) / w.all_calls if w.all_calls else None,
            None if cpu0 is None or cpu1 is None or per_call is None else (cpu1 - cpu0) * per_call,
            None if per_call is None else (client1 - client0) * per_call,
            None if rows0 is None or rows1 is None else rows1 - rows0, elapsed)
        phase.check(result)
        return result

    def run(self, rounds: int) -> dict[str, PhaseResult]:
        """``rounds`` rounds, each round-robin through every phase; the medians per phase."""
        measured: dict[str, list[RoundResult]] = {p.name: [] for p in self.phases}
        for n in range(1, rounds + 1):
            for p in self.phases:
                r = self.measure(p)
                measured[p.name].append(r)
                self.say(f"round {n}/{rounds} {p.name} (c={p.clients}): {r.calls_per_s:.0f}/s, "
                         f"p99 {_us(r.p99_ms, 2)} ms, server {_us(r.server_cpu_us_per_call)} us/call")
        return {p.name: aggregate(p.name, p.tool, p.clients, measured[p.name]) for p in self.phases}


def _reset(admin: psycopg.Connection[Any]) -> None:
    admin.execute(RESET_RUN_OPS)


@contextlib.contextmanager
def _service_statistics(admin: psycopg.Connection[Any], env: str) -> Iterator[None]:
    """Inside: the run graph's tables carry the column statistics a store in service has, kept
    while the call phases empty the tables (TRUNCATE keeps statistics; autovacuum, which would
    analyze a table just emptied or half-filled by one phase, is paused on these two tables and
    resumed on the way out). Why: with a table believed small (a fresh pair, or one analyzed right
    after a TRUNCATE) PostgreSQL plans a keyed trigger's key lookup through
    ``runs_environment_created_idx`` as readily as through the key index, each pgbench session
    keeps that generic plan for the phase, and the lookup reads every run of the environment
    (docs/benchmarks.md, "The trigger rows in the same session"): a store's first minute, or the
    bench's emptied tables, not a store in service."""
    tables = ("runops.runs", "runops.idempotency_claims")
    for options in ("jsonb_build_object('idempotency_key', 'prime-' || g)", "'{}'::jsonb"):
        admin.execute(f"SELECT count(*) FROM generate_series(1, 2000) AS g, "
                      f"LATERAL runops.trigger_run(%s, 'bench-task', '{{}}', {options}) AS t", [env])
    admin.execute(f"ANALYZE {', '.join(tables)}")
    for name in tables:
        admin.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = false)")
    admin.execute(RESET_RUN_OPS)
    try:
        yield
    finally:
        for name in tables:
            admin.execute(f"ALTER TABLE {name} RESET (autovacuum_enabled)")


def _cpu(datadirs: list[str]) -> float | None:
    values = [server_cpu_seconds(d) for d in datadirs]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


# -- the worker's side: the loop, dequeue scaling, pickup ---------------------------------------------


@dataclass(frozen=True)
class LoopSettings:
    """The sizes of the "loop" section's phases (``QUICK`` for a run of seconds, not figures)."""

    runs: int = 2000                 # runs per full-loop phase
    workers: int = 4
    concurrency: int = 4
    dequeue_levels: tuple[int, ...] = (1, 4, 16)
    dequeue_runs: int = 4800         # runs queued per dequeue phase
    pickup_runs: int = 100
    freshness_bound: int | None = None  # the no-ticker phase's bound (None: the store's, 60 s)


QUICK = LoopSettings(runs=96, dequeue_runs=160, pickup_runs=8, freshness_bound=2)


@dataclass(frozen=True)
class LoopPhaseResult:
    """A loop, dequeue or pickup workload over its rounds (medians): runs/s, latency, CPU per run."""

    name: str
    tool: str                  # "worker" (worker processes), "pgbench"
    clients: int
    calls_per_s: float | None  # runs per second (None for the pickup latency)
    rounds_calls_per_s: list[float]
    spread: float | None
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_us_per_call: float | None   # both clusters (runops) or the cluster (Procrastinate), per run
    client_cpu_us_per_call: float | None   # the worker processes, per run
    rounds: list[dict[str, Any]]


def _loop_result(name: str, tool: str, clients: int, rounds: list[dict[str, Any]]) -> LoopPhaseResult:
    rates = [r["rate"] for r in rounds if r.get("rate") is not None]
    mid = statistics.median(rates) if rates else None
    return LoopPhaseResult(
        name, tool, clients, mid, rates, (max(rates) - min(rates)) / mid if rates and mid else None,
        _median([r.get("p50_ms") for r in rounds]), _median([r.get("p99_ms") for r in rounds]),
        _median([r.get("server_cpu_us") for r in rounds]), _median([r.get("worker_cpu_us") for r in rounds]), rounds)


def run_loop_phases(stores: LocalStores, pgbench: Path, procrastinate: Path | None, settings: LoopSettings,
                    rounds: int, say: Callable[[str], None]) -> dict[str, LoopPhaseResult]:
    """The worker's side, measured by ``bench/worker_loop.py`` (its one home) in ``rounds``
    rounds: the full loop (runops, then Procrastinate when ``procrastinate`` is its python),
    ``dequeue_runs`` alone at each level of dequeuers (and Procrastinate's fetch at the top
    level), and an idle worker's pickup latency."""
    import worker_loop as wl  # imports this module: loaded here, not at the top

    bench = wl.Bench(stores)
    ours = wl.RunOpsSystem(bench, wl._organization(bench.app))
    systems: list[tuple[str, wl.System]] = [("full_loop", ours)]
    if procrastinate is not None:
        wl._peers_database(bench, procrastinate)
        systems.append(("procrastinate_loop", wl.ProcrastinateSystem(bench, procrastinate)))
    top = max(settings.dequeue_levels)
    rng = random.Random(7)
    measured: dict[str, list[dict[str, Any]]] = {}

    def keep(name: str, figures: dict[str, Any], note: str) -> None:
        measured.setdefault(name, []).append(figures)
        say(f"round {n}/{rounds} {name}: {note} (load {os.getloadavg()[0]:.1f})")

    for n in range(1, rounds + 1):
        for name, system in systems:
            ph = wl.full_loop(bench, system, settings.runs, settings.workers, settings.concurrency)
            keep(name, {"rate": ph.rate, "server_cpu_us": ph.server_cpu_us, "worker_cpu_us": ph.worker_cpu_us,
                        "xacts_per_run": ph.xacts, "wal_bytes_per_run": ph.wal_bytes},
                 f"{ph.rate:.0f} runs/s, server {ph.server_cpu_us:.0f} us/run")
        for clients in settings.dequeue_levels:
            dq = wl.dequeue_phase(bench, ours.organization, pgbench, clients, settings.dequeue_runs,
                                  f"{n}-{clients}-{secrets.token_hex(2)}")
            keep(f"dequeue_c{clients}", {"rate": dq.rate, "server_cpu_us": dq.server_cpu_us, "waits": dq.waits},
                 f"{dq.rate:.0f} runs/s, server {dq.server_cpu_us:.0f} us/run")
        if procrastinate is not None:
            dq = wl.procrastinate_dequeue_phase(bench, pgbench, top, settings.dequeue_runs)
            keep(f"procrastinate_dequeue_c{top}", {"rate": dq.rate, "server_cpu_us": dq.server_cpu_us},
                 f"{dq.rate:.0f} runs/s, server {dq.server_cpu_us:.0f} us/run")
        lat = wl.pickup_round(bench, ours, settings.pickup_runs, rng)
        if len(lat) < settings.pickup_runs:
            raise BenchError(f"pickup: only {len(lat)} of {settings.pickup_runs} runs were picked up")
        keep("pickup", {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "runs": len(lat)},
             f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms")
    tools = {"full_loop": "worker", "procrastinate_loop": "worker", "pickup": "worker"}
    clients_of = {"full_loop": settings.workers, "procrastinate_loop": settings.workers, "pickup": 1}
    return {name: _loop_result(name, tools.get(name, "pgbench"),
                               clients_of.get(name, int(name.rsplit("_c", 1)[-1]) if "_c" in name else 1), figs)
            for name, figs in measured.items()}


# -- the run -----------------------------------------------------------------------------------------------


def run_bench(seconds: int = 10, *, keep: bool = False,
              progress: Callable[[str], None] | None = None,
              sections: tuple[str, ...] = SECTIONS, batch_reps: int = BATCH_REPS,
              stream_reps: int = STREAM_REPS, rounds: int = ROUNDS, peers: bool = True,
              loop: LoopSettings = LoopSettings()) -> dict[str, Any]:
    """Runs every workload on fresh local clusters and returns the results (phases, the table's
    rows with ratios against the same run's baselines and peers, targets, machine and settings):
    the call phases for ``seconds`` each in ``rounds`` interleaved rounds, then the batch
    phases, ``batch_reps`` (``stream_reps`` for streaming) repetitions each. ``sections`` picks
    "calls", "batches", "loop" (the worker's side: ``loop`` sizes it) or several; ``peers`` False
    leaves Procrastinate and graphile-worker out."""
    if seconds < 1 or rounds < 1:
        raise BenchError("seconds and rounds must be at least 1")
    if not sections or set(sections) - set(SECTIONS):
        raise BenchError(f"sections must be among {', '.join(SECTIONS)}")
    say = progress or (lambda _msg: None)
    calls = "calls" in sections
    looping = "loop" in sections
    pgbench = find_pgbench() if calls or looping else None
    home = Path(tempfile.mkdtemp(prefix="runops-bench-"))
    home.chmod(0o755)  # the clusters run as the postgres user, which must reach them
    stores: LocalStores | None = None
    started = dt.datetime.now(dt.UTC)
    try:
        say("starting two local clusters (fsync on)")
        stores = _bring_up(home)
        app = stores.app_urls()
        admin_url = stores.admin_urls()[RUN_OPS]
        env = _make_environment(app)
        phases: dict[str, PhaseResult] = {}
        batch_phases: dict[str, BatchPhaseResult] = {}
        loop_phases: dict[str, LoopPhaseResult] = {}
        peer_list: list[Peer] = []
        procrastinate: Path | None = None
        unavailable: dict[str, str] = {}
        with psycopg.connect(admin_url, autocommit=True) as admin, \
                psycopg.connect(stores.admin_urls()[CONTROL_PLANE], autocommit=True) as cp_admin:
            machine = _machine(admin)
            source = _source(admin)
            for name in ("fsync", "synchronous_commit"):
                if machine["settings"][name] != "on":
                    raise BenchError(f"{name} is {machine['settings'][name]} on the run-ops store; the benchmark "
                                     "needs it on")
            datadir = stores.clusters[RUN_OPS].datadir
            if calls and peers:
                peer_list = setup_peers(admin_url, app[RUN_OPS], say)
            if looping and peers:
                try:
                    procrastinate = procrastinate_python(say)
                except PeerUnavailable as err:
                    unavailable.update({c: f"Procrastinate unavailable: {err}" for c in LOOP_PEERS})
            load_before = os.getloadavg()
            names = {w.name for w in WORKLOADS if w.section in sections and w.unit == "calls"}
            bench = Calls(stores, admin, cp_admin, env, pgbench, seconds, peer_list, say, names,
                          loop.freshness_bound) if pgbench is not None else None
            if bench is not None:
                with _service_statistics(admin, env):
                    phases = bench.run(rounds)
            if looping and pgbench is not None:
                loop_phases = run_loop_phases(stores, pgbench, procrastinate, loop, rounds, say)
            if "batches" in sections:
                admin.execute(BASELINE_DDL)
                batch_phases = run_batch_phases(admin, app, env, datadir, reps=batch_reps, stream_reps=stream_reps,
                                                say=say, reset=lambda: _reset(admin))
            load_after = os.getloadavg()
        rates = {k: v.calls_per_s for k, v in phases.items()}
        rates.update({k: v.rows_per_s for k, v in batch_phases.items()})
        rates.update({k: v.calls_per_s for k, v in loop_phases.items() if v.calls_per_s is not None})
        unavailable.update({c: f"{p.name} unavailable: {p.error}" for p in peer_list if p.error
                            for c in p.workloads})
        if calls and not peers:
            unavailable.update({c: "peers not measured (--no-peers)" for c in PEER_WORKLOADS})
        if looping and not peers:
            unavailable.update({c: "peers not measured (--no-peers)" for c in LOOP_PEERS})
        figures = {k: asdict(v) for k, v in loop_phases.items()}
        rows = report_rows(rates, unavailable, figures)
        result: dict[str, Any] = {
            "started_at": started.isoformat(timespec="seconds"),
            "sections": list(sections),
            "seconds": seconds,
            "rounds": rounds,
            "pgbench": {"clients": CLIENTS, "threads": THREADS, "mode": "prepared",
                        "path": None if pgbench is None else str(pgbench)},
            "python_threads": PYTHON_THREADS,
            "repeated_keys": REPEATED_KEYS,
            "batch": {"items": BATCH_ITEMS, "reps": batch_reps, "stream_items": STREAM_ITEMS,
                      "stream_chunk": STREAM_CHUNK, "stream_reps": stream_reps},
            "machine": {**machine, "loadavg_before": load_before, "loadavg_after": load_after},
            "source": source,
            "peers": {p.name: {"version": p.version, "error": p.error} for p in peer_list},
            "loop": asdict(loop),
            "targets": [asdict(t) for t in TARGETS] + [asdict(c) for c in CEILINGS],
            "phases": {**{k: asdict(v) for k, v in phases.items()}, **{k: asdict(v) for k, v in batch_phases.items()},
                       **figures},
            "rows": rows,
            "all_pass": verdict(rows),
        }
        if keep:
            result["kept"] = {"home": str(home), "app_urls": app, "admin_urls": stores.admin_urls()}
        return result
    finally:
        if stores is not None and not keep:
            stores.destroy()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


# -- the table ---------------------------------------------------------------------------------------------


def _us(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _target_cell(targets: list[dict[str, Any]]) -> str:
    cells = []
    for t in targets:
        if "maximum" in t:
            metric = t["metric"].replace("server_cpu_us_per_call", "srv us").replace("_ms", " ms")
            what = (f"{metric} <={t['maximum']:.2f} x {SHORT.get(t['against'], t['against'])}" if t["against"]
                    else f"{metric} <={t['maximum']:g}")
        else:
            what = f">={t['minimum']:.2f} x {SHORT.get(t['against'], t['against'])}"
        cells.append(f"{what} " + ("not measured" if t["met"] is None else "met" if t["met"] else "MISSED"))
    return "; ".join(cells)


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """The printed table's cells, one tuple per row of ``result['rows']``."""
    ph = result["phases"]
    out: list[tuple[str, ...]] = []
    for r in result["rows"]:
        p = ph.get(r["name"], {})
        rows_unit = r["unit"] == "rows"
        digits = 1 if rows_unit else 0
        rate = "-" if r["rate"] is None else f"{r['rate']:.0f}" + (" rows" if rows_unit else "")
        if rows_unit:
            spread_values = p.get("reps_rows_per_s") or []
            mid = r["rate"] or 0
            spread = (max(spread_values) - min(spread_values)) / mid if spread_values and mid else None
        else:
            spread = p.get("spread")
        ref = "-" if r["ratio"] is None else f"{_x(r['ratio'])} {SHORT.get(r['reference'], r['reference'])}"
        if r["reference"] is None and r["rate"] is not None:
            ref = "1.00"
        note = _target_cell(r["targets"])
        if r["unavailable"]:
            note = r["unavailable"]
        out.append((
            r["label"], str(r["clients"]), rate,
            _us(p.get("p50_ms"), 2), _us(p.get("p99_ms"), 2),
            _us(p.get("server_cpu_us_per_row" if rows_unit else "server_cpu_us_per_call"), digits),
            _us(p.get("client_cpu_us_per_row" if rows_unit else "client_cpu_us_per_call"), digits),
            ref, *(_x(r["peers"].get(name)) if r["peers"] else "" for name in PEER_WORKLOADS),
            "-" if spread is None else f"{100 * spread:.0f}%", note))
    return out


TABLE_HEADERS = ["workload", "c", "per s", "p50 ms", "p99 ms", "srv us", "cli us", "x ref",
                 "x procr", "x procr+lock", "x graphile", "x graphile+key", "spread", "targets"]


def print_results(result: dict[str, Any]) -> None:
    """The one table: each workload's rate (calls or rows per second, median of the rounds),
    latency p50/p99, CPU per call or row (server: the run-ops cluster, both clusters for FDW
    reads; client: pgbench or the Python process), its ratio to its yardstick and to each peer,
    the rounds' spread, and its targets."""
    settings = result["machine"]["settings"]
    title = f"runops bench: fsync={settings['fsync']}, synchronous_commit={settings['synchronous_commit']}"
    if "calls" in result["sections"]:
        title += (f"; calls: median of {result.get('rounds', 1)} interleaved rounds of {result['seconds']} s, "
                  f"pgbench -M prepared -c <c> -j {THREADS}")
    if "batches" in result["sections"]:
        title += "; rows: median of repetitions, one connection"
    table(table_rows(result), TABLE_HEADERS, title=title)
    peers = result.get("peers") or {}
    if peers:
        click.echo("peers: " + ", ".join(f"{name} {p['version']}" if p["version"]
                                         else f"{name} unavailable ({p['error']})" for name, p in peers.items()))
    click.echo("x ref: ratio to the row's yardstick (baseline at the same clients; set INSERT for batches; the "
               "local read for reads); x procr...: ratio to each peer's rate; spread: (max - min) / median of the "
               "rounds (repetitions for batches)")
    load = result["machine"]
    click.echo(f"load average {load['loadavg_before'][0]:.2f} before, {load['loadavg_after'][0]:.2f} after; "
               f"targets: {'all met' if result['all_pass'] else 'MISSED'}")
    src = result.get("source", {})
    if src:
        click.echo(f"measured SQL: commit {src.get('git_head', '?')}"
                   f"{' + uncommitted sql/ or migrations/ changes' if src.get('sql_uncommitted_changes') else ''}, "
                   f"installed functions md5 {str(src.get('functions_md5'))[:12]}")


def default_results_dir() -> Path:
    return HERE / "results"


# The chart the docs show; refreshed only when a run is asked to draw there (`--chart`), so a
# benchmark run never rewrites a tracked file.
DOCS_CHART = HERE.parent / "docs" / "benchmarks.png"


def draw_chart(results_json: Path, png: Path, say: Callable[[str], None]) -> bool:
    """``bench/chart.py`` in the bench-only venv (matplotlib is no project dependency)."""
    try:
        python = chart_python(say)
        out = subprocess.run([str(python), str(HERE / "chart.py"), str(results_json), str(png)],
                             capture_output=True, text=True, check=False, timeout=300)
    except (PeerUnavailable, OSError, subprocess.SubprocessError) as err:
        say(f"no chart: {err}")
        return False
    if out.returncode != 0:
        say(f"no chart: bench/chart.py failed: {out.stderr.strip()[-500:]}")
        return False
    return True


def save_results(result: dict[str, Any], out_dir: Path, chart: Path | None, say: Callable[[str], None],
                 draw: Callable[[Path, Path, Callable[[str], None]], bool] = draw_chart) -> tuple[Path, Path | None]:
    """Writes the result's JSON into ``out_dir`` and its chart beside it (or to ``chart``);
    the JSON's path and the chart's (None when it could not be drawn)."""
    path = out_dir / f"bench-{result['started_at'].replace(':', '').replace('+0000', 'Z')}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    png = chart or path.with_suffix(".png")
    return path, png if draw(path, png, say) else None


def main(seconds: int = 10, *, keep: bool = False, results_dir: Path | None = None,
         sections: tuple[str, ...] = SECTIONS, batch_reps: int = BATCH_REPS, stream_reps: int = STREAM_REPS,
         rounds: int = ROUNDS, peers: bool = True, chart: Path | None = None, quick: bool = False) -> int:
    """Runs the benchmark, prints the table, writes JSON to bench/results/ and the chart beside it
    (or to ``chart``; :data:`DOCS_CHART` refreshes the docs' one). Exit code 0 when every target
    measured is met, 4 when one is missed, 1 when the benchmark could not run. ``quick``: every
    row once, as small as it runs (1 s phases, one round, :data:`QUICK`) — to see the table
    work, not to read its figures."""
    say: Callable[[str], None] = lambda m: click.echo(m, err=True)  # noqa: E731
    loop = LoopSettings()
    if quick:
        seconds, rounds, batch_reps, stream_reps, loop = 1, 1, 1, 1, QUICK
    try:
        result = run_bench(seconds, keep=keep, progress=say, sections=sections, batch_reps=batch_reps,
                           stream_reps=stream_reps, rounds=rounds, peers=peers, loop=loop)
    except (RunOpsError, psycopg.Error, OSError, subprocess.SubprocessError) as err:
        click.echo(f"error: {err}", err=True)
        return 1
    print_results(result)
    path, png = save_results(result, results_dir or default_results_dir(), chart, say)
    click.echo(f"results: {path}")
    if png is not None:
        click.echo(f"chart: {png}")
    if keep:
        click.echo(f"clusters kept in {result['kept']['home']}: {result['kept']['app_urls']}")
    return 0 if result["all_pass"] else EXIT_TARGET_MISSED


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
