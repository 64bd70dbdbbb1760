"""Deploying the stores: Alembic histories (one per store) and the wiring outside them.

The histories build each store's schema (the versioned revisions) and, at head, its functions
(the repeatable step; runops.ops.schema). The wiring — postgres_fdw both ways and
the tenant mirror — depends on where the *other* store is, so it is not part of any history:
`runops migrate` (re)applies it idempotently after upgrading, from the two admin URLs.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runops._client_base import split_urls as split_urls  # `runops migrate` reads RUNOPS_RUN_OPS_URL as the client does
from runops.errors import RunOpsError

from . import schema
from .schema import ALEMBIC_INI, SQL

SECTIONS = {"CONTROL_PLANE": "control_plane", "RUN_OPS": "run_ops"}
LABELS = {"CONTROL_PLANE": "control plane", "RUN_OPS": "run-ops store"}
# Where `runops migrate` takes each store's URL from, in order; the local dev stores only when
# none of them is set.
URL_VARS = {"CONTROL_PLANE": ("RUNOPS_CONTROL_PLANE_ADMIN_URL", "RUNOPS_CONTROL_PLANE_URL"),
            "RUN_OPS": ("RUNOPS_RUN_OPS_ADMIN_URL", "RUNOPS_RUN_OPS_URL")}
# libpq options the FDW servers and the subscription take over from the DBA's URL.
CARRIED_OPTIONS = ("sslmode",)
PUBLICATION = "runops_tenants"
SUBSCRIPTION = "runops_mirror"
# heartbeats carries the control plane's tick to the run-ops store: the mirror's freshness.
MIRRORED_TABLES = ("organizations", "projects", "runtime_environments", "split_settings", "heartbeats",
                   "environment_shards", "alert_channels")


def alembic_config(store: str, url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI), ini_section=SECTIONS[store])
    cfg.attributes["url"] = url
    return cfg


def upgrade(store: str, url: str, revision: str = "head", *, tries: int = 5) -> None:
    """Upgrades one store to head (any other ``revision`` is refused: migrations/env_common.py). A
    revision's DDL under live traffic can deadlock with an application transaction; when the
    upgrade is the one PostgreSQL cancels, its transaction rolled back whole, so it is run again
    (a few times, with a pause)."""
    from alembic import command

    for attempt in range(1, tries + 1):
        try:
            command.upgrade(alembic_config(store, url), revision)
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == tries:
                raise
            time.sleep(0.5 * attempt)


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


def functions_current(store: str, url: str) -> bool:
    """Whether the store recorded the repeatable step (functions, stand-ins, grants) this runops
    ships at its head: the checksum only, as the upgrade compares it (`runops doctor` compares
    the installed bodies themselves)."""
    head = head_revision(store, url)
    with psycopg.connect(url) as conn:
        return head is not None and schema.recorded_checksum(conn, store) == schema.repeatable_checksum(store, head)


@dataclass
class Identity:
    system_identifier: str
    database_name: str


def identity(url: str) -> Identity:
    with psycopg.connect(url) as conn:
        return _identity(conn)


def _identity(conn: psycopg.Connection[Any]) -> Identity:
    row = conn.execute("SELECT (pg_control_system()).system_identifier::text, current_database()").fetchone()
    assert row is not None
    return Identity(row[0], row[1])


class PreconditionFailed(RunOpsError):
    """`runops migrate` found something missing before changing anything (exit 5)."""


@dataclass
class Target:
    """A store `runops migrate` acts on, and where its URL came from."""

    store: str
    url: str
    source: str

    def describe(self) -> str:
        info = conninfo_to_dict(self.url)
        where = f"{info.get('user') or '(default user)'}@{info.get('host') or '(local socket)'}:" \
                f"{info.get('port') or 5432}/{info.get('dbname') or '(default database)'}"
        return f"{LABELS[self.store]}: {where} (from {self.source})"


def resolve_targets(control_plane_url: str | None = None, run_ops_url: str | None = None,
                    environ: dict[str, str] | None = None) -> dict[str, Target]:
    """The stores to migrate: the flags, else RUNOPS_*_ADMIN_URL, else RUNOPS_*_URL; the local dev
    stores only when none of these is set. A run-ops store alone is never migrated."""
    env = dict(os.environ) if environ is None else environ
    flags = {"CONTROL_PLANE": control_plane_url, "RUN_OPS": run_ops_url}
    found: dict[str, Target] = {}
    for store, flag in flags.items():
        if flag:
            found[store] = Target(store, flag, f"--{SECTIONS[store].replace('_', '-')}-url")
            continue
        for var in URL_VARS[store]:
            if env.get(var):
                found[store] = Target(store, env[var], var)
                break
    if not found:
        from .local_cluster import LocalStores

        local = LocalStores.from_cwd()
        admin = {"CONTROL_PLANE": local.admin_urls()["CONTROL_PLANE"], "RUN_OPS": ",".join(local.shard_admin_urls())}
        return {store: Target(store, url, "the local dev stores in .runops/") for store, url in admin.items()}
    if "CONTROL_PLANE" not in found:
        raise PreconditionFailed("no control-plane URL (a run-ops store is never migrated alone): pass "
                                 "--control-plane-url or set RUNOPS_CONTROL_PLANE_ADMIN_URL")
    return found


def parse_peer_hosts(values: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """``--peer-host control_plane=HOST[:PORT]``: how the *other* store's server reaches this one."""
    peers: dict[str, dict[str, str]] = {}
    for value in values:
        name, _, where = value.partition("=")
        store = name.strip().upper().replace("-", "_")
        if store not in SECTIONS or not where:
            raise PreconditionFailed(f"--peer-host {value!r}: expected control_plane=HOST[:PORT] "
                                     "or run_ops=HOST[:PORT]")
        host, _, port = where.rpartition(":") if where.count(":") == 1 else (where, "", "")
        peers[store] = {"host": host, **({"port": port} if port else {})}
    return peers


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _privilege_problem(conn: psycopg.Connection[Any], label: str) -> str | None:
    """None for a superuser; else the grants the install needs that this login lacks, if any."""
    row = conn.execute("""
        SELECT r.rolname, r.rolsuper, r.rolcreaterole, current_database(),
               has_database_privilege(current_database(), 'CREATE'),
               EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'postgres_fdw'),
               EXISTS (SELECT 1 FROM pg_foreign_data_wrapper WHERE fdwname = 'postgres_fdw')
                 AND has_foreign_data_wrapper_privilege('postgres_fdw', 'USAGE'),
               (SELECT pg_has_role(current_user, o.oid, 'MEMBER') FROM pg_roles o WHERE o.rolname = 'runops_owner')
        FROM pg_roles r WHERE r.rolname = current_user""").fetchone()
    assert row is not None
    user, is_super, createrole, db, create_db, fdw_installed, fdw_usage, owner_member = row
    if is_super:
        return None
    u, d = sql.Identifier(user).as_string(conn), sql.Identifier(db).as_string(conn)
    missing = []
    if not createrole:
        missing.append(f"CREATEROLE (ALTER ROLE {u} CREATEROLE)")
    if not create_db:
        missing.append(f"CREATE on the database (GRANT CREATE ON DATABASE {d} TO {u})")
    if not fdw_installed:
        missing.append(f"postgres_fdw (a superuser runs CREATE EXTENSION postgres_fdw in {d})")
    elif not fdw_usage:
        missing.append(f"USAGE on postgres_fdw (GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO {u})")
    if owner_member is False:
        missing.append(f"membership in runops_owner (GRANT runops_owner TO {u})")
    if not missing:
        return None
    return f"{label}: {user} is not a superuser and lacks " + "; ".join(missing) + " — or run migrate as a superuser"


