"""Deploying the stores: Alembic histories (one per store) and the wiring outside them.

The histories build each store's schema and functions. The wiring — postgres_fdw both ways and
the tenant mirror — depends on where the *other* store is, so it is not part of any history:
`runops migrate` (re)applies it idempotently after upgrading, from the two admin URLs.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .schema import ALEMBIC_INI, SQL

SECTIONS = {"CONTROL_PLANE": "control_plane", "RUN_OPS": "run_ops"}
PUBLICATION = "runops_tenants"
SUBSCRIPTION = "runops_mirror"
MIRRORED_TABLES = ("organizations", "projects", "runtime_environments", "split_settings")


def alembic_config(store: str, url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI), ini_section=SECTIONS[store])
    cfg.attributes["url"] = url
    return cfg


def upgrade(store: str, url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(store, url), revision)


def head_revision(store: str, url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(store, url)).get_current_head()


def current_revision(store: str, url: str) -> str | None:
    table = f"alembic_version_{SECTIONS[store]}"
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{table}"]).fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute(sql.SQL("SELECT version_num FROM public.{}").format(sql.Identifier(table))).fetchone()
        return None if row is None else str(row[0])


@dataclass
class Identity:
    system_identifier: str
    database_name: str


def identity(url: str) -> Identity:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT (pg_control_system()).system_identifier::text, current_database()").fetchone()
        assert row is not None
        return Identity(row[0], row[1])


@dataclass
class MigrateReport:
    upgraded: list[str]
    wired: bool
    mirror: str          # "logical replication", "pull", or "none"
    notes: list[str]


def migrate(control_plane_url: str, run_ops_url: str | None) -> MigrateReport:
    """Upgrades both stores and wires them; with one URL (or two naming the same database) it
    installs the control plane only and wires nothing."""
    notes: list[str] = []
    upgrade("CONTROL_PLANE", control_plane_url)
    if run_ops_url is None:
        return MigrateReport(["CONTROL_PLANE"], False, "none", notes)
    if identity(run_ops_url) == identity(control_plane_url):
        notes.append("both URLs name the same database: installed the control plane only, wired nothing")
        return MigrateReport(["CONTROL_PLANE"], False, "none", notes)
    upgrade("RUN_OPS", run_ops_url)
    mirror = wire(control_plane_url, run_ops_url, notes)
    return MigrateReport(["CONTROL_PLANE", "RUN_OPS"], True, mirror, notes)


def _target(url: str) -> dict[str, str]:
    info = conninfo_to_dict(url)
    return {"host": str(info.get("host") or "127.0.0.1"), "port": str(info.get("port") or "5432"),
            "dbname": str(info.get("dbname") or info.get("user") or "postgres")}


def _wire_peer(conn: psycopg.Connection[Any], peer: dict[str, str], login: str) -> None:
    template = (SQL / "fdw" / "wire_peer.sql").read_text()
    text = template.format(host=sql.quote(peer["host"]), port=sql.quote(peer["port"]),
                           dbname=sql.quote(peer["dbname"]), login=login)
    with conn.transaction():
        conn.execute(text)


def _fdw_login(role: str, password: str) -> str:
    return f"user {sql.quote(role)}, password {sql.quote(password)}"


def wire_to_self(conn: psycopg.Connection[Any], url: str) -> None:
    """Points a store's FDW at its own database — the misconfiguration the sentinel must refuse.
    Used by the demo and the tests; it logs in as the (trusted, local) superuser."""
    _wire_peer(conn, _target(url), "user 'postgres', password_required 'false'")


def _fdw_login_role(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(Re)creates the login the other store's FDW uses to read this database, with a fresh
    password. One login per database — runops_fdw_<database> — so rewiring one store never
    invalidates the mapping of another database that reads from the same cluster. It inherits
    its (read-only) privileges from runops_fdw."""
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    role = f"runops_fdw_{row[0]}"[:63]
    password = secrets.token_urlsafe(24)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    conn.execute(sql.SQL("GRANT runops_fdw TO {}").format(sql.Identifier(role)))
    return role, password


def wire(control_plane_url: str, run_ops_url: str, notes: list[str]) -> str:
    """postgres_fdw both ways, then the tenant mirror. Idempotent."""
    with psycopg.connect(control_plane_url, autocommit=True) as cp, \
            psycopg.connect(run_ops_url, autocommit=True) as ro:
        _wire_peer(ro, _target(control_plane_url), _fdw_login(*_fdw_login_role(cp)))
        _wire_peer(cp, _target(run_ops_url), _fdw_login(*_fdw_login_role(ro)))
        return _wire_mirror(cp, ro, control_plane_url, notes)


