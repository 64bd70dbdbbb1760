"""The trust model (SPEC §5 [1.2], docs/security.md) as the catalog and real logins show it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops import migrate

from .conftest import Env, Stores, sqlstate_of

# What the other store's postgres_fdw imports (sql/fdw/wire_peer.sql), plus store_config, which
# the identity view's store_identity() reads as the calling login.
FDW_READS = {"runs", "run_view", "batches", "batch_items", "waitpoints", "waitpoint_view", "run_waitpoints",
             "organizations", "projects", "runtime_environments", "split_settings", "store_identity_view",
             "peer_identity_view", "idempotency_claims", "xact_snapshot_view", "store_config",
             "environment_shards"}


def readable_by(conn: psycopg.Connection[Any], role: str) -> set[str]:
    return {r[0] for r in conn.execute("""
        SELECT c.relname FROM pg_class AS c
        WHERE c.relnamespace = 'runops'::regnamespace AND c.relkind IN ('r', 'v', 'p')
          AND has_table_privilege(%s, c.oid, 'SELECT')""", [role])}


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_the_fdw_login_reads_exactly_what_the_other_store_imports(stores: Stores, store: str) -> None:
    with psycopg.connect(stores.admin[store]) as conn:
        assert readable_by(conn, "runops_fdw") == FDW_READS
        writable = {r[0] for r in conn.execute("""
            SELECT c.relname FROM pg_class AS c WHERE c.relnamespace = 'runops'::regnamespace
              AND c.relkind = 'r' AND (has_table_privilege('runops_fdw', c.oid, 'INSERT')
                   OR has_table_privilege('runops_fdw', c.oid, 'UPDATE')
                   OR has_table_privilege('runops_fdw', c.oid, 'DELETE'))""")}
        # The claim ledger is the one cross-store write (SPEC §5), on its home only.
        assert writable == ({"idempotency_claims"} if store == RUN_OPS else set())


def test_the_subscription_replicates_as_a_role_with_replication_and_the_mirrored_tables_only(stores: Stores) -> None:
    with psycopg.connect(stores.admin[RUN_OPS]) as ro:
        row = ro.execute("SELECT subconninfo FROM pg_subscription WHERE subname = 'runops_mirror'").fetchone()
        assert row is not None
    user = dict(kv.split("=", 1) for kv in row[0].split() if "=" in kv)["user"]
    with psycopg.connect(stores.admin[CONTROL_PLANE]) as cp:
        attrs = cp.execute("SELECT rolsuper, rolreplication, rolcreaterole, rolcreatedb, rolbypassrls "
                           "FROM pg_roles WHERE rolname = %s", [user]).fetchone()
        assert attrs == (False, True, False, False, False)
        assert readable_by(cp, user) == set(migrate.MIRRORED_TABLES)
        assert cp.execute("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
                          "WHERE r.rolname = %s", [user]).fetchone() == (0,)  # a member of nothing


@pytest.fixture
def services(stores: Stores) -> Iterator[dict[str, str]]:
    """Two service logins, members of runops_app, on the run-ops store; their URLs."""
    made: dict[str, str] = {}
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as conn:
        for name in ("svc_billing", "svc_mailer"):
            password = secrets.token_urlsafe(16)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE runops_app").format(
                sql.Identifier(name), sql.Literal(password)))
            made[name] = make_conninfo(stores.app[RUN_OPS], user=name, password=password)
    yield made
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_service_login_calls_the_api_and_cannot_lock_out_another(services: dict[str, str], new_env: Env) -> None:
    with psycopg.connect(services["svc_billing"], autocommit=True) as conn:
        row = conn.execute("SELECT residency FROM runops.trigger_run(%s, 't', %s)",
                           [new_env.environment_id, Jsonb({})]).fetchone()
        assert row == ("NEW",)
        for target in ("runops_app", "svc_mailer"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'taken'").format(sql.Identifier(target)))
        with pytest.raises(psycopg.Error) as read:
            conn.execute("SELECT * FROM runops.runs LIMIT 1")
        assert sqlstate_of(read.value) == "42501"
    with psycopg.connect(services["svc_mailer"]) as conn:  # still logs in with its own password
        assert conn.execute("SELECT current_user").fetchone() == ("svc_mailer",)
