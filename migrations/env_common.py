"""Shared body of both histories' env.py: connect, pick the store's version table, migrate.

`alembic upgrade head` applies the pending versioned revisions and then, once, the repeatable
step (the live function files, the unwired stand-ins, the grants) when its checksum differs
from the one the store recorded: runops.ops.schema.upgrade_to_head, in Alembic's transaction.
Any other target is refused: this tree carries no older release's functions, so a store left
at an older revision would run functions that do not match its tables.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from runops.ops import schema

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes runops_revisions importable

ADMIN_URL_VARS = {"control_plane": "RUNOPS_CONTROL_PLANE_ADMIN_URL", "run_ops": "RUNOPS_RUN_OPS_ADMIN_URL"}


def upgrading() -> bool:
    """Whether this is Alembic's upgrade command (not stamp, downgrade, current, history): the
    migrations function it hands the environment is named after it."""
    return getattr(context.get_context().opts.get("fn"), "__name__", "") == "upgrade"


def run(section: str) -> None:
    config = context.config
    url = (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
           or os.environ.get(ADMIN_URL_VARS[section]))
    if not url:
        raise SystemExit(f"no database URL: pass -x url=... or set {ADMIN_URL_VARS[section]}")
    if context.is_offline_mode():
        raise SystemExit("runops migrations run online only (they carry PL/pgSQL bodies)")
    # libpq reads the URL (postgresql://… or key=value), as everywhere else in runops: sslmode,
    # service files and the rest mean the same here.
    engine = create_engine("postgresql+psycopg://", poolclass=NullPool, creator=lambda: psycopg.connect(url))
    with engine.connect() as connection:
        # Each store has its own version table, so two stores in one database never wait on
        # each other's (the multidb template's hang).
        context.configure(connection=connection, target_metadata=None,
                          version_table=f"alembic_version_{section}", version_table_schema="public")
        with context.begin_transaction():
            if not upgrading():
                context.run_migrations()
                return
            head = context.script.get_current_head()
            target = context.get_revision_argument()
            if target != head and target != (head,):
                raise CommandError(f"runops upgrades to head ({head}) only, not {target}: this release carries the "
                                   "functions of its head alone (install the older release to reach an older "
                                   "revision)")
            schema.upgrade_to_head(connection.connection.driver_connection, section.upper(),
                                   context.get_context().get_current_revision(), head, context.run_migrations)