def _wire_mirror(cp: psycopg.Connection[Any], ro: psycopg.Connection[Any], control_plane_url: str,
                 notes: list[str]) -> str:
    row = cp.execute("SELECT current_setting('wal_level'), "
                     "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
    ro_super = ro.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is None or row[0] != "logical" or not row[1] or not (ro_super and ro_super[0]):
        notes.append("the tenant mirror is pulled by tick through the FDW (logical replication needs "
                     "wal_level = logical on the control plane and superuser URLs)")
        ro.execute("SELECT runops.pull_tenant_mirror()")
        return "pull"
    tables = sql.SQL(", ").join(sql.Identifier("runops", t) for t in MIRRORED_TABLES)
    if cp.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", [PUBLICATION]).fetchone() is None:
        cp.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(PUBLICATION), tables))
    # One slot per (publisher database, subscriber database), named so that two databases of one
    # cluster never share or wait on each other's slot. Creating it here, before the
    # subscription, avoids CREATE SUBSCRIPTION waiting on its own cluster.
    sub = ro.execute("SELECT (pg_control_system()).system_identifier::text, "
                     "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    pub = cp.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
    assert sub is not None and pub is not None
    slot = f"runops_mirror_{pub[0]}_{sub[0][-8:]}_{sub[1]}"
    existing = ro.execute("SELECT 1 FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                          "WHERE s.subname = %s AND d.datname = current_database()", [SUBSCRIPTION]).fetchone()
    # The subscription connects with the admin URL as given: password and TLS options included,
    # each value quoted as libpq wants.
    conninfo = make_conninfo(control_plane_url)
    if existing:
        ro.execute(sql.SQL("ALTER SUBSCRIPTION {} CONNECTION {}").format(
            sql.Identifier(SUBSCRIPTION), sql.Literal(conninfo)))
        ro.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(SUBSCRIPTION)))
        return "logical replication"
    if cp.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [slot]).fetchone() is None:
        cp.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    # The initial copy must land in empty tables (an earlier pull may have filled them). If the
    # subscription cannot be made, the pull refills the mirror at once.
    ro.execute(sql.SQL("TRUNCATE {}").format(tables))
    try:
        ro.execute(sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
                           "WITH (create_slot = false, slot_name = {}, copy_data = true)").format(
            sql.Identifier(SUBSCRIPTION), sql.Literal(conninfo), sql.Identifier(PUBLICATION), sql.Literal(slot)))
    except psycopg.Error as exc:
        ro.execute("SELECT runops.pull_tenant_mirror()")
        notes.append(f"the tenant mirror is pulled by tick: the subscription could not be created ({exc})")
        return "pull"
    if not _wait_for_initial_sync(ro):
        notes.append("the tenant mirror's initial copy is still running; the mirror catches up shortly")
    return "logical replication"


def _wait_for_initial_sync(ro: psycopg.Connection[Any], timeout: float = 30.0) -> bool:
    """Waits until the subscription's initial table copies are done. Until then a table-sync
    worker holds a slot being created on the publisher; dropping the subscription meanwhile —
    when both databases share a cluster — waits on that slot forever."""
    deadline = time.monotonic() + timeout
    while True:
        row = ro.execute("SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid "
                         "JOIN pg_database d ON d.oid = s.subdbid "
                         "WHERE s.subname = %s AND d.datname = current_database() AND r.srsubstate <> 'r'",
                         [SUBSCRIPTION]).fetchone()
        if row is not None and row[0] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def drop_mirror(control_plane_url: str, run_ops_url: str) -> None:
    """Removes the subscription, its slot and the publication (before dropping a store)."""
    with psycopg.connect(control_plane_url, autocommit=True) as cp, \
            psycopg.connect(run_ops_url, autocommit=True) as ro:
        row = ro.execute("SELECT s.subslotname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                         "WHERE s.subname = %s AND d.datname = current_database()", [SUBSCRIPTION]).fetchone()
        if row is not None:
            _wait_for_initial_sync(ro)
            name = sql.Identifier(SUBSCRIPTION)
            ro.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(name))
            ro.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(name))
            ro.execute(sql.SQL("DROP SUBSCRIPTION {}").format(name))
            cp.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", [row[0]])
        cp.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION)))


def set_app_password(url: str, password: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE runops_app LOGIN PASSWORD {}").format(sql.Literal(password)))
