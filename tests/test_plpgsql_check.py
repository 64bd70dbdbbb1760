"""Every PL/pgSQL function in schema runops passes plpgsql_check on both stores.

The gate is errors only (level 'error'); warnings are printed (run pytest with -s or -rA to see
them) and listed in the test report. Functions are checked under the search path the public
functions pin (runops, pg_catalog, pg_temp): the internal helpers carry no SET search_path and
rely on it. Trigger functions are checked against a table they are attached to. The test
clusters are wired, so runops_peer holds foreign tables here.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from runops.client import CONTROL_PLANE, RUN_OPS
from tests.conftest import Stores

PINNED_SEARCH_PATH = "runops, pg_catalog, pg_temp"

# (label, extra named arguments for plpgsql_check_function_tb)
CONFIGS = [
    ("defaults", ""),
    ("extra_warnings", ", performance_warnings => false, extra_warnings => true"),
]


def _install_plpgsql_check(conn: psycopg.Connection[Any]) -> str:
    """Creates plpgsql_check (in its own schema, so public stays clean) and returns its schema."""
    if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'plpgsql_check'").fetchone() is None:
        pytest.fail("the plpgsql_check extension is not available to this PostgreSQL server; "
                    "`make system-deps` (.ci/install-system-deps.sh) installs it")
    row = conn.execute("SELECT n.nspname FROM pg_extension AS e JOIN pg_namespace AS n ON n.oid = e.extnamespace "
                       "WHERE e.extname = 'plpgsql_check'").fetchone()
    if row is None:
        conn.execute("CREATE SCHEMA IF NOT EXISTS plpgsql_check")
        conn.execute("CREATE EXTENSION plpgsql_check SCHEMA plpgsql_check")
        return "plpgsql_check"
    return str(row[0])


def _plpgsql_functions(conn: psycopg.Connection[Any]) -> list[tuple[int, str, bool, int | None, str | None]]:
    """(oid, signature, is a trigger function, a table it is attached to, the name of its new-rows
    transition table) per PL/pgSQL function."""
    rows = conn.execute("""
        SELECT p.oid::bigint, p.oid::regprocedure::text, p.prorettype = 'trigger'::regtype, t.tgrelid::bigint,
               t.tgnewtable::text
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
        LEFT JOIN LATERAL (SELECT t.tgrelid, t.tgnewtable FROM pg_trigger AS t
                           WHERE t.tgfoid = p.oid AND NOT t.tgisinternal ORDER BY t.oid LIMIT 1) AS t ON true
        WHERE p.pronamespace = 'runops'::regnamespace AND l.lanname = 'plpgsql'
        ORDER BY 2""").fetchall()
    return [(int(r[0]), str(r[1]), bool(r[2]), None if r[3] is None else int(r[3]), r[4]) for r in rows]


def _format(signature: str, row: tuple[Any, ...]) -> str:
    level, lineno, statement, sqlstate, message, detail, hint = row
    where = f" line {lineno}" if lineno is not None else ""
    extra = "".join(f" [{k}: {v}]" for k, v in (("detail", detail), ("hint", hint)) if v)
    return f"{signature}{where} ({statement or '-'}) {level} {sqlstate}: {message}{extra}"


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_plpgsql_functions_have_no_errors(stores: Stores, store: str) -> None:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        schema = _install_plpgsql_check(conn)
        functions = _plpgsql_functions(conn)
        assert functions, "no PL/pgSQL functions in schema runops"
        # The bodies run as their owner (SECURITY DEFINER): checked as the owner too, with its
        # privileges and its FDW mapping (list_runs' foreign table asks the remote at plan time).
        conn.execute(f"GRANT USAGE ON SCHEMA {sql.Identifier(schema).as_string(conn)} TO runops_owner")
        conn.execute("SET ROLE runops_owner")
        conn.execute(f"SET search_path = {PINNED_SEARCH_PATH}")
        errors: list[str] = []
        warnings: set[str] = set()
        for oid, signature, is_trigger, relid, newtable in functions:
            if is_trigger and relid is None:
                errors.append(f"{signature}: a trigger function attached to no table cannot be checked")
                continue
            for label, extra in CONFIGS:
                rows = conn.execute(
                    f"SELECT level, lineno, statement, sqlstate, message, detail, hint "
                    f"FROM {sql.Identifier(schema).as_string(conn)}.plpgsql_check_function_tb("
                    f"%s::oid::regprocedure, %s::oid::regclass, newtable => %s{extra})",
                    [oid, relid or 0, newtable]).fetchall()
                for row in rows:
                    line = _format(signature, row)
                    if row[0] == "error":
                        errors.append(f"[{label}] {line}")
                    else:
                        warnings.add(line)
        for line in sorted(warnings):
            print(f"plpgsql_check {store}: {line}")
        assert not errors, f"plpgsql_check found errors on {store}:\n" + "\n".join(errors)
