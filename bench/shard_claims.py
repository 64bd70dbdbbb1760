"""The control plane's claim path with one run-ops store, before and after claims routed by the
environment's shard (docs/scale-out.md, "Mirror and FDW per shard"): backend CPU per keyed LEGACY
trigger with the split enabled (each a new key, so each claims in the run-ops store's ledger
through the FDW), read from /proc/<pid>/schedstat for the control plane's backend and for the
run-ops backend serving its FDW connection; and per get_run of a NEW id on the control plane. A =
main's sql/functions/claims.sql and reads.sql (git show <rev>:...), B = this tree's, installed
alternately on the same clusters.

  python bench/shard_claims.py [rev]      (rev defaults to main)

Runs as root on a machine with the PostgreSQL binaries; starts and removes its own clusters.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shards import _install, backend, cpu_ns  # noqa: E402
from tests.test_router import one, sharded_stores  # noqa: E402

from runops.ops import schema  # noqa: E402


def claims(rev: str = "main", rounds: int = 10, n: int = 300) -> None:
    files = ["claims.sql", "reads.sql"]
    old = {f: subprocess.run(["git", "-C", str(schema.ROOT), "show", f"{rev}:sql/functions/{f}"],
                             capture_output=True, text=True, check=True).stdout for f in files}
    new = {f: (schema.SQL / "functions" / f).read_text() for f in files}
    with sharded_stores(1) as s:
        with psycopg.connect(s.admin(0), autocommit=True) as admin, \
                psycopg.connect(s.app(0), autocommit=True) as cp, \
                psycopg.connect(s.shard_admin(0), autocommit=True) as shard:
            org = one(cp, "SELECT runops.create_organization('bench', %s)", [Jsonb({"mint_kind": "cuid"})])[0]
            project = one(cp, "SELECT runops.create_project(%s, 'p')", [org])[0]
            env = one(cp, "SELECT runops.create_environment(%s, 'e', 'PRODUCTION')", [project])[0]
            new_org = one(cp, "SELECT runops.create_organization('bench-new', %s)", [Jsonb({"mint_kind": "ksuid"})])[0]
            new_env = one(cp, "SELECT runops.create_environment(runops.create_project(%s, 'p'), 'e', 'PRODUCTION')",
                          [new_org])[0]
            with psycopg.connect(s.shard_app(0), autocommit=True) as ro:
                for _ in range(100):
                    try:
                        new_run = one(ro, "SELECT run_id FROM runops.trigger_run(%s, 't')", [new_env])[0]
                        break
                    except psycopg.Error:  # the mirror has not the environment yet
                        time.sleep(0.1)
                else:
                    raise RuntimeError("the run-ops store never took the environment")
            query = "SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)"
            for i in range(200):  # warm: plans, the FDW connection
                cp.execute(query, [env, Jsonb({"idempotency_key": f"warm-{i}"})]).fetchall()
            pid = backend(cp)
            row = shard.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'runops_peer' "
                                "ORDER BY backend_start DESC LIMIT 1").fetchone()
            assert row is not None
            fdw_pid = int(row[0])
            results: dict[str, dict[str, list[float]]] = {x: {"cp": [], "fdw": [], "get_run": []} for x in "AB"}
            for round_ in range(rounds):
                order = [("A", old), ("B", new)] if round_ % 2 == 0 else [("B", new), ("A", old)]
                for label, texts in order:
                    _install(admin, texts)
                    cp.execute("DISCARD PLANS")
                    for i in range(20):  # re-plan outside the measured calls
                        cp.execute(query, [env, Jsonb({"idempotency_key": f"w{round_}{label}{i}"})]).fetchall()
                    a, b = cpu_ns(pid), cpu_ns(fdw_pid)
                    for i in range(n):
                        cp.execute(query, [env, Jsonb({"idempotency_key": f"{round_}-{label}-{i}"})]).fetchall()
                    results[label]["cp"].append((cpu_ns(pid) - a) / n / 1000)
                    results[label]["fdw"].append((cpu_ns(fdw_pid) - b) / n / 1000)
                    a = cpu_ns(pid)
                    for _ in range(n):
                        cp.execute("SELECT * FROM runops.get_run(%s)", [new_run]).fetchall()
                    results[label]["get_run"].append((cpu_ns(pid) - a) / n / 1000)
            _install(admin, new)
            for key, what in (("cp", "keyed LEGACY trigger: control plane backend"),
                              ("fdw", "keyed LEGACY trigger: run-ops FDW backend"),
                              ("get_run", "get_run(NEW id) on the control plane")):
                a, b = statistics.median(results["A"][key]), statistics.median(results["B"][key])
                print(f"{what:44s} A ({rev}) {a:7.1f} µs  B {b:7.1f} µs  ({(b - a) / a * 100:+.1f}%)  "
                      f"A {[round(x) for x in results['A'][key]]} B {[round(x) for x in results['B'][key]]}")


if __name__ == "__main__":
    claims(*sys.argv[1:2])
