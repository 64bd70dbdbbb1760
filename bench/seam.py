"""Seam benchmarks (issue 7): ``python bench/seam.py [--seconds N] [--runs 10000,1000000]``.

On two throwaway clusters (fsync and synchronous_commit on, as ``runops bench``), one run:

* ``keyed trigger`` on the run-ops store with the cross-store guarantee (a claim in the ledger)
  against the same call with it off. *Off* = the run-ops store's FDW server renamed for the phase,
  so ``claims_required()`` is false and ``find_or_create_run`` claims nothing (exactly the single-store
  path); phases interleaved on / off / on / off, median of each. The same pair on the control
  plane (the claim crosses the FDW there).
* ``get_run`` of a LEGACY run asked on the run-ops store (read through the FDW) against the direct
  read on the control plane (pgbench, 4 clients); the Python client's routed ``get_run`` against
  a direct prepared ``get_run`` point read on one connection (one thread each, interleaved).
* a 50-row ``list_runs`` page merged across both stores against a one-store page
  (``list_store_runs``), first page and a page 5,000 rows deep, with 10k and 1M runs stored
  (half in each store, created_at spread over a day);
* ``purge_runs`` of old final runs with their attempts: rate, and table and index sizes before,
  after the purge and after VACUUM.

Each line prints the rate, the ratio, and server CPU µs per call. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up, _make_environment, find_pgbench, run_pgbench, server_cpu_seconds

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE / "pgbench"


def script(name: str, text: str, tmp: Path) -> Path:
    path = tmp / f"{name}.sql"
    path.write_text(text)
    return path


def measure(pgbench: Path, url: str, path: Path, seconds: int, variables: dict[str, str], datadir: str
            ) -> tuple[float, float | None]:
    """(calls per second, server CPU µs per call) of one pgbench phase."""
    before = server_cpu_seconds(datadir)
    work = run_pgbench(pgbench, url, path, seconds, variables)
    after = server_cpu_seconds(datadir)
    cpu = None if before is None or after is None or not work.all_calls else (after - before) / work.all_calls * 1e6
    return work.calls_per_s, cpu


def set_claims(admin_url: str, on: bool) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if on:
            conn.execute("ALTER SERVER runops_peer_off RENAME TO runops_peer")
        else:
            conn.execute("ALTER SERVER runops_peer RENAME TO runops_peer_off")


def keyed_triggers(pgbench: Path, stores: Any, app: dict[str, str], env_new: str, env_legacy: str, seconds: int,
                   rounds: int) -> list[dict[str, Any]]:
    results = []
    text = (SCRIPTS / "trigger_new_key.sql").read_text()
    for store, env in ((RUN_OPS, env_new), (CONTROL_PLANE, env_legacy)):
        admin = stores.admin_urls()[store]
        datadir = stores.clusters[store].datadir
        rates: dict[bool, list[float]] = {True: [], False: []}
        cpus: dict[bool, list[float]] = {True: [], False: []}
        with tempfile.TemporaryDirectory() as tmp:
            path = script("trigger_new_key", text, Path(tmp))
            for _ in range(rounds):
                for on in (True, False):
                    if not on:
                        set_claims(admin, False)
                    try:
                        rate, cpu = measure(pgbench, app[store], path, seconds, {"env": env}, datadir)
                    finally:
                        if not on:
                            set_claims(admin, True)
                    rates[on].append(rate)
                    if cpu is not None:
                        cpus[on].append(cpu)
        on_rate, off_rate = statistics.median(rates[True]), statistics.median(rates[False])
        results.append({"workload": f"keyed trigger, new key ({store})", "rate": on_rate,
                        "cpu_us": statistics.median(cpus[True]) if cpus[True] else None,
                        "against": f"claims off {off_rate:.0f}/s", "ratio": on_rate / off_rate,
                        "target": ">= 0.85" if store == RUN_OPS else "(no target: the claim crosses the FDW)"})
    return results


def point_reads(pgbench: Path, stores: Any, app: dict[str, str], env_legacy: str, seconds: int,
                rounds: int) -> list[dict[str, Any]]:
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        run_id = client.trigger_run(env_legacy, "bench-read", {"n": 1}).run_id
    read = "SELECT * FROM runops.get_run(:run);\n"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = script("get_run", read, Path(tmp))
        via: dict[str, list[float]] = {CONTROL_PLANE: [], RUN_OPS: []}
        cpu: dict[str, list[float]] = {CONTROL_PLANE: [], RUN_OPS: []}
        for _ in range(rounds):
            for store in (CONTROL_PLANE, RUN_OPS):
                # CPU of both servers: an FDW read costs on each side.
                before = [server_cpu_seconds(c.datadir) for c in stores.clusters.values()]
                work = run_pgbench(pgbench, app[store], path, seconds, {"run": run_id})
                after = [server_cpu_seconds(c.datadir) for c in stores.clusters.values()]
                via[store].append(work.calls_per_s)
                spent = [a - b for a, b in zip(after, before, strict=True) if a is not None and b is not None]
                if len(spent) == len(before):
                    cpu[store].append(sum(spent) / work.all_calls * 1e6)
    direct, fdw = statistics.median(via[CONTROL_PLANE]), statistics.median(via[RUN_OPS])
    results.append({"workload": "get_run of a LEGACY run, asked on run-ops (FDW)", "rate": fdw,
                    "cpu_us": statistics.median(cpu[RUN_OPS]) if cpu[RUN_OPS] else None,
                    "against": f"direct on the control plane {direct:.0f}/s", "ratio": direct / fdw,
                    "target": "<= 3 (slowdown)"})

    # The client's routed read against a direct prepared point read, one thread each.
    def loop(call: Any, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            call()
        return n / (time.perf_counter() - start)

    client_rates, direct_rates = [], []
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=1) as client, \
            psycopg.connect(app[CONTROL_PLANE], autocommit=True) as conn:
        n = max(500, seconds * 300)
        for _ in range(rounds):
            client_rates.append(loop(lambda: client.get_run(run_id), n))
            direct_rates.append(loop(lambda: conn.execute("SELECT * FROM runops.get_run(%s)", [run_id],
                                                          prepare=True).fetchall(), n))
    c, d = statistics.median(client_rates), statistics.median(direct_rates)
    results.append({"workload": "client get_run (routed, 1 thread)", "rate": c, "cpu_us": None,
                    "against": f"direct prepared get_run {d:.0f}/s", "ratio": c / d, "target": ">= 0.9"})
    return results


def fill_runs(stores: Any, env: str, project: str, org: str, total: int) -> None:
    """Half of ``total`` runs in each store, created_at spread over the last day (superuser
    INSERT: the benchmark measures reading, not triggering)."""
    admin = stores.admin_urls()
    for store in (CONTROL_PLANE, RUN_OPS):
        mint = "runops.generate_cuid()" if store == CONTROL_PLANE else "runops.generate_ksuid()"
        with psycopg.connect(admin[store], autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            done = 0
            while done < total // 2:
                n = min(100_000, total // 2 - done)
                conn.execute(f"""
                    INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                             payload, queue, created_at, updated_at)
                    SELECT {mint}, %s, %s, %s, 't', 'COMPLETED_SUCCESSFULLY', '{{}}', 'task/t',
                           now() - random() * interval '1 day', now()
                    FROM generate_series(1, %s)""", [env, project, org, n])
                done += n
            conn.execute("VACUUM ANALYZE runops.runs")


def listings(pgbench: Path, stores: Any, app: dict[str, str], sizes: list[int], seconds: int,
             rounds: int) -> list[dict[str, Any]]:
    results = []
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        org = client.create_organization(f"bench-list-{time.monotonic_ns()}", mint_kind="ksuid")
        project = client.create_project(org, "p")
        env = client.create_environment(project, "e", "PRODUCTION")
        client.wait_for_mirror()
    stored = 0
    for size in sizes:
        fill_runs(stores, env, project, org, size - stored)
        stored = size
        with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
            cursor = None
            for _ in range(100):  # 5,000 rows deep
                cursor = client.list_runs(env, 50, cursor).next_cursor
        for depth, c in (("first page", None), ("5,000 deep", cursor)):
            with tempfile.TemporaryDirectory() as tmp:
                cur = "NULL" if c is None else f"'{c}'"
                merged = script("merged", f"SELECT count(*) FROM runops.list_runs(:env, 50, {cur}, '{{}}');\n",
                                Path(tmp))
                single = script("single", f"SELECT count(*) FROM runops.list_store_runs(:env, 50, {cur}, '{{}}');\n",
                                Path(tmp))
                m_rates, s_rates = [], []
                for _ in range(rounds):
                    m_rates.append(run_pgbench(pgbench, app[RUN_OPS], merged, seconds, {"env": env}).calls_per_s)
                    s_rates.append(run_pgbench(pgbench, app[RUN_OPS], single, seconds, {"env": env}).calls_per_s)
            m, s = statistics.median(m_rates), statistics.median(s_rates)
            results.append({"workload": f"list_runs 50 rows, {depth}, {size:,} runs stored", "rate": m, "cpu_us": None,
                            "against": f"one-store page {s:.0f}/s", "ratio": s / m, "target": "<= 2 (slowdown)"})
    return results


def purge(stores: Any, app: dict[str, str], total: int) -> list[dict[str, Any]]:
    """``purge_runs`` on the run-ops store: ``total`` final runs aged 40 days, each with an
    attempt; the table and index sizes before, after the purge, and after VACUUM."""
    admin = stores.admin_urls()[RUN_OPS]
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        org = client.create_organization(f"bench-purge-{time.monotonic_ns()}", mint_kind="ksuid")
        project = client.create_project(org, "p")
        env = client.create_environment(project, "e", "PRODUCTION")
    size_sql = ("SELECT pg_table_size('runops.runs'), pg_indexes_size('runops.runs'), "
                "pg_total_relation_size('runops.attempts')")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("""
            INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                     payload, queue, created_at, updated_at)
            SELECT runops.generate_ksuid(), %s, %s, %s, 't', 'COMPLETED_SUCCESSFULLY', '{"n": 1}', 'task/t',
                   now() - interval '41 days', now() - interval '40 days'
            FROM generate_series(1, %s)""", [env, project, org, total])
        conn.execute("""
            INSERT INTO runops.attempts (id, run_id, environment_id, number, status, started_at, completed_at)
            SELECT runops.generate_ksuid(), r.id, r.environment_id, 1, 'COMPLETED', r.created_at, r.updated_at
            FROM runops.runs AS r WHERE r.environment_id = %s""", [env])
        conn.execute("VACUUM ANALYZE runops.runs, runops.attempts")
        before = conn.execute(size_sql).fetchone()
    with psycopg.connect(app[RUN_OPS], autocommit=True) as conn:
        start, calls, purged = time.perf_counter(), 0, 0
        while True:
            row = conn.execute("SELECT runops.purge_runs('30d', 10000)").fetchone()
            calls += 1
            if not row or row[0] == 0:
                break
            purged += row[0]
        seconds = time.perf_counter() - start
    with psycopg.connect(admin, autocommit=True) as conn:
        after = conn.execute(size_sql).fetchone()
        conn.execute("VACUUM runops.runs, runops.attempts")
        vacuumed = conn.execute(size_sql).fetchone()
    assert before and after and vacuumed

    def mb(row: Any) -> str:
        return f"runs {row[0] / 2**20:.0f} MB + indexes {row[1] / 2**20:.0f} MB, attempts {row[2] / 2**20:.0f} MB"

    print(f"purge: {purged:,} runs in {calls} calls of 10,000, {seconds:.1f} s ({purged / seconds:,.0f} runs/s)")
    print(f"  before: {mb(before)}\n  after purge: {mb(after)}\n  after VACUUM: {mb(vacuumed)}")
    return [{"workload": f"purge_runs of {purged:,} runs (10,000 per call)", "rate": purged / seconds, "cpu_us": None,
             "against": f"before {mb(before)}; after VACUUM {mb(vacuumed)}", "ratio": 1.0, "target": "(sizes)"}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", default="10000,1000000", help="Stored-run counts for the listing phases.")
    parser.add_argument("--purge", type=int, default=200_000, help="Runs purged in the retention phase (0: skip).")
    parser.add_argument("--only", choices=["purge", "keyed"], help="Run only the retention or the keyed phase.")
    args = parser.parse_args()
    pgbench = find_pgbench()
    with tempfile.TemporaryDirectory(prefix="runops-seam-bench-") as tmp:
        home = Path(tmp)
        home.chmod(0o755)
        stores = _bring_up(home)
        try:
            app = stores.app_urls()
            env_new = _make_environment(app)
            with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
                org = client.create_organization(f"bench-legacy-{time.monotonic_ns()}", mint_kind="cuid")
                env_legacy = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
                client.wait_for_mirror()
            results: list[dict[str, Any]] = []
            if args.only is None:
                results += keyed_triggers(pgbench, stores, app, env_new, env_legacy, args.seconds, args.rounds)
                results += point_reads(pgbench, stores, app, env_legacy, args.seconds, args.rounds)
                results += listings(pgbench, stores, app, [int(x) for x in args.runs.split(",")], args.seconds,
                                    args.rounds)
            if args.only == "keyed":
                results += keyed_triggers(pgbench, stores, app, env_new, env_legacy, args.seconds, args.rounds)
            if args.purge and args.only in (None, "purge"):
                results += purge(stores, app, args.purge)
        finally:
            stores.destroy()
    print(f"{'workload':58} {'rate/s':>9} {'CPU µs':>7} {'ratio':>6}  against / target")
    for r in results:
        cpu = "-" if r["cpu_us"] is None else f"{r['cpu_us']:.0f}"
        print(f"{r['workload']:58} {r['rate']:9.0f} {cpu:>7} {r['ratio']:6.2f}  {r['against']}; target {r['target']}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"seam-{int(time.time())}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
