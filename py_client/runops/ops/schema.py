"""Where the SQL lives, in which order a store installs it, and how a store is upgraded.

``sql/`` is the one place the schema and the functions are edited. A fresh install applies it
directly (tests compare that with what the migrations build). An upgrade (Alembic, through
``migrations/env_common.py``) has two parts (docs/decisions.md, "Revisions: frozen DDL deltas and
a repeatable step at head"):

* the *versioned* revisions: each applies its frozen DDL delta, ``sql/upgrades/<revision>/*.sql``
  (``migrations/runops_revisions`` is their one runner);
* the *repeatable* step, once at head: the live function files, the unwired stand-ins (only where
  the store is not wired) and ``sql/after_functions.sql``, applied whenever their checksum differs
  from the one recorded in the store, and after every versioned revision.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

# The checkout this module sits in (py_client/runops/ops/ -> the repository). Only meaningful in a
# checkout or an editable install: `python -m runops.ops.revision` writes under it.
ROOT = Path(__file__).resolve().parents[3]


def _data_dir(packaged: str, checkout: str) -> Path:
    """A directory of package data: inside an installed wheel ``runops/<packaged>`` (pyproject
    maps the repository's directory there at build time); in a checkout or an editable install,
    where that directory does not exist, the live repository directory itself."""
    inside = files("runops") / packaged
    if isinstance(inside, Path) and inside.is_dir():
        return inside
    return ROOT / checkout


SQL = _data_dir("_sql", "sql")
MIGRATIONS = _data_dir("_migrations", "migrations")
ALEMBIC_INI = MIGRATIONS / "alembic.ini"
DOCS = _data_dir("_docs", "docs")  # the Markdown pages (`runops docs`)

STORES = ("CONTROL_PLANE", "RUN_OPS")

# The residency CHECK each store puts on its run-graph ids. Inline expressions, not a function
# call: a CHECK calling a non-inlinable function cost a quarter of trigger throughput.
_RESIDENCY_CHECKS = {
    "CONTROL_PLANE": "{col} ~ '^c[0-9a-z]{{24}}$'",
    "RUN_OPS": "{col} ~ '^[0-9A-Za-z]{{27}}$' AND {col} <= 'aWgEPTl1tmebfsQzFP4bxwgy80V'",
}


_RESIDENCIES = {"CONTROL_PLANE": "LEGACY", "RUN_OPS": "NEW"}


def render(text: str, store: str) -> str:
    """Replaces RESIDENCY_CHECK(col) with the store's expression, and RESIDENCY_OF_THIS_STORE
    with its residency."""
    text = text.replace("RESIDENCY_OF_THIS_STORE", _RESIDENCIES[store])
    return re.sub(r"RESIDENCY_CHECK\((\w+)\)",
                  lambda m: _RESIDENCY_CHECKS[store].format(col=m.group(1)), text)


def install_files() -> list[Path]:
    """Every file a fresh install applies, in order."""
    return [
        *sorted((SQL / "schema").glob("*.sql")),
        *sorted((SQL / "functions").glob("*.sql")),
        SQL / "fdw" / "00_identity_views.sql",
        SQL / "fdw" / "10_unwired_peer.sql",
        SQL / "after_functions.sql",
    ]


def seed_sql(store: str) -> str:
    seed = f"INSERT INTO runops.store_config (store_role) VALUES ('{store}');\n"
    if store == "CONTROL_PLANE":
        # The mirror receives this row by replication; seeding it on run-ops would collide.
        seed += "INSERT INTO runops.split_settings DEFAULT VALUES;\n"
    return seed


def fresh_install_sql(store: str) -> str:
    return render(install_text(), store) + seed_sql(store)


# Bodies are not checked at creation (files reference each other in any order, as pg_dump output
# does); the plpgsql_check gate checks them instead. The search_path is the one the public
# functions pin, which the SQL helpers rely on.
PREAMBLE = ("SET LOCAL search_path = runops, pg_catalog, pg_temp;\n"
            "SET LOCAL check_function_bodies = off;\n")


def _joined(paths: list[Path]) -> str:
    return "\n".join(f"-- sql/{p.relative_to(SQL).as_posix()}\n{p.read_text()}" for p in paths)


def install_text() -> str:
    """All install files, unrendered."""
    return PREAMBLE + _joined(install_files())


# -- the versioned revisions ---------------------------------------------------------------------

UPGRADES = SQL / "upgrades"
# A delta names the tables its DDL locks in a line `-- lock: runops.a, runops.b`; the upgrade takes
# them all at once, before any revision runs (take_upgrade_locks).
_LOCK_LINE = re.compile(r"^-- lock: (.+)$", re.M)
_TABLE = re.compile(r"[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*")


def revision_names() -> list[str]:
    """Every revision this tree has a delta for (``sql/upgrades/r0001_foundation`` ...), in order."""
    return sorted(p.name for p in UPGRADES.iterdir() if p.is_dir() and re.fullmatch(r"r\d{4}_[a-z0-9_]+", p.name))


def revision_number(name: str) -> str:
    """The Alembic revision id of a revision: r0002_seam -> 0002."""
    return name.split("_", 1)[0].removeprefix("r")


def upgrade_files(name: str) -> list[Path]:
    return sorted((UPGRADES / name).glob("*.sql"))


def revision_sql(name: str, store: str) -> str:
    """What versioned revision ``name`` applies to ``store``: its delta's files, in name order."""
    return render(PREAMBLE + _joined(upgrade_files(name)), store)


def pending_revisions(current: str | None, head: str) -> list[str]:
    """The revisions an upgrade from ``current`` (None: an empty database) to ``head`` applies."""
    return [n for n in revision_names() if (current or "") < revision_number(n) <= head]


def revision_locks(names: list[str]) -> list[str]:
    """The tables the deltas of ``names`` lock, in order, each once."""
    tables: list[str] = []
    for name in names:
        for path in upgrade_files(name):
            for line in _LOCK_LINE.findall(path.read_text()):
                for table in (t.strip() for t in line.split(",")):
                    if not _TABLE.fullmatch(table):
                        raise ValueError(f"{path}: `-- lock:` names schema.table, not {table!r}")
                    if table not in tables:
                        tables.append(table)
    return tables


# Every lock the upgrade needs, all or none, before it changes anything: waiting for one lock
# while holding another deadlocked with application transactions that hold the second and wait
# for the first, and the upgrade — the longest waiter — was the one PostgreSQL cancelled. Each
# attempt waits at most 200 ms and, failing, rolls back its subtransaction (releasing what it
# took) and tries again, so the upgrade never holds a lock while it waits for the next one and
# never queues every caller behind it for long.
#   * the deltas' tables (revision_locks), ACCESS EXCLUSIVE; those that do not exist yet (an
#     empty database) are skipped;
#   * runs, SHARE ROW EXCLUSIVE: the repeatable step re-creates the status triggers on it;
#   * in an unwired store the stand-ins in runops_peer are dropped here (the repeatable step
#     makes them again at head), so no delta ever meets them: a delta may change any column a
#     stand-in shows. A wired store's runops_peer (foreign tables) is never touched.
_LOCK_WITH_RETRY = """
DO $$
DECLARE
  previous text := pg_catalog.current_setting('lock_timeout');
  exclusive text;
  attempts integer := 0;
BEGIN
  SELECT pg_catalog.string_agg(t, ', ') INTO exclusive
  FROM pg_catalog.unnest(ARRAY[TABLES]::text[]) AS t WHERE pg_catalog.to_regclass(t) IS NOT NULL;
  LOOP
    BEGIN
      PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
      IF exclusive IS NOT NULL THEN
        EXECUTE 'LOCK TABLE ' || exclusive || ' IN ACCESS EXCLUSIVE MODE';
      END IF;
      IF pg_catalog.to_regclass('runops.runs') IS NOT NULL THEN
        LOCK TABLE runops.runs IN SHARE ROW EXCLUSIVE MODE;
      END IF;
      IF NOT EXISTS (SELECT FROM pg_catalog.pg_foreign_server AS s WHERE s.srvname = 'runops_peer') THEN
        DROP SCHEMA IF EXISTS runops_peer CASCADE;
      END IF;
      PERFORM pg_catalog.set_config('lock_timeout', previous, true);
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      attempts := attempts + 1;
      IF attempts >= 600 THEN
        RAISE EXCEPTION 'the upgrade could not lock % in % attempts: too busy to upgrade now',
          pg_catalog.concat_ws(', ', exclusive, 'runops.runs', 'the stand-ins in runops_peer'), attempts;
      END IF;
      PERFORM pg_catalog.pg_sleep(0.01 + pg_catalog.random() * 0.04);
    END;
  END LOOP;
END
$$;
"""


def take_upgrade_locks(conn: psycopg.Connection[Any], tables: list[str]) -> None:
    conn.execute(_LOCK_WITH_RETRY.replace("TABLES", ", ".join(f"'{t}'" for t in tables)))


# -- the repeatable step -------------------------------------------------------------------------

def repeatable_files(wired: bool) -> list[Path]:
    """What the repeatable step applies, in the fresh install's order: the stand-ins only where
    the store is not wired (re-applying them must never replace a wired store's foreign tables)."""
    stand_ins = [] if wired else [SQL / "fdw" / "10_unwired_peer.sql"]
    return [*sorted((SQL / "functions").glob("*.sql")), *stand_ins, SQL / "after_functions.sql"]


def repeatable_checksum(store: str, head: str) -> str:
    """sha256 of the repeatable files as rendered for ``store``, and of ``head``: the stand-ins copy
    the columns of the tables they show when they are made, so a new revision re-makes them (and
    re-grants) even when no function file changed."""
    digest = hashlib.sha256(f"{head}\0".encode())
    for path in repeatable_files(wired=False):
        digest.update(f"{path.relative_to(SQL).as_posix()}\0{render(path.read_text(), store)}\0".encode())
    return digest.hexdigest()


def record_table(store: str) -> str:
    """Where a store records what the repeatable step applied: beside Alembic's version table
    (public.alembic_version_<history>), as Flyway keeps repeatable checksums in its history table."""
    return f"runops_repeatable_{store.lower()}"


def recorded_checksum(conn: psycopg.Connection[Any], store: str) -> str | None:
    table = record_table(store)
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"public.{table}"]).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(sql.SQL("SELECT checksum FROM public.{}").format(sql.Identifier(table))).fetchone()
    return None if row is None else str(row[0])


