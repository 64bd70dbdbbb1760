"""Measured SQL changes for batches: ``python bench/batch_experiments.py RESULTS_JSON [--rounds N]``.

Runs on the clusters that ``python bench/run.py --only batches --keep`` left running (RESULTS_JSON
is the file that run wrote; it names their URLs) and nowhere else: it redefines
``runops.add_batch_items`` and ``runops.idempotency_key_hash`` and drops and re-adds the two
foreign keys to ``runops.batches``, and restores all of them at the end.

The changes are patches to the SQL installed in that cluster (the repository's ``sql/`` at the
time), applied one on top of the other:

* ``task check``: ``'^[A-Za-z0-9][A-Za-z0-9_.:/-]*$'`` and ``length(...) <= 128`` instead of the
  bounded ``'...{0,127}$'``, which PostgreSQL's regex engine runs about 15 times slower;
* ``insert first``: no holder lookup before the first INSERT (``ON CONFLICT``'s pre-check is that
  lookup); only the positions whose insert conflicted are looked up, on the next pass;
* ``no FKs``: without ``runs_batch_id_fkey`` and ``batch_items_batch_id_fkey``, whose per-row
  checks (one SPI query, ``FOR KEY SHARE`` of the batch row, per run and per item) the functions
  make redundant: the batch row is created or locked by the same transaction.

A patch whose target text is no longer in the installed function is reported and skipped. Then:

1. it checks that every patch on answers as the installed SQL does, on one batch of live, dead,
   finished, duplicate and missing keys (which items share a run, which reuse a holder, counts);
2. ``batch_trigger`` of 10,000 items without and with keys, each configuration on its own
   connection, in random order in each round, median over the rounds, a CHECKPOINT before each
   call and a small warm-up call after each redefinition (as in the benchmark);
3. ``stream_batch`` of 100,000 items in chunks of 1,000: installed SQL, every patch;
4. keyed ``batch_trigger`` with every patch, ``idempotency_key_hash`` as it is (sha256) against
   the raw key string: what the hash's scattering of index inserts costs.

Stop the clusters afterwards (docs/benchmarks.md, "Reproducing the investigation"). Not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from runops.client import RunOps

N = 10_000
STREAM_N = 100_000
TASK_CHECK = ("(e.item ->> 'task') !~ '^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$'",
              "((e.item ->> 'task') !~ '^[A-Za-z0-9][A-Za-z0-9_.:/-]*$' OR length(e.item ->> 'task') > 128)")
INSERT_FIRST = ("WHERE w.run IS NULL AND w.h IS NOT NULL AND r.environment_id = env.id",
                "WHERE passes > 1 AND w.run IS NULL AND w.h IS NOT NULL AND r.environment_id = env.id")
RAW_KEY = [("encode(sha256(convert_to(array_to_string(", "(((array_to_string("),
           ("'-'), 'UTF8')), 'hex')", "'-'))))")]
FKS = [("runops.runs", "runs_batch_id_fkey"), ("runops.batch_items", "batch_items_batch_id_fkey")]


def patched(text: str, replacements: list[tuple[str, str]]) -> str | None:
    """text with every replacement made, or None when one of them finds nothing to replace."""
    for old, new in replacements:
        if old not in text:
            return None
        text = text.replace(old, new)
    return text


class Lab:
    def __init__(self, kept: dict[str, Any]) -> None:
        self.admin = psycopg.connect(kept["admin_urls"]["RUN_OPS"], autocommit=True)
        self.app_url: str = kept["app_urls"]["RUN_OPS"]
        self.cp_url: str = kept["app_urls"]["CONTROL_PLANE"]
        row = self.admin.execute(
            "SELECT environment_id FROM runops.batches ORDER BY created_at DESC LIMIT 1").fetchone()
        if row is None:
            raise SystemExit("no batch in the run-ops store: keep the clusters of a run with the batch phases")
        self.env: str = row[0]
        self.original: dict[str, str] = {}
        for name in ("add_batch_items", "idempotency_key_hash"):
            got = self.admin.execute("SELECT pg_get_functiondef(%s::regproc)", (f"runops.{name}",)).fetchone()
            assert got is not None
            self.original[name] = got[0]

    def define(self, sql: str) -> None:
        """CREATE OR REPLACE as the functions' owner, with the search path their bodies are written for."""
        self.admin.execute("SET ROLE runops_owner")
        self.admin.execute("SET search_path = runops, pg_catalog")
        try:
            self.admin.execute(sql)
        finally:
            self.admin.execute("RESET ROLE")
            self.admin.execute("RESET search_path")

    def configure(self, add_batch_items: str, fks: bool, key_hash: str | None = None) -> None:
        self.define(add_batch_items)
        self.define(key_hash or self.original["idempotency_key_hash"])
        for table, name in FKS:
            row = self.admin.execute("SELECT count(*) FROM pg_constraint WHERE conname = %s", (name,)).fetchone()
            have = bool(row and row[0])
            if fks and not have:
                self.admin.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY (batch_id) "
                                   "REFERENCES runops.batches(id) NOT VALID")
            elif not fks and have:
                self.admin.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")

    def restore(self) -> None:
        self.configure(self.original["add_batch_items"], True)

    def call(self, conn: psycopg.Connection[Any], items: list[dict[str, Any]]) -> tuple[str, bool, list[str]]:
        row = conn.execute("SELECT * FROM runops.batch_trigger(%s, %s::jsonb, '{}')",
                           (self.env, json.dumps(items))).fetchone()
        assert row is not None
        return row[0], row[1], row[2]

    def warm_up(self, conn: psycopg.Connection[Any]) -> None:
        self.call(conn, [{"task": "bench-task", "payload": {}, "options": {"idempotency_key": secrets.token_hex(8)}},
                         {"task": "bench-task", "payload": {}}])

    def batch_trigger(self, conn: psycopg.Connection[Any], keyed: bool) -> tuple[float, float]:
        """One checked 10,000-item batch_trigger after a CHECKPOINT: (ms, MB of WAL)."""
        p = secrets.token_hex(4)
        items = json.dumps([{"task": "bench-task", "payload": {"n": i},
                             **({"options": {"idempotency_key": f"k{p}-{i}"}} if keyed else {})} for i in range(N)])
        self.admin.execute("CHECKPOINT")
        wal0 = self.wal()
        t0 = time.perf_counter()
        row = conn.execute("SELECT * FROM runops.batch_trigger(%s, %s::jsonb, '{}')", (self.env, items)).fetchone()
        ms = (time.perf_counter() - t0) * 1000
        wal1 = self.wal()
        assert row is not None
        self.check(row[0], N, keyed)
        return ms, (wal1 - wal0) / 2**20

    def check(self, batch_id: str, n: int, keyed: bool) -> None:
        got = self.admin.execute(
            "SELECT b.item_count, (SELECT count(*) FROM runops.runs AS r WHERE r.batch_id = b.id), "
            "(SELECT count(r.idempotency_key_hash) FROM runops.runs AS r WHERE r.batch_id = b.id), "
            "(SELECT count(DISTINCT i.run_id) FROM runops.batch_items AS i WHERE i.batch_id = b.id) "
            "FROM runops.batches AS b WHERE b.id = %s", (batch_id.removeprefix("batch_"),)).fetchone()
        if got != (n, n, n if keyed else 0, n):
            raise SystemExit(f"{batch_id}: item_count, runs, keyed runs, distinct item runs = {got}")

    def wal(self) -> float:
        row = self.admin.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        return float(row[0]) if row else 0.0

    def semantics(self) -> tuple[list[str], Any]:
        """Positions 1 and 7 hold a live run's key, 5-6 a dead one's, 8 a finished run's, 2-3 a new
        key twice, 9 a key of another task, 0 and 4 none."""
        with psycopg.connect(self.app_url, autocommit=True) as conn:
            p = secrets.token_hex(4)
            held: dict[str, str] = {}
            for name in ("live", "dead", "done"):
                row = conn.execute("SELECT run_id FROM runops.trigger_run(%s, 'bench-task', '{}', %s)",
                                   (self.env, json.dumps({"idempotency_key": f"{p}-{name}"}))).fetchone()
                assert row is not None
                held[row[0]] = name.upper()
            bare = {v: k.removeprefix("run_") for k, v in held.items()}
            self.admin.execute("UPDATE runops.runs SET idempotency_key_expires_at = now() - interval '1 s' "
                               "WHERE id = %s", (bare["DEAD"],))
            self.admin.execute("UPDATE runops.runs SET status = 'CANCELED' WHERE id = %s", (bare["DONE"],))
            keys = [None, "live", "new", "new", None, "dead", "dead", "live", "done", "other"]
            batch_id, _, run_ids = self.call(conn, [
                {"task": "other-task" if i == 9 else "bench-task", "payload": {"n": i},
                 **({"options": {"idempotency_key": f"{p}-{k}"}} if k else {})} for i, k in enumerate(keys)])
            fresh: dict[str, str] = {}
            pattern = [held.get(r) or fresh.setdefault(r, f"new{len(fresh)}") for r in run_ids]
            counts = self.admin.execute("SELECT item_count, final_count, status FROM runops.batches WHERE id = %s",
                                        (batch_id.removeprefix("batch_"),)).fetchone()
            return pattern, counts


