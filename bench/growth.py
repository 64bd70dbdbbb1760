"""Does trigger_run stay fast as runops.runs grows? ``python bench/growth.py [--rows N] [--seconds S]``.

Two pairs of fresh throwaway clusters (fsync and synchronous_commit on, migrated, wired and split,
a ksuid organization's PRODUCTION environment each: what ``runops bench`` measures). One pair stays
empty; the other is loaded. On each pair's run-ops store:

1. **before the load**: the ``trigger_no_key``, ``trigger_new_key`` and ``trigger_repeated_key``
   (cached) pgbench scripts of bench/pgbench/, run as the harness runs them (``pgbench -n -M
   prepared -c 4 -j 2 -T S`` as ``runops_app`` over TCP, 1,000 prefilled keys, a CHECKPOINT before
   each phase), each phase on one pair then the other, ``--rounds`` rounds (the order reversed
   every other round), the median kept; with the run-ops cluster's CPU per call. Both pairs are
   empty here, so their ratio shows how much two pairs differ without any load;
2. **load** ``--rows`` runs (default 5,000,000) into the second pair's ``runops.runs`` as
   superuser, set-based (``INSERT ... SELECT generate_series`` in chunks of 500,000, two sessions
   at once), then ``VACUUM ANALYZE`` and a CHECKPOINT. The rows have the store's shape:
   27-character KSUIDs whose timestamp is their ``created_at`` (spread over the 45 days before
   now, so every new id sorts after them, as in a live store), half in the benchmark's environment
   and the rest in three others of another organization; 96 % final (completed, failed, canceled,
   expired, crashed), the rest PENDING, DELAYED, PAUSED, RETRYING and a few leased or waiting;
   20 % of those whose status keeps a key hold one (``global`` scope, expiring 30 days after
   creation), and the unexpired ones a claim in the ledger (``runops.idempotency_claims``), as
   NEW keyed triggers leave them. ``session_replication_role = replica`` skips the foreign-key
   checks during the load (every loaded row has NULL parent and batch);
3. **after the load**: the same alternation, and each rate's ratio loaded / empty (target
   >= 0.80). Measuring the empty pair alongside, rather than the same store before and after,
   keeps a machine whose load drifts from passing for growth (a shared 2-core machine's rates
   swing by 2-3x within minutes);
4. **plans**: every statement the hot paths run on the loaded store, captured with
   ``auto_explain`` (``log_nested_statements``: the plans PL/pgSQL actually used, in a session
   with the default ``plan_cache_mode``, from the 7th call, and in one with
   ``force_generic_plan``): ``trigger_run`` with no key, a new key, a prefilled key and a loaded
   key; ``get_run`` of a loaded run; ``list_store_runs`` (first page and one from a cursor deep in
   the environment); ``list_runs`` (merged); ``dequeue_runs`` and ``tick`` (rolled back). It prints
   each statement that reads runs or the claim ledger, with its top plan node, how it reads them
   and how many rows those scans touched, and fails when any plan reads them with a Seq Scan.

Exit code 0 when every ratio meets its target and no plan scans runs sequentially, 4 when not, 1
when it could not run. About 12 minutes with the defaults on a 2-core machine. The JSON goes to
bench/results/. Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up, _make_environment, find_pgbench, run_pgbench, scripts_dir
from profile_trigger import _table

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops.local_cluster import LocalStores

HERE = Path(__file__).resolve().parent
TARGET = 0.80
REPEATED_KEYS = 1000
PHASES = {"trigger_no_key": "trigger_no_key.sql", "trigger_new_key": "trigger_new_key.sql",
          "trigger_repeated_key": "trigger_repeated_key.sql"}
CHUNK = 500_000
LOADERS = 2
SPAN_SECONDS = 45 * 86400
KSUID_EPOCH = 1_400_000_000
P62_20 = 62 ** 20
P2_128 = 2 ** 128
_TICK = os.sysconf("SC_CLK_TCK")

# One chunk of loaded runs, rows lo..hi of n. t: seconds since the KSUID epoch (created_at), in
# order of g. The id is a KSUID of t: 7 leading base62 digits h with h * 62^20 inside
# [t * 2^128, (t + 1) * 2^128) (2^128 is about 483 * 62^20, so any of 400 values of h above
# t * 2^128 / 62^20 will do), then 20 digits: 10 pseudo-random, 10 of g (unique).
LOAD_SQL = """
INSERT INTO runops.runs AS r (
  id, environment_id, project_id, organization_id, task_identifier, status, payload, output, error,
  metadata, tags, queue, idempotency_key, idempotency_key_hash, idempotency_key_scope,
  idempotency_key_expires_at, depth, attempt_number, max_attempts, delay_until, locked_by, lease,
  lease_expires_at, retry_at, suspended_reason, queued_at, started_at, completed_at, expired_at,
  created_at, updated_at)
