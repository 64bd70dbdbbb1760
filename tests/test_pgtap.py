"""The pgTAP suites under tests/sql, run with pg_prove against the session's two stores.

Each suite directory runs on the stores it is written for: ``common/`` on both, ``control_plane/``
on the control plane, ``run_ops/`` on the run-ops store. Every file is one transaction that
rolls back, so the suites leave nothing behind but the pgtap extension (in its own schema
``tap``, away from ``runops``). ``lib/`` holds helpers the files include; it is not a suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS
from tests.conftest import Stores

SQL_DIR = Path(__file__).resolve().parent / "sql"
DATABASE = "runops"
TIMEOUT_SECONDS = 300

SUITES = [
    (CONTROL_PLANE, "common"),
    (CONTROL_PLANE, "control_plane"),
    (RUN_OPS, "common"),
    (RUN_OPS, "run_ops"),
]

PG_PROVE = shutil.which("pg_prove")
MISSING = "; `make system-deps` (.ci/install-system-deps.sh) installs it"


def _install_pgtap(url: str) -> None:
    """pgtap in schema tap, as the superuser; moved there if an earlier run put it elsewhere."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'pgtap'").fetchone() is None:
            pytest.fail("the pgtap extension is not available to this PostgreSQL server" + MISSING)
        conn.execute("CREATE SCHEMA IF NOT EXISTS tap")
        row = conn.execute("SELECT n.nspname FROM pg_extension AS e JOIN pg_namespace AS n ON n.oid = e.extnamespace "
                           "WHERE e.extname = 'pgtap'").fetchone()
        if row is None:
            conn.execute("CREATE EXTENSION pgtap SCHEMA tap")
        elif row[0] != "tap":
            conn.execute("ALTER EXTENSION pgtap SET SCHEMA tap")


@pytest.fixture(scope="module")
def pgtap_stores(stores: Stores) -> Stores:
    for store in (CONTROL_PLANE, RUN_OPS):
        _install_pgtap(stores.admin[store])
    return stores


def _psql_bin(stores: Stores) -> str | None:
    """The psql next to the clusters' server binaries, so client and server versions match."""
    candidate = Path(stores.local.bindir) / "psql"
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize(("store", "suite"), SUITES, ids=[f"{store}-{suite}" for store, suite in SUITES])
def test_pgtap_suite(pgtap_stores: Stores, store: str, suite: str) -> None:
    directory = SQL_DIR / suite
    assert sorted(directory.glob("*.sql")), f"no pgTAP files in {directory}"
    port = pgtap_stores.local.clusters[store].port
    assert PG_PROVE is not None, "pg_prove is not installed" + MISSING
    cmd = [str(PG_PROVE), "--ext", ".sql", "--failures", "--nocolor",
           "-d", DATABASE, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    psql = _psql_bin(pgtap_stores)
    if psql is not None:
        cmd += ["--psql-bin", psql]
    cmd.append(str(directory))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGOPTIONS etc.
    env["PGCONNECT_TIMEOUT"] = "10"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=env,
                              cwd=SQL_DIR, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        pytest.fail(f"pg_prove on {store} {suite}/ timed out after {TIMEOUT_SECONDS}s\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
    report = (f"pg_prove on {store} {suite}/ exited {proc.returncode}\n$ {' '.join(cmd)}\n"
              f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    assert proc.returncode == 0, report
    assert "Result: PASS" in proc.stdout, report
