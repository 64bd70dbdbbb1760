"""Backends killed with SIGKILL in the middle of dequeue_runs (the postmaster then resets every
backend of the cluster and recovers): the concurrency slots stay exact — every leased run holds
one, no slot is held by anything else, never more than the limit — and the work drains.

Two kills on a pair of its own: a dequeue whose transaction holds its slots and leased runs
(open, deterministic), and whichever backend is inside dequeue_runs while 12 threads lease,
start and complete runs at the limit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from tests.conftest import Stores, running_stores
from tests.lifecycle_helpers import call, one, trigger
from tests.test_dequeue_concurrency import active, assert_slots_match_runs, slots
from tests.test_faults_stores import wait_for_store as wait_for_store_to_answer

pytestmark = pytest.mark.faults

CAP = 5


@pytest.fixture(scope="module")
def own() -> Iterator[Stores]:
    with running_stores() as made:
        yield made


def admin_rows(own: Stores, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(own.admin[RUN_OPS], autocommit=True) as c:
        return c.execute(query, params).fetchall()


def wait_for_store(own: Stores, killed: int | None = None, timeout: float = 60.0) -> None:
    """Until the store answers again after ``killed`` died: the postmaster notices the crash and
    resets every backend a moment later, so a connection made before that must not count."""
    deadline = time.monotonic() + timeout
    while killed is not None and Path(f"/proc/{killed}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    wait_for_store_to_answer(own, RUN_OPS, max(deadline - time.monotonic(), 1.0))


def check_slots(own: Stores, env: str) -> None:
    with psycopg.connect(own.admin[RUN_OPS], autocommit=True) as c:
        assert_slots_match_runs(c, env)
        held, total, laid = slots(c, env)
        assert held == active(c, env) <= CAP and (total, laid) == (CAP, CAP), (held, total, laid)


def drain(own: Stores, env: str, runs: int) -> None:
    """Leases lapse (2 s), tick puts them back, one worker finishes everything."""
    deadline = time.monotonic() + 60
    with psycopg.connect(own.app[RUN_OPS], autocommit=True) as c:
        while time.monotonic() < deadline:
            c.execute("SELECT runops.tick(1000)")
            for run in call(c, "dequeue_runs", env, "drainer", CAP, {"lease": "2s"}):
                started = one(c, "start_attempt", run["run_id"], "drainer")
                one(c, "complete_attempt", run["run_id"], started["attempt_number"], None)
            done = admin_rows(own, "SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                                   "AND status = 'COMPLETED_SUCCESSFULLY'", [env])[0][0]
            if done == runs:
                break
            time.sleep(0.2)
    assert done == runs
    with psycopg.connect(own.admin[RUN_OPS], autocommit=True) as c:
        assert slots(c, env) == (0, CAP, CAP)


def make_env(own: Stores) -> str:
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as client:
        org = client.create_organization(f"d{time.monotonic_ns()}", mint_kind="ksuid")
        env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
        client.update_environment(env, maximum_concurrency_limit=CAP)
        assert client.wait_for_mirror()
    return env


def test_a_backend_killed_holding_a_dequeue_open_leaks_no_slot(own: Stores) -> None:
    env = make_env(own)
    with psycopg.connect(own.app[RUN_OPS], autocommit=True) as c:
        for _ in range(12):
            trigger(c, env)
        assert len(call(c, "dequeue_runs", env, "first", 2, {"lease": "2s"})) == 2
    victim = psycopg.connect(own.app[RUN_OPS])  # a transaction left open: its slots are claimed
    assert len(call(victim, "dequeue_runs", env, "victim", 3, {"lease": "2s"})) == 3
    pid = victim.info.backend_pid
    held = admin_rows(own, "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'transactionid'", [pid])
    assert held[0][0] >= 1  # it wrote: slots and runs are its uncommitted changes
    os.kill(pid, signal.SIGKILL)  # the postmaster resets every backend and recovers
    wait_for_store(own, pid)
    victim.close()
    check_slots(own, env)
    assert admin_rows(own, "SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                           "AND status = 'DEQUEUED'", [env]) == [(2,)]  # the first dequeue's only
    with psycopg.connect(own.app[RUN_OPS], autocommit=True) as c:
        assert len(call(c, "dequeue_runs", env, "after", 10, {"lease": "2s"})) == CAP - 2
    check_slots(own, env)
    drain(own, env, 12)


def test_a_backend_killed_inside_dequeue_runs_under_load_leaks_no_slot(own: Stores) -> None:
    env = make_env(own)
    runs = 600
    with psycopg.connect(own.app[RUN_OPS], autocommit=True) as c:
        c.execute("SELECT runops.batch_trigger(%s, (SELECT jsonb_agg(jsonb_build_object('task', 't', "
                  "'payload', '{}'::jsonb)) FROM generate_series(1, %s)))", [env, runs])
    stop = threading.Event()
    sampled: list[int] = []

    def work(i: int) -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(own.app[RUN_OPS], autocommit=True, connect_timeout=2) as c:
                    while not stop.is_set():
                        for run in call(c, "dequeue_runs", env, f"w{i}", 2, {"lease": "2s"}):
                            started = one(c, "start_attempt", run["run_id"], f"w{i}")
                            one(c, "complete_attempt", run["run_id"], started["attempt_number"], None)
            except psycopg.Error:
                time.sleep(0.1)  # the cluster is recovering

    def sample() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(own.admin[RUN_OPS], autocommit=True, connect_timeout=2) as c:
                    while not stop.is_set():
                        sampled.append(active(c, env))
            except psycopg.Error:
                time.sleep(0.1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)] + [threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        pid = None
        deadline = time.monotonic() + 20
        while pid is None and time.monotonic() < deadline:
            found = admin_rows(own, "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                                    "AND query LIKE '%%dequeue_runs%%' AND pid <> pg_backend_pid()")
            pid = found[0][0] if found else None
        assert pid is not None, "no backend was ever seen inside dequeue_runs"
        os.kill(pid, signal.SIGKILL)
        wait_for_store(own, pid)
        time.sleep(2.0)  # traffic resumes at the limit
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert sampled and max(sampled) <= CAP
    check_slots(own, env)
    drain(own, env, runs)