def apply_repeatable(conn: psycopg.Connection[Any], store: str, head: str) -> None:
    """The live functions, the stand-ins (unwired stores: take_upgrade_locks dropped them) and
    the grants; then the checksum is recorded. Functions are all CREATE OR REPLACE; one whose
    signature changed was dropped by its revision's delta."""
    wired = conn.execute("SELECT EXISTS (SELECT FROM pg_catalog.pg_foreign_server WHERE srvname = 'runops_peer')")
    conn.execute(render(PREAMBLE + _joined(repeatable_files(wired=wired.fetchone() == (True,))), store))
    table = sql.Identifier(record_table(store))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS public.{} (checksum text NOT NULL, revision text NOT NULL, "
                         "applied_at timestamptz NOT NULL DEFAULT pg_catalog.now())").format(table))
    conn.execute(sql.SQL("DELETE FROM public.{}").format(table))
    conn.execute(sql.SQL("INSERT INTO public.{} (checksum, revision) VALUES (%s, %s)").format(table),
                 [repeatable_checksum(store, head), head])


def upgrade_to_head(conn: psycopg.Connection[Any], store: str, current: str | None, head: str,
                    run_versioned: Callable[[], None]) -> bool:
    """One upgrade of ``store`` (in the caller's transaction) from ``current`` to ``head``: the
    locks, the pending versioned revisions (``run_versioned``: Alembic runs them), then the
    repeatable step. With nothing pending and the checksum unchanged it changes nothing.
    Returns whether the repeatable step ran."""
    pending = pending_revisions(current, head)
    if not pending and recorded_checksum(conn, store) == repeatable_checksum(store, head):
        run_versioned()  # nothing to run; Alembic still checks the version table
        return False
    take_upgrade_locks(conn, revision_locks(pending))
    run_versioned()
    apply_repeatable(conn, store, head)
    return True


def drop_store(conn: psycopg.Connection[Any], store: str) -> None:
    """Undoes the first revision: both schemas and the repeatable step's record."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS runops_peer CASCADE; DROP SCHEMA IF EXISTS runops CASCADE; "
                         "DROP TABLE IF EXISTS public.{}").format(sql.Identifier(record_table(store))))