SELECT runops.base62_digits7(s.high) || runops.base62_digits10(s.middle) || runops.base62_digits10(s.g),
       (%(envs)s::text[])[s.e], (%(projects)s::text[])[s.e], (%(orgs)s::text[])[s.e],
       s.task, s.status, jsonb_build_object('n', s.g),
       CASE WHEN s.status = 'COMPLETED_SUCCESSFULLY' THEN '{"ok": true}'::jsonb END,
       CASE WHEN runops.is_final_status(s.status) AND s.status NOT IN ('COMPLETED_SUCCESSFULLY', 'CANCELED')
            THEN jsonb_build_object('message', 'failed', 'status', s.status) END,
       '{}', '{}', 'task/' || s.task,
       CASE WHEN s.keyed THEN 'k' || s.g END,
       CASE WHEN s.keyed THEN runops.idempotency_key_hash('k' || s.g, 'global', NULL, NULL) END,
       CASE WHEN s.keyed THEN 'global' END,
       CASE WHEN s.keyed THEN s.created_at + interval '30 days' END,
       0, CASE WHEN s.status IN ('PENDING', 'DELAYED', 'PAUSED') THEN 0 ELSE 1 END, 3,
       CASE WHEN s.status = 'DELAYED' THEN now() + interval '1 day' END,
       CASE WHEN s.status IN ('DEQUEUED', 'EXECUTING') THEN 'growth-worker' END,
       CASE WHEN s.status IN ('DEQUEUED', 'EXECUTING') THEN interval '5 minutes' END,
       CASE WHEN s.status IN ('DEQUEUED', 'EXECUTING') THEN now() + interval '1 day' END,
       CASE WHEN s.status = 'RETRYING_AFTER_FAILURE' THEN now() + interval '1 day' END,
       CASE WHEN s.status = 'WAITING_TO_RESUME' THEN 'MANUAL' END,
       CASE WHEN s.status <> 'DELAYED' THEN s.created_at END,
       CASE WHEN s.status NOT IN ('PENDING', 'DELAYED', 'PAUSED') THEN s.created_at + interval '1 second' END,
       CASE WHEN runops.is_final_status(s.status) THEN s.created_at + interval '2 seconds' END,
       CASE WHEN s.status = 'EXPIRED' THEN s.created_at + interval '2 seconds' END,
       s.created_at, s.created_at + interval '2 seconds'