def _mirror_problem(cp: psycopg.Connection[Any]) -> str | None:
    """Logical replication (when possible at all: wal_level = logical and a superuser) must have
    its slot's WAL bounded."""
    row = cp.execute("SELECT current_setting('wal_level'), current_setting('max_slot_wal_keep_size'), "
                     "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
    assert row is not None
    wal_level, keep, is_super = row
    if wal_level != "logical" or not is_super:
        return None  # the mirror is pulled by tick; _wire_mirror says so
    if keep in ("-1", "-1kB"):
        return ("control plane: max_slot_wal_keep_size is unlimited, so a dead run-ops store could fill its disk "
                "through the mirror's replication slot: ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; "
                "SELECT pg_reload_conf();")
    return None


def _probe_peer(conn: psycopg.Connection[Any], peer: dict[str, str], peer_url: str, label: str,
                peer_label: str) -> str | None:
    """Connects from this store's server to the peer through postgres_fdw, as the wiring will,
    inside a transaction that is rolled back: nothing stays behind."""
    info = conninfo_to_dict(peer_url)
    options = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v))
                                 for k, v in _server_options(peer).items())
    login = {"user": str(info.get("user") or "postgres"),
             **({"password": str(info["password"])} if info.get("password") else {})}
    mapping = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in login.items())
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
            conn.execute(sql.SQL("CREATE SERVER runops_preflight FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({})")
                         .format(options))
            conn.execute(sql.SQL("CREATE USER MAPPING FOR CURRENT_USER SERVER runops_preflight OPTIONS ({})")
                         .format(mapping))
            conn.execute("CREATE SCHEMA runops_preflight")
            conn.execute("CREATE FOREIGN TABLE runops_preflight.probe (datname name) SERVER runops_preflight "
                         "OPTIONS (schema_name 'pg_catalog', table_name 'pg_database')")
            conn.execute("SELECT count(*) FROM runops_preflight.probe")
    except psycopg.Error as exc:
        return (f"{label} cannot reach the {peer_label} at {peer['host']}:{peer['port']} as its FDW will "
                f"({_first_line(exc)}): check pg_hba.conf and the network between the servers, or pass "
                f"--peer-host {'control_plane' if peer_label == 'control plane' else 'run_ops'}=HOST[:PORT]")
    return None


