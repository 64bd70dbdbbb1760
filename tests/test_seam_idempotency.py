"""One key, one run across both stores (SPEC §6): mint-kind flips, a global key shared by a NEW
root and a child of a LEGACY parent, dead holders in the other store, reset, and races between
connections on both stores at once. Crashes between the remote and the local commit are in
tests/faults/."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from tests.concurrent_calls import race
from tests.conftest import Stores, sqlstate_of

RETRYABLE = {"RO008", "40001", "40P01"}
T = TypeVar("T")


def retrying(call: Callable[[], T]) -> T:
    """A SQL call as a careful SQL caller makes it: again, after a short pause, on what the SPEC
    calls retryable (the transaction rolled back, so nothing was written)."""
    for attempt in itertools.count():
        try:
            return call()
        except psycopg.Error as exc:
            if sqlstate_of(exc) not in RETRYABLE or attempt > 50:
                raise
            time.sleep(random.uniform(0.001, 0.01))
    raise AssertionError("unreachable")


def trigger(conn: psycopg.Connection[Any], env: str, task: str = "t", **options: Any) -> tuple[str, bool, str, str]:
    """trigger_run as a SQL caller does it, retrying what the SPEC calls retryable."""
    row = retrying(lambda: conn.execute("SELECT * FROM runops.trigger_run(%s, %s, '{}', %s)",
                                        [env, task, Jsonb(options)]).fetchone())
    assert row is not None
    return row


def flip(client: RunOps, org: str, kind: str) -> None:
    client.set_mint_kind(org, kind)
    assert client.wait_for_mirror()


def key_holders(stores: Stores, env: str, task: str = "t") -> list[tuple[str, str]]:
    """Every run in either store that holds a live key for (env, task): (id, status)."""
    holders: list[tuple[str, str]] = []
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.admin[store]) as conn:
            holders += conn.execute("""
                SELECT id, status FROM runops.runs
                WHERE environment_id = %s AND task_identifier = %s AND idempotency_key_hash IS NOT NULL
                  AND NOT runops.idempotency_key_is_dead(status, idempotency_key_expires_at, now())""",
                                    [env, task]).fetchall()
    return holders


def finalize(conn: psycopg.Connection[Any], run_id: str, status: str) -> None:
    conn.execute("SELECT * FROM runops.finalize_run(%s, %s)", [run_id, status])


def test_a_mint_kind_flip_returns_the_existing_run_for_a_key(client: RunOps, make_env, store_conn) -> None:
    env = make_env("ksuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    first = trigger(ro, env.environment_id, idempotency_key="k1")
    assert first[1] is False and first[3] == "NEW"
    flip(client, env.organization_id, "cuid")
    again = trigger(cp, env.environment_id, idempotency_key="k1")
    assert again == (first[0], True, first[2], "NEW")
    flip(client, env.organization_id, "ksuid")
    assert trigger(ro, env.environment_id, idempotency_key="k1")[:2] == (first[0], True)


def test_a_flip_back_finds_the_legacy_holder(client: RunOps, make_env, store_conn) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    first = trigger(cp, env.environment_id, idempotency_key="k1")
    assert first[3] == "LEGACY"
    flip(client, env.organization_id, "ksuid")
    assert trigger(ro, env.environment_id, idempotency_key="k1") == (first[0], True, first[2], "LEGACY")


def test_the_client_returns_the_one_run_across_flips(client: RunOps, make_env) -> None:
    env = make_env("ksuid")
    runs = set()
    for kind in ("ksuid", "cuid", "ksuid", "cuid"):
        flip(client, env.organization_id, kind)
        runs.add(client.trigger_run(env.environment_id, "t", {}, idempotency_key="k").run_id)
    assert len(runs) == 1


def test_a_global_key_of_a_new_root_holds_for_a_child_of_a_legacy_parent(client: RunOps, make_env,
                                                                          store_conn) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    parent = trigger(cp, env.environment_id, "parent")[0]
    flip(client, env.organization_id, "ksuid")
    root = trigger(ro, env.environment_id, idempotency_key="g", idempotency_key_scope="global")
    assert root[3] == "NEW"
    child = trigger(cp, env.environment_id, idempotency_key="g", idempotency_key_scope="global",
                    parent_run_id=parent)
    assert child[:2] == (root[0], True) and child[3] == "NEW"


def test_a_child_of_a_legacy_parent_holds_a_global_key_against_a_new_root(client: RunOps, make_env,
                                                                          store_conn) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    parent = trigger(cp, env.environment_id, "parent")[0]
    child = trigger(cp, env.environment_id, idempotency_key="g", idempotency_key_scope="global", parent_run_id=parent)
    flip(client, env.organization_id, "ksuid")
    root = trigger(ro, env.environment_id, idempotency_key="g", idempotency_key_scope="global")
    assert root == (child[0], True, child[2], "LEGACY")


def test_trigger_and_wait_on_a_holder_in_the_other_store_blocks_the_parent_on_it(client: RunOps, make_env,
                                                                                store_conn, stores: Stores) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    parent = trigger(cp, env.environment_id, "parent")[0]
    flip(client, env.organization_id, "ksuid")
    holder = trigger(ro, env.environment_id, idempotency_key="w", idempotency_key_scope="global")
    cached = trigger(cp, env.environment_id, idempotency_key="w", idempotency_key_scope="global",
                     parent_run_id=parent, resume_parent_on_completion=True)
    assert cached[0] == holder[0]
    with psycopg.connect(stores.admin[CONTROL_PLANE]) as admin:
        edges = admin.execute("SELECT waitpoint_id FROM runops.run_waitpoints WHERE run_id = %s",
                              [parent[4:]]).fetchall()
    assert edges == [(holder[0][4:],)]


@pytest.mark.parametrize("dead_status", ["SYSTEM_FAILURE", "CRASHED"])
def test_a_dead_holder_in_the_other_store_yields_one_new_run_and_lets_go(client: RunOps, make_env, store_conn,
                                                                       stores: Stores, dead_status: str) -> None:
    env = make_env("ksuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    old = trigger(ro, env.environment_id, idempotency_key="d")
    finalize(ro, old[0], dead_status)
    flip(client, env.organization_id, "cuid")
    new = trigger(cp, env.environment_id, idempotency_key="d")
    assert new[1] is False and new[3] == "LEGACY"
    assert trigger(cp, env.environment_id, idempotency_key="d")[:2] == (new[0], True)
    flip(client, env.organization_id, "ksuid")
    # The run-ops store finds its dead holder, releases it, and returns the live LEGACY one.
    assert trigger(ro, env.environment_id, idempotency_key="d")[:2] == (new[0], True)
    with psycopg.connect(stores.admin[RUN_OPS]) as admin:
        row = admin.execute("SELECT idempotency_key_hash FROM runops.runs WHERE id = %s", [old[0][4:]]).fetchone()
    assert row == (None,)
    assert [h[0] for h in key_holders(stores, env.environment_id)] == [new[0][4:]]


def test_an_expired_holder_in_the_other_store_yields_one_new_run(client: RunOps, make_env, store_conn) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    old = trigger(cp, env.environment_id, idempotency_key="x", idempotency_key_ttl="1h")
    flip(client, env.organization_id, "ksuid")
    ro.execute("SELECT set_config('runops.fake_now', (now() + interval '2 hours')::text, false)")
    try:
        new = trigger(ro, env.environment_id, idempotency_key="x")
        assert new[1] is False and new[0] != old[0] and new[3] == "NEW"
        assert trigger(ro, env.environment_id, idempotency_key="x")[:2] == (new[0], True)
    finally:
        ro.execute("RESET runops.fake_now")
    # Back on real time the old key is still inside its hour, but the ledger names the new run:
    # the control plane asks the ledger and returns the new run.
    flip(client, env.organization_id, "cuid")
    assert trigger(cp, env.environment_id, idempotency_key="x")[0] in (new[0], old[0])


def test_a_reset_key_in_one_store_lets_the_other_store_mint_a_new_holder(client: RunOps, make_env,
                                                                        store_conn) -> None:
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    old = trigger(cp, env.environment_id, idempotency_key="r")
    assert client.reset_idempotency_key(env.environment_id, "t", "r") == 1
    flip(client, env.organization_id, "ksuid")
    new = trigger(ro, env.environment_id, idempotency_key="r")
    assert new[1] is False and new[0] != old[0]


def test_failed_task_runs_claim_their_key_across_stores(client: RunOps, make_env, store_conn) -> None:
    env = make_env("ksuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    live = trigger(ro, env.environment_id, idempotency_key="f")
    flip(client, env.organization_id, "cuid")
    row = cp.execute("SELECT * FROM runops.trigger_failed_task(%s, 't', '{}', '{}', %s)",
                     [env.environment_id, Jsonb({"idempotency_key": "f"})]).fetchone()
    assert row is not None and row[:2] == (live[0], True)


@pytest.mark.parametrize("round_", range(3))
def test_a_global_key_raced_from_both_stores_yields_one_run(client: RunOps, make_env, stores: Stores,
                                                            round_: int) -> None:
    """16 connections per store: children of a LEGACY parent on the control plane and NEW roots on
    run-ops trigger the same global keys at once."""
    env = make_env("cuid")
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as conn:
        parent = trigger(conn, env.environment_id, "parent")[0]
    flip(client, env.organization_id, "ksuid")
    keys = [f"race-{round_}-{i}" for i in range(4)]
    conns = [psycopg.connect(stores.app[store], autocommit=True) for store in [CONTROL_PLANE, RUN_OPS] * 16]
    try:
        def call(i: int) -> Callable[[], list[str]]:
            conn = conns[i]
            options: dict[str, Any] = {"idempotency_key_scope": "global"}
            if i % 2 == 0:
                options["parent_run_id"] = parent
            return lambda: [trigger(conn, env.environment_id, idempotency_key=k, **options)[0] for k in keys]

        results = race([call(i) for i in range(len(conns))], timeout=None)
        assert not [r for r in results if isinstance(r, BaseException)], results
    finally:
        for c in conns:
            c.close()
    for j in range(len(keys)):
        assert len({r[j] for r in results}) == 1, [r[j] for r in results]
    holders = key_holders(stores, env.environment_id)
    assert len(holders) == len(keys)


def test_flips_under_keyed_traffic_never_make_two_holders(client: RunOps, make_env, stores: Stores) -> None:
    """Keyed triggers through the client while the organization's mint kind flips
    cuid -> ksuid -> cuid ...: every caller of a key gets the same run, one holder per key."""
    env = make_env("cuid")
    stop = threading.Event()
    keys = [f"flip-{i}" for i in range(6)]
    seen: dict[str, set[str]] = {k: set() for k in keys}
    errors: list[BaseException] = []

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            key = rng.choice(keys)
            try:
                run = client.trigger_run(env.environment_id, "t", {}, idempotency_key=key)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted
                errors.append(exc)
                return
            seen[key].add(run.run_id)

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for kind in ["ksuid", "cuid"] * 3:
            time.sleep(0.2)
            flip(client, env.organization_id, kind)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert all(len(runs) == 1 for runs in seen.values()), seen
    holders = key_holders(stores, env.environment_id)
    assert len(holders) == len(keys)


def test_the_app_role_cannot_write_the_ledger(stores: Stores) -> None:
    with psycopg.connect(stores.app[RUN_OPS], autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO runops.idempotency_claims VALUES ('e', 't', 'h', 'r', NULL, now(), now())")


def test_keys_that_predate_the_split_are_claimed_when_it_is_enabled(scratch_db, stores: Stores) -> None:
    """A fresh pair of stores: a keyed LEGACY run made before the split was ever enabled is
    returned by a NEW-minting trigger afterwards (enable_split backfills its claim)."""
    from runops.ops import migrate

    cp_url, ro_url = scratch_db("seam_cp"), scratch_db("seam_ro")
    report = migrate.migrate(cp_url, ro_url)
    assert report.wired
    try:
        with psycopg.connect(cp_url, autocommit=True) as cp, psycopg.connect(ro_url, autocommit=True) as ro:
            org = one(cp, "SELECT runops.create_organization('pre', '{}')")
            project = one(cp, "SELECT runops.create_project(%s, 'p')", [org])
            env = one(cp, "SELECT runops.create_environment(%s, 'e', 'PRODUCTION')", [project])
            old = trigger(cp, env, idempotency_key="pre")
            assert old[3] == "LEGACY"
            enabled = one(cp, "SELECT runops.enable_split()")
            assert enabled["enabled"] is True
            cp.execute("SELECT runops.set_mint_kind(%s, 'ksuid')", [org])
            deadline = time.monotonic() + 10
            while one(ro, "SELECT runops.trigger_route(%s, '{}')", [env]) != RUN_OPS:
                assert time.monotonic() < deadline, "the mirror never caught up"
                ro.execute("SELECT runops.pull_tenant_mirror()")
                time.sleep(0.05)
            assert trigger(ro, env, idempotency_key="pre") == (old[0], True, old[2], "LEGACY")
            claims = one(ro, "SELECT count(*) FROM runops.idempotency_claims")
            assert claims == 1
    finally:
        migrate.drop_mirror(cp_url, ro_url)


def one(conn: psycopg.Connection[Any], query: str, params: list[Any] | None = None) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def batch(conn: psycopg.Connection[Any], env: str, items: list[dict[str, Any]], **options: Any) -> tuple[Any, ...]:
    row = conn.execute("SELECT * FROM runops.batch_trigger(%s, %s, %s)", [env, Jsonb(items), Jsonb(options)]).fetchone()
    assert row is not None
    return tuple(row)


def test_batch_item_keys_resolve_to_a_holder_in_the_other_store_and_the_batch_still_completes(
        client: RunOps, make_env, store_conn, stores: Stores) -> None:
    env = make_env("ksuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    holder = trigger(ro, env.environment_id, idempotency_key="item-k")
    flip(client, env.organization_id, "cuid")
    items = [{"task": "t", "options": {"idempotency_key": "item-k"}},
             {"task": "t", "options": {"idempotency_key": "item-k"}},
             {"task": "t", "options": {"idempotency_key": "fresh"}}]
    batch_id, cached, run_ids = batch(cp, env.environment_id, items)
    assert run_ids[0] == run_ids[1] == holder[0]
    assert run_ids[2].startswith("run_c") and run_ids[2] != holder[0]
    # The fresh key is claimed too: a NEW trigger of it gets the LEGACY run.
    flip(client, env.organization_id, "ksuid")
    assert trigger(ro, env.environment_id, idempotency_key="fresh")[:2] == (run_ids[2], True)
    finalize(cp, run_ids[2], "COMPLETED_SUCCESSFULLY")
    assert cp.execute("SELECT status FROM runops.get_batch(%s)", [batch_id]).fetchone() == ("PROCESSING",)
    finalize(ro, holder[0], "COMPLETED_SUCCESSFULLY")  # finishing in the other store is seen by tick
    cp.execute("SELECT runops.tick()")
    row = cp.execute("SELECT status, run_ids FROM runops.get_batch(%s)", [batch_id]).fetchone()
    assert row == ("COMPLETED", run_ids)
    with psycopg.connect(stores.admin[CONTROL_PLANE]) as admin:
        output = admin.execute("SELECT output FROM runops.batches WHERE id = %s", [batch_id[6:]]).fetchone()
    assert output is not None
    assert [o["status"] for o in output[0]] == ["COMPLETED_SUCCESSFULLY"] * 3


def test_batch_keys_raced_against_single_triggers_in_the_other_store_yield_one_run_each(
        client: RunOps, make_env, stores: Stores) -> None:
    env = make_env("cuid")
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as conn:
        parent = trigger(conn, env.environment_id, "parent")[0]
    flip(client, env.organization_id, "ksuid")
    keys = [f"bk-{i}" for i in range(5)]
    conns = [psycopg.connect(stores.app[s], autocommit=True) for s in [CONTROL_PLANE, RUN_OPS] * 6]
    try:
        def call(i: int) -> Callable[[], list[str]]:
            conn = conns[i]
            if i % 2 == 0:  # a batch of a LEGACY parent on the control plane, global keys
                items = [{"task": "t", "options": {"idempotency_key": k, "idempotency_key_scope": "global"}}
                         for k in keys]

                return lambda: list(retrying(lambda: batch(conn, env.environment_id, items,
                                                          parent_run_id=parent))[2])
            return lambda: [trigger(conn, env.environment_id, idempotency_key=k, idempotency_key_scope="global")[0]
                            for k in keys]

        results = race([call(i) for i in range(len(conns))], timeout=None)
        assert not [r for r in results if isinstance(r, BaseException)], results
    finally:
        for c in conns:
            c.close()
    for j in range(len(keys)):
        assert len({r[j] for r in results}) == 1, [r[j] for r in results]
    assert len(key_holders(stores, env.environment_id)) == len(keys)


def test_until_the_ledger_is_complete_a_claim_adopts_a_holder_no_claim_names(client: RunOps, make_env,
                                                                            store_conn, stores: Stores) -> None:
    """A pair upgraded from r0001 holds keys no claim names until `runops migrate` backfills them
    (split_settings.claims_backfilled_at). Meanwhile a new claim checks the other store's runs
    and adopts a live holder there instead of making a second run."""
    env = make_env("cuid")
    cp, ro = store_conn(CONTROL_PLANE), store_conn(RUN_OPS)
    held = trigger(cp, env.environment_id, idempotency_key="pre")
    with psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as cp_admin, \
            psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as ro_admin:
        # As after an upgrade: the claim is not there, and the ledger is not marked complete.
        ro_admin.execute("DELETE FROM runops.idempotency_claims WHERE environment_id = %s", [env.environment_id])
        cp_admin.execute("UPDATE runops.split_settings SET claims_backfilled_at = NULL, updated_at = now()")
        try:
            flip(client, env.organization_id, "ksuid")
            again = trigger(ro, env.environment_id, idempotency_key="pre")
            assert again == (held[0], True, held[2], "LEGACY")
            claim = ro_admin.execute("SELECT run_id FROM runops.idempotency_claims WHERE environment_id = %s",
                                     [env.environment_id]).fetchall()
            assert claim == [(held[0][4:],)]  # adopted: the ledger now names the old holder
        finally:
            cp_admin.execute("SET ROLE runops_owner")
            assert cp_admin.execute("SELECT runops.complete_claims_backfill()").fetchone() is not None
            cp_admin.execute("RESET ROLE")
            assert client.wait_for_mirror()
    with psycopg.connect(stores.admin[CONTROL_PLANE]) as cp_admin:
        assert cp_admin.execute("SELECT claims_backfilled_at IS NOT NULL FROM runops.split_settings").fetchone() \
            == (True,)
