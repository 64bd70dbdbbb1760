"""The environment's concurrency limit as slot rows (sql/schema/45_concurrency_slots.sql): exact
within a store under many concurrent dequeuers, without dequeuers waiting for each other, kept by
every transition into and out of DEQUEUED/EXECUTING, through a lowered limit, an operator's
UPDATE, a write that bypassed the triggers, and an upgrade of a store with runs already leased."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops import migrate
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import T0, call, one, set_clock, trigger
from tests.test_upgrade import RELEASES, install_release


def active(admin: psycopg.Connection[Any], env: str) -> int:
    row = admin.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s "
                        "AND status IN ('DEQUEUED', 'EXECUTING')", [env]).fetchone()
    assert row is not None
    return int(row[0])


def slots(admin: psycopg.Connection[Any], env: str) -> tuple[int, int, int | None]:
    """(slots held, slots in all, the limit they are laid out for)."""
    row = admin.execute("SELECT count(s.run_id), count(*), (SELECT l.slot_limit FROM runops.concurrency_limits AS l "
                        "WHERE l.environment_id = %s) FROM runops.concurrency_slots AS s "
                        "WHERE s.environment_id = %s", [env, env]).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), row[2]


def assert_slots_match_runs(admin: psycopg.Connection[Any], env: str) -> None:
    """Every leased run holds exactly one slot, and every held slot names a leased run."""
    pairs = admin.execute("""
        SELECT r.id, s.run_id FROM (SELECT id FROM runops.runs WHERE environment_id = %(e)s
                                      AND status IN ('DEQUEUED', 'EXECUTING')) AS r
        FULL JOIN (SELECT run_id FROM runops.concurrency_slots WHERE environment_id = %(e)s
                     AND run_id IS NOT NULL) AS s ON s.run_id = r.id
        WHERE r.id IS NULL OR s.run_id IS NULL""", {"e": env}).fetchall()
    assert pairs == []


@pytest.fixture
def admin(store: str, stores: Stores):
    with psycopg.connect(stores.admin[store], autocommit=True) as c:
        yield c


def limit(client: RunOps, env: str, n: int) -> None:
    client.update_environment(env, maximum_concurrency_limit=n)
    assert client.wait_for_mirror()


def test_the_limit_holds_under_32_concurrent_dequeuers(client: RunOps, stores: Stores, store: str, admin,
                                                       env_id: str) -> None:
    """32 dequeuers (each also starting — half of them in the dequeue —, completing, failing with
    a retry or canceling what it got) over 240 runs with a limit of 6: a sampler never sees more
    than 6 leased runs, every run is handed out once per PENDING spell, and all of them finish."""
    cap, total, dequeuers = 6, 240, 32
    limit(client, env_id, cap)
    with psycopg.connect(stores.app[store], autocommit=True) as conn:
        for _ in range(total):
            trigger(conn, env_id)
    taken: Counter[str] = Counter()
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def sample() -> None:
        with psycopg.connect(stores.admin[store], autocommit=True) as c:
            while not done.is_set():
                seen.append(active(c, env_id))

    def work(i: int) -> None:
        rng = random.Random(i)
        try:
            with psycopg.connect(stores.app[store], autocommit=True) as c:
                idle_since = time.monotonic()
                while time.monotonic() - idle_since < 3:
                    # odd dequeuers start the attempts in the dequeue (its start option)
                    runs = call(c, "dequeue_runs", env_id, f"w{i}", rng.randint(1, 3), {"start": i % 2 == 1})
                    if not runs:
                        time.sleep(0.005)
                        continue
                    idle_since = time.monotonic()
                    for run in runs:
                        taken[run["run_id"]] += 1
                        started = run if run["status"] == "EXECUTING" else one(c, "start_attempt", run["run_id"],
                                                                                f"w{i}")
                        roll = rng.random()
                        if roll < 0.1 and started["attempt_number"] == 1:  # back to PENDING after the retry
                            one(c, "fail_attempt", run["run_id"], 1, {"m": "again"},
                                dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
                            c.execute("SELECT runops.tick(100)")
                        elif roll < 0.15:
                            one(c, "cancel_run", run["run_id"], "enough")
                        else:
                            one(c, "complete_attempt", run["run_id"], started["attempt_number"], {"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(dequeuers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    sampler.join()
    assert not errors, errors[:3]
    assert len(seen) > 50 and max(seen) <= cap, (len(seen), max(seen))
    assert max(seen) == cap  # the limit was reached, not just respected
    finished = admin.execute("SELECT count(*) FILTER (WHERE status IN ('COMPLETED_SUCCESSFULLY', 'CANCELED')), "
                             "count(*) FROM runops.runs WHERE environment_id = %s", [env_id]).fetchone()
    assert finished == (total, total)
    assert set(taken) == {r for (r,) in admin.execute(
        "SELECT 'run_' || id FROM runops.runs WHERE environment_id = %s", [env_id]).fetchall()}
    retried = admin.execute("SELECT 'run_' || run_id FROM runops.attempts WHERE environment_id = %s "
                            "GROUP BY run_id HAVING count(*) > 1", [env_id]).fetchall()
    assert all(taken[r] == 2 for (r,) in retried) and sum(taken.values()) == total + len(retried)
    assert slots(admin, env_id) == (0, cap, cap)


def test_a_dequeuer_does_not_wait_for_another_ones_open_transaction(stores: Stores, store: str,
                                                                   env_id: str) -> None:
    """One dequeue's transaction stays open (its runs and slots locked); another dequeuer of the
    same environment gets other runs at once instead of queueing behind it. (Only laying the
    slots out — an environment's first dequeue, or one after a limit change — waits for the
    dequeues in flight; the first call here does it.)"""
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        assert call(c, "dequeue_runs", env_id, "warm", 1, {}) == []
        ids = [trigger(c, env_id) for _ in range(4)]
    with psycopg.connect(stores.app[store]) as holder, psycopg.connect(stores.app[store], autocommit=True) as other:
        first = call(holder, "dequeue_runs", env_id, "holder", 2, {})  # its transaction stays open
        other.execute("SET statement_timeout = '3s'")
        began = time.monotonic()
        second = call(other, "dequeue_runs", env_id, "other", 2, {})
        assert time.monotonic() - began < 1.0
        assert [r["run_id"] for r in first] == ids[:2] and [r["run_id"] for r in second] == ids[2:]
        holder.rollback()


def test_a_lowered_limit_lets_no_run_in_until_the_excess_has_finished(client: RunOps, stores: Stores, store: str,
                                                                      admin, env_id: str) -> None:
    limit(client, env_id, 4)
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        for _ in range(10):
            trigger(c, env_id)
        leased = [r["run_id"] for r in call(c, "dequeue_runs", env_id, "w", 10, {})]
        assert len(leased) == 4
        limit(client, env_id, 2)
        assert call(c, "dequeue_runs", env_id, "w", 10, {}) == []  # laid out again: 4 held, limit 2
        assert slots(admin, env_id) == (4, 4, 2)
        one(c, "start_attempt", leased[0], "w")
        one(c, "complete_attempt", leased[0], 1, None)  # 3 leased, still over the limit
        assert call(c, "dequeue_runs", env_id, "w", 10, {}) == []
        one(c, "cancel_run", leased[1])  # 2 leased: at the limit
        assert call(c, "dequeue_runs", env_id, "w", 10, {}) == []
        assert slots(admin, env_id) == (2, 2, 2)  # the overflow slots went with their runs
        one(c, "finalize_run", leased[2], "SYSTEM_FAILURE")
        assert len(call(c, "dequeue_runs", env_id, "w", 10, {})) == 1
        limit(client, env_id, 5)
        assert len(call(c, "dequeue_runs", env_id, "w", 10, {})) == 3
        assert active(admin, env_id) == 5
        assert slots(admin, env_id) == (5, 5, 5)
        assert_slots_match_runs(admin, env_id)


def test_every_way_out_of_a_lease_gives_the_slot_back(client: RunOps, stores: Stores, store: str, admin,
                                                      env_id: str) -> None:
    """Limit 1: after each way a leased run can end or go back, the next run can be leased."""
    limit(client, env_id, 1)
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        def lease(**options: Any) -> dict[str, Any]:
            trigger(c, env_id, **options)
            [run] = call(c, "dequeue_runs", env_id, "w", 1, {"lease": "10s"})
            assert call(c, "dequeue_runs", env_id, "w", 1, {}) == []  # the one slot is taken
            return run

        def executing(**options: Any) -> dict[str, Any]:
            return one(c, "start_attempt", lease(**options)["run_id"], "w")

        run = executing()
        one(c, "complete_attempt", run["run_id"], 1, None)
        run = executing()
        one(c, "fail_attempt", run["run_id"], 1, {"m": "x"}, T0)  # RETRYING_AFTER_FAILURE
        run = executing()
        one(c, "fail_attempt", run["run_id"], 1, {"m": "x"})  # COMPLETED_WITH_ERRORS
        run = executing()
        one(c, "create_checkpoint", run["run_id"], 1, "MANUAL", "here", {})  # WAITING_TO_RESUME
        run = executing()
        one(c, "finalize_run", run["run_id"], "INTERRUPTED")
        run = lease()
        one(c, "cancel_run", run["run_id"])  # canceled while DEQUEUED
        run = lease(max_attempts=1)
        one(c, "start_attempt", run["run_id"], "w")
        one(c, "fail_attempt", run["run_id"], 1, {"m": "x"}, T0)  # no attempt left: final
        run = executing(max_duration="1s")
        set_clock(c, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
        counts = c.execute("SELECT runops.tick(100)").fetchone()[0]  # type: ignore[index]
        assert counts["timed_out"] == 1
        set_clock(c, None)
        run = executing()
        set_clock(c, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
        counts = c.execute("SELECT runops.tick(100)").fetchone()[0]  # type: ignore[index]
        assert counts["leases_released"] == 1  # back to PENDING: its lease lapsed
        set_clock(c, None)
        assert [r["run_id"] for r in call(c, "dequeue_runs", env_id, "w", 1, {})] == [run["run_id"]]
        assert_slots_match_runs(admin, env_id)
        assert slots(admin, env_id) == (1, 1, 1)


def test_an_operators_update_takes_a_slot_or_is_refused(client: RunOps, stores: Stores, store: str, admin,
                                                        env_id: str) -> None:
    limit(client, env_id, 1)
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        first, second = trigger(c, env_id), trigger(c, env_id)
    admin.execute("UPDATE runops.runs SET status = 'DEQUEUED' WHERE 'run_' || id = %s", [first])
    assert slots(admin, env_id) == (1, 1, 1)
    with pytest.raises(psycopg.Error) as err:
        admin.execute("UPDATE runops.runs SET status = 'DEQUEUED' WHERE 'run_' || id = %s", [second])
    assert sqlstate_of(err.value) == "RO003"
    assert active(admin, env_id) == 1
    assert_slots_match_runs(admin, env_id)


def test_tick_frees_a_slot_left_by_a_write_that_bypassed_the_triggers(client: RunOps, stores: Stores, store: str,
                                                                       admin, env_id: str) -> None:
    limit(client, env_id, 1)
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        run = trigger(c, env_id)
        trigger(c, env_id)
        assert len(call(c, "dequeue_runs", env_id, "w", 1, {})) == 1
        with admin.transaction():
            admin.execute("SET LOCAL session_replication_role = replica")
            admin.execute("UPDATE runops.runs SET status = 'COMPLETED_SUCCESSFULLY' WHERE 'run_' || id = %s", [run])
        assert call(c, "dequeue_runs", env_id, "w", 1, {}) == []  # the slot is still held
        counts = c.execute("SELECT runops.tick(100)").fetchone()[0]  # type: ignore[index]
        assert counts["slots_freed"] == 1
        assert len(call(c, "dequeue_runs", env_id, "w", 1, {})) == 1
        assert_slots_match_runs(admin, env_id)


def test_the_upgrade_gives_runs_already_leased_their_slots(scratch_db) -> None:
    """A store at r0004 with leased runs (more than a lowered limit) is upgraded in place: each
    leased run holds a slot, the excess above the limit, and the limit is exact from then on."""
    url = scratch_db("slots")
    install_release(CONTROL_PLANE, url, RELEASES["r0004"])  # the r0004 release itself, from git
    with psycopg.connect(url, autocommit=True) as c:
        org = c.execute("SELECT runops.create_organization('o')").fetchone()[0]  # type: ignore[index]
        project = c.execute("SELECT runops.create_project(%s, 'p')", [org]).fetchone()[0]  # type: ignore[index]
        env = c.execute("SELECT runops.create_environment(%s, 'e', 'PRODUCTION')",
                        [project]).fetchone()[0]  # type: ignore[index]
        for _ in range(5):
            trigger(c, env)
        leased = [r["run_id"] for r in call(c, "dequeue_runs", env, "w", 3, {})]
        one(c, "start_attempt", leased[0], "w")
        c.execute("SELECT runops.update_environment(%s, '{\"maximum_concurrency_limit\": 2}')", [env])
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as c:
        assert slots(c, env) == (3, 3, 2)
        assert_slots_match_runs(c, env)
        assert call(c, "dequeue_runs", env, "w", 3, {}) == []
        one(c, "complete_attempt", leased[0], 1, None)
        assert call(c, "dequeue_runs", env, "w", 3, {}) == []  # 2 leased: at the limit
        one(c, "cancel_run", leased[1])
        assert len(call(c, "dequeue_runs", env, "w", 3, {})) == 1
        assert slots(c, env) == (2, 2, 2)
        assert_slots_match_runs(c, env)


@pytest.mark.parametrize("store", [RUN_OPS])
def test_a_first_dequeue_lays_out_the_slots_once(client: RunOps, stores: Stores, store: str, admin,
                                                  env_id: str) -> None:
    """Concurrent first dequeues of an environment lay its slots out once, and agree."""
    limit(client, env_id, 50)
    with psycopg.connect(stores.app[store], autocommit=True) as c:
        for _ in range(20):
            trigger(c, env_id)
    got: list[int] = []

    def first(i: int) -> None:
        with psycopg.connect(stores.app[store], autocommit=True) as c:
            got.append(len(call(c, "dequeue_runs", env_id, f"w{i}", 5, {})))

    threads = [threading.Thread(target=first, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 20
    assert slots(admin, env_id) == (20, 50, 50)