def preflight(control_plane_url: str, run_ops_url: str | None,
              peers: dict[str, dict[str, str]] | None = None) -> bool:
    """Checks everything `migrate` needs before it changes anything; raises PreconditionFailed
    naming what is missing and how to fix it. Returns whether the two URLs name distinct
    databases (to be wired)."""
    urls = {"CONTROL_PLANE": control_plane_url, **({"RUN_OPS": run_ops_url} if run_ops_url else {})}
    problems: list[str] = []
    conns: dict[str, psycopg.Connection[Any]] = {}
    try:
        for store, url in urls.items():
            try:
                conns[store] = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.Error as exc:
                problems.append(f"{LABELS[store]}: cannot connect ({_first_line(exc)})")
        for store, conn in conns.items():
            if problem := _privilege_problem(conn, LABELS[store]):
                problems.append(problem)
        distinct = len(conns) == 2 and _identity(conns["CONTROL_PLANE"]) != _identity(conns["RUN_OPS"])
        if distinct and not problems:
            if problem := _mirror_problem(conns["CONTROL_PLANE"]):
                problems.append(problem)
            for store, other in (("RUN_OPS", "CONTROL_PLANE"), ("CONTROL_PLANE", "RUN_OPS")):
                if problem := _probe_peer(conns[store], _target(urls[other], (peers or {}).get(other)), urls[other],
                                          f"the {LABELS[store]}", LABELS[other]):
                    problems.append(problem)
    finally:
        for conn in conns.values():
            conn.close()
    if problems:
        raise PreconditionFailed("; ".join(problems) + " (nothing was changed)")
    return distinct


@dataclass
class MigrateReport:
    upgraded: list[str]
    wired: bool
    mirror: str          # "logical replication", "pull", or "none"
    notes: list[str]


def migrate(control_plane_url: str, run_ops_url: str | None,
            peers: dict[str, dict[str, str]] | None = None) -> MigrateReport:
    """Checks the preconditions (nothing changes when one is missing), upgrades both stores and
    wires them; with one URL (or two naming the same database) it installs the control plane
    only and wires nothing. ``peers`` overrides the host/port the other store's server uses to
    reach a store (``--peer-host``)."""
    notes: list[str] = []
    distinct = preflight(control_plane_url, run_ops_url, peers)
    upgrade("CONTROL_PLANE", control_plane_url)
    if run_ops_url is None:
        return MigrateReport(["CONTROL_PLANE"], False, "none", notes)
    if not distinct:
        notes.append("both URLs name the same database: installed the control plane only, wired nothing")
        return MigrateReport(["CONTROL_PLANE"], False, "none", notes)
    upgrade("RUN_OPS", run_ops_url)
    mirror = wire(control_plane_url, run_ops_url, notes, peers)
    return MigrateReport(["CONTROL_PLANE", "RUN_OPS"], True, mirror, notes)


