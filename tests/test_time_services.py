"""Time-driven services under a frozen clock: delays, TTLs at the boundary, max_duration,
lapsed leases — and tick from many connections at once."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from tests.concurrent_calls import race
from tests.conftest import Stores
from tests.lifecycle_helpers import T0, call, one, run_to_executing, set_clock, status, trigger


def at(conn: psycopg.Connection, minutes: float) -> None:
    set_clock(conn, T0 + dt.timedelta(minutes=minutes))


def test_ttl_expires_a_queued_run_exactly_at_the_boundary(conn, env_id: str) -> None:
    at(conn, 0)
    run_id = trigger(conn, env_id, ttl="10m", idempotency_key="ttl-key")
    at(conn, 10 - 1 / 60)
    conn.execute("SELECT runops.expire_enqueued_runs(1000)")
    assert status(conn, run_id) == "PENDING"
    at(conn, 10)  # now >= queued_at + ttl
    conn.execute("SELECT runops.expire_enqueued_runs()")
    run = one(conn, "get_run", run_id)
    assert run["status"] == "EXPIRED" and run["expired_at"] == T0 + dt.timedelta(minutes=10)
    assert run["error"]["message"] == "run expired because its TTL (10m) was reached"
    assert run["idempotency_key"] is None  # the key was released
    wp = one(conn, "get_waitpoint", "waitpoint_" + run_id.removeprefix("run_"))
    assert (wp["status"], wp["output_is_error"]) == ("COMPLETED", True)
    assert trigger(conn, env_id, idempotency_key="ttl-key") != run_id


def test_a_delayed_run_starts_its_ttl_when_it_is_enqueued(conn, env_id: str) -> None:
    at(conn, 0)
    run_id = trigger(conn, env_id, delay="5m", ttl="10m")
    assert status(conn, run_id) == "DELAYED"
    at(conn, 4)
    conn.execute("SELECT runops.tick()")
    assert status(conn, run_id) == "DELAYED"
    at(conn, 5)
    conn.execute("SELECT runops.enqueue_delayed_runs()")
    assert one(conn, "get_run", run_id)["queued_at"] == T0 + dt.timedelta(minutes=5)
    at(conn, 14.9)
    conn.execute("SELECT runops.tick()")
    assert status(conn, run_id) == "PENDING"
    at(conn, 15)
    conn.execute("SELECT runops.tick()")
    assert status(conn, run_id) == "EXPIRED"


def test_a_dequeued_run_never_expires(conn, env_id: str) -> None:
    at(conn, 0)
    run_id = trigger(conn, env_id, ttl="1m", queue="ttl-locked")
    call(conn, "dequeue_runs", env_id, "w", 1, {"queues": ["ttl-locked"], "lease": "1h"})
    at(conn, 2)
    conn.execute("SELECT runops.tick()")
    assert status(conn, run_id) == "DEQUEUED"


def test_max_duration_times_an_attempt_out(conn, env_id: str) -> None:
    at(conn, 0)
    run = run_to_executing(conn, env_id, max_duration="30m")
    one(conn, "heartbeat_run", run["run_id"], "w1")
    at(conn, 29)
    one(conn, "heartbeat_run", run["run_id"], "w1")
    conn.execute("SELECT runops.tick()")
    assert status(conn, run["run_id"]) == "EXECUTING"
    at(conn, 30)
    conn.execute("SELECT runops.tick()")
    run = one(conn, "get_run", run["run_id"])
    assert run["status"] == "TIMED_OUT" and run["error"]["message"] == "run exceeded its max_duration (30m)"


def test_a_lapsed_lease_returns_the_run_to_the_queue(conn, env_id: str) -> None:
    at(conn, 0)
    queue = "lapse"
    run_id = trigger(conn, env_id, queue=queue)
    call(conn, "dequeue_runs", env_id, "w1", 1, {"queues": [queue], "lease": "1m"})
    at(conn, 0.5)
    one(conn, "heartbeat_run", run_id, "w1")  # extends to 1m30s
    at(conn, 1.2)
    conn.execute("SELECT runops.tick()")
    assert status(conn, run_id) == "DEQUEUED"
    at(conn, 1.5)
    conn.execute("SELECT runops.tick()")
    run = one(conn, "get_run", run_id)
    assert (run["status"], run["locked_by"]) == ("PENDING", None)
    assert [r["run_id"] for r in call(conn, "dequeue_runs", env_id, "w2", 1, {"queues": [queue]})] == [run_id]


def test_tick_reports_counts_and_validates(conn, store: str) -> None:
    counts = conn.execute("SELECT runops.tick(10)").fetchone()[0]
    assert set(counts) == {"delayed", "retried", "expired", "timed_out", "leases_released", "slots_freed",
                           "datetime_waitpoints", "manual_timeouts", "batches_aborted", "batches_finished_remote",
                           "resumed", "mirror", "bulk_processed"} | (
                               {"claims_pruned"} if store == "RUN_OPS" else {"bulk_settled"})
    with pytest.raises(psycopg.Error):
        conn.execute("SELECT runops.tick(0)")


def test_concurrent_ticks_expire_each_run_exactly_once(stores: Stores, store: str, env_id: str, conn) -> None:
    at(conn, 0)
    runs = [trigger(conn, env_id, ttl="1m") for _ in range(60)]
    when = T0 + dt.timedelta(days=1)
    with psycopg.connect(stores.admin[store]) as admin:
        due = admin.execute("SELECT count(*) FROM runops.runs WHERE status = 'PENDING' AND ttl_expires_at <= %s",
                            [when]).fetchone()[0]
    conns = [psycopg.connect(stores.app[store], autocommit=True) for _ in range(8)]
    for c in conns:
        set_clock(c, when)
    results = race([lambda c=c: c.execute("SELECT runops.tick(20)").fetchone()[0] for c in conns])
    for c in conns:
        c.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    expired = sum(r["expired"] for r in results)
    assert expired <= due
    # Whatever the 8 ticks did not reach, one more pass finishes; nothing was expired twice.
    set_clock(conn, when)
    while (n := conn.execute("SELECT runops.expire_enqueued_runs(1000)").fetchone()[0]) > 0:
        expired += n
    assert expired == due
    assert {status(conn, r) for r in runs} == {"EXPIRED"}


def test_the_timer_steps_scan_the_timer_index_in_a_generic_plan(stores: Stores, store: str) -> None:
    """wake_due_runs takes its status as a parameter; its constant status list lets a generic plan
    prove runs_timer_idx's predicate, so DELAYED and retry wake-ups stay an index scan in wake_at
    order (the statement as the function runs it, its variables as parameters)."""
    with psycopg.connect(stores.admin[store], autocommit=True) as admin:
        admin.execute("SET ROLE runops_owner")
        admin.execute("SET search_path = runops, pg_catalog, pg_temp")
        admin.execute("SET enable_seqscan = off")  # the test stores hold few rows
        # ... and how many of them are due depends on what ran before: a bitmap scan plus a Sort
        # can then cost less. Without it, the choice is the ordered index scan or nothing.
        admin.execute("SET enable_bitmapscan = off")
        admin.execute("""
            PREPARE due(text, timestamptz, integer) AS
            SELECT r.id FROM runs AS r
            WHERE r.status IN ('DELAYED', 'RETRYING_AFTER_FAILURE') AND r.status = $1
              AND wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) <= $2
            ORDER BY wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) LIMIT $3
            FOR UPDATE SKIP LOCKED""")
        admin.execute("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(r[0] for r in admin.execute(
            "EXPLAIN (COSTS OFF) EXECUTE due('DELAYED', now(), 10)").fetchall())
        admin.execute("DEALLOCATE due")
    assert "runs_timer_idx" in plan and "Sort" not in plan, plan
