"""The environment guard (SPEC §3 [1.2]): every write that names a row by id takes an optional
trailing environment_id; when given and the row belongs to another environment the call is RO004
and changes nothing. Without it, or with the row's own environment, the call works as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import RunOps
from runops.errors import NotFound
from tests.conftest import Env, Stores, sqlstate_of
from tests.lifecycle_helpers import call, one, run_to_executing, trigger

GUARDED = ["cancel_run", "heartbeat_run", "start_attempt", "complete_attempt", "fail_attempt",
           "create_checkpoint", "resume_run", "finalize_run", "block_run", "complete_waitpoint",
           "append_batch_items", "seal_batch", "resume_batch_run"]


@pytest.fixture
def admin(store: str, stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        yield conn


@pytest.fixture
def other_env(store: str, make_env: Callable[..., Env]) -> str:
    """A second environment whose rows live in the same store."""
    return make_env("cuid" if store == "CONTROL_PLANE" else "ksuid").environment_id


def snapshot(admin: psycopg.Connection[Any], env: str) -> list[tuple[Any, ...]]:
    """Everything the environment's rows say, to prove a refused call changed nothing."""
    return admin.execute(
        "SELECT 'run', id, status, attempt_number, lease_expires_at::text, output::text, error::text, locked_by"
        "  FROM runops.runs WHERE environment_id = %(e)s"
        " UNION ALL SELECT 'attempt', id, status, number, completed_at::text, output::text, error::text, worker_id"
        "  FROM runops.attempts WHERE environment_id = %(e)s"
        " UNION ALL SELECT 'checkpoint', id, reason, attempt_number, NULL, metadata::text, NULL, location"
        "  FROM runops.checkpoints WHERE environment_id = %(e)s"
        " UNION ALL SELECT 'batch', id, status, item_count, sealed_at::text, output::text, NULL, NULL"
        "  FROM runops.batches WHERE environment_id = %(e)s"
        " UNION ALL SELECT 'waitpoint', id, status, NULL, completed_at::text, output::text, NULL, NULL"
        "  FROM runops.waitpoints WHERE environment_id = %(e)s"
        " UNION ALL SELECT 'edge', run_id, waitpoint_id, NULL, completed_at::text, NULL, NULL, NULL"
        "  FROM runops.run_waitpoints WHERE environment_id = %(e)s"
        " ORDER BY 1, 2, 3", {"e": env}).fetchall()


def refused_as_not_found(conn: psycopg.Connection[Any], function: str, *args: Any) -> None:
    with pytest.raises(psycopg.Error) as err:
        call(conn, function, *args)
    assert sqlstate_of(err.value) == "RO004", (function, err.value)


def test_every_guarded_write_refuses_another_environments_row_and_changes_nothing(conn, admin, env_id: str,
                                                                                  other_env: str) -> None:
    executing = run_to_executing(conn, env_id)["run_id"]
    queue = "q-dequeued"
    dequeued = trigger(conn, env_id, queue=queue)
    assert call(conn, "dequeue_runs", env_id, "w1", 1, {"queues": [queue]})
    pending = trigger(conn, env_id)
    waitpoint = one(conn, "create_waitpoint", env_id, "MANUAL", {})["waitpoint_id"]
    open_batch = one(conn, "create_batch", env_id, 1, {})["batch_id"]
    before = snapshot(admin, env_id)
    attempts: dict[str, tuple[Any, ...]] = {
        "cancel_run": (pending, "no", other_env),
        "heartbeat_run": (dequeued, "w1", other_env),
        "start_attempt": (dequeued, "w1", other_env),
        "complete_attempt": (executing, 1, {"ok": True}, other_env),
        "fail_attempt": (executing, 1, {"message": "x"}, None, other_env),
        "create_checkpoint": (executing, 1, "MANUAL", "loc", {}, other_env),
        "resume_run": (executing, other_env),
        "finalize_run": (pending, "CRASHED", None, None, other_env),
        "block_run": (executing, [waitpoint], Jsonb({}), other_env),
        "complete_waitpoint": (waitpoint, {"ok": True}, False, other_env),
        "append_batch_items": (open_batch, 0, [{"task": "t"}], other_env),
        "seal_batch": (open_batch, other_env),
        "resume_batch_run": (open_batch, other_env),
    }
    assert sorted(attempts) == sorted(GUARDED)
    for function, args in attempts.items():
        refused_as_not_found(conn, function, *args)
    assert snapshot(admin, env_id) == before


