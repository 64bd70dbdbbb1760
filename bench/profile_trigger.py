"""Where a ``runops.trigger_run`` call's time goes: ``python bench/profile_trigger.py [--calls N]``.

Brings up two throwaway clusters (fsync and synchronous_commit on, migrated, wired and split, a
ksuid organization's PRODUCTION environment: exactly what ``runops bench`` measures), then, for
each of the three trigger paths — ``no_key``, ``new_key`` (a key no run holds) and ``cached`` (a
key one of 1,000 prefilled runs holds) — makes ``N`` sequential calls, one transaction each, on
one connection as ``runops_app`` over TCP, prepared like ``pgbench -M prepared``, and attributes
their time with what PostgreSQL offers:

a. **timing**: client wall µs per call, and the backend's CPU µs per call (``/proc/<pid>/schedstat``
   of the connection's backend), with nothing switched on;
b. **functions**: ``track_functions = 'all'`` (ALTER SYSTEM on the throwaway cluster) and
   ``pg_stat_user_functions``: calls, self and total µs per trigger for every ``runops`` function,
   as a share of the wall time per call measured in the same pass; the rest is the outer
   statement, the protocol and the commit;
c. **plprofiler** (when the extension is installed for the server's version; a note otherwise):
   per-function self/total time from its call graph and the costliest PL/pgSQL lines, as superuser
   (the extension's functions are not granted to ``runops_app``; ``trigger_run`` is ``SECURITY
   DEFINER``, so the body runs as its owner either way);
d. **table vs PL/pgSQL**: a plain ``INSERT`` of the same ``runops.runs`` row (pre-minted id, same
   columns; ``runops_app`` is granted INSERT, and EXECUTE on the CHECK's
   ``is_run_status``, on the throwaway cluster) and of the SPEC's
   ``bench_baseline`` row, timed like (a), plus ``EXPLAIN (ANALYZE, BUFFERS, WAL)`` of the runs
   INSERT and of the no-key ``trigger_run`` call;
e. **perf** (when ``perf record`` works here; skipped silently otherwise): the backend's hottest
   symbols during the no-key and new-key calls.

The clusters are destroyed at the end (``--keep`` leaves them running). The JSON goes to
bench/results/. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up, _make_environment, baseline_ddl

from runops.client import RUN_OPS
from runops.ops.local_cluster import LocalStores

HERE = Path(__file__).resolve().parent
TASK = "bench-task"
PAYLOAD = '{"n": 1}'
CACHED_KEYS = 1000
MODES = ("no_key", "new_key", "cached")
TRIGGER = "SELECT * FROM runops.trigger_run(%s, %s, %s::jsonb, %s::jsonb)"
# The row trigger_run inserts for a no-key root trigger (create_run), spelled out as plain SQL.
RUNS_INSERT = """INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
  payload, metadata, tags, queue, max_attempts, resume_parent_on_completion, depth, queued_at, created_at, updated_at)
VALUES (%s, %s, %s, %s, 'bench-task', 'PENDING', '{"n": 1}', '{}', '{}', 'task/bench-task', 3, false, 0,
        now(), now(), now())"""
BASELINE_INSERT = """INSERT INTO bench.bench_baseline
  (id, friendly_id, environment_id, task_identifier, status, idempotency_key, payload)
