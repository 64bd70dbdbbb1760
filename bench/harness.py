"""`runops bench`: trigger_run on the run-ops store against a plain INSERT baseline (SPEC §7), and
batches against a set-based INSERT ... SELECT (issue 4).

Two fresh local clusters (fsync and synchronous_commit on) are started in a temporary
directory, migrated, wired and split, exactly as `runops dev up` does. On the run-ops store the
benchmark then measures, one phase after another (never in parallel):

* ``baseline``              a plain single-row INSERT into ``bench.bench_baseline`` (the SPEC's
                            shape and indexes), measured first and last; the mean is the baseline;
* ``trigger_no_key``        ``runops.trigger_run`` with no idempotency key;
* ``python_client``         the same call through :class:`runops.client.RunOps`, 4 threads;
* ``trigger_new_key``       ``trigger_run`` with a key no run holds yet;
* ``trigger_repeated_key``  ``trigger_run`` with a key a live run holds (the cached path).

Every pgbench phase is ``pgbench -n -M prepared -c 4 -j 2 -T <seconds>`` as ``runops_app`` over
TCP, with a CHECKPOINT before it. Each rate is reported as a ratio to the baseline of the same
run (the Python client against ``trigger_no_key``), with its target. The scripts live beside
this harness in ``bench/pgbench/``; ``bench/run.py`` is the stand-alone entry point, and the
other ``bench/*.py`` experiments build on this module. ``runops bench`` loads it from the
checkout (the benchmarks' one home is ``bench/``: docs/decisions.md).

Then, on the same clusters, the batch phases (issue 4), counted in rows per second and taken as
the median of several repetitions (one connection, ``runops_app``, a CHECKPOINT before each
repetition, only the call's wall time counted):

* ``batch_baseline``        one set-based ``INSERT ... SELECT`` of 10,000 rows into
                            ``bench.bench_batch_baseline`` (the baseline's shape and indexes);
* ``batch_trigger_no_key``  ``runops.batch_trigger`` with 10,000 items without keys;
* ``batch_trigger_keys``    the same with a fresh idempotency key per item;
* ``stream_batch``          ``RunOps.stream_batch`` of 100,000 items in chunks of 1,000
                            (create, 100 appends, seal).

The repetitions are interleaved (baseline, no key, keys; then baseline, stream), so load
drifting during the run reaches every phase alike. Each batch is checked after its call
(item_count, sealed, one run per item, keys held).

Exit codes of :func:`main`: 0 every target met, 4 the benchmark ran but missed a target,
1 it could not run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import psycopg

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import RunOpsError
from runops.ops import migrate
from runops.ops.local_cluster import LocalStores, find_bindir
from runops.ops.output import table

HERE = Path(__file__).resolve().parent

CLIENTS = 4
THREADS = 2
PYTHON_THREADS = 4
REPEATED_KEYS = 1000
TASK = "bench-task"
PAYLOAD: dict[str, Any] = {"n": 1}
EXIT_TARGET_MISSED = 4
T = TypeVar("T")
SECTIONS = ("calls", "batches")
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


class BenchError(RunOpsError):
    """The benchmark could not run (missing pgbench or scripts, a phase failed)."""


@dataclass(frozen=True)
class Target:
    """What a phase is compared against, and the least ratio that passes."""

    name: str
    against: str
    minimum: float


TARGETS = (
    Target("trigger_no_key", "baseline", 0.80),
    Target("trigger_new_key", "baseline", 0.75),
    Target("trigger_repeated_key", "baseline", 1.00),
    Target("python_client", "trigger_no_key", 0.85),
    Target("batch_trigger_no_key", "batch_baseline", 0.50),
    Target("batch_trigger_keys", "batch_baseline", 0.35),
    Target("stream_batch", "batch_baseline", 0.40),
)


@dataclass(frozen=True)
class PhaseResult:
    name: str
    tool: str                  # "pgbench" or "python"
    calls_per_s: float
    calls: int
    failed: int
    latency_ms: float | None
    wal_bytes_per_call: float | None
    server_cpu_us_per_call: float | None   # every process of the run-ops cluster, per call
    client_cpu_us_per_call: float | None   # pgbench, or the Python process, per call
    runs_created: int | None
    seconds: float


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


def run_pgbench(pgbench: Path, url: str, script: Path, seconds: int, variables: dict[str, str]) -> Work:
    """One pgbench run of ``script`` (its tps excludes the initial connection time)."""
    cmd = [str(pgbench), "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", str(THREADS),
           "-T", str(seconds), "-f", str(script)]
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
                float(latency.group(1)) if latency else None, int(done.group(1)))


def run_python_client(control_plane_url: str, run_ops_url: str, environment_id: str, seconds: int) -> Work:
    """PYTHON_THREADS threads calling RunOps.trigger_run (no key) in a loop on one shared client
    (a pool of PYTHON_THREADS connections), after a one-second warm-up."""
    counts = [0] * PYTHON_THREADS
    warm = [0] * PYTHON_THREADS
    failures = [0] * PYTHON_THREADS
    busy = [0.0] * PYTHON_THREADS
    errors: list[BaseException] = []
    measuring = threading.Event()
    stop = threading.Event()
    with RunOps(control_plane_url, run_ops_url, max_pool_size=PYTHON_THREADS) as client:

        def worker(i: int) -> None:
            # Until `measuring` is set, the calls warm up: the pool grows to one connection per
            # thread and psycopg prepares the statement (after 5 executions).
            try:
                while not stop.is_set():
                    counting = measuring.is_set()
                    t0 = time.perf_counter()
                    try:
                        client.trigger_run(environment_id, TASK, PAYLOAD)
                    except RunOpsError:
                        if counting:
                            failures[i] += 1
                        continue
                    if counting:
                        counts[i] += 1
                        busy[i] += time.perf_counter() - t0
                    else:
                        warm[i] += 1
            except BaseException as exc:  # noqa: BLE001 - reported to the caller below
                errors.append(exc)

        pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(PYTHON_THREADS)]
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
    return Work(total / elapsed, total, sum(failures), 1000.0 * sum(busy) / max(sum(counts), 1),
                sum(counts) + sum(warm))


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


def _wait_for_backends_to_exit(admin: psycopg.Connection[Any], timeout: float = 10.0) -> None:
    """Until the phase's connections are gone, so that their CPU time has been reaped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                   "AND pid <> pg_backend_pid() AND datname = current_database()") > 0:
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


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a + b) / 2


