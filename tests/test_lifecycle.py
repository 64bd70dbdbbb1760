"""The state machine: every transition generated from the table, the worker's path, retries,
checkpoints, cancel — in both stores, through SQL and the client."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from runops.client import RunOps
from runops.errors import IllegalTransition
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import T0, call, one, run_to_executing, set_clock, status, trigger

ALL_STATUSES = ["DELAYED", "PENDING", "PENDING_VERSION", "WAITING_FOR_DEPLOY", "DEQUEUED", "EXECUTING",
                "WAITING_TO_RESUME", "RETRYING_AFTER_FAILURE", "PAUSED", "CANCELED", "INTERRUPTED",
                "COMPLETED_SUCCESSFULLY", "COMPLETED_WITH_ERRORS", "SYSTEM_FAILURE", "CRASHED", "EXPIRED",
                "TIMED_OUT"]
FINAL = set(ALL_STATUSES[9:])


@pytest.fixture
def admin(store: str, stores: Stores):
    with psycopg.connect(stores.admin[store], autocommit=True) as c:
        yield c


def test_every_pair_of_statuses_follows_the_transition_table(conn, admin, env_id: str) -> None:
    """Generated from runops.status_transitions: allowed moves succeed, every other pair raises
    RO003 and leaves the row as it was."""
    allowed = {(f, t) for f, t in admin.execute(
        "SELECT DISTINCT from_status, to_status FROM runops.status_transitions").fetchall()}
    for required in [("PENDING", "DEQUEUED"), ("DEQUEUED", "EXECUTING"), ("EXECUTING", "WAITING_TO_RESUME"),
                     ("WAITING_TO_RESUME", "PENDING"), ("PENDING", "EXPIRED"), ("DELAYED", "PENDING")]:
        assert required in allowed
    assert not {(f, t) for f, t in allowed if f in FINAL}, "a final status never changes"
    run_id = trigger(conn, env_id).removeprefix("run_")
    checked = 0
    for before in ALL_STATUSES:
        for after in ALL_STATUSES:
            if before == after:
                continue
            with admin.transaction(force_rollback=True):
                admin.execute("SET LOCAL session_replication_role = replica")  # place the run, no triggers
                admin.execute("UPDATE runops.runs SET status = %s WHERE id = %s", [before, run_id])
                admin.execute("SET LOCAL session_replication_role = origin")
                if (before, after) in allowed:
                    admin.execute("UPDATE runops.runs SET status = %s WHERE id = %s", [after, run_id])
                else:
                    with pytest.raises(psycopg.Error) as err, admin.transaction():
                        admin.execute("UPDATE runops.runs SET status = %s WHERE id = %s", [after, run_id])
                    assert sqlstate_of(err.value) == "RO003", (before, after)
                    now = admin.execute("SELECT status FROM runops.runs WHERE id = %s", [run_id]).fetchone()
                    assert now == (before,)
                checked += 1
    assert checked == len(ALL_STATUSES) * (len(ALL_STATUSES) - 1)


def test_a_function_may_make_only_its_own_moves(conn, admin, env_id: str) -> None:
    run_id = trigger(conn, env_id).removeprefix("run_")
    with admin.transaction(force_rollback=True):
        admin.execute("SELECT set_config('runops.transition_by', 'dequeue_runs', true)")
        with pytest.raises(psycopg.Error) as err, admin.transaction():  # finalize_run's move
            admin.execute("UPDATE runops.runs SET status = 'COMPLETED_SUCCESSFULLY' WHERE id = %s", [run_id])
        assert sqlstate_of(err.value) == "RO003"


def test_a_run_goes_from_trigger_to_completion_through_sql(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id, max_attempts=2)
    assert (run["status"], run["attempt_number"], run["locked_by"]) == ("EXECUTING", 1, "w1")
    done = one(conn, "complete_attempt", run["run_id"], 1, {"answer": 42})
    assert (done["status"], done["output"]) == ("COMPLETED_SUCCESSFULLY", {"answer": 42})
    assert done["completed_at"] is not None and done["locked_by"] is None
    again = one(conn, "complete_attempt", run["run_id"], 1, {"answer": 42})
    assert again == done  # the repeated completion returns the row unchanged


def test_a_run_goes_through_fail_retry_and_completion_with_the_client(client: RunOps, store: str, env_id: str,
                                                                      conn) -> None:
    queue = f"retry-{store}"
    run = client.trigger_run(env_id, "flaky", {}, max_attempts=3, queue=queue)
    taken = client.dequeue_runs(env_id, "worker-a", 1, queues=[queue])
    assert [r.run_id for r in taken] == [run.run_id] and taken[0].status == "DEQUEUED"
    first = client.start_attempt(run.run_id, "worker-a")
    retry_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    failed = client.fail_attempt(run.run_id, first.attempt_number, {"message": "boom"}, retry_at=retry_at)
    assert failed.status == "RETRYING_AFTER_FAILURE" and failed.retry_at == retry_at
    client.tick()
    assert client.get_run(run.run_id).status == "PENDING"  # type: ignore[union-attr]
    assert [r.run_id for r in client.dequeue_runs(env_id, "worker-b", 1, queues=[queue])] == [run.run_id]
    second = client.start_attempt(run.run_id, "worker-b")
    assert second.attempt_number == 2
    done = client.complete_attempt(run.run_id, 2, {"ok": True})
    assert (done.status, done.output, done.attempt_number) == ("COMPLETED_SUCCESSFULLY", {"ok": True}, 2)


def test_retries_stop_at_max_attempts(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id, max_attempts=2)
    past = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    assert one(conn, "fail_attempt", run["run_id"], 1, {"m": 1}, past)["status"] == "RETRYING_AFTER_FAILURE"
    conn.execute("SELECT runops.tick()")
    call(conn, "dequeue_runs", env_id, "w1", 1, {"queues": [run["queue"]]})
    assert one(conn, "start_attempt", run["run_id"], "w1")["attempt_number"] == 2
    final = one(conn, "fail_attempt", run["run_id"], 2, {"m": 2}, past)
    assert final["status"] == "COMPLETED_WITH_ERRORS"  # no attempts left, so retry_at is ignored
    assert one(conn, "fail_attempt", run["run_id"], 2, {"m": 2}, past) == final  # repeated report


@pytest.mark.parametrize("named", ["CRASHED", "SYSTEM_FAILURE", "TIMED_OUT", "COMPLETED_WITH_ERRORS", "bogus"])
def test_a_final_failure_takes_the_status_the_error_names(conn, env_id: str, named: str) -> None:
    run = run_to_executing(conn, env_id)
    failed = one(conn, "fail_attempt", run["run_id"], 1, {"status": named, "message": "x"}, None)
    assert failed["status"] == (named if named != "bogus" else "COMPLETED_WITH_ERRORS")


def test_workers_must_hold_the_lease_and_report_the_current_attempt(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id, worker="w1")
    for function, args in [("start_attempt", ("w1",)), ("heartbeat_run", ("w2",)),
                           ("complete_attempt", (2, {})), ("fail_attempt", (3, {}, None)),
                           ("create_checkpoint", (2, "MANUAL", "s3://x", {}))]:
        with pytest.raises(psycopg.Error) as err:
            call(conn, function, run["run_id"], *args)
        assert sqlstate_of(err.value) == "RO003", function
    beat = one(conn, "heartbeat_run", run["run_id"], "w1")
    assert beat["lease_expires_at"] >= run["lease_expires_at"]


def test_bad_worker_input_is_ro006(conn, env_id: str) -> None:
    run_id = trigger(conn, env_id)
    for function, args in [("dequeue_runs", (env_id, "", 1, {})), ("dequeue_runs", (env_id, "w", 0, {})),
                           ("dequeue_runs", (env_id, "w", 1, {"lease": "forever"})),
                           ("dequeue_runs", (env_id, "w", 1, {"queues": "q"})),
                           ("complete_attempt", (run_id, 0, {})),
                           ("create_checkpoint", (run_id, 1, "NAP", "loc", {})),
                           ("create_checkpoint", (run_id, 1, "MANUAL", "", {}))]:
        with pytest.raises(psycopg.Error) as err:
            call(conn, function, *args)
        assert sqlstate_of(err.value) == "RO006", (function, args)


def test_start_attempt_past_max_attempts_crashes_the_run(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id, max_attempts=1, worker="w9")
    set_clock(conn, T0 + dt.timedelta(days=400))  # every lease has lapsed by then
    conn.execute("SELECT runops.tick()")
    set_clock(conn, None)
    assert status(conn, run["run_id"]) == "PENDING"
    call(conn, "dequeue_runs", env_id, "w9", 1, {"queues": [run["queue"]]})
    crashed = one(conn, "start_attempt", run["run_id"], "w9")
    assert crashed["status"] == "CRASHED" and "attempts" in crashed["error"]["message"]


def test_a_manual_checkpoint_waits_for_resume_run(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    paused = one(conn, "create_checkpoint", run["run_id"], 1, "MANUAL", "s3://cp/1", {"k": 1})
    assert (paused["status"], paused["suspended_reason"]) == ("WAITING_TO_RESUME", "MANUAL")
    conn.execute("SELECT runops.tick()")
    assert status(conn, run["run_id"]) == "WAITING_TO_RESUME"
    assert one(conn, "resume_run", run["run_id"])["status"] == "PENDING"
    assert one(conn, "resume_run", run["run_id"])["status"] == "PENDING"  # idempotent
    call(conn, "dequeue_runs", env_id, "w1", 1, {"queues": [run["queue"]]})
    resumed = one(conn, "start_attempt", run["run_id"], "w1")
    assert (resumed["status"], resumed["attempt_number"]) == ("EXECUTING", 1)  # the paused attempt goes on


def test_a_wait_checkpoint_with_nothing_pending_resumes_at_once(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    assert one(conn, "create_checkpoint", run["run_id"], 1, "WAIT_FOR_DURATION", "loc", {})["status"] == "PENDING"


def test_finalize_run_writes_status_error_and_output_at_once(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    done = one(conn, "finalize_run", run["run_id"], "INTERRUPTED", {"message": "shutdown"}, {"partial": 1})
    assert (done["status"], done["error"], done["output"]) == ("INTERRUPTED", {"message": "shutdown"}, {"partial": 1})
    with pytest.raises(psycopg.Error) as err:
        one(conn, "complete_attempt", run["run_id"], 1, {})
    assert sqlstate_of(err.value) == "RO003"


def test_cancel_cascades_three_levels_and_spares_final_children(conn, env_id: str) -> None:
    root = trigger(conn, env_id, "root")
    child = trigger(conn, env_id, "child", parent_run_id=root)
    done_child = trigger(conn, env_id, "child", parent_run_id=root)
    one(conn, "finalize_run", done_child, "COMPLETED_SUCCESSFULLY")
    grandchild = trigger(conn, env_id, "grandchild", parent_run_id=child)
    great = trigger(conn, env_id, "great", parent_run_id=grandchild)
    canceled = one(conn, "cancel_run", root, "user asked")
    assert canceled["status"] == "CANCELED" and canceled["error"]["message"] == "user asked"
    assert [status(conn, r) for r in (child, grandchild, great)] == ["CANCELED"] * 3
    assert status(conn, done_child) == "COMPLETED_SUCCESSFULLY"
    assert one(conn, "cancel_run", root)["error"]["message"] == "user asked"  # canceling again: no-op


def test_a_run_canceled_while_executing_refuses_the_workers_completion(client: RunOps, store: str,
                                                                        env_id: str, conn) -> None:
    run = run_to_executing(conn, env_id)
    client.cancel_run(run["run_id"])
    with pytest.raises(IllegalTransition):
        client.complete_attempt(run["run_id"], 1, {"late": True})
    assert client.get_run(run["run_id"]).status == "CANCELED"  # type: ignore[union-attr]


def test_cancel_dev_session_runs_cancels_that_sessions_live_runs(client: RunOps, conn, env_id: str) -> None:
    mine = [trigger(conn, env_id, dev_session_id="s1") for _ in range(3)]
    child = trigger(conn, env_id, parent_run_id=mine[0])
    other = trigger(conn, env_id, dev_session_id="s2")
    assert client.cancel_dev_session_runs(env_id, "s1") == 4
    assert {status(conn, r) for r in mine + [child]} == {"CANCELED"}
    assert status(conn, other) == "PENDING"
    assert client.cancel_dev_session_runs(env_id, "s1") == 0


def test_execute_tasks_waiting_for_deploy_queues_them(client: RunOps, conn, admin, env_id: str) -> None:
    waiting = [trigger(conn, env_id, "deploy-me") for _ in range(2)]
    skipped = trigger(conn, env_id, "other-task")
    admin.execute("SET session_replication_role = replica")
    admin.execute("UPDATE runops.runs SET status = 'WAITING_FOR_DEPLOY' WHERE id = ANY(%s)",
                  [[r.removeprefix("run_") for r in waiting + [skipped]]])
    admin.execute("SET session_replication_role = origin")
    assert client.execute_tasks_waiting_for_deploy(env_id, ["deploy-me"]) == 2
    assert [status(conn, r) for r in waiting] == ["PENDING", "PENDING"]
    assert status(conn, skipped) == "WAITING_FOR_DEPLOY"


def test_final_statuses_notify_the_environment_and_every_status_when_it_asks(client: RunOps, store: str,
                                                                            env_id: str, conn) -> None:
    """SPEC §4 Notifications [1.3]: by default (notifications true) only the final status is
    notified; with notifications 'all' every change is; creation never is."""
    import json

    def moves() -> list[tuple[str, str]]:
        with client.listen(env_id, store) as listener:
            run = run_to_executing(conn, env_id)
            one(conn, "complete_attempt", run["run_id"], 1, {})
            events = [json.loads(n.payload) for n in listener.notifies(timeout=1, stop_after=3)]
        assert {e["run_id"] for e in events} == {run["run_id"]}
        return [(e["old_status"], e["new_status"]) for e in events]

    assert moves() == [("EXECUTING", "COMPLETED_SUCCESSFULLY")]
    client.update_environment(env_id, notifications="all")
    assert client.wait_for_mirror()
    assert moves() == [("PENDING", "DEQUEUED"), ("DEQUEUED", "EXECUTING"), ("EXECUTING", "COMPLETED_SUCCESSFULLY")]
    client.update_environment(env_id, notifications=True)
    assert client.wait_for_mirror()
    assert moves() == [("EXECUTING", "COMPLETED_SUCCESSFULLY")]


def test_an_environment_can_turn_notifications_off(client: RunOps, store: str, env_id: str, conn) -> None:
    client.update_environment(env_id, notifications=False)
    assert client.wait_for_mirror()
    with client.listen(env_id, store) as listener:
        run = run_to_executing(conn, env_id)
        one(conn, "complete_attempt", run["run_id"], 1, {})
        assert list(listener.notifies(timeout=0.5)) == []
    assert run["status"] == "EXECUTING"


def test_trigger_failed_task_is_born_final_and_resumes_a_waiting_parent(conn, env_id: str) -> None:
    parent = run_to_executing(conn, env_id)
    failed = one(conn, "trigger_failed_task", env_id, "child", {}, {"message": "bad item"},
                 {"parent_run_id": parent["run_id"], "resume_parent_on_completion": True})
    assert (failed["status"], failed["is_cached"]) == ("SYSTEM_FAILURE", False)
    child = one(conn, "get_run", failed["run_id"])
    assert child["error"] == {"message": "bad item"} and child["completed_at"] is not None
    waited = one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_TASK", "loc", {})
    assert waited["status"] == "PENDING"  # its only blocker was already final
    wp = one(conn, "get_waitpoint", "waitpoint_" + failed["run_id"].removeprefix("run_"))
    assert (wp["type"], wp["status"], wp["output_is_error"]) == ("RUN", "COMPLETED", True)


def test_dequeue_honours_the_concurrency_limit_and_pauses(client: RunOps, conn, env_id: str) -> None:
    client.update_environment(env_id, maximum_concurrency_limit=2)
    assert client.wait_for_mirror()
    for _ in range(5):
        trigger(conn, env_id)
    assert len(call(conn, "dequeue_runs", env_id, "w", 5, {})) == 2
    assert call(conn, "dequeue_runs", env_id, "w", 5, {}) == []
    client.update_environment(env_id, maximum_concurrency_limit=10, paused=True)
    assert client.wait_for_mirror()
    assert call(conn, "dequeue_runs", env_id, "w", 5, {}) == []
    client.update_environment(env_id, paused=False)
    assert client.wait_for_mirror()
    assert len(call(conn, "dequeue_runs", env_id, "w", 5, {})) == 3


def test_dequeue_order_and_filters(conn, env_id: str) -> None:
    ids = [trigger(conn, env_id, f"task-{i % 2}", queue=f"queue-{i % 3}") for i in range(6)]
    first = call(conn, "dequeue_runs", env_id, "w", 2, {"tasks": ["task-1"]})
    assert [r["run_id"] for r in first] == [ids[1], ids[3]]
    second = call(conn, "dequeue_runs", env_id, "w", 10, {"queues": ["queue-0"]})
    assert [r["run_id"] for r in second] == [ids[0]]  # ids[3] is already taken
    rest = call(conn, "dequeue_runs", env_id, "w", 10, {})
    assert [r["run_id"] for r in rest] == [ids[2], ids[4], ids[5]]
