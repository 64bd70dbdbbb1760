"""Which store a new run lives in: the mint kind for roots, the anchor for children, the
pre-minted id as given — and RO002 for a caller who asks the wrong store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import InvalidInput, NotFound, WrongStore
from runops.ids import generate_ksuid
from tests.conftest import Stores, sqlstate_of


def trigger(conn: psycopg.Connection[Any], env: str, task: str = "t", **options: Any) -> tuple[Any, ...]:
    row = conn.execute("SELECT * FROM runops.trigger_run(%s, %s, '{}', %s)", [env, task, Jsonb(options)]).fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture
def default_kind(client: RunOps) -> Iterator[None]:
    """Restores the default mint kind a test changes."""
    yield
    client.set_default_mint_kind("cuid")
    client.wait_for_mirror()


def test_root_runs_mint_by_the_organization_kind(client: RunOps, legacy_env, new_env) -> None:
    a = client.trigger_run(legacy_env.environment_id, "t")
    b = client.trigger_run(new_env.environment_id, "t")
    assert (a.residency, len(a.run_id)) == ("LEGACY", 4 + 25)
    assert (b.residency, len(b.run_id)) == ("NEW", 4 + 27)
    assert client.trigger_route(legacy_env.environment_id) == CONTROL_PLANE
    assert client.trigger_route(new_env.environment_id) == RUN_OPS


def test_organizations_without_a_kind_follow_the_default(client: RunOps, make_env, default_kind) -> None:
    env = make_env(None)
    assert client.trigger_run(env.environment_id, "t").residency == "LEGACY"
    client.set_default_mint_kind("ksuid")
    assert client.wait_for_mirror()
    assert client.trigger_run(env.environment_id, "t").residency == "NEW"


def test_a_child_inherits_its_parents_store_across_a_flip(client: RunOps, new_env) -> None:
    parent = client.trigger_run(new_env.environment_id, "parent")
    client.set_mint_kind(new_env.organization_id, "cuid")
    assert client.wait_for_mirror()
    child = client.trigger_run(new_env.environment_id, "child", parent_run_id=parent.run_id)
    grandchild = client.trigger_run(new_env.environment_id, "child", parent_run_id=child.run_id)
    root = client.trigger_run(new_env.environment_id, "root")
    assert (child.residency, grandchild.residency, root.residency) == ("NEW", "NEW", "LEGACY")
    run = client.get_run(grandchild.run_id)
    assert run is not None and run.parent_run_id == child.run_id and run.root_run_id == parent.run_id


def test_a_pre_minted_id_is_used_as_given_and_returned_on_retry(client: RunOps, new_env) -> None:
    run_id = "run_" + generate_ksuid()
    first = client.trigger_run(new_env.environment_id, "t", run_id=run_id)
    again = client.trigger_run(new_env.environment_id, "t", run_id=run_id)
    assert (first.run_id, first.is_cached) == (run_id, False)
    assert (again.run_id, again.is_cached) == (run_id, True)


def test_a_pre_minted_id_that_disagrees_with_the_rules_is_invalid(client: RunOps, legacy_env, new_env) -> None:
    with pytest.raises(InvalidInput):
        client.trigger_run(legacy_env.environment_id, "t", run_id="run_" + generate_ksuid())
    taken = client.trigger_run(new_env.environment_id, "t")
    with pytest.raises(InvalidInput):
        client.trigger_run(new_env.environment_id, "other-task", run_id=taken.run_id)
    with pytest.raises(InvalidInput):
        client.trigger_run(new_env.environment_id, "t", run_id="batch_" + generate_ksuid())


def test_triggering_on_the_wrong_store_is_ro002_naming_the_owner(cp: psycopg.Connection, ro: psycopg.Connection,
                                                                 legacy_env, new_env) -> None:
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, new_env.environment_id)
    assert sqlstate_of(err.value) == "RO002"
    assert err.value.diag.message_detail == "owning_store=RUN_OPS"
    with pytest.raises(psycopg.Error) as err:
        trigger(ro, legacy_env.environment_id)
    assert err.value.diag.message_detail == "owning_store=CONTROL_PLANE"
    parent = trigger(ro, new_env.environment_id)[0]
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, new_env.environment_id, parent_run_id=parent)
    assert err.value.diag.message_detail == "owning_store=RUN_OPS"


def test_the_client_retries_once_on_the_store_named_in_ro002(client: RunOps, new_env) -> None:
    client._routes[new_env.environment_id] = (CONTROL_PLANE, float("inf"))  # a stale route
    try:
        assert client.trigger_run(new_env.environment_id, "t").residency == "NEW"
    finally:
        client._routes.clear()


def test_a_client_without_the_owning_store_surfaces_wrong_store(stores: Stores, new_env) -> None:
    with RunOps(stores.app[CONTROL_PLANE]) as single:
        with pytest.raises(WrongStore) as err:
            single.trigger_run(new_env.environment_id, "t")
        assert err.value.owning_store == RUN_OPS


def test_runs_record_the_minted_shape_in_every_row(client: RunOps, new_env, ro_admin) -> None:
    run = client.trigger_run(new_env.environment_id, "t", tags=["a", "b"], metadata={"m": 1}, queue="q1",
                             concurrency_key="ck", max_attempts=5, ttl="10m", max_duration="1h")
    row = client.get_run(run.run_id)
    assert row is not None
    assert (row.tags, row.metadata, row.queue) == (["a", "b"], {"m": 1}, "q1")
    assert (row.concurrency_key, row.max_attempts) == ("ck", 5)
    assert row.ttl is not None and row.ttl.total_seconds() == 600
    assert row.environment_id == new_env.environment_id and row.organization_id == new_env.organization_id


def test_split_disabled_after_enabled_mints_roots_legacy_and_keeps_new_rows_live(client: RunOps, new_env) -> None:
    parent = client.trigger_run(new_env.environment_id, "parent")
    client.disable_split()
    try:
        assert client.wait_for_mirror()
        assert client.trigger_run(new_env.environment_id, "root").residency == "LEGACY"
        child = client.trigger_run(new_env.environment_id, "child", parent_run_id=parent.run_id)
        assert child.residency == "NEW"
        assert client.finalize_run(parent.run_id, "COMPLETED_SUCCESSFULLY").status == "COMPLETED_SUCCESSFULLY"
        assert client.get_run(parent.run_id, through=CONTROL_PLANE) is not None
    finally:
        client.enable_split()
        assert client.wait_for_mirror()


def test_never_enabled_store_mints_legacy_and_treats_new_ids_as_absent(scratch_db) -> None:
    from runops.ops import migrate

    url = scratch_db("never")
    migrate.migrate(url, None)
    with psycopg.connect(url, autocommit=True) as conn:
        org = conn.execute("SELECT runops.create_organization('o', '{\"mint_kind\": \"ksuid\"}')").fetchone()[0]
        env = conn.execute("SELECT runops.create_environment(runops.create_project(%s, 'p'), 'e', 'DEVELOPMENT')",
                           [org]).fetchone()[0]
        assert trigger(conn, env)[3] == "LEGACY"
        ksuid = "run_" + generate_ksuid()
        assert conn.execute("SELECT * FROM runops.get_run(%s)", [ksuid]).fetchall() == []
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM runops.finalize_run(%s, 'CANCELED')", [ksuid])
        assert sqlstate_of(err.value) == "RO004"
        with pytest.raises(psycopg.Error) as err:
            trigger(conn, env, run_id=ksuid)
        assert sqlstate_of(err.value) == "RO006"
        with pytest.raises(psycopg.Error) as err:
            trigger(conn, env, parent_run_id=ksuid)
        assert sqlstate_of(err.value) == "RO004"
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT runops.enable_split()")
        assert sqlstate_of(err.value) == "RO007"


def test_unknown_parent_or_another_environments_parent_is_not_found(client: RunOps, new_env, make_env) -> None:
    with pytest.raises(NotFound):
        client.trigger_run(new_env.environment_id, "t", parent_run_id="run_" + generate_ksuid())
    other = make_env("ksuid")
    parent = client.trigger_run(other.environment_id, "p")
    with pytest.raises(NotFound):
        client.trigger_run(new_env.environment_id, "t", parent_run_id=parent.run_id)