# While several shards are wired (migrate_shards): the password of each login made on a database,
# so every shard's mapping and subscription uses the same one.
_shared_passwords: dict[str, str] | None = None


def migrate_shards(control_plane_url: str, shard_urls: list[str], peers: dict[str, dict[str, str]] | None = None,
                   router_url: str | None = None) -> MigrateReport:
    """`runops migrate` with one --run-ops-url per shard (SPEC §9 [1.3], docs/scale-out.md): checks
    every pair first, upgrades every store, numbers the shards in the order given, wires each
    shard to the control plane (the control plane's FDW to shard 0), then (re)writes the router.
    With one shard and no router this is `migrate`."""
    global _shared_passwords
    if len(shard_urls) <= 1 and router_url is None:
        return migrate(control_plane_url, shard_urls[0] if shard_urls else None, peers)
    if not shard_urls:
        raise PreconditionFailed("--router-url needs at least one --run-ops-url (the shards it routes to)")
    named = {(i.system_identifier, i.database_name) for i in map(identity, [control_plane_url, *shard_urls])}
    if len(named) != len(shard_urls) + 1:
        raise PreconditionFailed("every --run-ops-url must name its own database, distinct from the control plane's "
                                 "(nothing was changed)")
    for url in shard_urls:
        preflight(control_plane_url, url, peers)
    notes: list[str] = []
    upgrade("CONTROL_PLANE", control_plane_url)
    for url in shard_urls:
        upgrade("RUN_OPS", url)
    configure_shards(control_plane_url, shard_urls)
    _shared_passwords = {}
    try:
        # The control plane reaches every shard (its claims go to the environment's shard) before
        # any claim backfill runs in wire().
        for number, url in enumerate(shard_urls[1:], start=1):
            wire_control_plane_to_shard(control_plane_url, url, number, notes)
        mirror = "none"
        for number, url in enumerate(shard_urls):
            mirror = wire(control_plane_url, url, notes, peers, control_plane_reads_it=number == 0)
    finally:
        _shared_passwords = None
    if router_url is not None:
        from .router import install_router

        version = install_router(router_url, control_plane_url, shard_urls, peers)
        notes.append(f"router: {len(shard_urls)} shards, cluster definition version {version}")
    return MigrateReport(["CONTROL_PLANE", *(f"RUN_OPS shard {n}" for n in range(len(shard_urls)))], True,
                         mirror, notes)


def configure_shards(control_plane_url: str, shard_urls: list[str]) -> None:
    """Numbers the shards in the order given and writes the shard count everywhere, with the
    deployment's cut-over second (shard 0's: where ids minted before shards live). A store that
    already minted ids as another shard number is refused: renumbering it would strand its rows."""
    with psycopg.connect(shard_urls[0], autocommit=True) as first:
        row = first.execute("SELECT shard_ids_since FROM runops.store_config").fetchone()
        assert row is not None
        since = int(row[0])
    for number, url in enumerate(shard_urls):
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT c.shard_number, EXISTS (SELECT FROM runops.runs) "
                               "FROM runops.store_config AS c").fetchone()
            assert row is not None
            if row[0] != number and row[1]:
                raise PreconditionFailed(f"the run-ops store at --run-ops-url number {number + 1} is shard {row[0]} "
                                         "and "
                                         f"holds runs: pass every --run-ops-url in shard order, shard 0 first")
    for number, url in enumerate(shard_urls):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE runops.store_config SET shard_number = %s, shard_count = %s, shard_ids_since = %s",
                         [number, len(shard_urls), since])
    with psycopg.connect(control_plane_url, autocommit=True) as cp:
        cp.execute("UPDATE runops.store_config SET shard_count = %s, shard_ids_since = %s", [len(shard_urls), since])


def _target(url: str, override: dict[str, str] | None = None) -> dict[str, str]:
    """Where the other store's server reaches the store of ``url``: the URL's host, port and
    database (or ``override``'s host and port), and the libpq options carried over."""
    info = conninfo_to_dict(url)
    target = {"host": str(info.get("host") or "127.0.0.1"), "port": str(info.get("port") or "5432"),
              "dbname": str(info.get("dbname") or info.get("user") or "postgres")}
    target.update({k: str(info[k]) for k in CARRIED_OPTIONS if info.get(k)})
    target.update(override or {})
    return target


