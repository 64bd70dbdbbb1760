"""Bulk-action benchmark: ``python bench/bulk.py [--runs N] [--rounds R] [--chunk-size C]``.

Starts two throwaway local clusters (fsync and synchronous_commit on, as ``runops bench``; the
control plane ticked every second, as a deployment does), and per round:

1. an environment with N live runs, half on the control plane (LEGACY: its organization mints
   cuids) and half on the run-ops store (NEW: after a flip to ksuids), each made by
   ``runops.trigger_run`` (set-based calls of 5,000 per statement, so the setup is quick);
2. ``create_bulk_action(env, 'CANCEL')`` through the client (the matched set fixed over both
   stores), then one processor per store — a thread calling ``runops.advance_bulk_actions()``
   in a loop on its store, as a worker process does — until ``get_bulk_action`` says COMPLETED.

Reports per round and as the median: the rate (N / wall seconds from the create call to the
completion, creation included), the creation's share, and both clusters' CPU per run (every
backend, reaped and live; the ticker's passes included). Checks that every run ended CANCELED
once (affected = matched = processed = N). The machine this ran on is noted with the figures
(docs/benchmarks.md, "Bulk cancel"): on 2 shared cores the two stores' processors compete with
each other, with both clusters' background work and with the benchmark itself.
Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from harness import _bring_up, server_cpu_seconds

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps

SET_SIZE = 5000  # triggers per setup statement


def make_runs(app: dict[str, str], client: RunOps, runs: int) -> str:
    """An environment with runs // 2 LEGACY and runs - runs // 2 NEW live runs."""
    org = client.create_organization(f"bulk-{secrets.token_hex(3)}", mint_kind="cuid")
    env = client.create_environment(client.create_project(org, "bench"), "e", "PRODUCTION")
    for store, count in ((CONTROL_PLANE, runs // 2), (RUN_OPS, runs - runs // 2)):
        if store == RUN_OPS:
            client.set_mint_kind(org, "ksuid")
            if not client.wait_for_mirror():
                raise SystemExit("the tenant mirror did not catch up after the flip")
        with psycopg.connect(app[store], autocommit=True) as conn:
            left = count
            while left:
                n = min(SET_SIZE, left)
                conn.execute("SELECT count(*) FROM generate_series(1, %s) AS i, "
                             "LATERAL runops.trigger_run(%s, 'bulk-bench', jsonb_build_object('i', i))", [n, env])
                left -= n
    return env


def cpu(stores: Any) -> float:
    return sum(server_cpu_seconds(c.datadir) or 0.0 for c in stores.clusters.values())


def one_round(stores: Any, app: dict[str, str], runs: int, chunk_size: int | None) -> dict[str, float]:
    with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
        env = make_runs(app, client, runs)
        for conn_url in stores.admin_urls().values():
            with psycopg.connect(conn_url, autocommit=True) as admin:
                admin.execute("CHECKPOINT")
        cpu0, t0 = cpu(stores), time.monotonic()
        created = client.create_bulk_action(env, "CANCEL", chunk_size=chunk_size)
        t_created = time.monotonic()
        done = threading.Event()

        def processor(store: str) -> None:
            with psycopg.connect(app[store], autocommit=True) as conn:
                while not done.is_set():
                    if conn.execute("SELECT runops.advance_bulk_actions()").fetchone() == (0,):
                        time.sleep(0.01)

        threads = [threading.Thread(target=processor, args=(s,)) for s in (CONTROL_PLANE, RUN_OPS)]
        for t in threads:
            t.start()
        while True:
            got = client.get_bulk_action(created.bulk_action_id)
            assert got is not None
            if got.is_over:
                break
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        done.set()
        for t in threads:
            t.join()
        cpu_s = cpu(stores) - cpu0
        if (got.status, got.matched_count, got.processed_count, got.affected_count) != ("COMPLETED", runs, runs, runs):
            raise SystemExit(f"the action did not cancel every run exactly once: {got}")
        with psycopg.connect(stores.admin_urls()[CONTROL_PLANE]) as cp, \
             psycopg.connect(stores.admin_urls()[RUN_OPS]) as ro:
            canceled = sum(c.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                                     "AND status = 'CANCELED'", [env]).fetchone()[0] for c in (cp, ro))  # type: ignore[index]
        if canceled != runs:
            raise SystemExit(f"{canceled} runs CANCELED, expected {runs}")
    return {"rate": runs / seconds, "seconds": seconds, "create_seconds": t_created - t0,
            "server_cpu_us_per_run": cpu_s * 1e6 / runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the store's (5000)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="runops-bulk-bench-"))
    os.chmod(home, 0o755)
    stores = _bring_up(home)
    try:
        app = stores.app_urls()
        with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
            client.enable_split()
        results = []
        for i in range(args.rounds):
            r = one_round(stores, app, args.runs, args.chunk_size)
            results.append(r)
            print(f"round {i + 1}: {args.runs} runs in {r['seconds']:.2f} s = {r['rate']:,.0f} runs/s "
                  f"(creating the action: {r['create_seconds']:.2f} s); server CPU "
                  f"{r['server_cpu_us_per_run']:.0f} µs/run", flush=True)
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"median of {args.rounds}: {med['rate']:,.0f} runs/s, {med['seconds']:.2f} s for {args.runs} runs "
              f"(create {med['create_seconds']:.2f} s), server CPU {med['server_cpu_us_per_run']:.0f} µs/run; "
              f"{os.cpu_count()} CPUs", flush=True)
    finally:
        stores.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
