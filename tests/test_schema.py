"""The schema: run-graph parity between stores, migrations equal the fresh install, installed
functions equal sql/functions, the repeatable step at head, released deltas frozen, the revision
tool, `migrate --check`, plain `alembic`, and the privilege model."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from runops.ops import migrate, revision, schema
from runops.ops.cli import main
from tests.conftest import sqlstate_of

REPO = Path(__file__).resolve().parents[1]

RUN_GRAPH = ("status_transitions", "runs", "batches", "batch_items", "waitpoints", "run_waitpoints",
             "attempts", "checkpoints")
# The one literal allowed to differ: each store's id-shape CHECK, as PostgreSQL prints it.
RESIDENCY_LITERAL = re.compile(
    r"^CHECK \(\(\w+ ~ '\^c\[0-9a-z\]\{24\}\$'::text\)\)$"
    r"|^CHECK \(\(\(\w+ ~ '\^\[0-9A-Za-z\]\{27\}\$'::text\) AND \(\w+ <= 'aWgEPTl1tmebfsQzFP4bxwgy80V'::text\)\)\)$")


def run_graph_shape(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    columns = conn.execute("""
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), co.collname, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'runops'::regnamespace AND c.relname = ANY(%s) AND a.attnum > 0
          AND NOT a.attisdropped ORDER BY 1, a.attnum""", [list(RUN_GRAPH)]).fetchall()
    constraints = conn.execute("""
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        WHERE c.relnamespace = 'runops'::regnamespace AND c.relname = ANY(%s) ORDER BY 1, 2""",
                               [list(RUN_GRAPH)]).fetchall()
    indexes = conn.execute("""
        SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'runops' AND tablename = ANY(%s)
        ORDER BY 1, 2""", [list(RUN_GRAPH)]).fetchall()
    return {"columns": columns,
            "constraints": [(t, n, RESIDENCY_LITERAL.sub("CHECK (<residency>)", d)) for t, n, d in constraints],
            "indexes": indexes}


def test_run_graph_schemas_are_identical_in_both_stores(cp_admin: psycopg.Connection,
                                                         ro_admin: psycopg.Connection) -> None:
    a, b = run_graph_shape(cp_admin), run_graph_shape(ro_admin)
    assert a["columns"] and a["indexes"]
    residency_checks = [c for c in a["constraints"] if c[2] == "CHECK (<residency>)"]
    assert {c[0] for c in residency_checks} >= {"runs", "batches", "waitpoints", "attempts", "checkpoints"}
    assert a == b


def test_tenant_columns_in_the_run_graph_carry_no_foreign_key(cp_admin: psycopg.Connection) -> None:
    refs = cp_admin.execute("""
        SELECT DISTINCT confrelid::regclass::text FROM pg_constraint
        WHERE contype = 'f' AND conrelid::regclass::text = ANY(%s)""",
                            [[f"runops.{t}" for t in RUN_GRAPH]]).fetchall()
    assert {r[0] for r in refs} <= {f"runops.{t}" for t in RUN_GRAPH}


@pytest.mark.parametrize(("store", "bad_id"), [("CONTROL_PLANE", "0ujtsYcgvSTl8PAuAdqWYSMnLOv"),
                                               ("RUN_OPS", "cjld2cjxh0000qzrmn831i7rn")])
def test_residency_check_rejects_a_misrouted_row_even_from_a_superuser(stores, store: str, bad_id: str) -> None:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("""INSERT INTO runops.runs (id, environment_id, project_id, organization_id,
                            task_identifier, status, payload, queue, created_at, updated_at)
                            VALUES (%s, 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now())""", [bad_id])


def pg_dump_schema(stores, url: str) -> str:
    out = subprocess.run([f"{stores.local.bindir}/pg_dump", "--schema-only",
                          "--schema=runops", "--schema=runops_peer", url],
                         capture_output=True, text=True, check=True).stdout
    # \\restrict lines carry a random key per dump.
    return "\n".join(line for line in out.splitlines()
                     if not line.startswith(("-- Dumped", "\\restrict", "\\unrestrict")))


def seed_rows(url: str) -> list[Any]:
    with psycopg.connect(url) as conn:
        return [conn.execute("SELECT * FROM runops.status_transitions ORDER BY 1, 2, 3").fetchall(),
                conn.execute("SELECT * FROM runops.store_config").fetchall(),
                conn.execute("SELECT singleton, enabled, ever_enabled, default_mint_kind "
                             "FROM runops.split_settings").fetchall()]


@pytest.mark.parametrize("store", ["CONTROL_PLANE", "RUN_OPS"])
def test_all_migrations_from_empty_equal_the_fresh_schema(stores, scratch_db, store: str) -> None:
    migrated, fresh = scratch_db("migrated"), scratch_db("fresh")
    migrate.upgrade(store, migrated)
    with psycopg.connect(fresh) as conn:
        conn.execute(schema.fresh_install_sql(store))  # type: ignore[arg-type]
    assert pg_dump_schema(stores, migrated) == pg_dump_schema(stores, fresh)
    assert seed_rows(migrated) == seed_rows(fresh)


def function_definitions(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("""
            SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid) FROM pg_proc p
            WHERE p.pronamespace = 'runops'::regnamespace""").fetchall())


@pytest.mark.parametrize("store", ["CONTROL_PLANE", "RUN_OPS"])
def test_installed_functions_equal_sql_functions(stores, scratch_db, store: str) -> None:
    """Drift: the running stores (built by the migrations) carry exactly the bodies in sql/."""
    fresh = scratch_db("drift")
    with psycopg.connect(fresh) as conn:
        conn.execute(schema.fresh_install_sql(store))  # type: ignore[arg-type]
    installed, expected = function_definitions(stores.admin[store]), function_definitions(fresh)
    assert sorted(installed) == sorted(expected)
    drifted = [name for name in expected if installed[name] != expected[name]]
    assert drifted == [], "the upgrade's repeatable step did not leave sql/functions installed"


def forget_the_checksum(url: str, store: str) -> None:
    """What a store looks like to a newer runops whose function files changed."""
    with psycopg.connect(url) as conn:
        conn.execute(f"UPDATE public.{schema.record_table(store)} SET checksum = 'older'")  # type: ignore[arg-type]


def test_migrate_check_exits_non_zero_when_a_store_is_behind(scratch_db) -> None:
    url = scratch_db("check")
    runner = CliRunner()
    behind = runner.invoke(main, ["migrate", "--check", "--control-plane-url", url])
    assert behind.exit_code == 3, behind.output
    assert "behind" in behind.output
    upgraded = runner.invoke(main, ["migrate", "--control-plane-url", url])
    assert upgraded.exit_code == 0, upgraded.output
    current = runner.invoke(main, ["migrate", "--check", "--control-plane-url", url])
    assert current.exit_code == 0, current.output
    # At head, but the functions it recorded are not the ones this runops ships: behind too.
    forget_the_checksum(url, "CONTROL_PLANE")
    functions = runner.invoke(main, ["--json", "migrate", "--check", "--control-plane-url", url])
    assert functions.exit_code == 3, functions.output
    head = migrate.head_revision("CONTROL_PLANE", url)
    assert '"state": "functions behind"' in functions.output and f'"current": "{head}"' in functions.output
    assert runner.invoke(main, ["migrate", "--control-plane-url", url]).exit_code == 0
    assert runner.invoke(main, ["migrate", "--check", "--control-plane-url", url]).exit_code == 0


def proc_versions(url: str) -> dict[str, str]:
    """Each runops function's pg_proc row version: it changes whenever the function is replaced."""
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT oid::regprocedure::text, xmin::text FROM pg_proc "
                                 "WHERE pronamespace = 'runops'::regnamespace").fetchall())