def _server_options(peer: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in peer.items() if k in ("host", "port", "dbname", *CARRIED_OPTIONS)}


def _wire_peer(conn: psycopg.Connection[Any], peer: dict[str, str], login: str, server: str = "runops_peer") -> None:
    """Wires server and schema ``server``: runops_peer from wire_peer.sql, a control plane's
    runops_peer_<k> (shard k >= 1) from wire_shard_peer.sql."""
    template = (SQL / "fdw" / ("wire_peer.sql" if server == "runops_peer" else "wire_shard_peer.sql")).read_text()
    text = template.format(host=sql.quote(peer["host"]), port=sql.quote(peer["port"]),
                           dbname=sql.quote(peer["dbname"]), login=login, server=server)
    carried = sql.SQL(", ").join(sql.SQL("ADD {} {}").format(sql.Identifier(k), sql.Literal(peer[k]))
                                 for k in CARRIED_OPTIONS if k in peer)
    # Dropping the old foreign tables one by one can deadlock with live calls that read two of
    # them; the transaction rolled back whole, so it is run again (as upgrade() does).
    for attempt in range(1, 6):
        try:
            with conn.transaction():
                conn.execute(text)
                if any(k in peer for k in CARRIED_OPTIONS):
                    conn.execute(sql.SQL("ALTER SERVER {} OPTIONS ({})").format(sql.Identifier(server), carried))
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == 5:
                raise
            time.sleep(0.5 * attempt)


def _fdw_works(conn: psycopg.Connection[Any], server: str = "runops_peer") -> psycopg.Error | None:
    """Reads through the wired mapping as runops_owner, the role the functions run as."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL ROLE runops_owner")
            conn.execute(sql.SQL("SELECT 1 FROM {}.store_identity_view LIMIT 1").format(sql.Identifier(server)))
    except psycopg.Error as exc:
        return exc
    return None


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
    role, password = _database_login(conn, "runops_fdw", "LOGIN")
    conn.execute(sql.SQL("GRANT runops_fdw TO {}").format(sql.Identifier(role)))
    return role, password


def _database_login(conn: psycopg.Connection[Any], prefix: str, attributes: str) -> tuple[str, str]:
    """(Re)creates the login ``<prefix>_<this database>`` with ``attributes`` and a fresh
    password; returns both. Per database, so rewiring one database never breaks another's."""
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    role = f"{prefix}_{row[0]}"[:63]
    password = secrets.token_urlsafe(24)
    if _shared_passwords is not None:
        # Several shards log in to one control-plane database as the same role: one password for
        # all of them, or wiring the next shard would lock the previous one out.
        password = _shared_passwords.setdefault(role, password)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(sql.SQL(f"{verb} ROLE {{}} {attributes} PASSWORD {{}}").format(sql.Identifier(role),
                                                                              sql.Literal(password)))
    return role, password


def _wire_checked(conn: psycopg.Connection[Any], peer_conn: psycopg.Connection[Any], peer: dict[str, str],
                  label: str, notes: list[str], server: str = "runops_peer") -> None:
    """Wires ``conn``'s FDW to the peer and reads through it. A peer that asks the FDW login no
    password (trust) makes postgres_fdw refuse the non-superuser mapping; a superuser may then
    declare that on the mapping (password_required 'false')."""
    login = _fdw_login(*_fdw_login_role(peer_conn))

    def attempt(login: str) -> psycopg.Error | None:
        try:
            _wire_peer(conn, peer, login, server)  # imports the foreign tables: connects already
        except psycopg.Error as exc:
            return exc
        return _fdw_works(conn, server)

    failure = attempt(login)
    if failure is not None and failure.sqlstate == "2F003":  # "password is required"
        failure = attempt(login + ", password_required 'false'")
        notes.append(f"the {label} asks the FDW login no password (trust): its mapping sets password_required "
                     "'false' (require scram for TCP logins there to drop this)")
    if failure is not None:
        raise PreconditionFailed(f"the FDW cannot read the {label} at {peer['host']}:{peer['port']} "
                                 f"({_first_line(failure)}): check pg_hba.conf for the runops_fdw_* logins")


