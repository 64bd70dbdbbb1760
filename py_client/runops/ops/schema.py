"""Where the SQL lives and in which order a store installs it.

``sql/`` is the one place the schema and the functions are edited. A fresh install applies it
directly (tests compare that with what the migrations build); revisions carry a copy of the text
as it was when they were written (see ``python -m runops.ops.revision``).
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

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


def render(sql: str, store: str) -> str:
    """Replaces RESIDENCY_CHECK(col) with the store's expression, and RESIDENCY_OF_THIS_STORE
    with its residency."""
    sql = sql.replace("RESIDENCY_OF_THIS_STORE", _RESIDENCIES[store])
    return re.sub(r"RESIDENCY_CHECK\((\w+)\)",
                  lambda m: _RESIDENCY_CHECKS[store].format(col=m.group(1)), sql)


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


def install_text() -> str:
    """All install files, unrendered. Bodies are not checked at creation (files reference each
    other in any order, as pg_dump output does); the plpgsql_check gate checks them instead.
    The search_path is the one the public functions pin, which the SQL helpers rely on."""
    parts = [f"-- sql/{p.relative_to(SQL).as_posix()}\n{p.read_text()}" for p in install_files()]
    return ("SET LOCAL search_path = runops, pg_catalog, pg_temp;\n"
            "SET LOCAL check_function_bodies = off;\n") + "\n".join(parts)


def function_sql() -> str:
    return "\n".join(p.read_text() for p in sorted((SQL / "functions").glob("*.sql")))