EDITED_STORE_ROLE = "CREATE OR REPLACE FUNCTION runops.store_role() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$"


def test_the_repeatable_step_runs_when_its_checksum_differs_and_only_then(scratch_db) -> None:
    url = scratch_db("repeatable")
    migrate.upgrade("CONTROL_PLANE", url)
    shipped, versions = function_definitions(url), proc_versions(url)
    migrate.upgrade("CONTROL_PLANE", url)
    assert proc_versions(url) == versions, "an upgrade with nothing to do replaced functions"
    # The checksum decides, not the installed bodies: an edit in place stays (`runops doctor`
    # reports it) until the function files change.
    with psycopg.connect(url) as conn:
        conn.execute(EDITED_STORE_ROLE)
    migrate.upgrade("CONTROL_PLANE", url)
    assert function_definitions(url) != shipped
    forget_the_checksum(url, "CONTROL_PLANE")
    migrate.upgrade("CONTROL_PLANE", url)
    assert function_definitions(url) == shipped
    assert migrate.functions_current("CONTROL_PLANE", url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'runops_peer.runs'::regclass").fetchone() == \
            ("v",), "an unwired store has its stand-ins back"


def test_the_repeatable_step_never_replaces_a_wired_runops_peer(scratch_db) -> None:
    url = scratch_db("wired")
    migrate.upgrade("RUN_OPS", url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.wire_to_self(conn, url)
    forget_the_checksum(url, "RUN_OPS")
    migrate.upgrade("RUN_OPS", url)
    assert migrate.functions_current("RUN_OPS", url)
    with psycopg.connect(url) as conn:
        kinds = dict(conn.execute("SELECT relname, relkind FROM pg_class "
                                  "WHERE relnamespace = 'runops_peer'::regnamespace").fetchall())
        assert kinds and set(kinds.values()) == {"f"}, kinds
        conn.execute("SET LOCAL ROLE runops_owner")  # the role the FDW's user mapping is for
        assert conn.execute("SELECT count(*) FROM runops_peer.store_identity_view").fetchone() == (1,)


def test_plain_alembic_refuses_a_target_other_than_head_and_changes_nothing(scratch_db) -> None:
    url = scratch_db("nothead")
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(schema.MIGRATIONS / "alembic.ini"),
                           "--name", "control_plane", "-x", f"url={url}", "upgrade", "0002"],
                          capture_output=True, text=True, check=False)
    said = done.stdout + done.stderr  # alembic prints its FAILED line on stdout
    assert done.returncode != 0
    assert "upgrades to head" in said and "only, not 0002" in said, said
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regnamespace('runops'), to_regclass('public.alembic_version_control_plane')"
                            ).fetchone() == (None, None)


