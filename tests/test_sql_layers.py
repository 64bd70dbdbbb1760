"""The SQL has floors: each file of sql/functions/ calls only functions of its own floor or lower
ones (docs/design.md, "Floors", which this test reads).

The calls are the installed ones, not a reading of the files: plpgsql_check's dependency listing
(plpgsql_show_dependency_tb) for every PL/pgSQL function, resolved as PostgreSQL resolves them
under the search path the public functions pin, and for SQL functions the names their bodies
call. Which file holds a function is read from the files (a move between files changes nothing
installed). Functions of sql/schema/ are below every floor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops.schema import ROOT
from tests.conftest import Stores
from tests.test_plpgsql_check import PINNED_SEARCH_PATH, _install_plpgsql_check

DESIGN = ROOT / "docs" / "design.md"
FUNCTIONS = ROOT / "sql" / "functions"
SCHEMA = ROOT / "sql" / "schema"
SCHEMA_FLOOR = 0


def floors() -> dict[str, tuple[int, str]]:
    """File name -> (floor number, floor name), from the numbered list under "## Floors"."""
    text = DESIGN.read_text()
    section = text[text.index("\n## Floors"):]
    section = section[:section.index("\n## ", 1)]
    found: dict[str, tuple[int, str]] = {}
    for number, name, files in re.findall(r"^(\d+)\. \*\*([^*]+)\*\*: (.*)$", section, re.M):
        for file in re.findall(r"`([\w.]+\.sql)`", files.split(" — ")[0]):
            assert file not in found, f"{file} is on two floors in docs/design.md"
            found[file] = (int(number), name)
    return found


def homes(directory: Path, pattern: str) -> dict[str, str]:
    """Function name -> the file of `directory` that defines it."""
    found: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        for name in re.findall(pattern, path.read_text()):
            assert found.get(name, path.name) == path.name, f"runops.{name} is defined in {found[name]} and {path.name}"
            found[name] = path.name
    return found


def body_calls(body: str, names: set[str]) -> set[str]:
    """The runops functions a SQL body calls: `name(` unqualified (the pinned search path puts
    runops first) or `runops.name(`; never another schema's (`pg_catalog.now(`)."""
    code = re.sub(r"--[^\n]*", "", body)
    code = re.sub(r"'(?:[^']|'')*'", "''", code)
    called = re.findall(r"(?:(?<![\w.])|(?<=runops\.))([a-z_][a-z0-9_]*)\s*\(", code)
    return {name for name in called if name in names}


def call_graph(conn: psycopg.Connection[Any], names: set[str]) -> set[tuple[str, str]]:
    """(caller, callee) for every runops function calling another."""
    schema = sql.Identifier(_install_plpgsql_check(conn)).as_string(conn)
    conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO runops_owner")
    # As the owner the bodies run as (its FDW mapping: foreign tables are planned), under the
    # pinned search path (the helpers' unqualified names resolve as they do at run time).
    conn.execute("SET ROLE runops_owner")
    conn.execute(f"SET search_path = {PINNED_SEARCH_PATH}")
    edges: set[tuple[str, str]] = set()
    functions = conn.execute("""
        SELECT p.oid::bigint, p.proname, l.lanname, p.prosrc,
               (SELECT t.tgrelid::bigint FROM pg_trigger AS t
                WHERE t.tgfoid = p.oid AND NOT t.tgisinternal ORDER BY t.oid LIMIT 1)
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
        WHERE p.pronamespace = 'runops'::regnamespace""").fetchall()
    for oid, name, language, body, relid in functions:
        if language == "plpgsql":
            callees = {str(r[0]) for r in conn.execute(
                f"SELECT d.name FROM {schema}.plpgsql_show_dependency_tb("
                "%s::oid::regprocedure, %s::oid::regclass) AS d "
                "WHERE d.type = 'FUNCTION' AND d.schema = 'runops'", [oid, relid or 0]).fetchall()}
        elif language == "sql":
            callees = body_calls(body, names)
        else:
            continue
        edges |= {(str(name), callee) for callee in callees if callee != name}
    return edges


def test_every_function_file_stands_on_one_floor() -> None:
    on_floors = set(floors())
    files = {p.name for p in FUNCTIONS.glob("*.sql")}
    assert files - on_floors == set(), "files on no floor: add them to docs/design.md, \"Floors\""
    assert on_floors - files == set(), "floors list files that do not exist"


def test_the_call_scanner_reads_sql_bodies() -> None:
    names = {"now", "mint_id", "local_residency"}
    assert body_calls("SELECT pg_catalog.now(), runops.mint_id() -- now()\n, 'local_residency()', "
                      "local_residency ()", names) == {"mint_id", "local_residency"}


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_no_file_calls_a_higher_floor(stores: Stores, store: str) -> None:
    floor_of = floors()
    home = homes(FUNCTIONS, r"CREATE OR REPLACE (?:FUNCTION|PROCEDURE) runops\.(\w+)\s*\(")
    below_all = homes(SCHEMA, r"CREATE (?:FUNCTION|PROCEDURE) runops\.(\w+)\s*\(")
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        edges = call_graph(conn, set(home) | set(below_all))
    assert len(edges) > 300, "the call graph came out nearly empty"

    def floor(function: str) -> tuple[int, str]:
        if function in home:
            return floor_of[home[function]]
        assert function in below_all, f"runops.{function} is defined in no file of sql/functions or sql/schema"
        return SCHEMA_FLOOR, "schema"

    upward = sorted(
        f"{home[caller]} ({floor(caller)[1]}) {caller} -> {home[callee]} ({floor(callee)[1]}) {callee}"
        for caller, callee in edges if floor(callee)[0] > floor(caller)[0])
    assert not upward, "calls to a higher floor (docs/design.md, \"Floors\"):\n" + "\n".join(upward)