FROM (
  SELECT g, t, e, task, status, to_timestamp(%(epoch)s + t) + (g %% 997) * interval '1 ms' AS created_at,
         g %% 5 = 0 AND NOT runops.status_releases_key(status) AND NOT status = 'DELAYED' AS keyed,
         (div(t::numeric * %(p2_128)s::numeric, %(p62_20)s::numeric) + 1 + g %% 400)::bigint AS high,
         (hashint8(g)::bigint & 2147483647) * 390000000 + (hashint8(-g)::bigint & 2147483647) %% 390000000 AS middle
  FROM (
    SELECT g, %(t0)s::bigint + g * %(span)s::bigint / %(n)s::bigint AS t,
           CASE WHEN g %% 2 = 0 THEN 1 ELSE 2 + g %% 3 END AS e,
           CASE WHEN g %% 4 < 2 THEN 'bench-task' ELSE 'task-' || g %% 7 END AS task,
           CASE WHEN h < 8500 THEN 'COMPLETED_SUCCESSFULLY'
                WHEN h < 9000 THEN 'COMPLETED_WITH_ERRORS'
                WHEN h < 9300 THEN 'CANCELED'
                WHEN h < 9450 THEN 'EXPIRED'
                WHEN h < 9550 THEN 'CRASHED'
                WHEN h < 9600 THEN 'SYSTEM_FAILURE'
                WHEN h < 9750 THEN 'PENDING'
                WHEN h < 9800 THEN 'DELAYED'
                WHEN h < 9850 THEN 'RETRYING_AFTER_FAILURE'
                WHEN h < 9997 THEN 'PAUSED'
                WHEN h < 9998 THEN 'WAITING_TO_RESUME'
                ELSE CASE WHEN g %% 100 = 0 THEN 'EXECUTING' ELSE 'COMPLETED_SUCCESSFULLY' END
           END AS status
    FROM (SELECT g, (hashint8(g * 7919)::bigint & 2147483647) %% 10000 AS h
          FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g) AS x
  ) AS y
  OFFSET 0  -- not pulled up: the digit functions then take plain columns, and PostgreSQL inlines them
) AS s
"""
CLAIMS_SQL = """
INSERT INTO runops.idempotency_claims (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                       expires_at, claimed_at)
SELECT r.environment_id, r.task_identifier, r.idempotency_key_hash, r.id, NULL, r.idempotency_key_expires_at,
       r.created_at
