"""dequeue_runs' start option: the dequeue that leases a run starts its attempt in the same write
(PENDING -> EXECUTING), as start_attempt would have — the same attempt rules (a new attempt, the
paused one after a resume, none past max_attempts), the same slot, the same row — in both stores."""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest

from runops.client import RunOps
from tests.conftest import sqlstate_of
from tests.lifecycle_helpers import T0, call, one, run_to_executing, set_clock, status, trigger


def started(conn: psycopg.Connection, env: str, worker: str, queue: str) -> list[dict]:
    return call(conn, "dequeue_runs", env, worker, 10, {"queues": [queue], "start": True, "lease": "2m"})


def test_a_started_dequeue_hands_out_executing_runs_with_their_first_attempt(conn, admin_conn, env_id: str) -> None:
    queue = f"q-{uuid.uuid4().hex}"
    first = trigger(conn, env_id, queue=queue, max_duration="1h")
    second = trigger(conn, env_id, queue=queue)
    runs = started(conn, env_id, "w-start", queue)
    assert [r["run_id"] for r in runs] == [first, second]  # queue order
    for run in runs:
        assert (run["status"], run["attempt_number"], run["locked_by"]) == ("EXECUTING", 1, "w-start")
        assert run["lease_expires_at"] is not None and run["started_at"] is not None
    # what start_attempt would have written: the attempt row, and max_duration's deadline
    attempts = admin_conn.execute("SELECT a.status, a.worker_id, a.number FROM runops.attempts AS a "
                                  "WHERE 'run_' || a.run_id = %s", [first]).fetchall()
    assert attempts == [("EXECUTING", "w-start", 1)]
    deadline = admin_conn.execute("SELECT r.execution_deadline - r.started_at FROM runops.runs AS r "
                                  "WHERE 'run_' || r.id = %s", [first]).fetchone()
    assert deadline == (dt.timedelta(hours=1),)
    # the worker's next call is its report; a start_attempt now would be a second start
    with pytest.raises(psycopg.Error) as err:
        call(conn, "start_attempt", first, "w-start")
    assert sqlstate_of(err.value) == "RO003"
    done = one(conn, "complete_attempt", first, 1, {"ok": True})
    assert done["status"] == "COMPLETED_SUCCESSFULLY"


def test_a_run_resumed_from_a_checkpoint_continues_its_paused_attempt(conn, admin_conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    one(conn, "create_checkpoint", run["run_id"], 1, "MANUAL", "s3://cp/1", {})
    assert one(conn, "resume_run", run["run_id"])["status"] == "PENDING"
    [resumed] = started(conn, env_id, "w2", run["queue"])
    assert (resumed["status"], resumed["attempt_number"], resumed["locked_by"]) == ("EXECUTING", 1, "w2")
    assert admin_conn.execute("SELECT count(*), min(a.status), min(a.worker_id) FROM runops.attempts AS a "
                              "WHERE 'run_' || a.run_id = %s", [run["run_id"]]).fetchone() == (1, "EXECUTING", "w2")


def test_a_run_out_of_attempts_comes_back_dequeued_and_start_attempt_crashes_it(conn, env_id: str) -> None:
    run = run_to_executing(conn, env_id, max_attempts=1, worker="w9")
    set_clock(conn, T0 + dt.timedelta(days=400))  # every lease has lapsed by then
    conn.execute("SELECT runops.tick()")
    set_clock(conn, None)
    assert status(conn, run["run_id"]) == "PENDING"
    [handed] = started(conn, env_id, "w9", run["queue"])
    assert (handed["status"], handed["attempt_number"]) == ("DEQUEUED", 1)
    crashed = one(conn, "start_attempt", run["run_id"], "w9")
    assert crashed["status"] == "CRASHED" and "attempts" in crashed["error"]["message"]


def test_started_runs_hold_concurrency_slots_like_dequeued_ones(conn, client: RunOps, admin_conn,
                                                                env_id: str) -> None:
    client.update_environment(env_id, maximum_concurrency_limit=1)
    assert client.wait_for_mirror()
    queue = f"q-{uuid.uuid4().hex}"
    first = trigger(conn, env_id, queue=queue)
    trigger(conn, env_id, queue=queue)
    assert [r["run_id"] for r in started(conn, env_id, "w1", queue)] == [first]
    assert started(conn, env_id, "w2", queue) == []  # the one slot is taken
    held = admin_conn.execute("SELECT 'run_' || s.run_id FROM runops.concurrency_slots AS s "
                              "WHERE s.environment_id = %s AND s.run_id IS NOT NULL", [env_id]).fetchall()
    assert held == [(first,)]
    one(conn, "complete_attempt", first, 1, None)  # gives the slot back
    assert [r["status"] for r in started(conn, env_id, "w2", queue)] == ["EXECUTING"]


def test_the_start_option_is_a_boolean(conn, env_id: str) -> None:
    with pytest.raises(psycopg.Error) as err:
        call(conn, "dequeue_runs", env_id, "w1", 1, {"start": "yes"})
    assert sqlstate_of(err.value) == "RO006" and "option start must be true or false" in str(err.value)


@pytest.fixture
def admin_conn(store: str, stores):
    with psycopg.connect(stores.admin[store], autocommit=True) as c:
        yield c