def test_released_deltas_are_unchanged_and_every_revision_has_both_version_files() -> None:
    """A revision is released once a later one exists (runops.ops.revision): its files must
    match sql/upgrades/released.sha256 exactly — none changed, none added, none removed."""
    names = schema.revision_names()
    listed = revision.released()
    assert {p.split("/")[0] for p in listed} >= set(names[:-1]), "make revision records the older revisions"
    for name in {p.split("/")[0] for p in listed}:
        assert revision.released_changes(name, listed) == [], f"{name} is released: add a new revision instead"
    for section in ("control_plane", "run_ops"):
        versions = sorted(p.stem for p in (schema.MIGRATIONS / section / "versions").glob("*.py"))
        assert versions == [n.removeprefix("r") for n in names], f"make revision NAME=... writes {section}'s versions"


def revision_tool(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree / "py_client")}
    return subprocess.run([sys.executable, "-m", "runops.ops.revision", *args], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)


def test_the_revision_tool_writes_version_files_and_refuses_to_touch_a_released_delta(tmp_path: Path) -> None:
    """On a copy of the tree: a new revision gets both version files after the newest, released
    revisions are refused, and a change to a released delta stops the tool."""
    for part in ("py_client", "sql", "migrations"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    newest = schema.revision_names()[-1]
    number = f"{int(schema.revision_number(newest)) + 1:04d}"
    (tmp_path / "sql" / "upgrades" / f"r{number}_trial").mkdir()
    (tmp_path / "sql" / "upgrades" / f"r{number}_trial" / "10_trial.sql").write_text("-- trial: no DDL\n")
    refused = revision_tool(tmp_path, "r0001_foundation")
    assert refused.returncode != 0 and "r0001_foundation is released" in refused.stderr

    made = revision_tool(tmp_path, f"r{number}_trial", "Trial: nothing")
    assert made.returncode == 0, made.stderr
    for section, title in (("control_plane", "control plane"), ("run_ops", "run-ops store")):
        text = (tmp_path / "migrations" / section / "versions" / f"{number}_trial.py").read_text()
        assert text.startswith(f'"""Trial: nothing ({title}).')
        assert f'down_revision = "{schema.revision_number(newest)}"' in text
        assert f'upgrade, downgrade = steps("r{number}_trial", ' in text
    # Every revision older than the new one is released now, file by file.
    listed = [line.split()[1] for line in (tmp_path / "sql" / "upgrades" / "released.sha256").read_text().splitlines()]
    assert listed == sorted(f"{n}/{p.name}" for n in schema.revision_names() for p in schema.upgrade_files(n))

    changed = tmp_path / "sql" / "upgrades" / newest / schema.upgrade_files(newest)[0].name
    changed.write_text(changed.read_text() + "-- an afterthought\n")
    refused = revision_tool(tmp_path, f"r{number}_trial")
    assert refused.returncode != 0
    assert f"{newest} is released and its delta changed ({newest}/{changed.name} changed)" in refused.stderr
    digest = hashlib.sha256(changed.read_bytes()).hexdigest()
    assert digest not in (tmp_path / "sql" / "upgrades" / "released.sha256").read_text()


def test_plain_alembic_upgrades_a_store(scratch_db) -> None:
    url = scratch_db("alembic")
    done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(schema.MIGRATIONS / "alembic.ini"),
                           "--name", "run_ops", "-x", f"url={url}", "upgrade", "head"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT runops.store_role()").fetchone()[0] == "RUN_OPS"
        assert conn.execute("SELECT version_num FROM public.alembic_version_run_ops").fetchone()[0] == \
            migrate.head_revision("RUN_OPS", url)


def test_migrate_with_one_database_installs_the_control_plane_only(scratch_db) -> None:
    url = scratch_db("single")
    report = migrate.migrate(url, url)
    assert report.upgraded == ["CONTROL_PLANE"] and not report.wired
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT runops.store_role(), runops.peer_wired()").fetchone() == ("CONTROL_PLANE", False)


def test_public_functions_are_security_definer_with_a_pinned_path(cp_admin: psycopg.Connection) -> None:
    rows = cp_admin.execute("""
        SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner),
               has_function_privilege('runops_app', p.oid, 'EXECUTE'),
               has_function_privilege('public', p.oid, 'EXECUTE')
        FROM pg_proc p WHERE p.pronamespace = 'runops'::regnamespace""").fetchall()
    identity = {"classify_residency", "try_classify_residency", "generate_ksuid", "generate_cuid",
                "ksuid_timestamp", "store_role", "store_identity", "now", "ksuid_encode", "base36_digits4",
                "base36_digits8", "base62_digits4", "base62_digits7", "base62_digits10", "input_prefix",
                # SPEC §9: shard_of is an identity function, with its decoding helpers
                "shard_of", "shard_of_id", "base62_digit", "ksuid_top40", "shard_of_top40"}
    app_callable = [r for r in rows if r[4]]
    assert len(app_callable) > len(identity)
    for name, secdef, _config, owner, _, public in rows:
        assert owner == "runops_owner", name
        assert not public, f"{name} is executable by PUBLIC"
        base = name.split("(")[0].removeprefix("runops.")
        if base in identity:
            assert not secdef, name
    # tick_every commits between passes, which a SECURITY DEFINER procedure may not do; it only
    # calls tick(), which is one.
    for name, secdef, config, *_ in app_callable:
        base = name.split("(")[0].removeprefix("runops.")
        if base not in identity and base != "tick_every":
            assert secdef, name
            assert config == ["search_path=runops, pg_catalog, pg_temp"], name


def test_the_app_role_cannot_touch_tables_directly(cp: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT * FROM runops.runs LIMIT 1")
    assert sqlstate_of(err.value) == "42501"
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT runops.find_or_create_run(NULL, NULL, NULL, NULL, NULL, NULL, NULL)")
    assert sqlstate_of(err.value) == "42501"
