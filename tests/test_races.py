"""Lifecycle races between many connections at once, on both stores."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE
from tests.concurrent_calls import race
from tests.conftest import Stores
from tests.lifecycle_helpers import call, one, run_to_executing, status, trigger


@pytest.fixture
def connections(stores: Stores, store: str):
    opened: list[psycopg.Connection[Any]] = []

    def open_(n: int) -> list[psycopg.Connection[Any]]:
        opened.extend(psycopg.connect(stores.app[store], autocommit=True) for _ in range(n))
        return opened[-n:]

    yield open_
    for c in opened:
        c.close()


def test_workers_never_dequeue_the_same_run(conn, connections, env_id: str) -> None:
    runs = {trigger(conn, env_id, queue="shared") for _ in range(90)}  # under the default limit of 100
    workers = connections(12)
    results = race([lambda c=c, i=i: [r["run_id"] for _ in range(3)
                                      for r in call(c, "dequeue_runs", env_id, f"w{i}", 4, {"queues": ["shared"]})]
                    for i, c in enumerate(workers)])
    assert not [r for r in results if isinstance(r, Exception)], results
    taken = [run_id for batch in results for run_id in batch]
    assert len(taken) == len(set(taken)) == len(runs)
    assert set(taken) == runs


def test_concurrent_dequeuers_respect_the_concurrency_limit(client, conn, connections, store: str,
                                                            make_env) -> None:
    env = make_env("cuid" if store == CONTROL_PLANE else "ksuid")
    client.update_environment(env.environment_id, maximum_concurrency_limit=5)
    assert client.wait_for_mirror()
    for _ in range(30):
        trigger(conn, env.environment_id)
    workers = connections(10)
    results = race([lambda c=c: call(c, "dequeue_runs", env.environment_id, "w", 3, {}) for c in workers])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(len(r) for r in results) == 5


@pytest.mark.parametrize("round_", range(4))
def test_cancel_racing_complete_ends_in_one_final_status(conn, connections, env_id: str, round_: int) -> None:
    run = run_to_executing(conn, env_id)
    canceler, completer = connections(2)
    results = race([lambda: one(canceler, "cancel_run", run["run_id"], "race"),
                    lambda: one(completer, "complete_attempt", run["run_id"], 1, {"r": round_})])
    final = one(conn, "get_run", run["run_id"])
    assert final["status"] in ("CANCELED", "COMPLETED_SUCCESSFULLY")
    if final["status"] == "CANCELED":
        assert isinstance(results[1], psycopg.Error) and results[1].diag.sqlstate == "RO003"
    else:
        assert results[0]["status"] == "COMPLETED_SUCCESSFULLY"  # cancel of a final run is a no-op
    wp = one(conn, "get_waitpoint", "waitpoint_" + run["run_id"].removeprefix("run_"))
    assert wp["status"] == "COMPLETED"
    assert wp["output_is_error"] == (final["status"] == "CANCELED")
    assert wp["completed_at"] == final["completed_at"]


def test_complete_waitpoint_called_twice_at_once_unblocks_once(conn, connections, env_id: str) -> None:
    waiting = [run_to_executing(conn, env_id) for _ in range(5)]
    token = one(conn, "create_waitpoint", env_id, "MANUAL", {})
    for run in waiting:
        one(conn, "block_run", run["run_id"], [token["waitpoint_id"]], "{}")
        one(conn, "create_checkpoint", run["run_id"], 1, "WAIT_FOR_TASK", "l", {})
    a, b, c = connections(3)
    results = race([lambda x=x, i=i: one(x, "complete_waitpoint", token["waitpoint_id"], {"by": i}, False)
                    for i, x in enumerate((a, b, c))])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r["completed_now"] for r in results) == [False, False, True]
    unblocked = [rid for r in results for rid in r["unblocked_run_ids"]]
    assert sorted(unblocked) == sorted(r["run_id"] for r in waiting)
    assert {status(conn, r["run_id"]) for r in waiting} == {"PENDING"}


def test_many_children_finishing_at_once_resume_their_parent_once(conn, connections, env_id: str) -> None:
    parent = run_to_executing(conn, env_id, worker="parent-worker")
    children = [trigger(conn, env_id, "child", parent_run_id=parent["run_id"], resume_parent_on_completion=True,
                        queue="kids") for _ in range(6)]
    one(conn, "create_checkpoint", parent["run_id"], 1, "WAIT_FOR_TASK", "l", {})
    for child in children:
        call(conn, "dequeue_runs", env_id, "kid-worker", 1, {"queues": ["kids"]})
        one(conn, "start_attempt", child, "kid-worker")
    workers = connections(len(children))
    results = race([lambda c=c, child=child: one(c, "complete_attempt", child, 1, {"child": child})
                    for c, child in zip(workers, children, strict=True)])
    errors = [r for r in results if isinstance(r, Exception)]
    # Deadlock-free by construction (edges lock runs in id order), so no retry is needed.
    assert errors == []
    assert status(conn, parent["run_id"]) == "PENDING"