def _bring_up(home: Path) -> LocalStores:
    stores, _ = LocalStores.create(home / ".runops", fsync=True)
    stores.start()
    admin = stores.admin_urls()
    migrate.migrate(admin[CONTROL_PLANE], admin[RUN_OPS])
    for url in admin.values():
        migrate.set_app_password(url, stores.app_password)
    _tick_control_plane(admin[CONTROL_PLANE])
    return stores


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
                     say: Callable[[str], None] = lambda _m: None) -> dict[str, BatchPhaseResult]:
    """The batch phases on the run-ops store (issue 4), one repetition after another:
    ``reps`` rounds of (baseline, batch_trigger without keys, with keys), then ``stream_reps``
    rounds of (baseline, stream_batch). Each batch is checked after its call."""
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


def run_bench(seconds: int = 10, *, keep: bool = False,
              progress: Callable[[str], None] | None = None,
              sections: tuple[str, ...] = SECTIONS, batch_reps: int = BATCH_REPS,
              stream_reps: int = STREAM_REPS) -> dict[str, Any]:
    """Runs every phase on fresh local clusters and returns the results (phases, ratios against
    the same run's baselines, targets, machine and settings): the call phases for ``seconds``
    each, then the batch phases, ``batch_reps`` (``stream_reps`` for streaming) repetitions each.
    ``sections`` picks "calls", "batches" or both."""
    if seconds < 1:
        raise BenchError("seconds must be at least 1")
    if not sections or set(sections) - set(SECTIONS):
        raise BenchError(f"sections must be among {', '.join(SECTIONS)}")
    say = progress or (lambda _msg: None)
    calls = "calls" in sections
    pgbench = find_pgbench() if calls else None
    scripts = scripts_dir() if calls else None
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
        with psycopg.connect(admin_url, autocommit=True) as admin:
            machine = _machine(admin)
            source = _source(admin)
            for name in ("fsync", "synchronous_commit"):
                if machine["settings"][name] != "on":
                    raise BenchError(f"{name} is {machine['settings'][name]} on the run-ops store; the benchmark "
                                     "needs it on")
            datadir = stores.clusters[RUN_OPS].datadir
            load_before = os.getloadavg()
            if pgbench is not None and scripts is not None:
                phases = _call_phases(admin, app, env, datadir, pgbench, scripts, seconds, say)
            if "batches" in sections:
                batch_phases = run_batch_phases(admin, app, env, datadir, reps=batch_reps,
                                                stream_reps=stream_reps, say=say)
            load_after = os.getloadavg()
        rates: dict[str, tuple[float, str]] = {k: (v.calls_per_s, "calls") for k, v in phases.items()}
        rates.update({k: (v.rows_per_s, "rows") for k, v in batch_phases.items()})
        rows = []
        for t in TARGETS:
            if t.name not in rates or t.against not in rates:
                continue
            ratio = rates[t.name][0] / rates[t.against][0]
            rows.append({"name": t.name, "rate": rates[t.name][0], "unit": rates[t.name][1], "against": t.against,
                         "ratio": ratio, "target": t.minimum, "pass": ratio >= t.minimum,
                         **({"calls_per_s": rates[t.name][0]} if rates[t.name][1] == "calls" else {})})
        result: dict[str, Any] = {
            "started_at": started.isoformat(timespec="seconds"),
            "sections": list(sections),
            "seconds": seconds,
            "pgbench": {"clients": CLIENTS, "threads": THREADS, "mode": "prepared",
                        "path": None if pgbench is None else str(pgbench)},
            "python_threads": PYTHON_THREADS,
            "repeated_keys": REPEATED_KEYS,
            "batch": {"items": BATCH_ITEMS, "reps": batch_reps, "stream_items": STREAM_ITEMS,
                      "stream_chunk": STREAM_CHUNK, "stream_reps": stream_reps},
            "machine": {**machine, "loadavg_before": load_before, "loadavg_after": load_after},
            "source": source,
            "phases": {**{k: asdict(v) for k, v in phases.items()}, **{k: asdict(v) for k, v in batch_phases.items()}},
            "rows": rows,
            "all_pass": all(r["pass"] for r in rows),
        }
        if keep:
            result["kept"] = {"home": str(home), "app_urls": app, "admin_urls": stores.admin_urls()}
        return result
    finally:
        if stores is not None and not keep:
            stores.destroy()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def _call_phases(admin: psycopg.Connection[Any], app: dict[str, str], env: str, datadir: str, pgbench: Path,
                 scripts: Path, seconds: int, say: Callable[[str], None]) -> dict[str, PhaseResult]:
    """The single-call phases: pgbench scripts and the Python client, ``seconds`` each."""
    phases: dict[str, PhaseResult] = {}
    admin.execute(BASELINE_DDL)
    with psycopg.connect(app[RUN_OPS], autocommit=True) as ro:
        ro.execute("SELECT count(t.*) FROM generate_series(1, %s) AS g, "
                   "LATERAL runops.trigger_run(%s, %s, %s::jsonb, "
                   "jsonb_build_object('idempotency_key', 'r' || g)) AS t",
                   (REPEATED_KEYS, env, TASK, json.dumps(PAYLOAD)))
    admin.execute("VACUUM ANALYZE runops.runs")
    admin.execute("VACUUM ANALYZE bench.bench_baseline")

    def measured(name: str, tool: str, work: Callable[[], Work],
                 client_cpu: Callable[[], float]) -> PhaseResult:
        admin.execute("CHECKPOINT")
        runs0 = int(_scalar(admin, "SELECT count(*) FROM runops.runs"))
        wal0 = _wal_lsn(admin)
        cpu0, client0, t0 = server_cpu_seconds(datadir), client_cpu(), time.perf_counter()
        w = work()
        elapsed = time.perf_counter() - t0
        client1 = client_cpu()
        wal1 = _wal_lsn(admin)
        _wait_for_backends_to_exit(admin)
        cpu1 = server_cpu_seconds(datadir)
        runs1 = int(_scalar(admin, "SELECT count(*) FROM runops.runs"))
        per_call = 1e6 / w.all_calls if w.all_calls else None
        return PhaseResult(
            name, tool, w.calls_per_s, w.calls, w.failed, w.latency_ms,
            (wal1 - wal0) / w.all_calls if w.all_calls else None,
            None if cpu0 is None or cpu1 is None or per_call is None else (cpu1 - cpu0) * per_call,
            None if per_call is None else (client1 - client0) * per_call,
            runs1 - runs0, elapsed)

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def pg_phase(name: str, script: str) -> PhaseResult:
        say(f"{name}: pgbench -n -M prepared -c {CLIENTS} -j {THREADS} -T {seconds} -f {script}")
        return measured(name, "pgbench", lambda: run_pgbench(
            pgbench, app[RUN_OPS], scripts / script, seconds, {"env": env, "keys": str(REPEATED_KEYS)}),
            children_cpu)

    def py_phase(name: str) -> PhaseResult:
        say(f"{name}: {PYTHON_THREADS} threads calling RunOps.trigger_run for {seconds} s")
        # The warm-up second creates runs too: runs_created counts them, and the CPU and WAL
        # figures are divided by every call made.
        return measured(name, "python", lambda: run_python_client(
            app[CONTROL_PLANE], app[RUN_OPS], env, seconds), time.process_time)

    first = pg_phase("baseline_first", "baseline.sql")
    phases["trigger_no_key"] = pg_phase("trigger_no_key", "trigger_no_key.sql")
    phases["python_client"] = py_phase("python_client")
    phases["trigger_new_key"] = pg_phase("trigger_new_key", "trigger_new_key.sql")
    phases["trigger_repeated_key"] = pg_phase("trigger_repeated_key", "trigger_repeated_key.sql")
    last = pg_phase("baseline_last", "baseline.sql")
    held = int(_scalar(admin, "SELECT count(*) FROM runops.runs WHERE idempotency_key LIKE 'r%%'"))
    if held != REPEATED_KEYS:
        raise BenchError(f"the repeated-key phase created runs: {held} runs hold r-keys, expected {REPEATED_KEYS}")
    phases["baseline"] = PhaseResult(
        "baseline", "pgbench", (first.calls_per_s + last.calls_per_s) / 2, first.calls + last.calls,
        first.failed + last.failed, _mean(first.latency_ms, last.latency_ms),
        _mean(first.wal_bytes_per_call, last.wal_bytes_per_call),
        _mean(first.server_cpu_us_per_call, last.server_cpu_us_per_call),
        _mean(first.client_cpu_us_per_call, last.client_cpu_us_per_call),
        None, first.seconds + last.seconds)
    phases["baseline_first"], phases["baseline_last"] = first, last
    return phases


