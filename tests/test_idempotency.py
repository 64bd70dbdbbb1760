"""Idempotent triggers: the dedup key, scopes, dead keys, reset, and races between connections."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ids import generate_ksuid
from tests.concurrent_calls import race
from tests.conftest import Env, Stores

DEAD_STATUSES = ["INTERRUPTED", "COMPLETED_WITH_ERRORS", "SYSTEM_FAILURE", "CRASHED", "TIMED_OUT", "EXPIRED"]
KEEPING_STATUSES = ["COMPLETED_SUCCESSFULLY", "CANCELED"]


def trigger(conn: psycopg.Connection[Any], env: str, task: str = "t", **options: Any) -> tuple[str, bool, str, str]:
    row = conn.execute("SELECT * FROM runops.trigger_run(%s, %s, '{}', %s)", [env, task, Jsonb(options)]).fetchone()
    assert row is not None
    return row


@pytest.fixture(params=["LEGACY", "NEW"])
def where(request: pytest.FixtureRequest, make_env: Callable[..., Env], store_conn) -> tuple[Env, psycopg.Connection]:
    """Each test runs once per store: a cuid organization on the control plane, a ksuid one on run-ops."""
    if request.param == "LEGACY":
        return make_env("cuid"), store_conn(CONTROL_PLANE)
    return make_env("ksuid"), store_conn(RUN_OPS)


def test_retrigger_with_the_same_key_returns_the_cached_run(where) -> None:
    env, conn = where
    first = trigger(conn, env.environment_id, idempotency_key="k")
    again = trigger(conn, env.environment_id, idempotency_key="k")
    assert first[1] is False and again[1] is True
    assert again[0] == first[0]


def test_keys_are_scoped_to_environment_and_task(where, make_env) -> None:
    env, conn = where
    a = trigger(conn, env.environment_id, "task-a", idempotency_key="k")
    b = trigger(conn, env.environment_id, "task-b", idempotency_key="k")
    assert a[0] != b[0]
    other = make_env("cuid" if a[3] == "LEGACY" else "ksuid")
    c = trigger(conn, other.environment_id, "task-a", idempotency_key="k")
    assert c[0] != a[0] and c[1] is False


def test_dedup_key_is_the_spec_hash(where, stores: Stores) -> None:
    env, conn = where
    parent = trigger(conn, env.environment_id, "parent")[0]
    run_scoped = trigger(conn, env.environment_id, idempotency_key="k", parent_run_id=parent)[0]
    global_scoped = trigger(conn, env.environment_id, idempotency_key="k", parent_run_id=parent,
                            idempotency_key_scope="global")[0]
    attempt_scoped = trigger(conn, env.environment_id, idempotency_key="k", parent_run_id=parent,
                             idempotency_key_scope="attempt", parent_attempt_number=2)[0]
    root = trigger(conn, env.environment_id, "root-task", idempotency_key="k", idempotency_key_scope="run")[0]
    expected = {
        run_scoped: "-".join(["k", parent]),
        global_scoped: "k",
        attempt_scoped: "-".join(["k", parent, "2"]),
        root: "k",  # no parent: every scope acts as global
    }
    assert len(set(expected)) == 4
    store = CONTROL_PLANE if parent.startswith("run_c") else RUN_OPS
    with psycopg.connect(stores.admin[store]) as admin:
        for run_id, material in expected.items():
            stored = admin.execute("SELECT idempotency_key_hash, idempotency_key FROM runops.runs WHERE id = %s",
                                   [run_id.removeprefix("run_")]).fetchone()
            assert stored == (hashlib.sha256(material.encode()).hexdigest(), "k")


@pytest.mark.parametrize("status", DEAD_STATUSES)
def test_retrigger_after_a_failed_or_expired_run_creates_a_new_run(where, status: str) -> None:
    env, conn = where
    first = trigger(conn, env.environment_id, idempotency_key="k")
    conn.execute("SELECT * FROM runops.finalize_run(%s, %s)", [first[0], status])
    second = trigger(conn, env.environment_id, idempotency_key="k")
    assert second[1] is False and second[0] != first[0]
    third = trigger(conn, env.environment_id, idempotency_key="k")
    assert third[0] == second[0] and third[1] is True
    old = conn.execute("SELECT idempotency_key FROM runops.get_run(%s)", [first[0]]).fetchone()
    assert old == (None,)  # the dead key was released by its store


@pytest.mark.parametrize("status", KEEPING_STATUSES)
def test_successful_and_canceled_runs_keep_their_key(where, status: str) -> None:
    env, conn = where
    first = trigger(conn, env.environment_id, idempotency_key="k")
    conn.execute("SELECT * FROM runops.finalize_run(%s, %s)", [first[0], status])
    again = trigger(conn, env.environment_id, idempotency_key="k")
    assert again[:3] == (first[0], True, status)


def test_an_expired_key_creates_a_new_run(where) -> None:
    env, conn = where
    conn.execute("SET runops.fake_now = '2031-01-01 00:00:00+00'")
    first = trigger(conn, env.environment_id, idempotency_key="k", idempotency_key_ttl="1h")
    conn.execute("SET runops.fake_now = '2031-01-01 00:59:59+00'")
    assert trigger(conn, env.environment_id, idempotency_key="k")[0] == first[0]
    conn.execute("SET runops.fake_now = '2031-01-01 01:00:00+00'")  # expires_at <= now: dead
    fresh = trigger(conn, env.environment_id, idempotency_key="k")
    assert fresh[0] != first[0] and fresh[1] is False


def test_default_key_ttl_is_thirty_days(where) -> None:
    env, conn = where
    conn.execute("SET runops.fake_now = '2031-01-01 00:00:00+00'")
    run_id = trigger(conn, env.environment_id, idempotency_key="k")[0]
    expires = conn.execute("SELECT idempotency_key_expires_at - runops.now() FROM runops.get_run(%s)",
                           [run_id]).fetchone()[0]
    assert expires.days == 30


def test_reset_idempotency_key_clears_the_key(where) -> None:
    env, conn = where
    first = trigger(conn, env.environment_id, idempotency_key="k")
    parent = trigger(conn, env.environment_id, "parent")[0]
    child = trigger(conn, env.environment_id, idempotency_key="k", parent_run_id=parent)
    assert conn.execute("SELECT runops.reset_idempotency_key(%s, 't', 'k', 'global')",
                        [env.environment_id]).fetchone()[0] == 1
    assert conn.execute("SELECT runops.reset_idempotency_key(%s, 't', 'k', 'global')",
                        [env.environment_id]).fetchone()[0] == 0
    assert trigger(conn, env.environment_id, idempotency_key="k")[0] != first[0]
    assert conn.execute("SELECT runops.reset_idempotency_key(%s, 't', 'k', 'run', %s)",
                        [env.environment_id, parent]).fetchone()[0] == 1
    assert trigger(conn, env.environment_id, idempotency_key="k", parent_run_id=parent)[0] != child[0]


def test_client_reset_clears_both_stores_and_strips_nul_bytes(client: RunOps, make_env) -> None:
    env = make_env("ksuid")
    first = client.trigger_run(env.environment_id, "t", {}, idempotency_key="a\x00b")
    assert client.trigger_run(env.environment_id, "t", {}, idempotency_key="ab").run_id == first.run_id
    assert client.reset_idempotency_key(env.environment_id, "t", "a\x00b", scope="global") == 1


@pytest.mark.parametrize("round_", range(3))
def test_32_connections_triggering_one_key_create_exactly_one_run(where, stores: Stores, round_: int) -> None:
    env, conn = where
    store = CONTROL_PLANE if conn.info.port == stores.local.clusters[CONTROL_PLANE].port else RUN_OPS
    conns = [psycopg.connect(stores.app[store], autocommit=True) for _ in range(32)]
    try:
        results = race([lambda c=c: trigger(c, env.environment_id, idempotency_key=f"race-{round_}") for c in conns])
    finally:
        for c in conns:
            c.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r[0] for r in results}) == 1
    assert sum(1 for r in results if r[1] is False) == 1


def test_concurrent_retriggers_of_a_dead_key_create_exactly_one_new_run(where, stores: Stores) -> None:
    env, conn = where
    store = CONTROL_PLANE if conn.info.port == stores.local.clusters[CONTROL_PLANE].port else RUN_OPS
    failed = trigger(conn, env.environment_id, idempotency_key="dead")
    conn.execute("SELECT * FROM runops.finalize_run(%s, 'CRASHED')", [failed[0]])
    conns = [psycopg.connect(stores.app[store], autocommit=True) for _ in range(16)]
    try:
        results = race([lambda c=c: trigger(c, env.environment_id, idempotency_key="dead") for c in conns])
    finally:
        for c in conns:
            c.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({r[0] for r in results}) == 1 and results[0][0] != failed[0]
    assert sum(1 for r in results if r[1] is False) == 1


def test_concurrent_client_triggers_with_a_pre_minted_id_create_one_run(client: RunOps, make_env) -> None:
    env = make_env("ksuid")
    run_id = "run_" + generate_ksuid()  # minted by the client, as a retrying caller would
    results = race([lambda: client.trigger_run(env.environment_id, "t", {}, run_id=run_id)] * 16)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert {r.run_id for r in results} == {run_id}
    assert sum(1 for r in results if not r.is_cached) == 1
