"""Reads answer from the owning store — locally or through postgres_fdw — and never refuse."""

from __future__ import annotations

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import StoreUnavailable
from runops.ids import generate_ksuid
from runops.ops import migrate
from tests.conftest import Stores, sqlstate_of


def get_run(conn: psycopg.Connection, run_id: str, env: str | None = None) -> list[tuple]:
    return conn.execute("SELECT run_id, status, residency, environment_id FROM runops.get_run(%s, %s)",
                        [run_id, env]).fetchall()


def test_each_store_reads_its_own_and_the_others_runs(client: RunOps, cp, ro, legacy_env, new_env) -> None:
    legacy = client.trigger_run(legacy_env.environment_id, "t").run_id
    new = client.trigger_run(new_env.environment_id, "t").run_id
    for conn in (cp, ro):
        assert get_run(conn, legacy) == [(legacy, "PENDING", "LEGACY", legacy_env.environment_id)]
        assert get_run(conn, new) == [(new, "PENDING", "NEW", new_env.environment_id)]
        assert get_run(conn, legacy.removeprefix("run_"))[0][0] == legacy  # bare ids work too


def test_full_rows_read_through_equal_the_owners_rows(client: RunOps, new_env, legacy_env) -> None:
    for env in (new_env, legacy_env):
        run = client.trigger_run(env.environment_id, "t", {"x": [1, 2]}, tags=["a"], idempotency_key="k", ttl="1h")
        owner = client.get_run(run.run_id)
        other = CONTROL_PLANE if run.residency == "NEW" else RUN_OPS
        assert owner is not None and client.get_run(run.run_id, through=other) == owner


def test_reads_are_environment_scoped(cp, ro, client: RunOps, new_env, make_env) -> None:
    run = client.trigger_run(new_env.environment_id, "t").run_id
    stranger = make_env("ksuid").environment_id
    for conn in (cp, ro):
        assert len(get_run(conn, run, new_env.environment_id)) == 1
        assert get_run(conn, run, stranger) == []
    assert client.get_run(run, stranger) is None


@pytest.mark.parametrize("run_id", [
    "run_" + "c" + "0" * 24,            # well-formed, never minted
    "run_" + generate_ksuid(),
    "garbage", "", "run_", "batch_cjld2cjxh0000qzrmn831i7rn", "aWgEPTl1tmebfsQzFP4bxwgy80W",
])
def test_missing_malformed_and_wrong_prefix_ids_read_as_no_row(cp, ro, client: RunOps, run_id: str) -> None:
    assert get_run(cp, run_id) == [] and get_run(ro, run_id) == []
    assert client.get_run(run_id) is None


def test_the_fdw_read_is_a_pushed_down_primary_key_lookup(cp_admin) -> None:
    plan = "\n".join(r[0] for r in cp_admin.execute(
        "EXPLAIN (VERBOSE) SELECT * FROM runops_peer.run_view AS v WHERE v.id = %s AND v.environment_id = %s",
        ["x", "y"]).fetchall())
    assert "Remote SQL" in plan, plan
    assert "FROM runops.run_view WHERE ((id = 'x')) AND ((environment_id = 'y'))" in plan, plan


@pytest.fixture
def broken_peer(stores: Stores, scratch_db) -> str:
    """A control plane whose run-ops store has gone away (its FDW points at a closed port)."""
    url = scratch_db("deadpeer")
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate._wire_peer(conn, migrate._target(stores.admin[RUN_OPS]), "user 'postgres', password_required 'false'")
        conn.execute("UPDATE runops.split_settings SET enabled = true, ever_enabled = true")
        conn.execute("ALTER SERVER runops_peer OPTIONS (SET port '1')")
    return url


def test_an_unreachable_other_store_is_ro009(broken_peer: str) -> None:
    with psycopg.connect(broken_peer, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM runops.get_run(%s)", ["run_" + generate_ksuid()])
        assert sqlstate_of(err.value) == "RO009"
        assert conn.execute("SELECT * FROM runops.get_run(%s)", ["run_c" + "0" * 24]).fetchall() == []


def test_the_client_maps_an_unreachable_store_to_store_unavailable(stores: Stores, new_env) -> None:
    with RunOps(stores.app[CONTROL_PLANE], "postgresql://runops_app:x@127.0.0.1:1/runops", timeout=1) as c:
        with pytest.raises(StoreUnavailable):
            c.get_run("run_" + generate_ksuid())
