"""Writes a shared run-graph revision from the current ``sql/`` files.

    python -m runops.revision r0001_foundation

The revision carries the full text, so it stays valid however ``sql/`` changes later; both
histories' revision files call its ``upgrade(op, store)``.
"""

from __future__ import annotations

import sys

from .schema import _RESIDENCIES, _RESIDENCY_CHECKS, MIGRATIONS, ROOT, install_text, seed_sql

TEMPLATE = '''"""{name}: generated from sql/ by `python -m runops.revision {name}`. Do not edit by hand.

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
    op.get_bind().connection.driver_connection.execute(
        "DROP SCHEMA IF EXISTS runops_peer CASCADE; DROP SCHEMA IF EXISTS runops CASCADE;")
'''


def main(name: str) -> None:
    text = install_text()
    if "'''" in text:
        raise SystemExit("sql/ contains ''' which the revision template cannot quote")
    out = MIGRATIONS / "runops_revisions" / f"{name}.py"
    out.write_text(TEMPLATE.format(name=name, checks=_RESIDENCY_CHECKS, residencies=_RESIDENCIES,
                                   seeds={s: seed_sql(s) for s in _RESIDENCY_CHECKS}, sql=text))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1])
