"""Writes a shared run-graph revision from the current ``sql/`` files.

    python -m runops.ops.revision r0002_seam "Across the seam: claim ledger, merged listing, purge"

r0001 (released) carries the whole install. Every later revision is a *delta*: the hand-written
DDL in ``sql/upgrades/<name>/*.sql``, applied in file-name order (what changed in ``sql/schema/``
and the fdw stand-ins, written so it upgrades a store with data in place), then every file of ``sql/functions/`` and
``sql/after_functions.sql`` as they are now. Function files are all ``CREATE OR REPLACE``, so
re-applying an unchanged one is a no-op; a function whose signature changes is dropped by the
delta first. The revision carries the text, so it stays valid however ``sql/`` changes later;
re-rendering is allowed only while the revision is unreleased (the drift test tells you when).

It also writes both histories' version files (``migrations/{control_plane,run_ops}/versions``),
each calling the shared revision's ``upgrade(op, store)``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .schema import (
    _RESIDENCIES,
    _RESIDENCY_CHECKS,
    MIGRATIONS,
    ROOT,
    SQL,
    install_text,
    seed_sql,
)

PREAMBLE = ("SET LOCAL search_path = runops, pg_catalog, pg_temp;\n"
            "SET LOCAL check_function_bodies = off;\n")

MODULE = '''"""{name}: generated from sql/ by `python -m runops.ops.revision {name}`. Do not edit by hand.

Both histories apply this text; RESIDENCY_CHECK(col) becomes each store's id-shape CHECK and
RESIDENCY_OF_THIS_STORE its residency.
"""

import re

RESIDENCY_CHECKS = {checks!r}

RESIDENCIES = {residencies!r}

SEEDS = {seeds!r}

SQL = r\'\'\'
{sql}\'\'\'


def render(sql: str, store: str) -> str:
    sql = sql.replace("RESIDENCY_OF_THIS_STORE", RESIDENCIES[store])
    return re.sub(r"RESIDENCY_CHECK\\((\\w+)\\)", lambda m: RESIDENCY_CHECKS[store].format(col=m.group(1)), sql)


def upgrade(op, store: str) -> None:
    # The driver connection runs the text as one simple query: no parameter parsing of the
    # PL/pgSQL bodies, and the same transaction Alembic opened.
    op.get_bind().connection.driver_connection.execute(render(SQL, store) + SEEDS[store])


def downgrade(op) -> None:
{downgrade}
'''

FULL_DOWNGRADE = '''    op.get_bind().connection.driver_connection.execute(
        "DROP SCHEMA IF EXISTS runops_peer CASCADE; DROP SCHEMA IF EXISTS runops CASCADE;")'''

DELTA_DOWNGRADE = '''    raise NotImplementedError("{name} is not reversible in place: restore the pre-upgrade backup, "
                              "or install the older release into a fresh store")'''

VERSION = '''"""{message} ({title}).

Revision ID: {number}
Revises: {down}
"""
from alembic import op
from runops_revisions import {name}

revision = "{number}"
down_revision = {down_repr}
branch_labels = None
depends_on = None


def upgrade() -> None:
    {name}.upgrade(op, "{store}")


def downgrade() -> None:
    {name}.downgrade(op)
'''

# Revisions that have shipped: their text never changes again (add a new revision instead).
RELEASED = {"r0001_foundation", "r0002_seam", "r0003_freshness"}

HISTORIES = {"CONTROL_PLANE": ("control_plane", "control plane"), "RUN_OPS": ("run_ops", "run-ops store")}


def delta_text(name: str) -> str:
    """What revision ``name`` (not the first) applies: its DDL delta, then the function files."""
    delta = sorted((SQL / "upgrades" / name).glob("*.sql"))
    if not delta:
        raise SystemExit(f"write the DDL delta first: sql/upgrades/{name}/*.sql")
    parts = [*delta, *sorted((SQL / "functions").glob("*.sql")), SQL / "after_functions.sql"]
    return PREAMBLE + "\n".join(f"-- {p.relative_to(ROOT)}\n{p.read_text()}" for p in parts)


def write_versions(name: str, message: str) -> None:
    number = name.split("_", 1)[0].lstrip("r")
    previous = sorted(p.stem for p in (MIGRATIONS / "runops_revisions").glob("r[0-9]*.py") if p.stem < name)
    down = previous[-1].split("_", 1)[0].lstrip("r") if previous else None
    for store, (section, title) in HISTORIES.items():
        path = MIGRATIONS / section / "versions" / f"{number}_{name.split('_', 1)[1]}.py"
        path.write_text(VERSION.format(message=message, title=title, number=number, down=down or "",
                                       down_repr=repr(down), name=name, store=store))


def main(name: str, message: str | None = None) -> None:
    if not re.fullmatch(r"r\d{4}_[a-z0-9_]+", name):
        raise SystemExit("revision names look like r0002_what_it_does")
    if name in RELEASED:
        raise SystemExit(f"{name} is released: put the change in a new revision (r0002_... and up)")
    full = name.startswith("r0001_")
    text = install_text() if full else delta_text(name)
    if "'''" in text:
        raise SystemExit("sql/ contains ''' which the revision template cannot quote")
    out: Path = MIGRATIONS / "runops_revisions" / f"{name}.py"
    seeds = {s: seed_sql(s) if full else "" for s in _RESIDENCY_CHECKS}
    out.write_text(MODULE.format(name=name, checks=_RESIDENCY_CHECKS, residencies=_RESIDENCIES, seeds=seeds,
                                 sql=text, downgrade=FULL_DOWNGRADE if full else DELTA_DOWNGRADE.format(name=name)))
    print(f"wrote {out.relative_to(ROOT)}")
    if not full:
        write_versions(name, message or name.split("_", 1)[1].replace("_", " ").capitalize())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
