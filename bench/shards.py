"""Shard costs, measured (docs/scale-out.md, "Measured cost"): server CPU per call read from each
backend's /proc/<pid>/schedstat, A and B alternately in one sitting on the same clusters.

  python bench/shards.py router   the router's added CPU per routed call: the same call on a shard
                                  directly, and through the router (router backend + shard backend)
  python bench/shards.py single   N = 1 before and after shard-aware ids: /work/main's function files
                                  (A) against this tree's (B) on one run-ops store, alternately
  python bench/shards.py decode   shard_of's CPU per id

Runs as root on a machine with the PostgreSQL binaries; starts and removes its own clusters.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_router import make_environments, one, sharded_stores  # noqa: E402

from runops.ops import schema  # noqa: E402


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def backend(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn, "SELECT pg_backend_pid()")[0])


def plproxy_backend(shard: psycopg.Connection[Any]) -> int | None:
    row = shard.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'runops_router_p%' "
                        "ORDER BY backend_start DESC LIMIT 1").fetchone()
    return int(row[0]) if row else None


def per_call(conn: psycopg.Connection[Any], query: str, params: list[Any], n: int, pids: list[int]) -> float:
    """CPU µs per call summed over ``pids``."""
    before = sum(cpu_ns(p) for p in pids)
    for _ in range(n):
        conn.execute(query, params).fetchall()
    return (sum(cpu_ns(p) for p in pids) - before) / n / 1000


def router(rounds: int = 6, n: int = 2000) -> None:
    with sharded_stores(2) as s:
        env = make_environments(s, 1)[0]
        with psycopg.connect(s.router_app, autocommit=True) as r:
            run_id = one(r, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])[0]
            owner = int(one(r, "SELECT runops.shard_of(%s)", [run_id])[0])
        with psycopg.connect(s.router_app, autocommit=True) as r, \
                psycopg.connect(s.shard_app(owner), autocommit=True) as d, \
                psycopg.connect(s.shard_admin(owner), autocommit=True) as admin:
            calls = {"get_run": ("SELECT * FROM runops.get_run(%s)", [run_id]),
                     "trigger_run": ("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                                     [env, Jsonb({"idempotency_key": "same"})]),
                     "shard_of": ("SELECT runops.shard_of(%s)", [run_id])}
            for q, p in calls.values():  # warm both paths (plans, the router's connections and cache)
                for _ in range(200):
                    r.execute(q, p).fetchall()
                    d.execute(q, p).fetchall()
            proxied = plproxy_backend(admin)
            assert proxied is not None
            for name, (q, p) in calls.items():
                direct, routed_r, routed_s, wall_d, wall_r = [], [], [], [], []
                for _ in range(rounds):
                    t = time.perf_counter()
                    direct.append(per_call(d, q, p, n, [backend(d)]))
                    wall_d.append((time.perf_counter() - t) / n * 1e6)
                    t = time.perf_counter()
                    routed_r.append(per_call(r, q, p, n, [backend(r)]))
                    wall_r.append((time.perf_counter() - t) / n * 1e6)
                    routed_s.append(per_call(r, q, p, n, [proxied]))
                print(f"{name:12s} direct shard CPU {statistics.median(direct):6.1f} µs | via router: router CPU "
                      f"{statistics.median(routed_r):6.1f} µs, shard CPU {statistics.median(routed_s):6.1f} µs | "
                      f"wall {statistics.median(wall_d):6.1f} -> {statistics.median(wall_r):6.1f} µs")


def _install(conn: psycopg.Connection[Any], texts: dict[str, str]) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL search_path = runops, pg_catalog, pg_temp")
        for name, text in texts.items():
            conn.execute(schema.render(text, "RUN_OPS") if name == "residency.sql" else text)


# A: the function files before shards (this branch's base, r0004 + the revision machinery).
BASE = "c40e781"


def single(rounds: int = 8, n: int = 500) -> None:
    files = ["minting.sql", "residency.sql", "split.sql", "tenants.sql", "trigger_run.sql"]
    old = {f: subprocess.run(["git", "-C", str(schema.ROOT), "show", f"{BASE}:sql/functions/{f}"], capture_output=True,
                             text=True, check=True).stdout for f in files}
    new = {f: (schema.SQL / "functions" / f).read_text() for f in files}
    with sharded_stores(1) as s:
        envs = make_environments(s, 2 * rounds)  # a fresh environment per round: no round sees another's runs
        with psycopg.connect(s.shard_admin(0), autocommit=True) as admin, \
                psycopg.connect(s.shard_app(0), autocommit=True) as d:
            pid = backend(d)
            results: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
            for round_ in range(rounds):
                for label, texts in (("A", old), ("B", new)):
                    env = envs.pop()
                    if round_ % 2:  # B first every other round
                        label, texts = ("B", new) if label == "A" else ("A", old)
                    _install(admin, texts)
                    d.execute("DISCARD PLANS")
                    runs = [one(d, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])[0] for _ in range(n)]
                    for q, p, key in (("SELECT * FROM runops.trigger_run(%s, 't')", [env], "trigger_run"),
                                      ("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                                       [env, Jsonb({"tags": ["x"]})], "trigger_run tags"),
                                      ("SELECT runops.generate_ksuid()", [], "generate_ksuid")):
                        results[label].setdefault(key, []).append(per_call(d, q, p, n, [pid]))
                    before = cpu_ns(pid)
                    for run_id in runs:
                        d.execute("SELECT * FROM runops.cancel_run(%s)", [run_id]).fetchall()
                    results[label].setdefault("cancel_run", []).append((cpu_ns(pid) - before) / n / 1000)
            _install(admin, new)
            for key in results["A"]:
                a, b = statistics.median(results["A"][key]), statistics.median(results["B"][key])
                print(f"{key:16s} A (r0004) {a:7.1f} µs  B (shards) {b:7.1f} µs  ({(b - a) / a * 100:+.1f}%)  "
                      f"A {[round(x) for x in results['A'][key]]} B {[round(x) for x in results['B'][key]]}")


def decode(n: int = 100_000) -> None:
    with sharded_stores(1) as s, psycopg.connect(s.shard_app(0), autocommit=True) as d:
        pid = backend(d)
        ids = [one(d, "SELECT runops.generate_ksuid()")[0] for _ in range(100)] * (n // 100)
        for label, q in (("shard_of", "SELECT count(runops.shard_of(i)) FROM unnest(%s::text[]) AS i"),
                         ("shard_of_id", "SELECT count(runops.shard_of_id(i, 0)) FROM unnest(%s::text[]) AS i"),
                         ("ksuid_top40", "SELECT count(runops.ksuid_top40(i)) FROM unnest(%s::text[]) AS i"),
                         ("baseline", "SELECT count(runops.try_classify_residency(i)) FROM unnest(%s::text[]) AS i")):
            samples = []
            for _ in range(5):
                before = cpu_ns(pid)
                d.execute(q, [ids]).fetchall()
                samples.append((cpu_ns(pid) - before) / n / 1000)
            print(f"{label:10s} {statistics.median(samples):6.2f} µs per id")


if __name__ == "__main__":
    {"router": router, "single": single, "decode": decode}[sys.argv[1]]()
