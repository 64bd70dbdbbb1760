"""New work notifies idle workers, and only when one waits for it (SPEC §4 Notifications [1.3];
sql/schema/46_waiting_workers.sql): a dequeue that finds the queue dry registers its channel, the
next run to become PENDING in the environment notifies that channel once, a batch wakes one
worker per run, filters are honoured, and with nobody waiting nothing is notified. The worker
picks a run up on that notification, long before its polling would have. Also the environment's
`notifications` setting: true, false or 'all'."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from runops.client import RUN_OPS, RunOps
from runops.errors import InvalidInput
from runops.worker import Worker
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import T0, call, one, set_clock, trigger


def channel() -> str:
    return f"runops_wake_{secrets.token_hex(8)}"


@pytest.fixture
def listener(stores: Stores, store: str) -> Iterator[Any]:
    """Opens LISTEN connections on `store`: listen(channel) -> the connection."""
    opened: list[psycopg.Connection[Any]] = []

    def listen(name: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(stores.app[store], autocommit=True)
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))
        opened.append(conn)
        return conn

    yield listen
    for conn in opened:
        conn.close()


def heard(conn: psycopg.Connection[Any], timeout: float = 0.5) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=timeout)]


def test_a_dry_dequeue_registers_and_the_next_run_notifies_its_channel_once(conn, env_id: str, listener) -> None:
    wake = channel()
    ear = listener(wake)
    assert call(conn, "dequeue_runs", env_id, "w", 4, {"wake": wake}) == []
    trigger(conn, env_id)
    assert heard(ear) == [env_id]
    trigger(conn, env_id)  # the registration was used up: the worker is on its way
    assert heard(ear) == []
    assert len(call(conn, "dequeue_runs", env_id, "w", 4, {"wake": wake})) == 2  # dry again: registers
    trigger(conn, env_id)
    assert heard(ear) == [env_id]


def test_a_full_dequeue_leaves_no_registration(conn, env_id: str, listener) -> None:
    wake = channel()
    ear = listener(wake)
    assert call(conn, "dequeue_runs", env_id, "w", 1, {"wake": wake}) == []  # registered
    trigger(conn, env_id)
    trigger(conn, env_id)
    assert heard(ear) == [env_id]
    assert len(call(conn, "dequeue_runs", env_id, "w", 1, {"wake": wake})) == 1  # got all it asked for
    trigger(conn, env_id)
    assert heard(ear) == []


def test_a_batch_wakes_one_waiting_worker_per_run(conn, env_id: str, listener) -> None:
    wakes = [channel() for _ in range(3)]
    ears = [listener(w) for w in wakes]
    for w in wakes:
        assert call(conn, "dequeue_runs", env_id, "w", 1, {"wake": w}) == []
    one(conn, "batch_trigger", env_id, [{"task": "t", "payload": {}}, {"task": "t", "payload": {}}])
    woken = [bool(heard(ear, 0.3)) for ear in ears]
    assert sorted(woken) == [False, True, True]


def test_waiting_workers_are_woken_only_for_their_environment_queues_and_tasks(conn, env_id: str, make_env,
                                                                              store: str, listener) -> None:
    other_env = make_env("cuid" if store == "CONTROL_PLANE" else "ksuid").environment_id
    by_queue, by_task = channel(), channel()
    queue_ear, task_ear = listener(by_queue), listener(by_task)
    call(conn, "dequeue_runs", env_id, "w", 1, {"wake": by_queue, "queues": ["a"]})
    call(conn, "dequeue_runs", env_id, "w", 1, {"wake": by_task, "tasks": ["x"]})
    trigger(conn, other_env, "x", queue="a")
    trigger(conn, env_id, "y", queue="b")
    assert heard(queue_ear) == [] and heard(task_ear) == []
    trigger(conn, env_id, "y", queue="a")
    assert heard(queue_ear) == [env_id] and heard(task_ear) == []
    trigger(conn, env_id, "x", queue="b")
    assert heard(task_ear) == [env_id]


def test_a_run_coming_back_to_pending_wakes_a_waiting_worker(conn, env_id: str, listener) -> None:
    wake = channel()
    ear = listener(wake)
    trigger(conn, env_id, delay=T0.isoformat())
    call(conn, "dequeue_runs", env_id, "w", 1, {"wake": wake})
    assert heard(ear) == []  # DELAYED is no work yet
    set_clock(conn, T0 + dt.timedelta(seconds=1))
    try:
        assert conn.execute("SELECT runops.tick(100)").fetchone()[0]["delayed"] == 1  # type: ignore[index]
    finally:
        set_clock(conn, None)
    assert heard(ear) == [env_id]


@pytest.mark.parametrize("store", [RUN_OPS])
def test_with_nobody_waiting_new_work_and_intermediate_moves_notify_nothing(stores: Stores, store: str,
                                                                           env_id: str, listener) -> None:
    """The trigger path never reaches the notifying code while no worker waits (counted with
    pg_stat_user_functions), and the run's intermediate moves send nothing by default."""
    ear = listener(f"runops_env_{env_id}")
    with psycopg.connect(stores.admin[store], autocommit=True) as admin:
        admin.execute("SET track_functions = 'pl'")

        def calls() -> int:
            admin.execute("SELECT pg_stat_clear_snapshot()")
            row = admin.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
                                "WHERE schemaname = 'runops' AND funcname = 'wake_waiting_workers'").fetchone()
            assert row is not None
            return int(row[0])

        admin.execute("DELETE FROM runops.waiting_workers")
        before = calls()
        for _ in range(5):
            trigger(admin, env_id)
        [run] = call(admin, "dequeue_runs", env_id, "w", 1, {})
        one(admin, "start_attempt", run["run_id"], "w")
        admin.execute("SELECT pg_stat_force_next_flush()")
        assert calls() == before
        assert heard(ear) == []
        waiting = channel()
        call(admin, "dequeue_runs", env_id, "w", 10, {"wake": waiting})  # drains the queue, then waits
        trigger(admin, env_id)
        admin.execute("SELECT pg_stat_force_next_flush()")
        assert calls() == before + 1


