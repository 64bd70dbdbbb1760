"""Waitpoints: tokens, datetimes, RUN waitpoints, trigger-and-wait, and edges across the stores."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from runops.client import RunOps
from tests.conftest import sqlstate_of
from tests.lifecycle_helpers import T0, call, one, run_to_executing, set_clock, status, trigger


def test_a_parent_that_triggers_and_waits_resumes_with_the_childs_output(conn, env_id: str) -> None:
    parent = run_to_executing(conn, env_id, worker="pw")
    child = trigger(conn, env_id, "child", {"n": 2}, parent_run_id=parent["run_id"],
                    resume_parent_on_completion=True, queue="children")
    waiting = one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_TASK", "s3://p", {})
    assert waiting["status"] == "WAITING_TO_RESUME"
    call(conn, "dequeue_runs", env_id, "cw", 1, {"queues": ["children"]})
    one(conn, "start_attempt", child, "cw")
    one(conn, "complete_attempt", child, 1, {"square": 4})
    assert status(conn, parent["run_id"]) == "PENDING"  # resumed in the child's transaction
    call(conn, "dequeue_runs", env_id, "pw", 1, {"queues": [parent["queue"]]})
    assert one(conn, "start_attempt", parent["run_id"], "pw")["attempt_number"] == 1
    wp = one(conn, "get_waitpoint", "waitpoint_" + child.removeprefix("run_"))
    assert (wp["type"], wp["status"], wp["output"], wp["output_is_error"]) == ("RUN", "COMPLETED", {"square": 4}, False)
    assert one(conn, "complete_attempt", parent["run_id"], 1, wp["output"])["status"] == "COMPLETED_SUCCESSFULLY"


def test_a_cached_trigger_and_wait_on_a_finished_run_never_hangs(conn, env_id: str) -> None:
    first_parent = run_to_executing(conn, env_id)
    child = trigger(conn, env_id, "child", idempotency_key="once", idempotency_key_scope="global",
                    parent_run_id=first_parent["run_id"])
    one(conn, "finalize_run", child, "COMPLETED_SUCCESSFULLY", None, {"v": 1})
    parent = run_to_executing(conn, env_id)
    cached = one(conn, "trigger_run", env_id, "child", {}, {
        "idempotency_key": "once", "idempotency_key_scope": "global", "parent_run_id": parent["run_id"],
        "resume_parent_on_completion": True})
    assert (cached["run_id"], cached["is_cached"]) == (child, True)
    assert one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_TASK", "l", {})["status"] == "PENDING"


def test_a_cached_trigger_and_wait_on_a_live_run_waits_for_it(conn, env_id: str) -> None:
    parent = run_to_executing(conn, env_id)
    child = trigger(conn, env_id, "child", idempotency_key="shared", idempotency_key_scope="global")
    again = one(conn, "trigger_run", env_id, "child", {}, {
        "idempotency_key": "shared", "idempotency_key_scope": "global", "parent_run_id": parent["run_id"],
        "resume_parent_on_completion": True})
    assert again["run_id"] == child and again["is_cached"]
    one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_TASK", "l", {})
    assert status(conn, parent["run_id"]) == "WAITING_TO_RESUME"
    one(conn, "cancel_run", child)
    assert status(conn, parent["run_id"]) == "PENDING"  # a canceled child also ends the wait


def test_trigger_and_wait_needs_a_live_parent(conn, env_id: str) -> None:
    parent = trigger(conn, env_id)
    one(conn, "finalize_run", parent, "COMPLETED_SUCCESSFULLY")
    with pytest.raises(psycopg.Error) as err:
        trigger(conn, env_id, parent_run_id=parent, resume_parent_on_completion=True)
    assert sqlstate_of(err.value) == "RO003"


def test_manual_tokens_block_and_complete_once(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    token = one(conn, "create_waitpoint", env_id, "MANUAL", {"timeout": "1h", "tags": ["approval"]})
    one(conn, "block_run", run["run_id"], [token["waitpoint_id"]], "{}")
    one(conn, "create_checkpoint", run["run_id"], 1, "WAIT_FOR_TASK", "l", {})
    assert status(conn, run["run_id"]) == "WAITING_TO_RESUME"
    done = one(conn, "complete_waitpoint", token["waitpoint_id"], {"approved": True}, False)
    assert done == {"completed_now": True, "unblocked_run_ids": [run["run_id"]], "remote_run_ids": []}
    assert status(conn, run["run_id"]) == "PENDING"
    again = one(conn, "complete_waitpoint", token["waitpoint_id"], {"approved": False}, False)
    assert again == {"completed_now": False, "unblocked_run_ids": [], "remote_run_ids": []}
    wp = one(conn, "get_waitpoint", token["waitpoint_id"])
    assert (wp["status"], wp["output"]) == ("COMPLETED", {"approved": True})


def test_blocking_on_an_already_completed_waitpoint_never_hangs(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    token = one(conn, "create_waitpoint", env_id, "MANUAL", {})
    one(conn, "complete_waitpoint", token["waitpoint_id"], None, False)
    one(conn, "create_checkpoint", run["run_id"], 1, "MANUAL", "l", {})
    one(conn, "block_run", run["run_id"], [token["waitpoint_id"]], "{}")
    assert one(conn, "resume_run", run["run_id"])["status"] == "PENDING"


def test_a_datetime_waitpoint_resumes_its_run_when_tick_sees_it_due(conn, env_id: str) -> None:
    set_clock(conn, T0)
    run = run_to_executing(conn, env_id)
    wp = one(conn, "create_waitpoint", env_id, "DATETIME", {"completed_after": "10m"})
    one(conn, "block_run", run["run_id"], [wp["waitpoint_id"]], "{}")
    one(conn, "create_checkpoint", run["run_id"], 1, "WAIT_FOR_DURATION", "l", {})
    set_clock(conn, T0 + dt.timedelta(minutes=9))
    conn.execute("SELECT runops.tick()")
    assert status(conn, run["run_id"]) == "WAITING_TO_RESUME"
    set_clock(conn, T0 + dt.timedelta(minutes=10))
    assert one(conn, "get_waitpoint", wp["waitpoint_id"])["status"] == "COMPLETED"  # due reads as done
    conn.execute("SELECT runops.tick()")
    assert status(conn, run["run_id"]) == "PENDING"


def test_a_manual_token_times_out_with_an_error(conn, env_id: str) -> None:
    set_clock(conn, T0)
    run = run_to_executing(conn, env_id)
    token = one(conn, "create_waitpoint", env_id, "MANUAL", {"timeout": "1h"})
    one(conn, "block_run", run["run_id"], [token["waitpoint_id"]], "{}")
    one(conn, "create_checkpoint", run["run_id"], 1, "WAIT_FOR_TASK", "l", {})
    set_clock(conn, T0 + dt.timedelta(hours=1))
    conn.execute("SELECT runops.tick()")
    wp = one(conn, "get_waitpoint", token["waitpoint_id"])
    assert (wp["status"], wp["output_is_error"]) == ("COMPLETED", True)
    assert status(conn, run["run_id"]) == "PENDING"


def test_waitpoint_idempotency_keys_rotate_when_expired(conn, env_id: str) -> None:
    set_clock(conn, T0)
    first = one(conn, "create_waitpoint", env_id, "MANUAL", {"idempotency_key": "k", "idempotency_key_ttl": "1h"})
    assert one(conn, "create_waitpoint", env_id, "MANUAL", {"idempotency_key": "k"}) == \
        {"waitpoint_id": first["waitpoint_id"], "is_cached": True}
    set_clock(conn, T0 + dt.timedelta(hours=1))
    rotated = one(conn, "create_waitpoint", env_id, "MANUAL", {"idempotency_key": "k"})
    assert rotated["is_cached"] is False and rotated["waitpoint_id"] != first["waitpoint_id"]


def test_waitpoint_errors(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    other = trigger(conn, env_id)
    cases = [
        (("create_waitpoint", env_id, "RUN", {}), "RO006"),
        (("create_waitpoint", env_id, "DATETIME", {}), "RO006"),
        (("create_waitpoint", env_id, "MANUAL", {"completed_after": "1m"}), "RO006"),
        (("create_waitpoint", "no-such-env", "MANUAL", {}), "RO004"),
        (("complete_waitpoint", "waitpoint_" + other.removeprefix("run_"), None, False), "RO003"),
        (("complete_waitpoint", "garbage", None, False), "RO001"),
        (("complete_waitpoint", "run_" + other.removeprefix("run_"), None, False), "RO006"),
        (("block_run", run["run_id"], ["waitpoint_" + "c" + "0" * 24], "{}"), "RO004"),
        (("block_run", run["run_id"], [], "{}"), "RO006"),
        (("block_run", run["run_id"], ["waitpoint_" + run["run_id"].removeprefix("run_")], "{}"), "RO006"),
    ]
    for args, code in cases:
        with pytest.raises(psycopg.Error) as err:
            call(conn, *args)
        assert sqlstate_of(err.value) == code, args
    one(conn, "finalize_run", other, "CANCELED")
    token = one(conn, "create_waitpoint", env_id, "MANUAL", {})
    with pytest.raises(psycopg.Error) as err:
        call(conn, "block_run", other, [token["waitpoint_id"]], "{}")
    assert sqlstate_of(err.value) == "RO003"
    assert call(conn, "get_waitpoint", token["waitpoint_id"], "another-env") == []


def test_a_legacy_run_waits_on_a_new_token_across_the_stores(client: RunOps, cp, make_env) -> None:
    # One environment whose organization flips: tokens follow the mint kind, runs their anchors.
    env = make_env("cuid")
    legacy = run_to_executing(cp, env.environment_id)
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    token = client.create_waitpoint(env.environment_id, "MANUAL")
    assert client.classify_residency(token.waitpoint_id) == "NEW"
    client.block_run(legacy["run_id"], [token.waitpoint_id])
    client.create_checkpoint(legacy["run_id"], 1, "WAIT_FOR_TASK", "l")
    assert client.get_run(legacy["run_id"]).status == "WAITING_TO_RESUME"  # type: ignore[union-attr]
    done = client.complete_waitpoint(token.waitpoint_id, {"ok": 1})
    assert done.remote_run_ids == [legacy["run_id"]] and done.unblocked_run_ids == []
    # The client sent resume_run to the control plane as its follow-up.
    assert client.get_run(legacy["run_id"]).status == "PENDING"  # type: ignore[union-attr]


def test_tick_reconciles_a_lost_cross_store_follow_up(client: RunOps, cp, ro, make_env) -> None:
    env = make_env("cuid")
    legacy = run_to_executing(cp, env.environment_id)
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    token = client.create_waitpoint(env.environment_id, "MANUAL")
    client.block_run(legacy["run_id"], [token.waitpoint_id])
    client.create_checkpoint(legacy["run_id"], 1, "WAIT_FOR_TASK", "l")
    # Complete it in plain SQL on run-ops and "crash" before the follow-up resume_run.
    remote = one(ro, "complete_waitpoint", token.waitpoint_id, None, False)["remote_run_ids"]
    assert remote == [legacy["run_id"]]
    assert status(cp, legacy["run_id"]) == "WAITING_TO_RESUME"
    cp.execute("SELECT runops.tick()")
    assert status(cp, legacy["run_id"]) == "PENDING"


def test_a_checkpoint_after_a_remote_blocker_completed_resumes_at_once(client: RunOps, cp, make_env) -> None:
    env = make_env("cuid")
    legacy = run_to_executing(cp, env.environment_id)
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    token = client.create_waitpoint(env.environment_id, "MANUAL")
    client.block_run(legacy["run_id"], [token.waitpoint_id])
    client.complete_waitpoint(token.waitpoint_id)  # the follow-up finds the run not yet suspended
    assert client.create_checkpoint(legacy["run_id"], 1, "WAIT_FOR_TASK", "l").status == "PENDING"