VALUES (%s, 'run_' || %s, %s, 'bench-task', 'PENDING', %s, '{"n": 1}')"""


def options(mode: str) -> str:
    if mode == "no_key":
        return "{}"
    if mode == "new_key":
        return json.dumps({"idempotency_key": "p" + secrets.token_hex(12)})
    return json.dumps({"idempotency_key": f"r{secrets.randbelow(CACHED_KEYS) + 1}"})


def backend_cpu_s(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Timing:
    name: str
    calls: int
    wall_us: float              # client wall time per call
    backend_cpu_us: float | None


def timed_calls(url: str, name: str, calls: int, one: Callable[[psycopg.Connection[Any], int], None],
                before: Callable[[psycopg.Connection[Any]], None] = lambda _c: None) -> Timing:
    """``calls`` autocommit calls of ``one`` on one fresh connection, after 20 warm-up calls (the
    statement is prepared and PL/pgSQL's plans cached, as in a pgbench session)."""
    with psycopg.connect(url, autocommit=True) as conn:
        before(conn)
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        for i in range(20):
            one(conn, -1 - i)
        cpu0, t0 = backend_cpu_s(pid), time.perf_counter()
        for i in range(calls):
            one(conn, i)
        wall = time.perf_counter() - t0
        cpu1 = backend_cpu_s(pid)
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / calls * 1e6
    return Timing(name, calls, wall / calls * 1e6, cpu)


def trigger_call(env: str, mode: str) -> Callable[[psycopg.Connection[Any], int], None]:
    def one(conn: psycopg.Connection[Any], _i: int) -> None:
        row = conn.execute(TRIGGER, (env, TASK, PAYLOAD, options(mode)), prepare=True).fetchone()
        if row is None or bool(row[1]) != (mode == "cached"):
            raise SystemExit(f"trigger_run ({mode}) returned {row!r}")
    return one


@dataclass(frozen=True)
class FunctionRow:
    function: str
    calls_per_trigger: float
    self_us: float
    total_us: float
    share_of_trigger: float     # self / trigger_run's total time


def function_stats(admin: psycopg.Connection[Any], app_url: str, env: str, mode: str, calls: int
                   ) -> tuple[Timing, list[FunctionRow]]:
    """One pass with track_functions = 'all': pg_stat_user_functions per trigger."""

    # The warm-up calls of timed_calls count too; reset after them, from the admin side, once the
    # app backend has flushed (it flushes at most once a second while busy, and when it exits).
    with psycopg.connect(app_url, autocommit=True) as conn:
        one = trigger_call(env, mode)
        for i in range(20):
            one(conn, -1 - i)
        time.sleep(1.1)
        conn.execute("SELECT 1")  # flushes the warm-up's counters (more than 1 s since the last flush)
        admin.execute("SELECT pg_stat_reset()")
        t0 = time.perf_counter()
        for i in range(calls):
            one(conn, i)
        wall = time.perf_counter() - t0
    _wait_backends_gone(admin)
    admin.execute("SELECT pg_stat_clear_snapshot()")
    rows = admin.execute(
        "SELECT funcname, calls, self_time, total_time FROM pg_stat_user_functions WHERE schemaname = 'runops' "
        "ORDER BY self_time DESC").fetchall()
    wall_us = wall / calls * 1e6
    trigger_total = next((float(t) for name, _n, _s, t in rows if name == "trigger_run"), 0.0) * 1000 / calls
    out = [FunctionRow(str(name), n / calls, float(s) * 1000 / calls, float(t) * 1000 / calls,
                       float(s) * 1000 / calls / trigger_total if trigger_total else 0.0) for name, n, s, t in rows]
    return Timing(f"{mode} (track_functions)", calls, wall_us, None), out


def _wait_backends_gone(admin: psycopg.Connection[Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND usename = 'runops_app' AND datname = current_database()").fetchone()
        if row is not None and row[0] == 0:
            break
        time.sleep(0.05)
    time.sleep(0.2)


def plprofiler_available(admin: psycopg.Connection[Any]) -> bool:
    return admin.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plprofiler'").fetchone() is not None


def _bare(function: str) -> str:
    """``runops.create_run(...) oid=123`` -> ``create_run``."""
    return re.sub(r"\(.*$", "", function).removeprefix("runops.")


def plprofiler_pass(admin_url: str, env: str, mode: str, calls: int) -> dict[str, Any]:
    """plprofiler's call graph (self/total per function) and line statistics for ``calls`` triggers
    on one superuser connection (LOAD in the session; local data only)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS plprofiler")
        conn.execute("LOAD 'plprofiler'")
        # On before the first call: a function first run with the profiler off is never profiled in
        # that session. The warm-up's figures are then reset.
        conn.execute("SELECT pl_profiler_set_enabled_local(true)")
        one = trigger_call(env, mode)
        for i in range(20):
            one(conn, -1 - i)
        conn.execute("SELECT pl_profiler_reset_local()")
        t0 = time.perf_counter()
        for i in range(calls):
            one(conn, i)
        wall = time.perf_counter() - t0
        conn.execute("SELECT pl_profiler_set_enabled_local(false)")
        graph = conn.execute(
            "SELECT pl_profiler_get_stack(stack), call_count, us_total, us_self FROM pl_profiler_callgraph_local()"
        ).fetchall()
        lines = conn.execute(
            "SELECT l.func_oid::regprocedure::text, l.line_number, l.exec_count, l.total_time, s.source "
            "FROM pl_profiler_linestats_local() AS l "
            "LEFT JOIN pl_profiler_funcs_source(pl_profiler_func_oids_local()) AS s "
            "  ON s.func_oid = l.func_oid AND s.line_number = l.line_number "
            "WHERE l.line_number > 0 AND l.exec_count > 0 ORDER BY l.total_time DESC LIMIT 30").fetchall()
    per_fn: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0.0, "self": 0.0, "total": 0.0})
    for stack, n, total, self_us in graph:
        name = _bare(str(stack[-1]))
        f = per_fn[name]
        f["calls"] += n
        f["self"] += self_us
        if name not in {_bare(str(s)) for s in stack[:-1]}:  # not recursive
            f["total"] += total
    functions: list[dict[str, Any]] = sorted(
        ({"function": k, "calls_per_trigger": v["calls"] / calls, "self_us": v["self"] / calls,
          "total_us": v["total"] / calls} for k, v in per_fn.items()), key=lambda r: -float(r["self_us"]))
    return {"wall_us": wall / calls * 1e6, "functions": functions,
            "lines": [{"function": _bare(fn), "line": ln, "execs_per_trigger": n / calls,
                       "total_us": t / calls, "source": (src or "").strip()} for fn, ln, n, t, src in lines]}


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", f"{tmp}/p.data", "--", "true"],
                             capture_output=True, text=True, check=False, timeout=30)
        return out.returncode == 0


def perf_pass(app_url: str, env: str, mode: str, calls: int, top: int = 15) -> dict[str, Any]:
    """The backend's hottest symbols (cpu-clock samples, self) while it makes ``calls`` triggers,
    and its samples per binary (postgres, plpgsql.so, the kernel: the network and the WAL flush)."""
    with psycopg.connect(app_url, autocommit=True) as conn, tempfile.TemporaryDirectory() as tmp:
        one = trigger_call(env, mode)
        for i in range(20):
            one(conn, -1 - i)
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        data = f"{tmp}/perf.data"
        rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4999", "-p", str(pid), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        for i in range(calls):
            one(conn, i)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
        report = ["perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "0.5"]
        syms = subprocess.run([*report, "--sort", "dso,symbol"], capture_output=True, text=True, check=False,
                              timeout=120)
        dsos = subprocess.run([*report, "--sort", "dso"], capture_output=True, text=True, check=False, timeout=120)
    symbols = []
    for line in syms.stdout.splitlines():
        m = re.match(r"^\s+([0-9.]+)%\s+(\S+)\s+\[.\]\s+(.+?)(\s+-)*\s*$", line)
        if m:
            symbols.append({"percent": float(m.group(1)), "dso": m.group(2), "symbol": m.group(3)})
    by_dso = {}
    for line in dsos.stdout.splitlines():
        m = re.match(r"^\s+([0-9.]+)%\s+(\S+)", line)
        if m:
            by_dso[m.group(2)] = float(m.group(1))
    return {"symbols": symbols[:top], "dsos": by_dso}


def explain(admin: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS, WAL) of one statement, rolled back."""
    with admin.transaction(force_rollback=True):
        return [str(r[0]) for r in admin.execute(f"EXPLAIN (ANALYZE, BUFFERS, WAL) {sql}", params).fetchall()]


def run(calls: int, keep: bool, say: Callable[[str], None]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="runops-prof-"))
    home.chmod(0o755)
    stores: LocalStores | None = None
    started = dt.datetime.now(dt.UTC)
    try:
        say("starting two local clusters (fsync on)")
        stores = _bring_up(home)
        app = stores.app_urls()
        app_url, admin_url = app[RUN_OPS], stores.admin_urls()[RUN_OPS]
        env = _make_environment(app)
        result: dict[str, Any] = {"started_at": started.isoformat(timespec="seconds"), "calls": calls,
                                  "environment": env}
        with psycopg.connect(admin_url, autocommit=True) as admin:
            result["server_version"] = admin.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            admin.execute(baseline_ddl("bench_baseline"))
            # Throwaway cluster: runops_app may insert the plain row (its CHECK calls is_run_status).
            admin.execute("GRANT INSERT ON runops.runs TO runops_app")
            admin.execute("GRANT EXECUTE ON FUNCTION runops.is_run_status(text) TO runops_app")
            with psycopg.connect(app_url, autocommit=True) as conn:
                conn.execute("SELECT count(t.*) FROM generate_series(1, %s) AS g, LATERAL runops.trigger_run("
                             "%s, %s, %s::jsonb, jsonb_build_object('idempotency_key', 'r' || g)) AS t",
                             (CACHED_KEYS, env, TASK, PAYLOAD))
            template = admin.execute("SELECT project_id, organization_id FROM runops.runs WHERE environment_id = %s "
                                     "LIMIT 1", (env,)).fetchone()
            assert template is not None
            project_id, org_id = str(template[0]), str(template[1])
            admin.execute("VACUUM ANALYZE runops.runs")
            admin.execute("VACUUM ANALYZE bench.bench_baseline")

            # (a) timing, nothing switched on; then the plain INSERTs of (d), timed alike.
            timings: list[Timing] = []
            for mode in MODES:
                say(f"timing: {calls} trigger_run calls, {mode}")
                timings.append(timed_calls(app_url, f"trigger_run {mode}", calls, trigger_call(env, mode)))
            with admin.transaction():
                admin.execute("SET LOCAL search_path = runops, pg_catalog")  # mint_ids runs in its caller's
                ids = [str(r[0]) for r in admin.execute("SELECT unnest(mint_ids(%s))", (calls + 40,)).fetchall()]

            def runs_insert(conn: psycopg.Connection[Any], i: int) -> None:
                conn.execute(RUNS_INSERT, (ids[i + 20], env, project_id, org_id), prepare=True)

            def baseline_insert(conn: psycopg.Connection[Any], _i: int) -> None:
                b = secrets.token_hex(9)
                conn.execute(BASELINE_INSERT, (b, b, env, "k" + b), prepare=True)

            say(f"timing: {calls} plain INSERTs into runops.runs and bench.bench_baseline")
            timings.append(timed_calls(app_url, "INSERT runops.runs (plain SQL)", calls, runs_insert))
            timings.append(timed_calls(app_url, "INSERT bench_baseline (SPEC §7)", calls, baseline_insert))
            result["timings"] = [asdict(t) for t in timings]

            # (b) track_functions
            admin.execute("ALTER SYSTEM SET track_functions = 'all'")
            admin.execute("SELECT pg_reload_conf()")
            time.sleep(0.3)
            result["functions"] = {}
            for mode in MODES:
                say(f"track_functions: {calls} trigger_run calls, {mode}")
                t, rows = function_stats(admin, app_url, env, mode, calls)
                result["functions"][mode] = {"wall_us": t.wall_us, "rows": [asdict(r) for r in rows]}
            admin.execute("ALTER SYSTEM RESET track_functions")
            admin.execute("SELECT pg_reload_conf()")

            # (c) plprofiler
            if plprofiler_available(admin):
                result["plprofiler"] = {}
                for mode in MODES:
                    say(f"plprofiler: {calls} trigger_run calls, {mode}")
                    result["plprofiler"][mode] = plprofiler_pass(admin_url, env, mode, calls)
            else:
                result["plprofiler"] = None

            # (d) EXPLAIN ANALYZE: the table against the function
            result["explain"] = {
                "INSERT runops.runs": explain(admin, RUNS_INSERT, (ids[-1], env, project_id, org_id)),
                "trigger_run no_key": explain(admin, TRIGGER, (env, TASK, PAYLOAD, "{}")),
            }

            # (e) perf
            result["perf"] = None
            if perf_works():
                result["perf"] = {}
                for mode in ("no_key", "new_key"):
                    say(f"perf: {calls} trigger_run calls, {mode}")
                    result["perf"][mode] = perf_pass(app_url, env, mode, calls)
            result["loadavg"] = os.getloadavg()
        if keep:
            result["kept"] = {"home": str(home), "admin_urls": stores.admin_urls(), "app_urls": app}
        return result
    finally:
        if stores is not None and not keep:
            stores.destroy()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...], left: tuple[int, ...] = (0,)) -> None:
    """A plain-text table; columns in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        print("  " + "  ".join(cells).rstrip())


def print_result(res: dict[str, Any]) -> None:
    n = res["calls"]
    print(f"\nprofile_trigger: PostgreSQL {res['server_version']}, {n} sequential calls per pass, one transaction "
          "each, one connection, runops_app over TCP, prepared\n")
    print("(a)+(d) timing, nothing switched on: client wall and backend CPU per call")
    base = next(t for t in res["timings"] if t["name"].startswith("INSERT bench_baseline"))
    def cpu(t: dict[str, Any], of: float | None = None) -> str:
        v = t["backend_cpu_us"]
        return "-" if v is None else f"{v:.0f}" if of is None else f"{v / of:.2f}" if of else "-"

    _table([(t["name"], f"{t['wall_us']:.0f}", cpu(t), f"{t['wall_us'] / base['wall_us']:.2f}",
             cpu(t, base["backend_cpu_us"] or 0.0)) for t in res["timings"]],
           ("call", "wall us", "backend CPU us", "x baseline wall", "x baseline CPU"))
    for mode in MODES:
        f = res["functions"][mode]
        wall = f["wall_us"]
        print(f"\n(b) track_functions = 'all', trigger_run {mode}: per trigger; % of trigger_run's total time")
        rows = [r for r in f["rows"] if r["calls_per_trigger"] > 0]
        top = next((r for r in rows if r["function"] == "trigger_run"), None)
        shown = [(r["function"], f"{r['calls_per_trigger']:.2f}", f"{r['self_us']:.1f}", f"{r['total_us']:.1f}",
                  f"{100 * r['share_of_trigger']:.1f}") for r in rows if r["self_us"] >= 0.5]
        rest = [r for r in rows if r["self_us"] < 0.5]
        if rest:
            shown.append((f"({len(rest)} more, < 0.5 us each)", "", f"{sum(r['self_us'] for r in rest):.1f}", "",
                          f"{100 * sum(r['share_of_trigger'] for r in rest):.1f}"))
        _table(shown, ("function", "calls", "self us", "total us", "% of trigger"))
        if top is not None:
            print(f"  wall per call {wall:.0f} us: inside trigger_run {top['total_us']:.0f} us "
                  f"({100 * top['total_us'] / wall:.0f} %), outside it {wall - top['total_us']:.0f} us (the outer "
                  "statement, protocol, commit and its WAL flush, waiting for a core)")
    prof = res.get("plprofiler")
    if prof is None:
        print("\n(c) plprofiler: not installed for this server (the Debian package is postgresql-<major>-plprofiler); "
              "skipped")
    else:
        for mode in MODES:
            p = prof[mode]
            print(f"\n(c) plprofiler, trigger_run {mode} (superuser session, {p['wall_us']:.0f} us wall per call "
                  "with the profiler on): functions")
            top_total = next((r["total_us"] for r in p["functions"] if r["function"] == "trigger_run"), 0.0)
            _table([(r["function"], f"{r['calls_per_trigger']:.2f}", f"{r['self_us']:.1f}", f"{r['total_us']:.1f}",
                     f"{100 * r['self_us'] / top_total:.1f}" if top_total else "-")
                    for r in p["functions"] if r["self_us"] >= 0.5],
                   ("function", "calls", "self us", "total us", "% of trigger"))
            print("  costliest statements (us per trigger, nested calls included; block lines left out)")
            _table([(f"{r['function']}:{r['line']}", f"{r['execs_per_trigger']:.2f}", f"{r['total_us']:.1f}",
                     " ".join(r["source"].split())[:90]) for r in p["lines"]
                    if r["source"] not in ("BEGIN", "LOOP", "END", "END LOOP", "")][:10],
                   ("line", "execs", "us", "source"), left=(0, 3))
    print("\n(d) EXPLAIN (ANALYZE, BUFFERS, WAL), rolled back")
    for name, lines in res["explain"].items():
        print(f"  {name}:")
        for line in lines:
            print(f"    {line}")
    if res.get("perf"):
        for mode, p in res["perf"].items():
            print(f"\n(e) perf, backend cpu-clock samples, trigger_run {mode}: by binary "
                  + ", ".join(f"{d} {v:.0f}%" for d, v in p["dsos"].items()) + "; hottest symbols (self)")
            _table([(f"{r['percent']:.1f}", r["dso"], r["symbol"][:70]) for r in p["symbols"]],
                   ("%", "dso", "symbol"), left=(1, 2))
    print(f"\nload average {res['loadavg'][0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="Calls per pass and path (default 2000).")
    parser.add_argument("--keep", action="store_true", help="Leave the clusters running.")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    try:
        res = run(args.calls, args.keep, lambda m: print(m, file=sys.stderr, flush=True))
    except (psycopg.Error, OSError, subprocess.SubprocessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_result(res)
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-trigger-{res['started_at'].replace(':', '').replace('+00:00', 'Z')}.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"results: {path}")
    if args.keep:
        print(f"clusters kept in {res['kept']['home']}: {res['kept']['admin_urls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
