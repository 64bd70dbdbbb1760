"""Shared body of both histories' env.py: connect, pick the store's version table, migrate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes runops_revisions importable

ADMIN_URL_VARS = {"control_plane": "RUNOPS_CONTROL_PLANE_ADMIN_URL", "run_ops": "RUNOPS_RUN_OPS_ADMIN_URL"}


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
            context.run_migrations()