FROM runops.runs AS r
WHERE r.idempotency_key_hash IS NOT NULL AND r.idempotency_key LIKE 'k%%' AND r.idempotency_key_expires_at > now()
ON CONFLICT DO NOTHING
"""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cluster_cpu_seconds(datadir: str) -> float | None:
    """CPU of a cluster so far: the postmaster's reaped children plus its live children."""
    try:
        pm = int(Path(datadir, "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pm}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[13]) + int(fields[14])) / _TICK
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pm:
                    total += int((stat.parent / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
        return total
    except (OSError, ValueError, IndexError):
        return None


def _scalar(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _backends_gone(admin: psycopg.Connection[Any]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _scalar(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                   "AND usename = 'runops_app'") > 0:
        time.sleep(0.05)
    time.sleep(0.1)


@dataclass(frozen=True)
class Pair:
    """One pair of throwaway clusters, and the run-ops store's side of it that is measured."""

    name: str
    stores: LocalStores
    env: str

    @property
    def app_url(self) -> str:
        return self.stores.app_urls()[RUN_OPS]

    @property
    def admin_url(self) -> str:
        return self.stores.admin_urls()[RUN_OPS]

    @property
    def datadir(self) -> str:
        return self.stores.clusters[RUN_OPS].datadir


def measure(pairs: list[Pair], seconds: int, rounds: int, label: str) -> dict[str, dict[str, Any]]:
    """``rounds`` rounds of the three trigger phases, each phase run on every pair in turn (the
    order reversed every other round), so load drifting on the machine reaches them alike. Per pair
    and phase: the median rate and the median server CPU per call (the run-ops cluster's)."""
    pgbench, scripts = find_pgbench(), scripts_dir()
    rates: dict[str, dict[str, list[float]]] = {p.name: {ph: [] for ph in PHASES} for p in pairs}
    cpus: dict[str, dict[str, list[float]]] = {p.name: {ph: [] for ph in PHASES} for p in pairs}
    for r in range(1, rounds + 1):
        for phase, script in PHASES.items():
            for pair in (pairs if r % 2 else pairs[::-1]):
                with psycopg.connect(pair.admin_url, autocommit=True) as admin:
                    admin.execute("CHECKPOINT")
                    cpu0 = cluster_cpu_seconds(pair.datadir)
                    work = run_pgbench(pgbench, pair.app_url, scripts / script, seconds,
                                       {"env": pair.env, "keys": str(REPEATED_KEYS)})
                    _backends_gone(admin)
                    cpu1 = cluster_cpu_seconds(pair.datadir)
                rates[pair.name][phase].append(work.calls_per_s)
                if cpu0 is not None and cpu1 is not None and work.all_calls:
                    cpus[pair.name][phase].append((cpu1 - cpu0) / work.all_calls * 1e6)
                say(f"  {label} round {r}: {pair.name} {phase} {work.calls_per_s:,.0f} calls/s"
                    + (f", {cpus[pair.name][phase][-1]:.0f} us server CPU per call" if cpus[pair.name][phase] else ""))
    return {p.name: {ph: {"calls_per_s": statistics.median(rates[p.name][ph]), "rounds": rates[p.name][ph],
                          "server_cpu_us_per_call": statistics.median(cpus[p.name][ph]) if cpus[p.name][ph] else None,
                          "cpu_rounds": cpus[p.name][ph]} for ph in PHASES} for p in pairs}


def ratios(of: dict[str, Any], to: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per phase: rate and server CPU per call of ``of`` over ``to``."""
    out: dict[str, dict[str, float | None]] = {}
    for ph in PHASES:
        a, b = of[ph]["server_cpu_us_per_call"], to[ph]["server_cpu_us_per_call"]
        out[ph] = {"rate": of[ph]["calls_per_s"] / to[ph]["calls_per_s"], "cpu": a / b if a and b else None}
    return out


def other_environments(app: dict[str, str]) -> list[str]:
    """Three more environments (another ksuid organization) for the loaded runs."""
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        org = client.create_organization(f"growth-{os.getpid()}", mint_kind="ksuid")
        project = client.create_project(org, "other")
        envs = [client.create_environment(project, slug, kind)
                for slug, kind in (("prod", "PRODUCTION"), ("stg", "STAGING"), ("dev", "DEVELOPMENT"))]
        client.wait_for_mirror()
    return envs


def load_runs(admin_url: str, rows: int, envs: list[str]) -> dict[str, Any]:
    """``rows`` runs in chunks, LOADERS sessions at once; then the claims, VACUUM ANALYZE, CHECKPOINT."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        tenancy = admin.execute("SELECT id, project_id, organization_id FROM runops.runtime_environments "
                                "WHERE id = ANY (%s) ORDER BY array_position(%s, id)", (envs, envs)).fetchall()
        if len(tenancy) != len(envs):
            raise SystemExit(f"the mirror holds {len(tenancy)} of the {len(envs)} environments")
        before = int(_scalar(admin, "SELECT count(*) FROM runops.runs"))
    t_end = int(time.time()) - KSUID_EPOCH - 60
    params = {"envs": [t[0] for t in tenancy], "projects": [t[1] for t in tenancy],
              "orgs": [t[2] for t in tenancy], "p2_128": str(P2_128), "p62_20": str(P62_20),
              "epoch": KSUID_EPOCH, "t0": t_end - SPAN_SECONDS, "span": SPAN_SECONDS, "n": rows}
    chunks = [(lo, min(lo + CHUNK - 1, rows)) for lo in range(1, rows + 1, CHUNK)]
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = [0]
    t0 = time.perf_counter()

    def loader(mine: list[tuple[int, int]]) -> None:
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute("SET session_replication_role = replica")  # NULL parents and batches: no FK work
                conn.execute("SET synchronous_commit = off")  # the load is setup, not measured
                for lo, hi in mine:
                    conn.execute(LOAD_SQL, {**params, "lo": lo, "hi": hi})
                    with lock:
                        done[0] += hi - lo + 1
                        say(f"  loaded {done[0]:,} / {rows:,} runs ({time.perf_counter() - t0:.0f} s)")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    # Each session takes a contiguous half, so the two write apart in every index ordered by time.
    half = (len(chunks) + 1) // 2
    threads = [threading.Thread(target=loader, args=(part,)) for part in (chunks[:half], chunks[half:]) if part]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    insert_s = time.perf_counter() - t0
    with psycopg.connect(admin_url, autocommit=True) as admin:
        t1 = time.perf_counter()
        claims = admin.execute(CLAIMS_SQL).rowcount
        claims_s = time.perf_counter() - t1
        say(f"  {claims:,} claims in the ledger ({claims_s:.0f} s); VACUUM ANALYZE")
        t2 = time.perf_counter()
        admin.execute("VACUUM ANALYZE runops.runs")
        admin.execute("VACUUM ANALYZE runops.idempotency_claims")
        vacuum_s = time.perf_counter() - t2
        admin.execute("CHECKPOINT")
        check = admin.execute(
            "SELECT count(*), count(*) FILTER (WHERE runops.is_final_status(status)), "
            "count(idempotency_key_hash), count(DISTINCT environment_id) FROM runops.runs").fetchone()
        assert check is not None
        sample = admin.execute(
            "SELECT id, created_at, runops.ksuid_timestamp(id) FROM runops.runs WHERE idempotency_key LIKE 'k%%' "
            "ORDER BY id LIMIT 3").fetchall()
        bad = [s for s in sample if abs((s[1] - s[2]).total_seconds()) >= 1.0]
        if bad:
            raise SystemExit(f"loaded ids do not carry their created_at: {bad}")
        sizes = admin.execute(
            "SELECT pg_size_pretty(pg_table_size('runops.runs')), pg_size_pretty(pg_indexes_size('runops.runs')), "
            "pg_size_pretty(pg_total_relation_size('runops.idempotency_claims'))").fetchone()
        assert sizes is not None
    return {"rows": rows, "runs_before": before, "runs_after": int(check[0]), "final": int(check[1]),
            "keyed": int(check[2]), "environments": int(check[3]), "claims": claims,
            "insert_seconds": insert_s, "claims_seconds": claims_s, "vacuum_analyze_seconds": vacuum_s,
            "total_seconds": time.perf_counter() - t0, "runs_table_size": sizes[0], "runs_indexes_size": sizes[1],
            "claims_size": sizes[2]}


def _walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *[n for child in plan.get("Plans", []) for n in _walk(child)]]


def _node(plan: dict[str, Any]) -> str:
    what = str(plan["Node Type"])
    if plan.get("Index Name"):
        what += f" using {plan['Index Name']}"
    elif plan.get("Relation Name"):
        what += f" on {plan['Relation Name']}"
    return what


BIG = ("runs", "idempotency_claims")


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of runs and the claim ledger returned or filtered out."""
    total = 0
    for n in _walk(plan):
        if n.get("Relation Name") in BIG and "Scan" in n["Node Type"]:
            total += int((n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)
                          + n.get("Rows Removed by Index Recheck", 0)) * n.get("Actual Loops", 1))
    return total


def _scans(plan: dict[str, Any]) -> list[str]:
    """Every node that reads a relation, as 'Node on relation (index)'."""
    out = []
    for n in _walk(plan):
        if n.get("Relation Name"):
            out.append(f"{n['Node Type']} on {n['Relation Name']}"
                       + (f" ({n['Index Name']})" if n.get("Index Name") else ""))
        elif n.get("Index Name"):
            out.append(f"{n['Node Type']} ({n['Index Name']})")
    return out


def capture_plans(admin_url: str, env: str, generic: bool, deep: int) -> list[dict[str, Any]]:
    """The plans of every statement the hot paths ran, through auto_explain (nested statements),
    in one fresh superuser session; deduplicated by statement text."""
    notes: list[str] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        for setting in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_nested_statements = on", "SET auto_explain.log_format = 'json'",
                        "SET auto_explain.log_level = 'notice'", "SET auto_explain.log_analyze = on",
                        "SET auto_explain.log_timing = off",
                        f"SET plan_cache_mode = {'force_generic_plan' if generic else 'auto'}"):
            conn.execute(setting)
        loaded = conn.execute(
            "SELECT id, idempotency_key FROM runops.runs WHERE environment_id = %s AND task_identifier = 'bench-task' "
            "AND idempotency_key LIKE 'k%%' AND idempotency_key_expires_at > now() "
            "AND status = 'COMPLETED_SUCCESSFULLY' ORDER BY id DESC LIMIT 1", (env,)).fetchone()
        cursor = conn.execute(
            "SELECT runops.run_cursor(created_at, id) FROM runops.runs WHERE environment_id = %s "
            "ORDER BY created_at DESC, id DESC OFFSET %s LIMIT 1", (env, deep)).fetchone()
        if loaded is None or cursor is None:
            raise SystemExit("no loaded keyed run, or fewer runs than the deep page needs: load more --rows")
        notes.clear()
        calls: list[tuple[str, str, tuple[Any, ...]]] = [
            ("trigger_run, no key", "SELECT * FROM runops.trigger_run(%s, 'bench-task', '{\"n\": 1}', '{}')", (env,)),
            ("trigger_run, new key", "SELECT * FROM runops.trigger_run(%s, 'bench-task', '{\"n\": 1}', "
             "jsonb_build_object('idempotency_key', 'g' || gen_random_uuid()))", (env,)),
            ("trigger_run, prefilled key (cached)", "SELECT * FROM runops.trigger_run(%s, 'bench-task', '{\"n\": 1}', "
             "'{\"idempotency_key\": \"r1\"}')", (env,)),
            ("trigger_run, loaded key (cached)", "SELECT * FROM runops.trigger_run(%s, 'bench-task', '{\"n\": 1}', "
             "jsonb_build_object('idempotency_key', %s::text))", (env, loaded[1])),
            ("get_run, loaded run", "SELECT * FROM runops.get_run(%s)", ("run_" + loaded[0],)),
            ("list_store_runs, first page", "SELECT * FROM runops.list_store_runs(%s, 50)", (env,)),
            (f"list_store_runs, {deep:,} deep", "SELECT * FROM runops.list_store_runs(%s, 50, %s)", (env, cursor[0])),
            ("list_runs (merged), first page", "SELECT * FROM runops.list_runs(%s, 50)", (env,)),
            ("dequeue_runs (rolled back)", "SELECT * FROM runops.dequeue_runs(%s, 'growth-worker', 10)", (env,)),
            ("tick (rolled back)", "SELECT runops.tick()", ()),
        ]
        captured: list[dict[str, Any]] = []
        for label, sql, params in calls:
            # The plans of the last call kept. Under plan_cache_mode = auto, the 7th: PL/pgSQL's
            # cached statements plan custom for five executions, then settle on a generic plan
            # unless it costs more. Forced generic plans are generic from the first.
            for _ in range(2 if generic else 7):
                notes.clear()
                with conn.transaction(force_rollback=True):
                    conn.execute(sql, params).fetchall()
            for note in notes:
                _, _, body = note.partition("\n")
                try:
                    doc = json.loads(body)
                except json.JSONDecodeError:
                    continue
                text = " ".join(str(doc.get("Query Text", "")).split())
                plan = doc["Plan"]
                captured.append({"call": label, "statement": text, "top": _node(plan), "scans": _scans(plan),
                                 "rows_read": _rows_read(plan)})
    # The top-level call itself (a Function Scan) left out; one entry per statement (its last plan).
    last = {(c["call"], c["statement"]): c for c in captured
            if not c["statement"].startswith("SELECT * FROM runops.") and c["statement"] != "SELECT runops.tick()"}
    return list(last.values())


def seq_scans_on_big_tables(plans: list[dict[str, Any]]) -> list[str]:
    bad = []
    for p in plans:
        for s in p["scans"]:
            if s.startswith("Seq Scan on runs") or s.startswith("Seq Scan on idempotency_claims"):
                bad.append(f"{p['call']}: {s} in {p['statement'][:100]}")
    return bad


def _pair(name: str, home: Path) -> Pair:
    stores = _bring_up(home)
    return Pair(name, stores, _make_environment(stores.app_urls()))


def run(rows: int, seconds: int, rounds: int, keep: bool) -> dict[str, Any]:
    homes = [Path(tempfile.mkdtemp(prefix="runops-growth-")) for _ in range(2)]
    pairs: list[Pair] = []
    started = dt.datetime.now(dt.UTC)
    t_start = time.perf_counter()
    try:
        say("starting two pairs of local clusters (fsync on): one stays empty, the other is loaded")
        for name, home in zip(("empty", "loaded"), homes, strict=True):
            home.chmod(0o755)
            pairs.append(_pair(name, home))
        empty, loaded = pairs
        others = other_environments(loaded.stores.app_urls())
        with psycopg.connect(loaded.admin_url, autocommit=True) as admin:
            settings = {k: _scalar(admin, f"SHOW {k}") for k in ("server_version", "fsync", "synchronous_commit",
                                                                   "shared_buffers", "max_wal_size")}
        if settings["fsync"] != "on" or settings["synchronous_commit"] != "on":
            raise SystemExit("fsync and synchronous_commit must be on")
        for pair in pairs:
            with psycopg.connect(pair.app_url, autocommit=True) as ro:
                ro.execute("SELECT count(t.*) FROM generate_series(1, %s) AS g, LATERAL runops.trigger_run("
                           "%s, 'bench-task', '{\"n\": 1}', jsonb_build_object('idempotency_key', 'r' || g)) AS t",
                           (REPEATED_KEYS, pair.env))
            with psycopg.connect(pair.admin_url, autocommit=True) as admin:
                admin.execute("VACUUM ANALYZE runops.runs")
        load_before = os.getloadavg()
        say(f"before the load (both pairs empty): {rounds} rounds of 3 phases, {seconds} s each, pairs alternating")
        before = measure(pairs, seconds, rounds, "before")
        say(f"loading {rows:,} runs into the second pair")
        load = load_runs(loaded.admin_url, rows, [loaded.env, *others])
        say(f"loaded in {load['total_seconds']:.0f} s (insert {load['insert_seconds']:.0f} s, claims "
            f"{load['claims_seconds']:.0f} s, VACUUM ANALYZE {load['vacuum_analyze_seconds']:.0f} s)")
        say(f"after the load: {rounds} rounds of 3 phases, {seconds} s each, pairs alternating")
        after = measure(pairs, seconds, rounds, "after")
        load_after = os.getloadavg()
        with psycopg.connect(loaded.admin_url, autocommit=True) as admin:
            runs_stored = int(_scalar(admin, "SELECT count(*) FROM runops.runs"))
            admin.execute("ANALYZE runops.runs")
        with psycopg.connect(empty.admin_url, autocommit=True) as admin:
            runs_empty = int(_scalar(admin, "SELECT count(*) FROM runops.runs"))
        say("plans: auto_explain of the hot statements (default plan_cache_mode, then force_generic_plan)")
        deep = min(100_000, rows // 4)
        plans = {"auto": capture_plans(loaded.admin_url, loaded.env, False, deep),
                 "generic": capture_plans(loaded.admin_url, loaded.env, True, deep)}
        bad = [b for mode in plans.values() for b in seq_scans_on_big_tables(mode)]
        growth = ratios(after["loaded"], after["empty"])
        result: dict[str, Any] = {
            "started_at": started.isoformat(timespec="seconds"), "rows": rows, "seconds": seconds,
            "rounds": rounds, "settings": settings, "environment": loaded.env, "other_environments": others,
            "before": before, "calibration": ratios(before["loaded"], before["empty"]), "load": load,
            "after": after, "ratios": growth, "runs_in_empty_pair": runs_empty, "runs_in_loaded_pair": runs_stored,
            "target": TARGET, "plans": plans, "seq_scans": bad, "loadavg_before": load_before,
            "loadavg_after": load_after,
            "all_pass": not bad and all((r["rate"] or 0.0) >= TARGET for r in growth.values()),
            "wall_seconds": time.perf_counter() - t_start,
        }
        if keep:
            result["kept"] = {p.name: {"home": str(p.stores.home), "admin_urls": p.stores.admin_urls(),
                                       "app_urls": p.stores.app_urls()} for p in pairs}
        return result
    finally:
        if not keep:
            for p in pairs:
                p.stores.destroy()
            for home in homes:
                shutil.rmtree(home, ignore_errors=True)


def print_result(res: dict[str, Any]) -> None:
    s = res["settings"]
    ld = res["load"]
    print(f"\ngrowth: PostgreSQL {s['server_version']}, fsync={s['fsync']}, synchronous_commit="
          f"{s['synchronous_commit']}, shared_buffers={s['shared_buffers']}; pgbench -n -M prepared -c 4 -j 2 "
          f"-T {res['seconds']}, median of {res['rounds']} interleaved rounds\n")

    def num(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:,.{digits}f}"

    rows = []
    for p in PHASES:
        e, st, r, c = res["after"]["empty"][p], res["after"]["loaded"][p], res["ratios"][p], res["calibration"][p]
        rows.append((p, num(e["calls_per_s"]), num(st["calls_per_s"]), num(r["rate"], 2), f">= {TARGET:.2f}",
                     "pass" if (r["rate"] or 0.0) >= TARGET else "FAIL", num(e["server_cpu_us_per_call"]),
                     num(st["server_cpu_us_per_call"]), num(r["cpu"], 2), num(c["rate"], 2), num(c["cpu"], 2)))
    _table(rows, ("phase", "empty /s", "loaded /s", "loaded/empty", "target", "result", "CPU us empty",
                  "CPU us loaded", "CPU loaded/empty", "before load: rate", "CPU"))
    print("\n  loaded/empty: the two pairs measured alternately after the load; \"before load\": the same two "
          "pairs, both empty, measured alike (what the pairs differ by without the load)")
    print(f"  runs: {ld['runs_after']:,} in the loaded pair after the load ({ld['final']:,} final, {ld['keyed']:,} "
          f"holding a key, {ld['environments']} environments, {ld['claims']:,} claims), {res['runs_in_loaded_pair']:,} "
          f"at the end; {res['runs_in_empty_pair']:,} in the empty pair at the end")
    print(f"  load of {ld['rows']:,} runs: {ld['total_seconds']:.0f} s (INSERT ... SELECT {ld['insert_seconds']:.0f} s "
          f"in {LOADERS} sessions, claims {ld['claims_seconds']:.0f} s, VACUUM ANALYZE "
          f"{ld['vacuum_analyze_seconds']:.0f} s); runs {ld['runs_table_size']} + indexes {ld['runs_indexes_size']}, "
          f"claims {ld['claims_size']}")
    for mode, plans in res["plans"].items():
        big = [p for p in plans if any(f" on {t}" in x for x in p["scans"] for t in BIG)]
        print(f"\nstatements reading runs or the claim ledger inside the calls (auto_explain, plan_cache_mode = "
              f"{'force_generic_plan' if mode == 'generic' else 'auto'}; {len(plans) - len(big)} others read only "
              "small tables or none): top node, how runs / claims are read, rows those scans touched")
        _table([(p["call"], p["statement"][:58], p["top"][:44],
                 "; ".join(x for x in p["scans"] if any(f" on {t}" in x for t in BIG))[:100], f"{p['rows_read']:,}")
                for p in big], ("call", "statement", "top node", "runs / claims read by", "rows"), left=(0, 1, 2, 3))
    if res["seq_scans"]:
        print("\nSeq Scan on runs or the claim ledger: FAIL")
        for b in res["seq_scans"]:
            print(f"  {b}")
    else:
        print("\nno plan reads runs or idempotency_claims with a Seq Scan: pass")
    print(f"load average {res['loadavg_before'][0]:.2f} before, {res['loadavg_after'][0]:.2f} after; "
          f"whole run {res['wall_seconds'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="Runs to load (default 5,000,000).")
    parser.add_argument("--seconds", type=int, default=10, help="Length of each pgbench phase (default 10).")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds of the phases (default 2).")
    parser.add_argument("--keep", action="store_true", help="Leave the clusters running.")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.seconds < 1 or args.rounds < 1:
        parser.error("--rows, --seconds and --rounds must be at least 1")
    try:
        res = run(args.rows, args.seconds, args.rounds, args.keep)
    except (psycopg.Error, OSError, subprocess.SubprocessError) as err:
        say(f"error: {err}")
        return 1
    print_result(res)
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"growth-{res['started_at'].replace(':', '').replace('+00:00', 'Z')}.json"
    path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"results: {path}")
    if args.keep:
        for name, kept in res["kept"].items():
            print(f"{name} pair kept in {kept['home']}: {kept['admin_urls']}")
    return 0 if res["all_pass"] else 4


if __name__ == "__main__":
    sys.exit(main())
