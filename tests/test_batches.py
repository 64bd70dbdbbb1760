"""Batches: one-call and streaming, with the single-trigger idempotency rules, residency
inheritance, completion, seal timeouts, and concurrent streams."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RunOps
from tests.concurrent_calls import race
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import T0, call, one, run_to_executing, set_clock, status, trigger


def batch(conn: psycopg.Connection, env: str, items: list[Any], **options: Any) -> dict[str, Any]:
    return one(conn, "batch_trigger", env, items, options)


def finish(conn: psycopg.Connection, run_ids: list[str], final: str = "COMPLETED_SUCCESSFULLY") -> None:
    for run_id in dict.fromkeys(run_ids):
        one(conn, "finalize_run", run_id, final, None, {"from": run_id})


def test_batch_trigger_creates_every_run_in_item_order(conn, env_id: str) -> None:
    made = batch(conn, env_id, [{"task": f"t{i}", "payload": {"i": i}} for i in range(5)])
    assert made["is_cached"] is False and len(made["run_ids"]) == 5
    runs = [one(conn, "get_run", r) for r in made["run_ids"]]
    assert [(r["task_identifier"], r["payload"], r["batch_id"]) for r in runs] == \
        [(f"t{i}", {"i": i}, made["batch_id"]) for i in range(5)]
    got = one(conn, "get_batch", made["batch_id"])
    assert (got["status"], got["expected_count"], got["item_count"], got["is_sealed"]) == ("PROCESSING", 5, 5, True)
    assert got["run_ids"] == made["run_ids"]


def test_a_single_item_batch_works_and_an_empty_one_is_refused(conn, env_id: str) -> None:
    assert len(batch(conn, env_id, [{"task": "only"}])["run_ids"]) == 1
    with pytest.raises(psycopg.Error) as err:
        batch(conn, env_id, [])
    assert sqlstate_of(err.value) == "RO006"


@pytest.mark.parametrize(("bad", "index"), [
    ({"task": "ok", "options": {"ttl": "5x"}}, 2), ({"payload": {}}, 2), ("not an object", 2),
    ({"task": "ok", "colour": "red"}, 2), ({"task": "ok", "options": {"parent_run_id": "run_x"}}, 2),
    ({"task": "ok", "options": {"tags": [str(i) for i in range(11)]}}, 2),
])
def test_a_bad_item_is_ro006_naming_its_index_and_nothing_is_created(conn, stores: Stores, store: str, env_id: str,
                                                                     bad: Any, index: int) -> None:
    items = [{"task": "a"}, {"task": "b", "options": {"idempotency_key": "x"}}, bad, {"task": "d"}]
    with pytest.raises(psycopg.Error) as err:
        batch(conn, env_id, items)
    assert sqlstate_of(err.value) == "RO006"
    assert f"item {index}" in err.value.diag.message_primary
    with psycopg.connect(stores.admin[store]) as admin:
        for table in ("runs", "batches"):
            count = admin.execute(f"SELECT count(*) FROM runops.{table} WHERE environment_id = %s", [env_id]).fetchone()
            assert count == (0,), table


def test_a_batch_key_retrigger_returns_the_same_batch(conn, env_id: str) -> None:
    first = batch(conn, env_id, [{"task": "a"}, {"task": "b"}], idempotency_key="nightly")
    again = batch(conn, env_id, [{"task": "other"}], idempotency_key="nightly")
    assert (again["batch_id"], again["is_cached"], again["run_ids"]) == (first["batch_id"], True, first["run_ids"])


def test_items_without_a_key_use_the_batch_key_and_their_index(conn, env_id: str) -> None:
    first = batch(conn, env_id, [{"task": "a"}, {"task": "a"}], idempotency_key="bk", idempotency_key_ttl="1h")
    single = trigger(conn, env_id, "a", idempotency_key="bk-1")
    assert single == first["run_ids"][1]
    assert one(conn, "get_run", single)["idempotency_key"] == "bk-1"


def test_duplicate_keys_in_one_batch_resolve_to_one_run_and_still_complete(conn, env_id: str) -> None:
    parent = run_to_executing(conn, env_id)
    made = batch(conn, env_id, [{"task": "a", "options": {"idempotency_key": "same"}},
                                {"task": "a", "options": {"idempotency_key": "same"}},
                                {"task": "a", "options": {"idempotency_key": "other"}}],
                 parent_run_id=parent["run_id"], resume_parent_on_completion=True)
    assert made["run_ids"][0] == made["run_ids"][1] != made["run_ids"][2]
    one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_BATCH", "l", {})
    finish(conn, made["run_ids"])
    got = one(conn, "get_batch", made["batch_id"])
    assert got["status"] == "COMPLETED"
    assert status(conn, parent["run_id"]) == "PENDING"  # the parent did not hang (the original did)
    wp = one(conn, "get_waitpoint", made["batch_id"].replace("batch_", "waitpoint_"))
    assert wp["type"] == "BATCH" and wp["status"] == "COMPLETED" and wp["output_is_error"] is False
    assert [o["index"] for o in wp["output"]] == [0, 1, 2]
    assert [o["run_id"] for o in wp["output"]] == made["run_ids"]
    assert {o["status"] for o in wp["output"]} == {"COMPLETED_SUCCESSFULLY"}


def test_item_keys_follow_the_single_trigger_rules(conn, env_id: str) -> None:
    failed = trigger(conn, env_id, "a", idempotency_key="k-failed")
    one(conn, "finalize_run", failed, "CRASHED")
    live = trigger(conn, env_id, "a", idempotency_key="k-live")
    done = trigger(conn, env_id, "a", idempotency_key="k-done")
    one(conn, "finalize_run", done, "COMPLETED_SUCCESSFULLY")
    made = batch(conn, env_id, [{"task": "a", "options": {"idempotency_key": k}}
                                for k in ("k-failed", "k-live", "k-done", "k-new")] + [{"task": "a"}])
    new_for_failed, cached_live, cached_done, fresh, unkeyed = made["run_ids"]
    assert new_for_failed != failed  # a failed run's key is dead: a new run (the original returned it)
    assert (cached_live, cached_done) == (live, done)
    assert len({new_for_failed, fresh, unkeyed, live, done}) == 5


def test_all_cached_items_complete_the_batch_at_once_and_a_waiting_parent_resumes(conn, env_id: str) -> None:
    a, b = trigger(conn, env_id, "a", idempotency_key="ka"), trigger(conn, env_id, "a", idempotency_key="kb")
    finish(conn, [a, b])
    parent = run_to_executing(conn, env_id)
    # With a parent an item key is scoped to it unless the item says global.
    made = batch(conn, env_id, [{"task": "a", "options": {"idempotency_key": "ka", "idempotency_key_scope": "global"}},
                                {"task": "a", "options": {"idempotency_key": "kb", "idempotency_key_scope": "global"}}],
                 parent_run_id=parent["run_id"], resume_parent_on_completion=True)
    assert made["run_ids"] == [a, b]
    assert one(conn, "get_batch", made["batch_id"])["status"] == "COMPLETED"
    assert one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_BATCH", "l", {})["status"] == "PENDING"


def test_a_failed_item_counts_and_the_batch_completes_with_its_status(conn, env_id: str) -> None:
    made = batch(conn, env_id, [{"task": "a"}, {"task": "b"}])
    one(conn, "finalize_run", made["run_ids"][0], "SYSTEM_FAILURE")
    assert one(conn, "get_batch", made["batch_id"])["status"] == "PROCESSING"
    one(conn, "cancel_run", made["run_ids"][1])
    wp = one(conn, "get_waitpoint", made["batch_id"].replace("batch_", "waitpoint_"))
    assert [o["status"] for o in wp["output"]] == ["SYSTEM_FAILURE", "CANCELED"]


def test_streaming_append_resend_and_seal(conn, env_id: str) -> None:
    created = one(conn, "create_batch", env_id, 4, {})
    b = created["batch_id"]
    first = one(conn, "append_batch_items", b, 0, [{"task": "a"}, {"task": "b"}])
    again = one(conn, "append_batch_items", b, 0, [{"task": "changed"}, {"task": "changed"}])
    assert again["run_ids"] == first["run_ids"]  # a re-sent index keeps its first content
    with pytest.raises(psycopg.Error) as err:
        one(conn, "seal_batch", b)
    assert sqlstate_of(err.value) == "RO006"  # short of expected_count
    with pytest.raises(psycopg.Error) as err:
        one(conn, "append_batch_items", b, 3, [{"task": "c"}, {"task": "d"}])
    assert sqlstate_of(err.value) == "RO006"  # past expected_count
    one(conn, "append_batch_items", b, 2, [{"task": "c"}, {"task": "d"}])
    sealed = one(conn, "seal_batch", b)
    assert (sealed["status"], sealed["item_count"], sealed["expected_count"]) == ("PROCESSING", 4, 4)
    assert one(conn, "seal_batch", b)["status"] == "PROCESSING"  # sealing twice is fine
    assert one(conn, "append_batch_items", b, 2, [{"task": "c"}])["run_ids"] == \
        one(conn, "get_batch", b)["run_ids"][2:3]  # a re-sent chunk after sealing is still a no-op
    with pytest.raises(psycopg.Error) as err:
        one(conn, "append_batch_items", b, 3, [{"task": "x"}, {"task": "y"}])
    assert sqlstate_of(err.value) == "RO006"


def test_a_single_trigger_or_failed_task_can_fill_a_streamed_index(conn, env_id: str) -> None:
    b = one(conn, "create_batch", env_id, 2, {})["batch_id"]
    run_id = trigger(conn, env_id, "a", batch_id=b, batch_index=0)
    failed = one(conn, "trigger_failed_task", env_id, "b", {}, {"message": "bad input"},
                 {"batch_id": b, "batch_index": 1})
    assert trigger(conn, env_id, "a", batch_id=b, batch_index=0) == run_id  # re-sent index: same run
    one(conn, "seal_batch", b)
    finish(conn, [run_id])
    got = one(conn, "get_batch", b)
    assert got["status"] == "COMPLETED" and got["run_ids"] == [run_id, failed["run_id"]]


def test_an_unsealed_batch_past_its_seal_timeout_is_aborted_and_its_parent_resumes(conn, env_id: str) -> None:
    set_clock(conn, T0)
    parent = run_to_executing(conn, env_id)
    b = one(conn, "create_batch", env_id, 3,
            {"seal_timeout": "10m", "parent_run_id": parent["run_id"], "resume_parent_on_completion": True})["batch_id"]
    one(conn, "append_batch_items", b, 0, [{"task": "a"}])
    one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_BATCH", "l", {})
    set_clock(conn, T0 + dt.timedelta(minutes=10))
    conn.execute("SELECT runops.tick()")
    assert one(conn, "get_batch", b)["status"] == "ABORTED"
    wp = one(conn, "get_waitpoint", b.replace("batch_", "waitpoint_"))
    assert wp["output_is_error"] is True and "seal timeout" in wp["output"]["message"]
    assert status(conn, parent["run_id"]) == "PENDING"
    with pytest.raises(psycopg.Error) as err:
        one(conn, "seal_batch", b)
    assert sqlstate_of(err.value) == "RO003"


def test_resume_batch_run_recounts_and_is_idempotent(conn, env_id: str) -> None:
    made = batch(conn, env_id, [{"task": "a"}])
    finish(conn, made["run_ids"])
    assert one(conn, "resume_batch_run", made["batch_id"])["status"] == "COMPLETED"
    assert one(conn, "resume_batch_run", made["batch_id"])["status"] == "COMPLETED"


def test_batch_errors(conn, ro, env_id: str, store: str) -> None:
    for args, code in [
        (("create_batch", env_id, 0, {}), "RO006"),
        (("create_batch", env_id, 2, {"seal_timeout": "soon"}), "RO006"),
        (("create_batch", "no-such-env", 2, {}), "RO004"),
        (("seal_batch", "batch_garbage"), "RO001"),
        (("seal_batch", "run_" + "c" + "0" * 24), "RO006"),
        (("seal_batch", "batch_" + "c" + "0" * 24), "RO004" if store == CONTROL_PLANE else "RO002"),
    ]:
        with pytest.raises(psycopg.Error) as err:
            call(conn, *args)
        assert sqlstate_of(err.value) == code, args
    assert call(conn, "get_batch", "batch_garbage") == []


def test_batches_inherit_residency(client: RunOps, make_env) -> None:
    env = make_env("cuid")
    legacy_parent = client.trigger_run(env.environment_id, "p")
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    new_parent = client.trigger_run(env.environment_id, "p")
    under_legacy = client.batch_trigger(env.environment_id, [{"task": "a"}], parent_run_id=legacy_parent.run_id)
    under_new = client.batch_trigger(env.environment_id, [{"task": "a"}], parent_run_id=new_parent.run_id)
    root = client.batch_trigger(env.environment_id, [{"task": "a"}])
    assert [client.classify_residency(b.batch_id) for b in (under_legacy, under_new, root)] == ["LEGACY", "NEW", "NEW"]
    assert client.classify_residency(under_legacy.run_ids[0]) == "LEGACY"
    assert client.classify_residency(under_new.run_ids[0]) == "NEW"


def test_items_keep_the_batch_residency_when_the_kind_flips_mid_stream(client: RunOps, make_env) -> None:
    env = make_env("ksuid")
    created = client.create_batch(env.environment_id, 4)
    client.append_batch_items(created.batch_id, 0, [{"task": "a"}, {"task": "b"}])
    client.set_mint_kind(env.organization_id, "cuid")
    assert client.wait_for_mirror()
    client.append_batch_items(created.batch_id, 2, [{"task": "c"}, {"task": "d"}])
    got = client.get_batch(created.batch_id)
    assert got is not None and {client.classify_residency(r) for r in got.run_ids} == {"NEW"}
    assert client.trigger_run(env.environment_id, "root").residency == "LEGACY"


def test_two_clients_streaming_one_batch_create_each_index_once(stores: Stores, store: str, env_id: str,
                                                                conn) -> None:
    b = one(conn, "create_batch", env_id, 40, {})["batch_id"]
    chunks = [[{"task": f"t{i}"} for i in range(start, start + 10)] for start in range(0, 40, 10)]
    conns = [psycopg.connect(stores.app[store], autocommit=True) for _ in range(2)]

    def stream(c: psycopg.Connection) -> None:
        for n, chunk in enumerate(chunks):
            c.execute("SELECT * FROM runops.append_batch_items(%s, %s, %s)", [b, n * 10, Jsonb(chunk)])

    results = race([lambda c=c: stream(c) for c in conns])
    for c in conns:
        c.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    got = one(conn, "get_batch", b)
    assert got["item_count"] == 40 and len(set(got["run_ids"])) == 40
    with psycopg.connect(stores.admin[store]) as admin:
        assert admin.execute("SELECT count(*) FROM runops.runs WHERE batch_id = %s",
                             [b.removeprefix("batch_")]).fetchone() == (40,)


def test_read_through_of_a_batch_from_the_other_store(client: RunOps, cp, new_env) -> None:
    made = client.batch_trigger(new_env.environment_id, [{"task": "a"}, {"task": "b"}])
    through = one(cp, "get_batch", made.batch_id)
    assert through["run_ids"] == made.run_ids and through["status"] == "PROCESSING"


def test_concurrent_batches_sharing_item_keys_create_one_run_per_key(stores: Stores, store: str, env_id: str,
                                                                      conn) -> None:
    keys = [f"shared-{i}" for i in range(30)]
    conns = [psycopg.connect(stores.app[store], autocommit=True) for _ in range(8)]
    items = [{"task": "t", "options": {"idempotency_key": k}} for k in keys] + [{"task": "mine"}]
    results = race([lambda c=c: c.execute("SELECT * FROM runops.batch_trigger(%s, %s)",
                                          [env_id, Jsonb(items)]).fetchone()
                    for c in conns])
    for c in conns:
        c.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    per_key = {tuple(r[2][:30]) for r in results}
    assert len(per_key) == 1  # every batch resolved every key to the same run
    assert len(set(next(iter(per_key)))) == 30
    assert len({r[2][30] for r in results}) == 8  # unkeyed items stay distinct


def test_an_items_own_key_lives_thirty_days_and_a_derived_key_as_long_as_the_batch_key(conn, env_id: str) -> None:
    set_clock(conn, T0)
    made = batch(conn, env_id, [{"task": "a", "options": {"idempotency_key": "own"}}, {"task": "a"}],
                 idempotency_key="bk", idempotency_key_ttl="1h")
    own, derived = (one(conn, "get_run", r)["idempotency_key_expires_at"] for r in made["run_ids"])
    assert own - T0 == dt.timedelta(days=30) and derived - T0 == dt.timedelta(hours=1)


def test_a_batch_waitpoint_cannot_be_completed_by_hand(conn, env_id: str) -> None:
    made = batch(conn, env_id, [{"task": "a"}])
    with pytest.raises(psycopg.Error) as err:
        one(conn, "complete_waitpoint", made["batch_id"].replace("batch_", "waitpoint_"), None, False)
    assert sqlstate_of(err.value) == "RO003"


def test_append_with_an_enormous_start_index_is_ro006(conn, env_id: str) -> None:
    b = one(conn, "create_batch", env_id, 2, {})["batch_id"]
    with pytest.raises(psycopg.Error) as err:
        one(conn, "append_batch_items", b, 2147483647, [{"task": "a"}])
    assert sqlstate_of(err.value) == "RO006"


def test_the_client_strips_nul_bytes_from_item_keys(client: RunOps, new_env) -> None:
    made = client.batch_trigger(new_env.environment_id, [{"task": "a", "options": {"idempotency_key": "n\x00ul"}}])
    single = client.trigger_run(new_env.environment_id, "a", idempotency_key="nul")
    assert single.run_id == made.run_ids[0] and single.is_cached