def test_the_rows_own_environment_passes_the_guard(conn, env_id: str) -> None:
    run_id = run_to_executing(conn, env_id)["run_id"]
    one(conn, "heartbeat_run", run_id, "w1", env_id)
    done = one(conn, "complete_attempt", run_id, 1, {"ok": True}, env_id)
    assert done["status"] == "COMPLETED_SUCCESSFULLY"
    assert one(conn, "cancel_run", run_id, None, env_id)["status"] == "COMPLETED_SUCCESSFULLY"
    batch_id = one(conn, "create_batch", env_id, 1, {})["batch_id"]
    assert one(conn, "append_batch_items", batch_id, 0, [{"task": "t"}], env_id)["first_index"] == 0
    assert one(conn, "seal_batch", batch_id, env_id)["status"] == "PROCESSING"
    assert one(conn, "resume_batch_run", batch_id, env_id)["batch_id"] == batch_id
    waitpoint = one(conn, "create_waitpoint", env_id, "MANUAL", {})["waitpoint_id"]
    assert one(conn, "complete_waitpoint", waitpoint, None, False, env_id)["completed_now"] is True


def test_without_environment_id_the_calls_work_as_before(conn, env_id: str) -> None:
    run_id = run_to_executing(conn, env_id)["run_id"]
    assert one(conn, "complete_attempt", run_id, 1, {"ok": True})["status"] == "COMPLETED_SUCCESSFULLY"
    assert one(conn, "finalize_run", run_id, "COMPLETED_SUCCESSFULLY")["status"] == "COMPLETED_SUCCESSFULLY"


def test_a_run_or_batch_waitpoint_of_another_environment_is_not_found_rather_than_illegal(
        conn, env_id: str, other_env: str) -> None:
    # RO004 comes before RO003 in the SPEC's order: another tenant learns nothing about the id.
    run_id = trigger(conn, env_id)
    batch_id = one(conn, "create_batch", env_id, 1, {})["batch_id"]
    for owner in (run_id.removeprefix("run_"), batch_id.removeprefix("batch_")):
        with pytest.raises(psycopg.Error) as err:
            call(conn, "complete_waitpoint", "waitpoint_" + owner, None, False, env_id)
        assert sqlstate_of(err.value) == "RO003"
        refused_as_not_found(conn, "complete_waitpoint", "waitpoint_" + owner, None, False, other_env)


def test_the_guard_comes_after_ro006_ro001_and_ro002(conn, env_id: str, other_env: str) -> None:
    # RO006 → RO001 → RO002 → RO004: input and id shape are judged before the row's environment.
    run_id = run_to_executing(conn, env_id)["run_id"]
    with pytest.raises(psycopg.Error) as err:
        call(conn, "complete_attempt", run_id, 0, {}, other_env)
    assert sqlstate_of(err.value) == "RO006"
    with pytest.raises(psycopg.Error) as err:
        call(conn, "cancel_run", "run_not-an-id", None, other_env)
    assert sqlstate_of(err.value) == "RO001"


def test_the_client_passes_environment_id_through(client: RunOps, env_id: str, other_env: str) -> None:
    run = client.trigger_run(env_id, "t")
    with pytest.raises(NotFound):
        client.cancel_run(run.run_id, environment_id=other_env)
    assert client.cancel_run(run.run_id, environment_id=env_id).status == "CANCELED"
    batch = client.create_batch(env_id, 1)
    with pytest.raises(NotFound):
        client.append_batch_items(batch.batch_id, 0, [{"task": "t"}], environment_id=other_env)
    assert client.append_batch_items(batch.batch_id, 0, [{"task": "t"}], environment_id=env_id).first_index == 0
    with pytest.raises(NotFound):
        client.seal_batch(batch.batch_id, environment_id=other_env)
    assert client.seal_batch(batch.batch_id, environment_id=env_id).status == "PROCESSING"
    waitpoint = client.create_waitpoint(env_id, "MANUAL")
    with pytest.raises(NotFound):
        client.complete_waitpoint(waitpoint.waitpoint_id, environment_id=other_env)
    assert client.complete_waitpoint(waitpoint.waitpoint_id, environment_id=env_id).completed_now