def wire(control_plane_url: str, run_ops_url: str, notes: list[str],
         peers: dict[str, dict[str, str]] | None = None, *, control_plane_reads_it: bool = True) -> str:
    """postgres_fdw both ways, then the tenant mirror. Idempotent. A run-ops shard other than
    shard 0 is wired one way only (``control_plane_reads_it`` false): the control plane's FDW
    reaches shard 0 (docs/scale-out.md, "Mirror and FDW per shard")."""
    peers = peers or {}
    with psycopg.connect(control_plane_url, autocommit=True) as cp, \
            psycopg.connect(run_ops_url, autocommit=True) as ro:
        cp_target = _target(control_plane_url, peers.get("CONTROL_PLANE"))
        _wire_checked(ro, cp, cp_target, LABELS["CONTROL_PLANE"], notes)
        if control_plane_reads_it:
            _wire_checked(cp, ro, _target(run_ops_url, peers.get("RUN_OPS")), LABELS["RUN_OPS"], notes)
        # The subscription connects from the run-ops server: the control plane as that server
        # reaches it, with the URL's login, password and TLS options.
        subscription_url = make_conninfo(control_plane_url, host=cp_target["host"], port=cp_target["port"])
        mirror = _wire_mirror(cp, ro, subscription_url, notes)
        _complete_claims_backfill(cp, ro, notes)
        return mirror


def wire_control_plane_to_shard(control_plane_url: str, shard_url: str, number: int, notes: list[str]) -> None:
    """The control plane's FDW to run-ops shard ``number`` >= 1, server and schema
    runops_peer_<number>: its claims for that shard's environments go there (docs/scale-out.md,
    "Mirror and FDW per shard"). Idempotent; a shard added later gets its server on the next
    migrate. It reaches the shard at its URL's host (``--peer-host run_ops=`` names shard 0's)."""
    with psycopg.connect(control_plane_url, autocommit=True) as cp, \
            psycopg.connect(shard_url, autocommit=True) as shard:
        _wire_checked(cp, shard, _target(shard_url), f"run-ops shard {number}", notes,
                      server=f"runops_peer_{number}")


def _complete_claims_backfill(cp: psycopg.Connection[Any], ro: psycopg.Connection[Any], notes: list[str]) -> None:
    """A pair upgraded from r0001 with the split enabled: claims for the keys its runs already
    hold (docs/idempotency-across-stores.md). The run-ops store's own keys first, then the
    control plane's, which also marks the ledger complete. Nothing to do on a fresh pair."""
    claimed = 0
    for conn in (ro, cp):
        row = conn.execute("SELECT runops.complete_claims_backfill()").fetchone()
        claimed += int(row[0]) if row else 0
    if claimed:
        notes.append(f"the idempotency claim ledger took {claimed} keys held before the upgrade")


def _mirror_login_role(cp: psycopg.Connection[Any], mirrored: list[str]) -> dict[str, str]:
    """(Re)creates runops_mirror_<database> on the control plane, with a fresh password: the
    login the subscription replicates as. REPLICATION and SELECT on the published tables (the
    initial copy) and nothing else."""
    role, password = _database_login(cp, "runops_mirror", "LOGIN REPLICATION")
    cp.execute(sql.SQL("GRANT USAGE ON SCHEMA runops TO {}").format(sql.Identifier(role)))
    cp.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
        sql.SQL(", ").join(sql.Identifier("runops", t) for t in mirrored), sql.Identifier(role)))
    return {"user": role, "password": password}