def measure(lab: Lab, configs: list[tuple[str, str, bool, str | None]], rounds: int,
            work: Callable[[psycopg.Connection[Any]], tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    """Each configuration once per round, in random order, on its own connection."""
    res: dict[str, list[tuple[float, float]]] = defaultdict(list)
    conns = {name: psycopg.connect(lab.app_url, autocommit=True) for name, _, _, _ in configs}
    try:
        for _ in range(rounds):
            for name, body, fks, key_hash in random.sample(configs, len(configs)):
                lab.configure(body, fks, key_hash)
                lab.warm_up(conns[name])
                res[name].append(work(conns[name]))
    finally:
        for conn in conns.values():
            conn.close()
    return res


def report(title: str, configs: list[tuple[str, str, bool, str | None]], res: dict[str, list[tuple[float, float]]],
           rows: int) -> None:
    print(f"\n{title}")
    base = statistics.median(ms for ms, _ in res[configs[0][0]])
    for name, _, _, _ in configs:
        ms = statistics.median(m for m, _ in res[name])
        print(f"  {name:36} {ms:7.0f} ms {rows / ms * 1000:7.0f} rows/s  x{base / ms:4.2f}  "
              f"{statistics.median(w for _, w in res[name]):5.1f} MB WAL  "
              f"[{min(m for m, _ in res[name]):.0f}-{max(m for m, _ in res[name]):.0f}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="The JSON of a `bench/run.py --keep` run.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    kept = json.loads(args.results.read_text()).get("kept")
    if not kept:
        raise SystemExit(f"{args.results} names no kept clusters: run `python bench/run.py --only batches --keep`")
    lab = Lab(kept)
    original = lab.original["add_batch_items"]
    configs: list[tuple[str, str, bool, str | None]] = [("installed SQL", original, True, None)]
    body, replacements = original, list[tuple[str, str]]()
    for name, patch in (("+ task check without {0,127}", TASK_CHECK),
                        ("+ insert first, look up conflicts", INSERT_FIRST)):
        candidate = patched(original, [*replacements, patch])
        if candidate is None:
            print(f"skipped (its target is not in the installed add_batch_items): {name}")
            continue
        replacements.append(patch)
        body = candidate
        configs.append((name, body, True, None))
    configs.append(("+ no foreign keys to batches", body, False, None))
    every = configs[-1]
    try:
        lab.configure(every[1], every[2])
        changed = lab.semantics()
        lab.restore()
        installed = lab.semantics()
        print(f"same answer: installed {installed}\n             patched   {changed}")
        if installed != changed:
            print("THE PATCHED SQL ANSWERS DIFFERENTLY")
            return 1
        lab.admin.execute("VACUUM ANALYZE runops.runs, runops.batches, runops.batch_items")
        for keyed in (False, True):
            res = measure(lab, configs, args.rounds, lambda conn, k=keyed: lab.batch_trigger(conn, k))  # type: ignore[misc]
            report(f"batch_trigger, {N} items {'with' if keyed else 'without'} keys: median of {args.rounds} "
                   "(patches cumulative)", configs, res, N)

        items = [{"task": "bench-task", "payload": {"n": i}} for i in range(STREAM_N)]

        def stream(_conn: psycopg.Connection[Any]) -> tuple[float, float]:
            with RunOps(lab.cp_url, lab.app_url) as client:
                client.trigger_route(lab.env)
                lab.admin.execute("CHECKPOINT")
                wal0, t0 = lab.wal(), time.perf_counter()
                created = client.stream_batch(lab.env, items, expected_count=STREAM_N, chunk_size=1000)
                ms, wal1 = (time.perf_counter() - t0) * 1000, lab.wal()
            lab.check(created.batch_id, STREAM_N, False)
            return ms, (wal1 - wal0) / 2**20

        stream_configs = [configs[0], configs[-2], configs[-1]]
        res = measure(lab, stream_configs, args.stream_rounds, stream)
        report(f"stream_batch, {STREAM_N} items in chunks of 1000: median of {args.stream_rounds}", stream_configs,
               res, STREAM_N)

        raw = patched(lab.original["idempotency_key_hash"], RAW_KEY)
        if raw is None:
            print("\nskipped: idempotency_key_hash no longer has the sha256 expression this replaces")
        else:
            hash_configs = [("sha256 of the key (installed)", every[1], False, None),
                            ("the raw key string", every[1], False, raw)]
            res = measure(lab, hash_configs, args.rounds, lambda conn: lab.batch_trigger(conn, True))
            report(f"batch_trigger with keys, every patch, idempotency_key_hash: median of {args.rounds}",
                   hash_configs, res, N)
    finally:
        lab.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
