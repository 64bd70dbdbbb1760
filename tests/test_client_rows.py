"""Rows are read by column name, and columns the client does not know are ignored (SPEC §9
"Rolling upgrades": stores are upgraded before applications, so a later revision may add a column
to what a function answers while the deployed clients still run).

A store of its own (a control-plane install in a scratch database of the session's cluster) is
widened as a later revision would widen it — a column added at the end of ``runops.run_view``, and
so of every run-returning function and of ``list_store_runs``' row, and one more on
``trigger_run``'s, ``get_batch``'s and ``get_waitpoint``'s rows — and every read of both clients
must go on working.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from runops import RunOps
from runops.client import CONTROL_PLANE
from runops.ops import migrate
from tests.client_flavours import Blocking
from tests.conftest import Stores

ADDED = "added_later"


def _add_column_to_run_view(conn: psycopg.Connection[Any]) -> None:
    """ALTERs run_view as a revision would (a column at the end), then rebuilds the listing's row
    type, which copies run_view's columns, with the functions that answer it."""
    viewdef = conn.execute("SELECT pg_get_viewdef('runops.run_view'::regclass)").fetchone()[0]
    head, sep, tail = viewdef.rpartition("\n   FROM ")
    assert sep, viewdef
    conn.execute(f"CREATE OR REPLACE VIEW runops.run_view AS {head},\n    42 AS {ADDED}{sep}{tail}")
    listing = [row[0] for row in conn.execute(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p WHERE p.prorettype = 'runops.run_page_row'::regtype")]
    assert len(listing) == 2  # list_runs and list_store_runs
    conn.execute("DROP VIEW runops.run_page_row CASCADE")
    conn.execute("CREATE VIEW runops.run_page_row AS SELECT v.*, NULL::text AS cursor FROM runops.run_view AS v "
                 "WHERE false")
    conn.execute("ALTER VIEW runops.run_page_row OWNER TO runops_owner")
    for definition in listing:
        conn.execute(definition)
    for name in ("list_runs", "list_store_runs"):
        conn.execute(f"ALTER FUNCTION runops.{name}(text, integer, text, jsonb) OWNER TO runops_owner")
        conn.execute(f"GRANT EXECUTE ON FUNCTION runops.{name}(text, integer, text, jsonb) TO runops_api")


def _add_column_to_answer(conn: psycopg.Connection[Any], name: str, args: str) -> None:
    """Puts a wrapper answering one column more in front of ``runops.<name>(<args>)``."""
    signature = f"runops.{name}({args})"
    params, columns, nargs = conn.execute("""
        SELECT pg_get_function_arguments(p.oid),
               coalesce((SELECT string_agg(format('%%I %%s', a.n, format_type(a.t, NULL)), ', ' ORDER BY a.o)
                         FROM unnest(p.proargnames, p.proallargtypes, p.proargmodes::text[])
                              WITH ORDINALITY AS a(n, t, m, o) WHERE a.m = 't'),
                        (SELECT string_agg(format('%%I %%s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                                           ORDER BY a.attnum)
                         FROM pg_attribute a
                         WHERE a.attrelid = (SELECT typrelid FROM pg_type WHERE oid = p.prorettype)
                           AND a.attnum > 0 AND NOT a.attisdropped)),
               p.pronargs
        FROM pg_proc p WHERE p.oid = %s::regprocedure""", [signature]).fetchone()
    conn.execute(f"CREATE TYPE runops.{name}_widened AS ({columns}, {ADDED} integer)")
    # Moved, not renamed: its body names its parameters by the function's name.
    conn.execute("CREATE SCHEMA IF NOT EXISTS runops_before_widening AUTHORIZATION runops_owner")
    conn.execute(f"ALTER FUNCTION {signature} SET SCHEMA runops_before_widening")
    positional = ", ".join(f"${i}" for i in range(1, nargs + 1))
    conn.execute(f"""
        CREATE FUNCTION runops.{name}({params}) RETURNS SETOF runops.{name}_widened
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = runops, pg_catalog, pg_temp
        AS $$ SELECT b.*, 42 FROM runops_before_widening.{name}({positional}) AS b $$""")
    conn.execute(f"ALTER FUNCTION {signature} OWNER TO runops_owner")
    conn.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO runops_api")


@pytest.fixture(scope="module")
def widened(stores: Stores) -> Iterator[str]:
    """The application URL of a control-plane store whose answers carry a column no client knows."""
    dbname = f"widened_{secrets.token_hex(3)}"
    cluster = stores.local.clusters[CONTROL_PLANE]
    cluster.create_database(dbname)
    admin = stores.admin_url(CONTROL_PLANE, dbname)
    try:
        migrate.migrate(admin, None)
        with psycopg.connect(admin, autocommit=True) as conn:
            _add_column_to_run_view(conn)
            _add_column_to_answer(conn, "trigger_run", "text, text, jsonb, jsonb")
            _add_column_to_answer(conn, "get_batch", "text, text")
            _add_column_to_answer(conn, "get_waitpoint", "text, text")
        yield stores.app[CONTROL_PLANE].rsplit("/", 1)[0] + f"/{dbname}"
    finally:
        with psycopg.connect(stores.admin_url(CONTROL_PLANE, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(params=["sync", "async"])
def client_on_widened(request: pytest.FixtureRequest, widened: str) -> Iterator[Any]:
    flavour = RunOps if request.param == "sync" else Blocking
    with flavour(widened) as c:
        yield c


def test_the_store_answers_the_added_column(widened: str) -> None:
    """The fixture did widen every answer the client reads (else the test below proves nothing)."""
    with psycopg.connect(widened, autocommit=True) as conn:
        org = conn.execute("SELECT runops.create_organization('w', '{}')").fetchone()[0]
        env = conn.execute("SELECT runops.create_environment(runops.create_project(%s, 'p'), 'e', 'PRODUCTION')",
                           [org]).fetchone()[0]
        run = conn.execute("SELECT run_id, added_later FROM runops.trigger_run(%s, 't')", [env]).fetchone()
        batch = conn.execute("""SELECT batch_id FROM runops.batch_trigger(%s, '[{"task": "t"}]', '{}')""",
                             [env]).fetchone()[0]
        waitpoint = conn.execute("SELECT waitpoint_id FROM runops.create_waitpoint(%s, 'MANUAL', '{}')",
                                 [env]).fetchone()[0]
        assert run[1] == 42
        for query, arg in (("SELECT added_later FROM runops.get_run(%s)", run[0]),
                           ("SELECT added_later FROM runops.list_store_runs(%s)", env),
                           ("SELECT added_later FROM runops.dequeue_runs(%s, 'w', 1)", env),
                           ("SELECT added_later FROM runops.get_batch(%s)", batch),
                           ("SELECT added_later FROM runops.get_waitpoint(%s)", waitpoint)):
            assert {row[0] for row in conn.execute(query, [arg])} == {42}, query


def test_every_read_ignores_a_column_added_by_a_later_revision(client_on_widened: Any) -> None:
    ro = client_on_widened
    org = ro.create_organization(f"w{secrets.token_hex(3)}")
    env = ro.create_environment(ro.create_project(org, "p"), "e", "PRODUCTION")
    queue = f"q-{secrets.token_hex(3)}"

    made = ro.trigger_run(env, "t", {"n": 1}, queue=queue)
    keyed = ro.trigger_run(env, "t", {"n": 2}, idempotency_key="k")
    again = ro.trigger_run(env, "t", {"n": 3}, idempotency_key="k")
    assert (made.status, keyed.is_cached, again.is_cached, again.run_id) == ("PENDING", False, True, keyed.run_id)

    run = ro.get_run(made.run_id)
    assert run is not None and (run.run_id, run.payload, run.queue) == (made.run_id, {"n": 1}, queue)
    page = ro.list_runs(env, 10)
    assert {r.run_id for r in page.runs} == {made.run_id, keyed.run_id} and page.runs[0].cursor

    [taken] = ro.dequeue_runs(env, "w", 1, queues=[queue])
    assert (taken.run_id, taken.status) == (made.run_id, "DEQUEUED")
    assert ro.start_attempt(made.run_id, "w").status == "EXECUTING"
    assert ro.complete_attempt(made.run_id, 1, {"ok": True}).output == {"ok": True}

    batch = ro.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(2)])
    got = ro.get_batch(batch.batch_id)
    assert got is not None and (got.run_ids, got.item_count) == (batch.run_ids, 2)

    waitpoint = ro.create_waitpoint(env, "MANUAL")
    seen = ro.get_waitpoint(waitpoint.waitpoint_id)
    assert seen is not None and (seen.waitpoint_id, seen.status) == (waitpoint.waitpoint_id, "PENDING")