def test_the_worker_picks_up_new_work_on_the_notification(stores: Stores, make_env) -> None:
    """A worker that polls only every 10 s starts a run triggered while it idles within a
    fraction of a second: the notification woke it."""
    env = make_env("ksuid").environment_id
    with RunOps(stores.app["CONTROL_PLANE"], stores.app[RUN_OPS]) as ro:
        @ro.task("noop")
        def noop(ctx: Any, payload: Any) -> Any:
            return None

        worker = Worker(ro, env, ro.tasks, concurrency=2, poll_interval=(10.0, 10.0), handle_signals=False)
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            time.sleep(1.5)  # its first dequeue found nothing and registered
            runs = []
            for _ in range(3):
                runs.append(ro.trigger_run(env, "noop"))
                time.sleep(0.3)
            done = [ro.wait_for_run(r.run_id, timeout=5) for r in runs]
        finally:
            worker.stop()
            thread.join(30)
        assert [d.status for d in done] == ["COMPLETED_SUCCESSFULLY"] * 3
        for d in done:
            assert d.started_at is not None and (d.started_at - d.created_at).total_seconds() < 1.0, d


def test_expired_registrations_wake_nobody_and_are_forgotten_by_tick(conn, env_id: str, stores: Stores, store: str,
                                                                     listener) -> None:
    """A worker that stopped renewing its registration (gone without a word) is not notified."""
    wake = channel()
    ear = listener(wake)
    call(conn, "dequeue_runs", env_id, "w", 1, {"wake": wake})
    with psycopg.connect(stores.admin[store], autocommit=True) as admin:
        admin.execute("UPDATE runops.waiting_workers SET expires_at = now() - interval '1 second' "
                      "WHERE channel = %s", [wake])
        trigger(conn, env_id)
        assert heard(ear) == []
        conn.execute("SELECT runops.tick(10)")
        assert admin.execute("SELECT count(*) FROM runops.waiting_workers WHERE channel = %s",
                             [wake]).fetchone() == (0,)


def test_a_bad_wake_channel_is_invalid_input(conn, env_id: str) -> None:
    for bad in ("Upper", "with space", "x" * 64, 7):
        with pytest.raises(psycopg.Error) as err:
            call(conn, "dequeue_runs", env_id, "w", 1, {"wake": bad})
        assert sqlstate_of(err.value) == "RO006", bad


@pytest.mark.parametrize("store", [RUN_OPS])
def test_notifications_take_true_false_or_all(client: RunOps, env_id: str, stores: Stores) -> None:
    for value, stored in ((False, (False, False)), ("all", (True, True)), (True, (True, False))):
        client.update_environment(env_id, notifications=value)
        assert client.wait_for_mirror()
        for url in stores.admin.values():  # the control plane and its mirror
            with psycopg.connect(url, autocommit=True) as admin:
                assert admin.execute("SELECT notifications, notify_every_status FROM runops.runtime_environments "
                                     "WHERE id = %s", [env_id]).fetchone() == stored
    for bad in ("some", 1, ["all"]):
        with pytest.raises(InvalidInput):
            client.update_environment(env_id, notifications=bad)
    with psycopg.connect(stores.admin["CONTROL_PLANE"], autocommit=True) as admin:
        with pytest.raises(psycopg.Error) as err:
            admin.execute("SELECT runops.update_environment(%s, %s)", [env_id, Jsonb({"notifications": "ALL"})])
        assert sqlstate_of(err.value) == "RO006"