def _wire_mirror(cp: psycopg.Connection[Any], ro: psycopg.Connection[Any], subscription_url: str,
                 notes: list[str]) -> str:
    row = cp.execute("SELECT current_setting('wal_level'), "
                     "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
    ro_super = ro.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is None or row[0] != "logical" or not row[1] or not (ro_super and ro_super[0]):
        notes.append("the tenant mirror is pulled by tick through the FDW (logical replication needs "
                     "wal_level = logical on the control plane and superuser URLs)")
        ro.execute("SELECT runops.pull_tenant_mirror()")
        return "pull"
    mirrored = _mirrored_tables(cp)
    tables = sql.SQL(", ").join(sql.Identifier("runops", t) for t in mirrored)
    if cp.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", [PUBLICATION]).fetchone() is None:
        cp.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(PUBLICATION), tables))
    added = _publish_missing_tables(cp, mirrored)
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
    # The subscription logs in as a dedicated replication role (not the DBA's superuser), with the
    # URL's host, port and TLS options; each value quoted as libpq wants.
    conninfo = make_conninfo(subscription_url, **_mirror_login_role(cp, mirrored))
    slot_row = cp.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", [slot]).fetchone()
    if existing and (slot_row is None or slot_row[0] == "lost"):
        # max_slot_wal_keep_size invalidated the slot (or it was dropped): the subscription can
        # never resume from it. Start over with a new slot and a fresh copy (the pull keeps the
        # mirror fresh meanwhile, and the copy below replaces what it wrote).
        notes.append("the tenant mirror's replication slot was lost: the subscription was recreated")
        _drop_subscription(ro)
        if slot_row is not None:
            cp.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        existing = None
    if existing:
        name = sql.Identifier(SUBSCRIPTION)
        ro.execute(sql.SQL("ALTER SUBSCRIPTION {} CONNECTION {}").format(name, sql.Literal(conninfo)))
        ro.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(name))
        if added:
            # Tables published since the subscription was made (an upgrade added them): their
            # rows already exist on both sides (the revision seeds them), so no copy.
            ro.execute(sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = false)").format(name))
        ro.execute("SELECT runops.pull_tenant_mirror()")
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
        _restore_heartbeat_rows(ro)
        ro.execute("SELECT runops.pull_tenant_mirror()")
        notes.append(f"the tenant mirror is pulled by tick: the subscription could not be created ({exc})")
        return "pull"
    if not _wait_for_initial_sync(ro):
        # The copy brings the heartbeat rows when it is done (inserting them now would make it
        # fail); until then the mirror counts as stale and new work reads through the FDW.
        notes.append("the tenant mirror's initial copy is still running; the mirror catches up shortly")
        return "logical replication"
    ro.execute("SELECT runops.pull_tenant_mirror()")  # stamps the mirror fresh as of now
    return "logical replication"


def _mirrored_tables(cp: psycopg.Connection[Any]) -> list[str]:
    """The mirrored tables the control plane's revision has (an older release wired by its own
    `runops migrate` mirrors fewer; the upgrade test wires one)."""
    return [t for t in MIRRORED_TABLES
            if cp.execute("SELECT to_regclass(%s)", [f"runops.{t}"]).fetchone() != (None,)]


def _publish_missing_tables(cp: psycopg.Connection[Any], mirrored: list[str]) -> bool:
    """Adds to the publication the mirrored tables it lacks (a store made before a revision that
    mirrors more). True when it added any."""
    have = {r[0] for r in cp.execute("SELECT tablename FROM pg_publication_tables "
                                     "WHERE pubname = %s AND schemaname = 'runops'", [PUBLICATION])}
    missing = [t for t in mirrored if t not in have]
    for table in missing:
        cp.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            sql.Identifier(PUBLICATION), sql.Identifier("runops", table)))
    return bool(missing)


def _restore_heartbeat_rows(ro: psycopg.Connection[Any]) -> None:
    """The heartbeat rows the TRUNCATE before the initial copy removed, when no copy will bring
    them back (the subscription could not be made)."""
    if ro.execute("SELECT to_regclass('runops.heartbeats')").fetchone() == (None,):
        return
    ro.execute("INSERT INTO runops.heartbeats (source) VALUES ('control_plane_tick'), ('run_ops_tick'), "
               "('mirror_pull') ON CONFLICT (source) DO NOTHING")


def _drop_subscription(ro: psycopg.Connection[Any]) -> None:
    """Drops this database's subscription without touching its slot (gone, or dropped by the caller)."""
    name = sql.Identifier(SUBSCRIPTION)
    ro.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(name))
    ro.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(name))
    ro.execute(sql.SQL("DROP SUBSCRIPTION {}").format(name))


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
            _drop_subscription(ro)
            cp.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", [row[0]])
        cp.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(PUBLICATION)))


def set_app_password(url: str, password: str) -> None:
    """The local stores' application login: runops_app, a member of runops_api (which holds the
    grants and which nobody logs in as), given a login and this password. It has no members, so
    no other login can SET ROLE to it and change its password (docs/security.md); a deployment
    gives each service a login of its own in runops_api instead."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE runops_app LOGIN PASSWORD {}").format(sql.Literal(password)))
