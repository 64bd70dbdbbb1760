"""`runops doctor`: is this pair of stores healthy, and if not, what to do about it.

With run-ops shards (a comma-separated run-ops URL, docs/scale-out.md) every shard is examined
as a run-ops store of its own — each check named by its shard — and one more check compares the
shards' numbering and count with the URLs' order and the control plane's.

Each check is a small function that looks at one thing and returns one :class:`Check` (ok, warn
or fail, a one-line detail, and the figures behind it). The checks only read: doctor never
changes a store. docs/operations.md ("doctor") says what each check means and what to do.

Which databases: the same resolution `runops migrate` uses (flags, RUNOPS_*_ADMIN_URL,
RUNOPS_*_URL, the local dev stores). Some checks read catalog and runops tables an application
login may not see; they ask for an admin URL instead of guessing.

A store that does not answer is one `fail` line naming it; the checks that need it are left
out, and the checks the other store can still answer (its FDW towards the missing one, say) run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from runops import ids
from runops._client_base import split_urls
from runops.errors import StoreUnavailable, translate

from . import migrate as migrations
from .schema import SQL, render

CONTROL_PLANE, RUN_OPS = "CONTROL_PLANE", "RUN_OPS"
LABELS = migrations.LABELS
SEVERITIES = ("ok", "warn", "fail")
EXIT_CODES = {"ok": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Thresholds:
    """Every number doctor judges by, in one place (docs/operations.md explains each)."""

    # tick runs every 1-2 s (`runops tick --loop`, pg_cron's tick_every): a minute without a beat
    # means delayed runs, retries and lapsed leases are a minute late; ten, that nothing ticks.
    tick_warn_seconds: float = 60.0
    tick_fail_seconds: float = 600.0
    # Work tick should have done by now, given some slack for a busy tick (1,000 rows per step).
    stuck_grace_seconds: float = 300.0
    # A sealed batch whose runs have not all finished after a day: its runs are stuck or lost.
    processing_batch_warn_seconds: float = 86400.0
    # The alert outbox: an alert is due at once and retried 5 s, 10 s, 20 s, ... later, so one
    # still undelivered after 5 minutes has failed several attempts or nobody delivers (no
    # `runops worker`, no `runops alerts deliver --loop`); a thousand waiting is a backlog too.
    alert_backlog_warn_seconds: float = 300.0
    alert_backlog_warn_count: int = 1000
    # WAL a replication slot holds back, as a share of max_slot_wal_keep_size (the slot is lost
    # at 1.0); and the absolute figure when that setting is unlimited.
    slot_retained_warn_fraction: float = 0.5
    slot_retained_warn_bytes: int = 1 << 30
    # How long doctor waits for one statement (an FDW probe to a hung peer must not hang doctor).
    statement_timeout_ms: int = 10000
    # `doctor --deep` reads whole tables (runs, batch_items): minutes on a large store, not 10 s.
    deep_statement_timeout_ms: int = 600000
    connect_timeout_seconds: int = 5


THRESHOLDS = Thresholds()


@dataclass
class Check:
    name: str
    severity: str          # ok | warn | fail
    detail: str            # one line
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.severity in SEVERITIES, self.severity


def worst(checks: list[Check]) -> str:
    return max((c.severity for c in checks), key=SEVERITIES.index, default="ok")


def exit_code(checks: list[Check]) -> int:
    """0 when every check is ok, 1 when the worst is a warning, 2 when one failed."""
    return EXIT_CODES[worst(checks)]


def _first_line(exc: BaseException) -> str:
    """The error's first line, and its DETAIL's (postgres_fdw puts the cause there: "could not
    connect to server" / "Connection refused")."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    diag = getattr(exc, "diag", None)
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    if detail and detail.strip():
        line += f" ({detail.strip().splitlines()[0]})"
    return line


def _slug(store: str) -> str:
    return migrations.SECTIONS[store]


# -- the installed functions against sql/functions --------------------------------------------

_FUNCTION_HEADER = re.compile(r"^CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+runops\.(\w+)\s*\(", re.I | re.M)
_BODY_START = re.compile(r"\bAS\s+(\$\w*\$)", re.I)


def _closing_paren(text: str, start: int) -> int:
    """The index of the parenthesis closing the one at ``start`` (quotes and nesting skipped)."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "'":
            i = text.index("'", i + 1)
        elif ch == '"':
            i = text.index('"', i + 1)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced parentheses")


def _input_arity(arguments: str) -> int:
    """How many input arguments an argument list declares (pg_proc.pronargs: OUT ones excluded)."""
    parts, depth, current = [], 0, ""
    for ch in arguments:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    parts.append(current)
    return sum(1 for p in parts if p.strip() and not re.match(r"\s*OUT\s", p, re.I))


def shipped_functions(store: str) -> dict[tuple[str, int], list[str]]:
    """The bodies sql/functions/*.sql gives this store, keyed by (name, input arity): the text
    between each function's dollar quotes, rendered for the store as the revisions render it.
    Functions with an SQL-standard body (no dollar quotes) carry no comparable text: ''."""
    found: dict[tuple[str, int], list[str]] = {}
    for path in sorted((SQL / "functions").glob("*.sql")):
        text = render(path.read_text(), store)
        pos = 0
        while match := _FUNCTION_HEADER.search(text, pos):
            close = _closing_paren(text, match.end() - 1)
            arity = _input_arity(text[match.end():close])
            end_of_statement = text.find(";", close)
            body = _BODY_START.search(text, close)
            source = ""
            if body is not None and (end_of_statement < 0 or body.start() < end_of_statement):
                tag = body.group(1)
                finish = text.index(tag, body.end())
                source = text[body.end():finish]
                pos = finish + len(tag)
            else:
                pos = close
            found.setdefault((match.group(1), arity), []).append(source)
    return found


# -- connections ----------------------------------------------------------------------------

@dataclass
class Store:
    """One examined database: its role, where its URL came from, and an open connection (None
    when it did not answer)."""

    store: str
    target: migrations.Target
    conn: psycopg.Connection[Any] | None = None
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    shard: int | None = None  # with shards: which run-ops shard (its URL's position)

    @property
    def label(self) -> str:
        return LABELS[self.store] if self.shard is None else f"run-ops shard {self.shard}"

    @property
    def slug(self) -> str:
        return _slug(self.store) if self.shard is None else f"run_ops_shard_{self.shard}"


def open_store(target: migrations.Target, thresholds: Thresholds = THRESHOLDS, shard: int | None = None) -> Store:
    found = Store(target.store, target, shard=shard)
    try:
        found.conn = psycopg.connect(target.url, autocommit=True, connect_timeout=thresholds.connect_timeout_seconds,
                                     options=f"-c statement_timeout={thresholds.statement_timeout_ms}",
                                     application_name="runops doctor")
    except psycopg.Error as exc:
        found.error = _first_line(translate(exc))
    return found


class NeedsAdmin(Exception):
    """The login may not read what a check needs (an application URL, not an admin one)."""


@contextmanager
def _reading(store: Store) -> Iterator[psycopg.Connection[Any]]:
    """One check's transaction on ``store``: rolled back afterwards (doctor changes nothing)."""
    assert store.conn is not None
    try:
        with store.conn.transaction(force_rollback=True):
            yield store.conn
    except psycopg.errors.InsufficientPrivilege as exc:
        raise NeedsAdmin(_first_line(exc)) from exc


def _lost(store: Store) -> bool:
    """Whether the connection to the store itself went away (not an error it reported)."""
    return store.conn is None or store.conn.broken or store.conn.closed


def guarded(name: str, store: Store, check: Callable[[], Check]) -> Check:
    """Runs one check; never raises. A store that went away is a `fail` naming it; a login
    without the privileges a check needs is a `warn` asking for an admin URL."""
    try:
        return check()
    except NeedsAdmin as exc:
        return Check(name, "warn", f"cannot check as this login ({exc}): give doctor an admin URL "
                                   f"(RUNOPS_{_slug(store.store).upper()}_ADMIN_URL or "
                                   f"--{_slug(store.store).replace('_', '-')}-url)")
    except psycopg.Error as exc:
        gone = translate(exc)
        if isinstance(gone, StoreUnavailable) or _lost(store):
            return Check(name, "fail", f"the {store.label} became unavailable (StoreUnavailable): {_first_line(exc)}")
        return Check(name, "fail", f"{_first_line(exc)} (on the {store.label})")
    except Exception as exc:  # a bug in a check must not hide the others' answers
        return Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {_first_line(exc)}")


# -- the checks -----------------------------------------------------------------------------

def check_store(store: Store) -> Check:
    """Reachable, which server and database it is, and that it is the store it was named as."""
    name = f"store.{store.slug}"
    if store.conn is None:
        return Check(name, "fail", f"the {store.label} is unavailable (StoreUnavailable): {store.error}",
                     {"where": store.target.describe()})

    def run() -> Check:
        with _reading(store) as conn:
            row = conn.execute("""
                SELECT current_setting('server_version'), current_database(),
                       (SELECT oid FROM pg_database WHERE datname = current_database())::bigint,
                       current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                       to_regprocedure('runops.store_role()') IS NOT NULL""").fetchone()
            assert row is not None
            version, database, oid, user, is_super, installed = row
            facts: dict[str, Any] = {"server_version": version, "database_name": database, "database_oid": oid,
                                     "login": user, "superuser": is_super, "store_role": None,
                                     "system_identifier": None}
            store.facts.update(facts)
            try:
                with conn.transaction():
                    control = conn.execute("SELECT (pg_control_system()).system_identifier::text").fetchone()
                facts["system_identifier"] = control[0] if control else None
            except psycopg.errors.InsufficientPrivilege:
                pass  # pg_control_system() needs pg_monitor or a superuser on some installations
            if installed:
                role = conn.execute("SELECT runops.store_role()").fetchone()
                facts["store_role"] = role[0] if role else None
            store.facts.update(facts)
        who = f"as {user}{' (superuser)' if is_super else ''}"
        sysid = facts["system_identifier"] or "(hidden)"
        where = f"PostgreSQL {str(version).split()[0]}, database {database}, system {sysid}"
        if not installed:
            return Check(name, "fail", f"{where}: runops is not installed here (run `runops migrate`)", facts)
        if facts["store_role"] != store.store:
            return Check(name, "fail", f"{where}: this database is a {facts['store_role']} store, named here as the "
                                       f"{store.label} (are the two URLs swapped?)", facts)
        return Check(name, "ok", f"{where}, store_role {facts['store_role']}, {who}", facts)

    return guarded(name, store, run)


def check_topology(stores: dict[str, Store]) -> Check:
    """Which databases these are to each other: distinct, the same cluster, or the same database
    — doctor's own comparison of the two URLs and the control plane's sentinel verdict
    (split_status(), which also asks the run-ops store which control plane its FDW reads)."""
    name = "topology"
    cp = stores[CONTROL_PLANE]
    ro = stores.get(RUN_OPS)

    def run() -> Check:
        with _reading(cp) as conn:
            row = conn.execute("SELECT runops.split_status()").fetchone()
        status: dict[str, Any] = row[0] if row else {}
        data: dict[str, Any] = {"split_status": status, "control_plane": cp.facts,
                                "run_ops": ro.facts if ro else None}
        enabled, distinct, reason = status.get("enabled"), status.get("distinct"), status.get("reason")
        if ro is None:
            if enabled:
                return Check(name, "warn", "the split is enabled but no run-ops URL was given: only the control plane "
                                           "was examined (set RUNOPS_RUN_OPS_ADMIN_URL or --run-ops-url)", data)
            return Check(name, "ok", f"control plane only (split {'enabled' if enabled else 'not enabled'}: "
                                     f"{reason})", data)
        mine, theirs = cp.facts, ro.facts
        same_db = (mine.get("system_identifier") is not None
                   and mine.get("system_identifier") == theirs.get("system_identifier")
                   and mine.get("database_name") == theirs.get("database_name"))
        if same_db:
            return Check(name, "fail", "the run-ops URL names the control plane's own database: initialise a separate "
                                       "run-ops database and wire it with `runops migrate`", data)
        seen = status.get("run_ops") or {}
        if seen and theirs.get("system_identifier") and (
                seen.get("system_identifier") != theirs.get("system_identifier")
                or seen.get("database_name") != theirs.get("database_name")):
            return Check(name, "fail", f"the control plane's FDW reads {seen.get('database_name')} of system "
                                       f"{seen.get('system_identifier')}, but the run-ops URL names "
                                       f"{theirs.get('database_name')} of system {theirs.get('system_identifier')}: "
                                       "re-wire with `runops migrate` and these two URLs", data)
        if not distinct:
            return Check(name, "fail" if enabled else "warn",
                         f"split {'enabled' if enabled else 'not enabled'}, and the sentinel says: {reason}", data)
        same_cluster = mine.get("system_identifier") == theirs.get("system_identifier")
        if same_cluster:
            return Check(name, "warn", f"two databases of one cluster ({reason}); split "
                                       f"{'enabled' if enabled else 'not enabled'}", data)
        return Check(name, "ok" if enabled else "warn",
                     f"{mine.get('database_name')}@{mine.get('system_identifier')} and "
                     f"{theirs.get('database_name')}@{theirs.get('system_identifier')}: {reason}; split "
                     + ("enabled" if enabled else "not enabled (`runops split enable`)"), data)

    return guarded(name, cp, run)


def check_migrations(store: Store) -> Check:
    """The store's Alembic revision against the head this runops ships."""
    name = f"migrations.{store.slug}"

    def run() -> Check:
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError

        url = store.target.url
        try:
            current = migrations.current_revision(store.store, url)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise NeedsAdmin(_first_line(exc)) from exc
        head = migrations.head_revision(store.store, url)
        data = {"current": current, "head": head}
        if current is None:
            return Check(name, "fail", f"no migrations applied (head {head}): run `runops migrate`", data)
        if current == head:
            return Check(name, "ok", f"at head {head}", data)
        script = ScriptDirectory.from_config(migrations.alembic_config(store.store, url))
        try:
            script.get_revision(current)
        except CommandError:
            return Check(name, "warn", f"at {current}, which this runops does not know (head {head}): a newer "
                                       "release migrated it; upgrade this runops", data)
        return Check(name, "fail", f"at {current}, behind head {head}: run `runops migrate`", data)

    return guarded(name, store, run)


def check_functions(store: Store, migrations_current: bool) -> Check:
    """Drift: the installed runops functions against the bodies in sql/functions (what this
    runops ships), compared by name and input arity."""
    name = f"functions.{store.slug}"

    def run() -> Check:
        shipped = shipped_functions(store.store)
        with _reading(store) as conn:
            rows = conn.execute("""
                SELECT p.proname, p.pronargs, p.prosrc FROM pg_proc AS p
                WHERE p.pronamespace = 'runops'::regnamespace AND p.prokind = 'f'""").fetchall()
        installed: dict[tuple[str, int], list[str]] = {}
        for proname, nargs, source in rows:
            installed.setdefault((proname, int(nargs)), []).append(source or "")
        missing = sorted(f"{n}/{a}" for n, a in shipped if (n, a) not in installed)
        drifted = sorted(f"{n}/{a}" for (n, a), bodies in shipped.items()
                         if (n, a) in installed and sorted(bodies) != sorted(installed[(n, a)])
                         and any(bodies))
        data = {"shipped": len(shipped), "installed": len(installed), "missing": missing, "drifted": drifted}
        why = "" if migrations_current else " (the store is behind its migrations: `runops migrate`)"
        if missing:
            return Check(name, "fail", f"{len(missing)} function(s) of sql/functions are not installed: "
                                       f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}{why}", data)
        if drifted:
            return Check(name, "warn", f"{len(drifted)} installed function(s) differ from sql/functions: "
                                       f"{', '.join(drifted[:5])}{' ...' if len(drifted) > 5 else ''}"
                                       f"{why or ' (edited in place, or sql/ changed without a revision)'}", data)
        return Check(name, "ok", f"{len(shipped)} functions equal sql/functions", data)

    return guarded(name, store, run)


def _server_target(srvoptions: list[str] | None) -> tuple[dict[str, str], str]:
    """A foreign server's options, and the host:port/dbname they name (``?`` where unset)."""
    options = dict(o.split("=", 1) for o in (srvoptions or []))
    return options, f"{options.get('host', '?')}:{options.get('port', '?')}/{options.get('dbname', '?')}"


def _read_as_owner(store: Store, sql: str) -> tuple[Any, str | None]:
    """One row of ``sql`` read as the functions read through the FDW (as runops_owner, whose user
    mappings it uses), in a transaction rolled back afterwards: (the row, None), or (None, the
    error's first line) when the read failed on a store still connected."""
    assert store.conn is not None
    with store.conn.transaction(force_rollback=True):
        try:
            store.conn.execute("SET LOCAL ROLE runops_owner")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise NeedsAdmin(_first_line(exc)) from exc
        try:
            # A savepoint: whatever the remote says, the rollback above still runs cleanly.
            with store.conn.transaction():
                return store.conn.execute(sql).fetchone(), None
        except psycopg.Error as exc:
            if _lost(store):
                raise
            return None, _first_line(exc)


def check_fdw(store: Store, peer_store: str, expect_wired: bool) -> Check:
    """A cheap read through this store's runops_peer foreign tables, as the functions read them
    (as runops_owner, whose user mapping the FDW uses)."""
    peer_label = LABELS[peer_store]
    name = f"fdw.{store.slug}_to_{_slug(peer_store)}"

    def run() -> Check:
        with _reading(store) as conn:
            wired_row = conn.execute("SELECT runops.peer_wired()").fetchone()
            wired = bool(wired_row and wired_row[0])
            server = conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'runops_peer'").fetchone()
        options, target = _server_target(server[0] if server else None)
        data: dict[str, Any] = {"wired": wired, "server": options}
        if not wired:
            return Check(name, "fail" if expect_wired else "ok",
                         f"the {store.label}'s FDW is not wired"
                         + (": run `runops migrate` with both URLs" if expect_wired else " (one store)"), data)
        _, error = _read_as_owner(store, "SELECT count(*) FROM runops_peer.split_settings")
        if error is not None:
            return Check(name, "fail", f"the {store.label} cannot read the {peer_label} through postgres_fdw "
                                       f"(server runops_peer -> {target}): {error}", {**data, "error": error})
        return Check(name, "ok", f"the {store.label} reads the {peer_label} at {target}", data)

    return guarded(name, store, run)


def check_fdw_to_shard(cp: Store, shard: Store) -> Check:
    """With run-ops shards: the control plane's FDW server for shard k >= 1 (runops_peer_<k>, through
    which it claims keys of that shard's environments and reads its ids) reads that shard, as
    runops_owner, and reaches the database the shard's URL names."""
    server = f"runops_peer_{shard.shard}"
    name = f"fdw.control_plane_to_{shard.slug}"
    fix = "run `runops migrate` with every --run-ops-url, shard 0 first"

    def run() -> Check:
        with _reading(cp) as conn:
            row = conn.execute("SELECT srvoptions FROM pg_foreign_server WHERE srvname = %s", [server]).fetchone()
        if row is None:
            return Check(name, "fail", f"the control plane has no FDW server for {shard.label} ({server}): keyed "
                                       f"triggers of its environments there are refused (RO009): {fix}",
                         {"server": None})
        options, target = _server_target(row[0])
        data: dict[str, Any] = {"server": options}
        seen, error = _read_as_owner(cp, f"SELECT system_identifier, database_oid FROM {server}.store_identity_view")
        if error is not None:
            return Check(name, "fail", f"the control plane cannot read {shard.label} through postgres_fdw "
                                       f"(server {server} -> {target}): {error}", {**data, "error": error})
        sysid, oid = shard.facts.get("system_identifier"), shard.facts.get("database_oid")
        if seen is not None and sysid is not None and oid is not None \
                and (str(seen[0]), int(seen[1])) != (str(sysid), int(oid)):
            return Check(name, "fail", f"the control plane's server {server} ({target}) reaches another database "
                                       f"than {shard.label}'s URL: {fix}", data)
        return Check(name, "ok", f"the control plane reads {shard.label} at {target}", data)

    return guarded(name, cp, run)


def _mirror_status(conn: psycopg.Connection[Any]) -> dict[str, Any] | None:
    """runops.mirror_status() where this store has it (r0003 on); else None."""
    row = conn.execute("SELECT to_regprocedure('runops.mirror_status()') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    status = conn.execute("SELECT runops.mirror_status()").fetchone()
    return dict(status[0]) if status else None


def _subscription_fallback(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What a store without mirror_status() can say from the catalogs: the engine and whether it
    applies, not how fresh the mirror is."""
    row = conn.execute("""
        SELECT s.subenabled, st.pid IS NOT NULL,
               round(extract(epoch FROM now() - st.latest_end_time)::numeric, 3)
        FROM pg_subscription AS s
        LEFT JOIN pg_stat_subscription AS st ON st.subid = s.oid AND st.relid IS NULL
        WHERE s.subname = 'runops_mirror'
          AND s.subdbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())""").fetchone()
    wired = conn.execute("SELECT runops.peer_wired()").fetchone()
    if row is None:
        engine, state = ("pull", "pull") if wired and wired[0] else ("none", "unwired")
        return {"engine": engine, "state": state, "subscription_enabled": None, "worker_running": None,
                "age_seconds": None, "bound_seconds": None, "fresh": None}
    enabled, running, lag = row
    state = "disabled" if not enabled else ("applying" if running else "not_running")
    return {"engine": "subscription", "state": state, "subscription_enabled": enabled, "worker_running": running,
            "age_seconds": float(lag) if lag is not None else None, "bound_seconds": None, "fresh": None}


def check_mirror(store: Store) -> Check:
    """The run-ops store's tenant mirror: engine, state, age against its freshness bound."""
    name = "mirror" if store.shard is None else f"mirror.{store.slug}"

    def run() -> Check:
        with _reading(store) as conn:
            status = _mirror_status(conn)
            fallback = status is None
            if status is None:
                status = _subscription_fallback(conn)
        data = {**status, "from": "catalogs (no runops.mirror_status(): store before r0003)" if fallback
                else "runops.mirror_status()"}
        engine, state, fresh = status.get("engine"), status.get("state"), status.get("fresh")
        age, bound = status.get("age_seconds"), status.get("bound_seconds")
        when = ("never refreshed" if age is None else f"{float(age):.1f} s old") + \
            (f" (bound {bound} s)" if bound is not None else "")
        if state == "unwired":
            return Check(name, "fail", "the run-ops store is not wired to a control plane: no tenant mirror "
                                       "(run `runops migrate` with both URLs)", data)
        if fresh is False:
            return Check(name, "fail", f"the tenant mirror is stale: {when}, engine {engine}, state {state}; new work "
                                       "on the run-ops store reads tenants through the FDW, and fails RO009 when "
                                       "that is down (is tick running on both stores?)", data)
        if state == "disabled":
            return Check(name, "warn", f"the subscription runops_mirror is disabled; tick's pull stands in ({when}): "
                                       "ALTER SUBSCRIPTION runops_mirror ENABLE on the run-ops store", data)
        if state == "not_running":
            return Check(name, "warn", f"the subscription runops_mirror is enabled but no apply worker runs (its "
                                       f"slot lost, the control plane unreachable, or an apply error: see the "
                                       f"run-ops server log); tick's pull stands in ({when})", data)
        if fallback:
            return Check(name, "warn", f"engine {engine}, state {state}; freshness unknown: this store has no "
                                       "runops.mirror_status() (run `runops migrate`)", data)
        how = "logical replication applying" if engine == "subscription" else "pulled by tick through the FDW"
        return Check(name, "ok", f"{how}, {when}", data)

    return guarded(name, store, run)


def check_slots(cp: Store, ro: Store | list[Store] | None, thresholds: Thresholds = THRESHOLDS) -> Check:
    """The control plane's runops_mirror_* replication slots: active, WAL status, WAL retained
    (``ro``: the run-ops store, or every shard, each subscribed with a slot of its own)."""
    name = "mirror.slot"

    def run() -> Check:
        with _reading(cp) as conn:
            keep_row = conn.execute("SELECT pg_size_bytes(CASE WHEN current_setting('max_slot_wal_keep_size') "
                                    "IN ('-1', '-1kB') THEN NULL ELSE current_setting('max_slot_wal_keep_size') "
                                    "END)").fetchone()
            rows = conn.execute(r"""
                SELECT slot_name, active, wal_status,
                       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size
                FROM pg_replication_slots
                WHERE slot_name LIKE 'runops\_mirror\_%' AND database = current_database()
                ORDER BY slot_name""").fetchall()
        keep = int(keep_row[0]) if keep_row and keep_row[0] is not None else None
        subscribed: list[str] = []
        for subscriber in ro if isinstance(ro, list) else [ro] if ro is not None else []:
            if subscriber.conn is None or _lost(subscriber):
                continue
            with _reading(subscriber) as conn:
                sub = conn.execute("""
                    SELECT s.subslotname FROM pg_subscription AS s
                    WHERE s.subname = 'runops_mirror'
                      AND s.subdbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())
                    """).fetchone()
            if sub and sub[0]:
                subscribed.append(sub[0])
        used = subscribed[0] if subscribed else None
        slots = [{"slot_name": n, "active": a, "wal_status": w, "retained_bytes": r, "safe_wal_size": s,
                  "used_by_examined_run_ops": n in subscribed} for n, a, w, r, s in rows]
        data = {"slots": slots, "max_slot_wal_keep_size_bytes": keep, "subscription_slot": used,
                "subscription_slots": subscribed}
        if not slots:
            if used:
                return Check(name, "fail", f"the run-ops subscription uses slot {used}, which the control plane does "
                                           "not have: `runops migrate` recreates it", data)
            return Check(name, "ok", "no runops_mirror_* slot (the mirror is pulled, or the split is not wired)",
                         data)
        problems: list[tuple[str, str]] = []
        limit = thresholds.slot_retained_warn_fraction * keep if keep else thresholds.slot_retained_warn_bytes
        for s in slots:
            slot, retained = s["slot_name"], s["retained_bytes"] or 0
            if s["wal_status"] == "lost":
                problems.append(("fail", f"slot {slot} lost WAL its subscriber needs: `runops migrate` recreates the "
                                         "slot and the subscription (tick's pull keeps the mirror fresh meanwhile)"))
            elif s["wal_status"] == "unreserved":
                problems.append(("warn", f"slot {slot} is past max_slot_wal_keep_size and about to be lost"))
            elif retained > limit:
                problems.append(("warn", f"slot {slot} holds back {_size(retained)} of WAL (warn above "
                                         f"{_size(int(limit))}): is its subscriber applying?"))
            if not s["active"] and s["wal_status"] != "lost":
                stale = bool(subscribed) and slot not in subscribed
                problems.append(("warn", f"slot {slot} is inactive" + (
                    " and used by no subscription of the examined run-ops store: drop it if no other run-ops "
                    f"database uses it (SELECT pg_drop_replication_slot('{slot}'))" if stale
                    else ": no subscriber is streaming from it, so the control plane keeps its WAL")))
        if keep is None:
            problems.append(("warn", "max_slot_wal_keep_size is unlimited: a dead run-ops store could fill the "
                                     "control plane's disk (ALTER SYSTEM SET max_slot_wal_keep_size = '10GB')"))
        for missing in [u for u in subscribed if u not in {s["slot_name"] for s in slots}]:
            problems.append(("fail", f"the run-ops subscription uses slot {missing}, which the control plane does not "
                                     "have: `runops migrate` recreates it"))
        if problems:
            severity = "fail" if any(p[0] == "fail" for p in problems) else "warn"
            return Check(name, severity, "; ".join(p[1] for p in problems), data)
        summary = ", ".join(f"{s['slot_name']} active, {s['wal_status']}, {_size(s['retained_bytes'] or 0)} retained"
                            for s in slots)
        return Check(name, "ok", summary, data)

    return guarded(name, cp, run)


def check_shards(cp: Store, shards: list[Store]) -> Check:
    """With run-ops shards: each shard numbered as its URL's position, every store (control plane
    included) configured with the same shard count and cut-over second (what `runops migrate`
    writes), and how many environments each shard was assigned."""
    name = "shards"

    def run() -> Check:
        configs: dict[str, Any] = {}
        for store in [cp, *shards]:
            if store.conn is None or _lost(store):
                continue
            with _reading(store) as conn:
                if conn.execute("SELECT to_regprocedure('runops.shard_config()') IS NULL").fetchone() == (True,):
                    return Check(name, "fail", f"the {store.label} has no runops.shard_config(): run `runops migrate`")
                row = conn.execute("SELECT shard_number, shard_count, shard_ids_since FROM runops.shard_config()"
                                   ).fetchone()
            assert row is not None
            configs[store.label] = {"shard_number": row[0], "shard_count": row[1], "shard_ids_since": row[2]}
        with _reading(cp) as conn:
            spread = dict(conn.execute("SELECT shard, count(*) FROM runops.environment_shards GROUP BY shard "
                                       "ORDER BY shard").fetchall())
        data = {"stores": configs, "environments_per_shard": spread, "urls": len(shards)}
        fix = "run `runops migrate` with every --run-ops-url, shard 0 first"
        problems = [f"{s.label}'s URL leads to shard {configs[s.label]['shard_number']}: give the run-ops URLs in "
                    "shard order" for s in shards
                    if s.label in configs and configs[s.label]["shard_number"] != s.shard]
        counts = {label: c["shard_count"] for label, c in configs.items()}
        if any(n != len(shards) for n in counts.values()):
            problems.append(f"shard counts {counts} differ from the {len(shards)} run-ops URLs given: {fix}")
        if len({c["shard_ids_since"] for c in configs.values()}) > 1:
            problems.append(f"the stores disagree on the cut-over second of shard-aware ids: {fix}")
        if problems:
            return Check(name, "fail", "; ".join(problems), data)
        placed = ", ".join(f"shard {k}: {spread.get(k, 0)}" for k in range(len(shards)))
        return Check(name, "ok", f"{len(shards)} shards numbered in URL order; environments per shard: {placed}", data)

    return guarded(name, cp, run)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


TICK_SOURCES = {CONTROL_PLANE: "control_plane_tick", RUN_OPS: "run_ops_tick"}


def check_tick(store: Store, thresholds: Thresholds = THRESHOLDS) -> Check:
    """When this store's tick() last ran (runops.heartbeats)."""
    name = f"tick.{store.slug}"
    source = TICK_SOURCES[store.store]

    def run() -> Check:
        with _reading(store) as conn:
            exists = conn.execute("SELECT to_regclass('runops.heartbeats') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return Check(name, "warn", "cannot tell: this store has no runops.heartbeats (it predates r0003: "
                                           "run `runops migrate`)", {"source": source})
            row = conn.execute("SELECT beat_at, extract(epoch FROM now() - beat_at)::float8 FROM runops.heartbeats "
                               "WHERE source = %s", [source]).fetchone()
        beat_at, age = (row[0], float(row[1] or 0)) if row else (None, 0.0)
        data = {"source": source, "beat_at": beat_at, "age_seconds": age,
                "warn_seconds": thresholds.tick_warn_seconds, "fail_seconds": thresholds.tick_fail_seconds}
        fix = "run `runops tick --loop` (or schedule runops.tick_every with pg_cron: docs/pg_cron.md)"
        if beat_at is None:
            return Check(name, "warn", f"tick has never run on the {store.label}: {fix}", data)
        if age >= thresholds.tick_fail_seconds:
            return Check(name, "fail", f"tick last ran {age:.0f} s ago on the {store.label}: delays, retries, leases "
                                       f"and waitpoints are not moving; {fix}", data)
        if age >= thresholds.tick_warn_seconds:
            return Check(name, "warn", f"tick last ran {age:.0f} s ago on the {store.label} (warn after "
                                       f"{thresholds.tick_warn_seconds:.0f} s): is `runops tick --loop` running?",
                         data)
        return Check(name, "ok", f"tick ran {age:.1f} s ago", data)

    return guarded(name, store, run)


# Each is (key, what it means, the query: one count and the oldest age in seconds). The $grace
# parameter is stuck_grace_seconds, $processing processing_batch_warn_seconds. Each predicate
# follows an index tick itself uses, except PROCESSING batches (a scan of batches by status).
STUCK_WORK = (
    ("lapsed_leases", "DEQUEUED/EXECUTING runs whose lease ran out (tick puts them back to PENDING)", """
        SELECT count(*), extract(epoch FROM now() - min(lease_expires_at))::float8 FROM runops.runs
        WHERE status IN ('DEQUEUED', 'EXECUTING') AND lease_expires_at < now() - make_interval(secs => %(grace)s)"""),
    ("unsealed_batches", "open batches past their seal timeout (tick aborts them)", """
        SELECT count(*), extract(epoch FROM now() - min(seal_deadline))::float8 FROM runops.batches
        WHERE status = 'PENDING' AND seal_deadline < now() - make_interval(secs => %(grace)s)"""),
    ("long_processing_batches", "sealed batches whose runs have not all finished", """
        SELECT count(*), extract(epoch FROM now() - min(coalesce(sealed_at, created_at)))::float8
        FROM runops.batches
        WHERE status = 'PROCESSING' AND coalesce(sealed_at, created_at) < now() - make_interval(secs => %(processing)s)
        """),
    ("overdue_waitpoints", "DATETIME waitpoints past their time, MANUAL ones past their timeout (tick completes them)",
     """
        SELECT count(*), extract(epoch FROM now() - min(coalesce(completed_after, timeout_at)))::float8
        FROM runops.waitpoints
        WHERE status = 'PENDING'
          AND ((type = 'DATETIME' AND completed_after < now() - make_interval(secs => %(grace)s))
               OR timeout_at < now() - make_interval(secs => %(grace)s))"""),
    ("unresumed_runs", "WAITING_TO_RESUME runs (not MANUAL) with every waitpoint completed (tick resumes them)", """
        SELECT count(*), extract(epoch FROM now() - min(r.updated_at))::float8 FROM runops.runs AS r
        WHERE r.status = 'WAITING_TO_RESUME' AND r.suspended_reason IS DISTINCT FROM 'MANUAL'
          AND r.updated_at < now() - make_interval(secs => %(grace)s)
          AND NOT EXISTS (SELECT FROM runops.run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL)"""),
)


def check_stuck_work(store: Store, thresholds: Thresholds = THRESHOLDS) -> Check:
    """Work tick should have moved by now, and batches that never finish."""
    name = f"work.{store.slug}"

    def run() -> Check:
        params = {"grace": thresholds.stuck_grace_seconds, "processing": thresholds.processing_batch_warn_seconds}
        found: dict[str, Any] = {}
        with _reading(store) as conn:
            for key, _, query in STUCK_WORK:
                row = conn.execute(query, params).fetchone()
                assert row is not None
                found[key] = {"count": int(row[0]), "oldest_seconds": row[1]}
        data = {**found, "grace_seconds": thresholds.stuck_grace_seconds,
                "processing_warn_seconds": thresholds.processing_batch_warn_seconds}
        stuck = [(key, what) for key, what, _ in STUCK_WORK if found[key]["count"]]
        if stuck:
            parts = [f"{found[k]['count']} {what} (oldest {found[k]['oldest_seconds']:.0f} s)" for k, what in stuck]
            return Check(name, "warn", "; ".join(parts), data)
        return Check(name, "ok", f"nothing overdue by more than {thresholds.stuck_grace_seconds:.0f} s", data)

    return guarded(name, store, run)


def check_alerts(store: Store, thresholds: Thresholds = THRESHOLDS) -> Check:
    """The alert outbox: undelivered alerts piling up or waiting long, and alerts given up."""
    name = f"alerts.{store.slug}"

    def run() -> Check:
        with _reading(store) as conn:
            exists = conn.execute("SELECT to_regclass('runops.alerts') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                return Check(name, "warn", "cannot tell: this store has no runops.alerts (it predates r0006: "
                                           "run `runops migrate`)")
            row = conn.execute("""
                SELECT count(*), extract(epoch FROM now() - min(created_at))::float8,
                       (SELECT count(*) FROM runops.alerts WHERE status = 'FAILED')
                FROM runops.alerts WHERE status = 'PENDING'""").fetchone()
        assert row is not None
        pending, oldest, failed = int(row[0]), row[1], int(row[2])
        data = {"pending": pending, "oldest_pending_seconds": oldest, "failed": failed,
                "warn_seconds": thresholds.alert_backlog_warn_seconds,
                "warn_count": thresholds.alert_backlog_warn_count}
        if pending and (pending >= thresholds.alert_backlog_warn_count
                        or (oldest or 0) >= thresholds.alert_backlog_warn_seconds):
            return Check(name, "warn", f"{pending} alerts undelivered on the {store.label}, the oldest for "
                                       f"{oldest or 0:.0f} s (warn at {thresholds.alert_backlog_warn_count} or "
                                       f"{thresholds.alert_backlog_warn_seconds:.0f} s): is a `runops worker` or "
                                       "`runops alerts deliver --loop` running, and do the webhooks answer 2xx?", data)
        gave_up = f"; {failed} failed for good" if failed else ""
        return Check(name, "ok", f"{pending} alerts undelivered{gave_up}", data)

    return guarded(name, store, run)


# -- doctor --deep: invariants the functions keep instead of foreign keys ------------------------

# SPEC §5 [1.2]: on the batch hot path the functions, not foreign keys, keep the run graph's
# references (docs/decisions.md, "Batches"). Each query counts the rows breaking one invariant
# and names up to three (bare ids). Whole-table reads: only with --deep.
INTEGRITY = (
    ("runs_naming_no_batch", "runs whose batch_id names no batch", """
        SELECT count(*), (array_agg(r.id ORDER BY r.id))[1:3] FROM runops.runs AS r
        WHERE r.batch_id IS NOT NULL AND NOT EXISTS (SELECT FROM runops.batches AS b WHERE b.id = r.batch_id)"""),
    ("runs_off_their_batch", "runs of a batch with no batch_index or one past its expected_count", """
        SELECT count(*), (array_agg(r.id ORDER BY r.id))[1:3] FROM runops.runs AS r
        JOIN runops.batches AS b ON b.id = r.batch_id
        WHERE r.batch_index IS NULL OR r.batch_index NOT BETWEEN 0 AND b.expected_count - 1"""),
    ("items_naming_no_batch", "batch_items rows whose batch_id names no batch", """
        SELECT count(*), (array_agg(i.batch_id || '/' || i.item_index ORDER BY i.batch_id, i.item_index))[1:3]
        FROM runops.batch_items AS i
        WHERE NOT EXISTS (SELECT FROM runops.batches AS b WHERE b.id = i.batch_id)"""),
    ("items_off_their_batch", "batch_items rows past their batch's expected_count", """
        SELECT count(*), (array_agg(i.batch_id || '/' || i.item_index ORDER BY i.batch_id, i.item_index))[1:3]
        FROM runops.batch_items AS i JOIN runops.batches AS b ON b.id = i.batch_id
        WHERE i.item_index >= b.expected_count"""),
    ("indexes_held_twice", "batch indexes held both by a run the batch created and by a batch_items row", """
        SELECT count(*), (array_agg(i.batch_id || '/' || i.item_index ORDER BY i.batch_id, i.item_index))[1:3]
        FROM runops.batch_items AS i
        JOIN runops.runs AS r ON r.batch_id = i.batch_id AND r.batch_index = i.item_index"""),
    # Open batches only: purge_runs may delete a finished batch's runs before the batch itself.
    ("open_items_naming_no_run", "batch_items rows of open batches naming a run missing from this store", """
        SELECT count(*), (array_agg(i.batch_id || '/' || i.item_index ORDER BY i.batch_id, i.item_index))[1:3]
        FROM runops.batch_items AS i JOIN runops.batches AS b ON b.id = i.batch_id
        WHERE b.status IN ('PENDING', 'PROCESSING')
          AND runops.try_classify_residency(i.run_id) = runops.local_residency()
          AND NOT EXISTS (SELECT FROM runops.runs AS r WHERE r.id = i.run_id)"""),
    ("open_batches_miscounted", "open batches whose item_count differs from their members", """
        SELECT count(*), (array_agg(b.id ORDER BY b.id))[1:3] FROM runops.batches AS b
        WHERE b.status IN ('PENDING', 'PROCESSING')
          AND b.item_count <> (SELECT count(*) FROM runops.batch_members(b.id, 0, b.expected_count - 1))"""),
)

# Cached items whose run lives in the other store: read there, one id list (postgres_fdw ships
# one = ANY), only when the FDW is wired (unwired, runops_peer.runs is an empty stand-in). Run
# as runops_owner: the FDW's user mapping is that role's.
REMOTE_ITEMS = """
    WITH remote AS (SELECT i.batch_id, i.item_index, i.run_id FROM runops.batch_items AS i
                    JOIN runops.batches AS b ON b.id = i.batch_id
                    WHERE b.status IN ('PENDING', 'PROCESSING')
                      AND runops.try_classify_residency(i.run_id) IS DISTINCT FROM runops.local_residency())
    SELECT count(*), (array_agg(m.batch_id || '/' || m.item_index ORDER BY m.batch_id, m.item_index))[1:3]
    FROM remote AS m
    WHERE m.run_id NOT IN (SELECT p.id FROM runops_peer.runs AS p
                           WHERE p.id = ANY (ARRAY(SELECT x.run_id FROM remote AS x)))"""


def check_integrity(store: Store, thresholds: Thresholds = THRESHOLDS) -> Check:
    """The references foreign keys no longer guard (every runs.batch_id names a batch, every
    batch_items row a batch and, for open batches, a run; one holder per batch index; open
    batches count their members): `fail` on any row breaking one."""
    name = f"integrity.{store.slug}"

    def run() -> Check:
        found: dict[str, Any] = {}
        with _reading(store) as conn:
            conn.execute(f"SET LOCAL statement_timeout = {int(thresholds.deep_statement_timeout_ms)}")
            checks = list(INTEGRITY)
            wired = conn.execute("SELECT runops.peer_wired()").fetchone()
            if wired is not None and wired[0]:
                checks.append(("open_items_naming_no_remote_run",
                               "batch_items rows of open batches naming a run missing from the other store",
                               REMOTE_ITEMS))
            for key, what, query in checks:
                if query is REMOTE_ITEMS:
                    conn.execute("SET LOCAL ROLE runops_owner")  # the role whose user mapping the functions use
                row = conn.execute(query).fetchone()
                assert row is not None
                found[key] = {"count": int(row[0]), "examples": list(row[1] or []), "what": what}
        broken = [f"{v['count']} {v['what']} (e.g. {', '.join(v['examples'])})" for v in found.values() if v["count"]]
        if broken:
            return Check(name, "fail", "; ".join(broken), found)
        return Check(name, "ok", f"{len(found)} invariants hold", found)

    return guarded(name, store, run)


# -- the whole examination --------------------------------------------------------------------

@dataclass
class Report:
    targets: list[migrations.Target]
    checks: list[Check]

    @property
    def worst(self) -> str:
        return worst(self.checks)

    @property
    def exit_code(self) -> int:
        return exit_code(self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"targets": [{"store": t.store, "where": t.describe(), "source": t.source} for t in self.targets],
                "worst": self.worst, "exit_code": self.exit_code,
                "checks": [{"name": c.name, "severity": c.severity, "detail": c.detail, "data": c.data}
                           for c in self.checks]}


def examine(targets: dict[str, migrations.Target], thresholds: Thresholds = THRESHOLDS, *,
            deep: bool = False) -> Report:
    """Every check against the stores ``targets`` names (migrate.resolve_targets); with ``deep``,
    the integrity checks too (whole-table reads)."""
    if RUN_OPS in targets and targets[RUN_OPS].url == targets[CONTROL_PLANE].url:
        targets = {CONTROL_PLANE: targets[CONTROL_PLANE]}  # migrate, too, treats this as one store
    examined = store_targets(targets)
    stores = {key: open_store(t, thresholds, shard) for key, (t, shard) in examined.items()}
    try:
        return Report([t for t, _ in examined.values()], _run_checks(stores, thresholds, deep))
    finally:
        for s in stores.values():
            if s.conn is not None:
                s.conn.close()


def store_targets(targets: dict[str, migrations.Target]) -> dict[str, tuple[migrations.Target, int | None]]:
    """Each database to examine by the client's store name, with its shard: the control plane and
    the run-ops store, or each shard of a comma-separated run-ops URL (RUN_OPS, RUN_OPS_1, ...)."""
    found: dict[str, tuple[migrations.Target, int | None]] = {
        store: (t, None) for store, t in targets.items() if store != RUN_OPS}
    if RUN_OPS in targets:
        urls = split_urls(targets[RUN_OPS].url)
        if len(urls) <= 1:
            found[RUN_OPS] = (targets[RUN_OPS], None)
        else:
            for number, url in enumerate(urls):
                found[ids.shard_store(number)] = (migrations.Target(RUN_OPS, url, targets[RUN_OPS].source), number)
    return found


def _run_checks(stores: dict[str, Store], thresholds: Thresholds, deep: bool = False) -> list[Check]:
    checks = [check_store(s) for s in stores.values()]
    answered = {name: s for name, s in stores.items() if s.conn is not None and s.facts.get("store_role") == s.store}
    cp, ro = answered.get(CONTROL_PLANE), answered.get(RUN_OPS)
    shards = [s for s in answered.values() if s.store == RUN_OPS]
    pair = RUN_OPS in stores
    if cp is not None and (not pair or ro is not None):
        checks.append(check_topology({CONTROL_PLANE: cp, **({RUN_OPS: ro} if ro else {})}))
    behind: dict[str, bool] = {}
    for s in answered.values():
        result = check_migrations(s)
        behind[s.store] = result.severity != "ok"
        checks.append(result)
    checks += [check_functions(s, not behind[s.store]) for s in answered.values()]
    if cp is not None:
        checks.append(check_fdw(cp, RUN_OPS, expect_wired=pair))
    for shard in shards:
        checks.append(check_fdw(shard, CONTROL_PLANE, expect_wired=True))
        checks.append(check_mirror(shard))
    if cp is not None:
        checks += [check_fdw_to_shard(cp, s) for s in stores.values() if s.shard]
    if cp is not None and pair:
        checks.append(check_slots(cp, shards if len(shards) > 1 else ro, thresholds))
    every_shard = [s for s in stores.values() if s.shard is not None]
    if cp is not None and every_shard:
        checks.append(check_shards(cp, every_shard))
    checks += [check_tick(s, thresholds) for s in answered.values()]
    checks += [check_stuck_work(s, thresholds) for s in answered.values()]
    checks += [check_alerts(s, thresholds) for s in answered.values()]
    if deep:
        checks += [check_integrity(s, thresholds) for s in answered.values()]
    return checks
