"""The trust model (SPEC §5 [1.2], docs/security.md) as the catalog and real logins show it."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops import migrate

from .conftest import Env, Stores, sqlstate_of
from .test_upgrade import RELEASES, install_release

# What the other store's postgres_fdw imports (sql/fdw/wire_peer.sql), plus store_config, which
# the identity view's store_identity() reads as the calling login.
FDW_READS = {"runs", "run_view", "batches", "batch_items", "waitpoints", "waitpoint_view", "run_waitpoints",
             "organizations", "projects", "runtime_environments", "split_settings", "store_identity_view",
             "peer_identity_view", "idempotency_claims", "xact_snapshot_view", "store_config",
             "environment_shards", "bulk_actions", "bulk_action_members", "bulk_action_progress",
             "alert_channels"}


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


def login_url(stores: Stores, store: str, role: str, password: str) -> str:
    return make_conninfo(stores.app[store], user=role, password=password)


@pytest.fixture
def services(stores: Stores, store: str) -> Iterator[dict[str, str]]:
    """Two service logins in runops_api on `store`, made as docs/security.md says; their URLs."""
    made: dict[str, str] = {}
    suffix = secrets.token_hex(3)
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        for name in (f"svc_billing_{suffix}", f"svc_mailer_{suffix}"):
            password = secrets.token_urlsafe(16)
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE runops_api").format(
                sql.Identifier(name), sql.Literal(password)))
            made[name.rsplit("_", 1)[0]] = login_url(stores, store, name, password)
    yield made
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        for url in made.values():
            name = conninfo_to_dict(url)["user"]
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(str(name))))


def refused(conn: psycopg.Connection[Any], statement: str, args: list[Any] | None = None) -> str:
    """Runs `statement`, which must fail; returns its SQLSTATE."""
    try:
        conn.execute(statement, args)
    except psycopg.Error as exc:
        return sqlstate_of(exc) or type(exc).__name__
    return "accepted"


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_a_service_login_cannot_lock_out_the_app_role_or_another_service(
        stores: Stores, store: str, services: dict[str, str], make_env: Callable[..., Env]) -> None:
    env = make_env("cuid" if store == CONTROL_PLANE else "ksuid").environment_id
    billing, mailer = services["svc_billing"], services["svc_mailer"]
    mailer_role = str(conninfo_to_dict(mailer)["user"])
    with psycopg.connect(stores.app[store], autocommit=True) as app, \
            psycopg.connect(mailer, autocommit=True) as other, \
            psycopg.connect(billing, autocommit=True) as conn:
        victims = {"runops_app": app.info.backend_pid, mailer_role: other.info.backend_pid}
        assert conn.execute("SELECT status FROM runops.trigger_run(%s, 't', %s)",
                            [env, Jsonb({})]).fetchone() == ("PENDING",)
        attempts = {}
        # As itself, then as the group it may SET ROLE to (membership implies SET on PostgreSQL 15).
        for as_role in ("the service", "runops_api"):
            if as_role == "runops_api":
                conn.execute("SET ROLE runops_api")
            for target in victims:
                ident = sql.Identifier(target).as_string(conn)
                for statement in (f"SET ROLE {ident}", f"ALTER ROLE {ident} PASSWORD 'taken'",
                                  f"ALTER ROLE {ident} SET statement_timeout = '1ms'",
                                  f"ALTER ROLE {ident} NOLOGIN", f"GRANT {ident} TO runops_api"):
                    attempts[(as_role, statement)] = refused(conn, statement)
                for signal in ("pg_cancel_backend", "pg_terminate_backend"):
                    attempts[(as_role, f"{signal}({target})")] = refused(conn, f"SELECT {signal}(%s)",
                                                                         [victims[target]])
            for statement in ("ALTER ROLE runops_api LOGIN", f"GRANT runops_api TO {mailer_role}",
                              f"REVOKE runops_api FROM {mailer_role}", "CREATE ROLE svc_intruder"):
                attempts[(as_role, statement)] = refused(conn, statement)
        assert {k: v for k, v in attempts.items() if v != "42501"} == {}
        # A member may ask to DROP OWNED BY the group: it owns nothing, and the grants it holds
        # were made by the owner, whom only the owner (or a superuser) can revoke them for.
        grants = "SELECT count(*) FROM pg_proc AS p, aclexplode(p.proacl) AS a WHERE a.grantee = 'runops_api'::regrole"
        held = conn.execute(grants).fetchone()
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP OWNED BY runops_api")
        assert conn.execute(grants).fetchone() == held and held is not None and held[0] > 50
        conn.execute("RESET ROLE")
        # The victims' sessions were neither canceled nor ended, and their grants still hold.
        assert app.execute("SELECT status FROM runops.trigger_run(%s, 't', %s)",
                           [env, Jsonb({})]).fetchone() == ("PENDING",)
        assert other.execute("SELECT count(*) FROM runops.trigger_run(%s, 't', %s)",
                             [env, Jsonb({})]).fetchone() == (1,)
        with pytest.raises(psycopg.Error) as read:
            conn.execute("SELECT * FROM runops.runs LIMIT 1")
        assert sqlstate_of(read.value) == "42501"
    # Every login still logs in with its own password, with its settings untouched.
    for url in (stores.app[store], mailer):
        with psycopg.connect(url) as again:
            assert again.execute("SELECT current_setting('statement_timeout')").fetchone() == ("0",)
            assert again.execute("SELECT runops.store_role()").fetchone() == (store,)


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_the_roles_hold_exactly_what_docs_security_lists(stores: Stores, store: str) -> None:
    with psycopg.connect(stores.admin[store]) as conn:
        # runops_api: the grants, no login, nothing owned, no default privileges, no attributes.
        assert conn.execute("""SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
                               FROM pg_roles WHERE rolname = 'runops_api'""").fetchone() == (False,) * 6
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relowner = 'runops_api'::regrole").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proowner = 'runops_api'::regrole").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_default_acl WHERE defaclrole = 'runops_api'::regrole"
                            ).fetchone() == (0,)
        assert readable_by(conn, "runops_api") == {"store_config"}
        assert {r[0] for r in conn.execute("""
            SELECT c.relname FROM pg_class AS c WHERE c.relnamespace = 'runops'::regnamespace
              AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege('runops_api', c.oid, 'USAGE') END
            """)} == {"cuid_counter"}
        # runops_app: a login in runops_api holding nothing of its own, and nobody's group.
        assert conn.execute("SELECT pg_has_role('runops_app', 'runops_api', 'MEMBER')").fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM pg_auth_members WHERE roleid = 'runops_app'::regrole"
                            ).fetchone() == (0,)
        assert conn.execute("""
            SELECT count(*) FROM pg_proc AS p, aclexplode(p.proacl) AS a
            WHERE p.pronamespace = 'runops'::regnamespace AND a.grantee = 'runops_app'::regrole""").fetchone() == (0,)
        # The FDW's group and the owner are no login either.
        assert conn.execute("SELECT bool_or(rolcanlogin) FROM pg_roles WHERE rolname IN "
                            "('runops_owner', 'runops_fdw', 'runops_clock')").fetchone() == (False,)


# Storage outside every runops limit: large objects, and WAL messages.
UNBOUNDED_WRITES = ["SELECT lo_create(0)", "SELECT lo_creat(-1)", "SELECT lo_from_bytea(0, '\\x00')",
                    "SELECT lo_put(1, 0, '\\x00')", "SELECT lo_get(1)", "SELECT lo_unlink(1)",
                    "SELECT pg_logical_emit_message(false, 'p', repeat('x', 1000))"]


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_services_may_not_use_large_objects_or_write_wal_messages(stores: Stores, store: str,
                                                                  services: dict[str, str]) -> None:
    for url in (stores.app[store], services["svc_billing"]):
        with psycopg.connect(url, autocommit=True) as conn:
            assert {call: refused(conn, call) for call in UNBOUNDED_WRITES} == \
                {call: "42501" for call in UNBOUNDED_WRITES}


def test_an_upgraded_store_moves_service_logins_out_of_runops_app_and_keeps_them_working(
        stores: Stores, scratch_db: Callable[[str], str]) -> None:
    """A store at r0004 whose services joined runops_app (as docs/security.md said then), and
    another application's role that uses large objects, upgraded in place."""
    url = scratch_db("roles")
    install_release(CONTROL_PLANE, url, RELEASES["r0004"])  # the r0004 release itself, from git
    suffix = secrets.token_hex(3)
    service, other = f"svc_old_{suffix}", f"other_app_{suffix}"
    password = secrets.token_urlsafe(16)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE runops_app").format(
            sql.Identifier(service), sql.Literal(password)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(other), sql.Literal(password)))
    service_url, other_url = (make_conninfo(url, user=role, password=password, host="127.0.0.1")
                              for role in (service, other))
    try:
        with psycopg.connect(service_url, autocommit=True) as conn:
            assert conn.execute("SELECT runops.store_role()").fetchone() == (CONTROL_PLANE,)
            conn.execute("SET ROLE runops_app")  # the hole this upgrade closes
        with psycopg.connect(other_url, autocommit=True) as conn:
            conn.execute("SELECT lo_unlink(lo_create(0))")
        migrate.upgrade(CONTROL_PLANE, url)
        migrate.set_app_password(url, stores.local.app_password)
        with psycopg.connect(url) as admin:
            assert admin.execute("SELECT pg_has_role(%s, 'runops_app', 'MEMBER'), "
                                 "pg_has_role(%s, 'runops_api', 'MEMBER')", [service, service]).fetchone() == \
                (False, True)
        with psycopg.connect(service_url, autocommit=True) as conn:
            org = conn.execute("SELECT runops.create_organization(%s, '{}')", [f"o-{suffix}"]).fetchone()
            assert org is not None and conn.execute("SELECT runops.store_role()").fetchone() == (CONTROL_PLANE,)
            assert refused(conn, "SET ROLE runops_app") == "42501"
            assert refused(conn, "SELECT lo_create(0)") == "42501"
        app_url = make_conninfo(url, user="runops_app", password=stores.local.app_password, host="127.0.0.1")
        with psycopg.connect(app_url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM runops.list_environments(NULL)").fetchone() is not None
            assert refused(conn, "SELECT lo_create(0)") == "42501"
        with psycopg.connect(other_url, autocommit=True) as conn:  # another application keeps them
            conn.execute("SELECT lo_unlink(lo_create(0)), pg_logical_emit_message(false, 'p', 'x')")
    finally:
        with psycopg.connect(stores.admin_url(CONTROL_PLANE, "postgres"), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(str(conninfo_to_dict(url)["dbname"]))))
            for role in (service, other):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