def _us(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def print_results(result: dict[str, Any]) -> None:
    """The table: each rate (calls or rows per second), its ratio and target, and the CPU each
    call or row cost (server: every process of the run-ops cluster; client: pgbench or the
    Python process)."""
    ph = result["phases"]
    rows: list[tuple[str, ...]] = []
    for base_name, unit in (("baseline", "calls"), ("batch_baseline", "rows")):
        base = ph.get(base_name)
        if base is None:
            continue
        rate = base["calls_per_s"] if unit == "calls" else base["rows_per_s"]
        suffix, digits = ("call", 0) if unit == "calls" else ("row", 1)
        rows.append((base_name, f"{rate:.0f}", unit, "1.00", "-", "-", _us(base[f"server_cpu_us_per_{suffix}"], digits),
                     _us(base[f"client_cpu_us_per_{suffix}"], digits)))
        for r in result["rows"]:
            if r.get("unit", "calls") != unit:
                continue
            p = ph[r["name"]]
            rows.append((r["name"], f"{r.get('rate', r.get('calls_per_s')):.0f}", unit,
                         f"{r['ratio']:.2f} x {r['against']}", f">= {r['target']:.2f}", "pass" if r["pass"] else "FAIL",
                         _us(p[f"server_cpu_us_per_{suffix}"], digits), _us(p[f"client_cpu_us_per_{suffix}"], digits)))
    settings = result["machine"]["settings"]
    title = f"runops bench: fsync={settings['fsync']}, synchronous_commit={settings['synchronous_commit']}"
    if "baseline" in ph:
        title += f"; calls: {result['seconds']} s per phase, pgbench -c {CLIENTS} -j {THREADS} -M prepared"
    if "batch_baseline" in ph:
        b = result["batch"]
        title += f"; rows: median of {b['reps']} (stream {b['stream_reps']}) repetitions, one connection"
    table(rows, ["name", "per s", "unit", "ratio", "target", "result", "server us/unit", "client us/unit"],
          title=title)
    load = result["machine"]
    if "baseline" in ph:
        click.echo(f"baseline = mean of first ({ph['baseline_first']['calls_per_s']:.0f}/s) and last "
                   f"({ph['baseline_last']['calls_per_s']:.0f}/s) phase")
    if "batch_baseline" in ph:
        b = result["batch"]
        click.echo(f"batch_baseline = median of {len(ph['batch_baseline']['reps_rows_per_s'])} INSERT ... SELECT "
                   f"of {b['items']} rows; batch_trigger: {b['items']} items; stream_batch: {b['stream_items']} "
                   f"items in chunks of {b['stream_chunk']}")
        click.echo("rows/s of the repetitions (min-max): " + ", ".join(
            f"{name} {_range(ph[name]['reps_rows_per_s'])}"
            for name in ("batch_baseline", "batch_trigger_no_key", "batch_trigger_keys", "stream_batch")
            if name in ph))
        click.echo("WAL per row: " + ", ".join(
            f"{name} {_us(ph[name]['wal_bytes_per_row'])} B"
            for name in ("batch_baseline", "batch_trigger_no_key", "batch_trigger_keys", "stream_batch")
            if name in ph))
    click.echo(f"load average {load['loadavg_before'][0]:.2f} before, {load['loadavg_after'][0]:.2f} after")
    src = result.get("source", {})
    if src:
        click.echo(f"measured SQL: commit {src.get('git_head', '?')}"
                   f"{' + uncommitted sql/ or migrations/ changes' if src.get('sql_uncommitted_changes') else ''}, "
                   f"installed functions md5 {str(src.get('functions_md5'))[:12]}")


def default_results_dir() -> Path:
    return HERE / "results"


def main(seconds: int = 10, *, keep: bool = False, results_dir: Path | None = None,
         sections: tuple[str, ...] = SECTIONS, batch_reps: int = BATCH_REPS, stream_reps: int = STREAM_REPS) -> int:
    """Runs the benchmark, prints the table, writes JSON to bench/results/. Exit code 0 when
    every target is met, 4 when one is missed, 1 when the benchmark could not run."""
    try:
        result = run_bench(seconds, keep=keep, progress=lambda m: click.echo(m, err=True), sections=sections,
                           batch_reps=batch_reps, stream_reps=stream_reps)
    except (RunOpsError, psycopg.Error, OSError, subprocess.SubprocessError) as err:
        click.echo(f"error: {err}", err=True)
        return 1
    print_results(result)
    out_dir = results_dir or default_results_dir()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"bench-{result['started_at'].replace(':', '').replace('+0000', 'Z')}.json"
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        click.echo(f"results: {path}")
    if keep:
        click.echo(f"clusters kept in {result['kept']['home']}: {result['kept']['app_urls']}")
    return 0 if result["all_pass"] else EXIT_TARGET_MISSED


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
