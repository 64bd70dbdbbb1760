"""`runops migrate` acts only on the databases it was named, checks its preconditions before it
changes anything, and wires stores that trust TCP logins as well as ones that ask passwords."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops import migrate
from runops.ops.local_cluster import LocalStores, _as_server_user
from tests.conftest import Stores

RUNOPS = Path(sys.executable).parent / "runops"


def runops(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_") or k == "RUNOPS_TESTING"}
    return subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, cwd=cwd, env={**clean, **env},
                          timeout=300, check=False)


def has_runops_schema(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regnamespace('runops') IS NOT NULL").fetchone()
        return bool(row and row[0])


def test_the_flag_then_the_admin_url_then_the_app_url_and_the_local_stores_only_when_none_is_set(
        stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RUNOPS_CONTROL_PLANE_URL": "postgresql://app@cp/a", "RUNOPS_CONTROL_PLANE_ADMIN_URL": "postgresql://dba@cp/a",
           "RUNOPS_RUN_OPS_URL": "postgresql://app@ro/b"}
    found = migrate.resolve_targets("postgresql://flag@cp/a", None, env)
    assert (found[CONTROL_PLANE].url, found[CONTROL_PLANE].source) == ("postgresql://flag@cp/a", "--control-plane-url")
    assert (found[RUN_OPS].url, found[RUN_OPS].source) == ("postgresql://app@ro/b", "RUNOPS_RUN_OPS_URL")
    assert migrate.resolve_targets(None, None, env)[CONTROL_PLANE].source == "RUNOPS_CONTROL_PLANE_ADMIN_URL"
    with pytest.raises(migrate.PreconditionFailed, match="no control-plane URL"):
        migrate.resolve_targets(None, None, {"RUNOPS_RUN_OPS_URL": "postgresql://app@ro/b"})
    monkeypatch.chdir(stores.home)
    local = migrate.resolve_targets(None, None, {})
    assert {s: t.url for s, t in local.items()} == stores.admin


def test_named_databases_are_migrated_and_the_local_stores_are_not_touched(stores: Stores, scratch_db) -> None:
    url = scratch_db("named")
    done = runops("migrate", cwd=stores.home, RUNOPS_CONTROL_PLANE_ADMIN_URL=url)
    assert done.returncode == 0, done.stderr
    dbname = conninfo_to_dict(url)["dbname"]
    assert f"using control plane: postgres@127.0.0.1:{stores.local.clusters[CONTROL_PLANE].port}/{dbname} " \
           "(from RUNOPS_CONTROL_PLANE_ADMIN_URL)" in done.stderr
    assert "run-ops store" not in done.stderr and "upgraded: CONTROL_PLANE; wired: no" in done.stdout
    assert has_runops_schema(url)


def test_a_login_without_the_grants_is_refused_in_one_line_before_anything_changes(stores: Stores,
                                                                                   scratch_db) -> None:
    url = scratch_db("weak")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS runops_test_weak")
        conn.execute("CREATE ROLE runops_test_weak LOGIN PASSWORD 'weak'")
    try:
        weak = make_conninfo(url, user="runops_test_weak", password="weak")
        done = runops("migrate", "--control-plane-url", weak, cwd=stores.home)
        assert done.returncode == 5, done.stderr
        [line] = [x for x in done.stderr.splitlines() if x.startswith("error")]
        assert "not a superuser" in line and "CREATEROLE" in line and "GRANT CREATE ON DATABASE" in line
        assert "nothing was changed" in line
        assert not has_runops_schema(url)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP ROLE runops_test_weak")


def test_an_unreachable_peer_is_refused_before_anything_changes(stores: Stores, scratch_db) -> None:
    cp_url, ro_url = scratch_db("reachcp"), scratch_db("reachro")
    done = runops("migrate", "--control-plane-url", cp_url, "--run-ops-url", ro_url,
                  "--peer-host", "control_plane=127.0.0.1:1", cwd=stores.home)
    assert done.returncode == 5, done.stderr
    assert "cannot reach the control plane at 127.0.0.1:1" in done.stderr and "nothing was changed" in done.stderr
    assert not has_runops_schema(cp_url) and not has_runops_schema(ro_url)


def test_unbounded_slot_wal_is_refused(stores: Stores) -> None:
    with psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = -1")
        conn.execute("SELECT pg_reload_conf()")
        try:
            with pytest.raises(migrate.PreconditionFailed, match="max_slot_wal_keep_size"):
                # Reload is asynchronous: a fresh session sees the new value once the postmaster
                # has re-read the file.
                for _ in range(50):
                    migrate.preflight(stores.admin[CONTROL_PLANE], stores.admin[RUN_OPS])
                    time.sleep(0.1)
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def trusting() -> Iterator[LocalStores]:
    """Two clusters whose pg_hba trusts every TCP login on loopback."""
    home = Path(tempfile.mkdtemp(prefix="runops-trust-"))
    home.chmod(0o755)
    local, _ = LocalStores.create(home / ".runops", fsync=False)
    try:
        for cluster in local.clusters.values():
            cluster.init(Path(local.bindir))
            hba = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
            subprocess.run(_as_server_user(["sh", "-c", f"cat > {cluster.datadir}/pg_hba.conf"]), input=hba,
                           text=True, check=True)
        local.start()
        yield local
    finally:
        local.destroy()
        shutil.rmtree(home, ignore_errors=True)


def test_stores_that_trust_tcp_logins_are_wired_with_password_required_false_and_peer_host_and_sslmode(
        trusting: LocalStores) -> None:
    admin = {s: make_conninfo(u, sslmode="disable") for s, u in trusting.admin_urls().items()}
    peers = migrate.parse_peer_hosts(["control_plane=localhost", "run_ops=localhost"])
    report = migrate.migrate(admin[CONTROL_PLANE], admin[RUN_OPS], peers)
    assert report.wired and any("password_required" in n for n in report.notes), report.notes
    for store, url in admin.items():
        with psycopg.connect(url) as conn:
            options = conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'runops_peer'").fetchone()
            assert options is not None and "host=localhost" in options[0] and "sslmode=disable" in options[0]
            mapping = conn.execute("SELECT umoptions FROM pg_user_mappings WHERE srvname = 'runops_peer'").fetchone()
            assert mapping is not None and "password_required=false" in mapping[0]
            conn.execute("SET ROLE runops_owner")
            assert conn.execute("SELECT count(*) FROM runops_peer.store_identity_view").fetchone() == (1,), store
    with psycopg.connect(admin[RUN_OPS]) as conn:
        sub = conn.execute("SELECT subconninfo FROM pg_subscription WHERE subname = %s",
                           [migrate.SUBSCRIPTION]).fetchone()
    assert report.mirror == "logical replication"
    assert sub is not None and "host=localhost" in sub[0] and "sslmode=disable" in sub[0]
    assert "user=runops_mirror_runops" in sub[0]  # a replication role, not the DBA's superuser


def test_the_mirror_replicates_as_its_own_role(stores: Stores, client) -> None:
    with psycopg.connect(stores.admin[RUN_OPS]) as conn:
        row = conn.execute("SELECT subconninfo FROM pg_subscription WHERE subname = %s",
                           [migrate.SUBSCRIPTION]).fetchone()
    assert row is not None and "user=runops_mirror_" in row[0] and "user=postgres" not in row[0]
    org = client.create_organization(f"mirror-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    assert client.wait_for_mirror()
    with psycopg.connect(stores.admin[RUN_OPS]) as conn:
        assert conn.execute("SELECT 1 FROM runops.organizations WHERE id = %s", [org]).fetchone() == (1,)
