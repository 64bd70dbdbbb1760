"""The worker, as an application runs it: real `runops worker --app tests.worker_app:ro` processes
against the real stores, each test in its own environment. Plus the client's waiting helpers and
the status vocabulary.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops import RUN_STATUSES, AsyncRunOps, Backoff, RunOps, TaskRegistry, TriggerOptions
from runops.client import CONTROL_PLANE, RUN_OPS
from runops.models import Run

from .conftest import Stores

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[str], log: Path, env: dict[str, str]) -> None:
        self.proc = proc
        self.log = log
        self.env = env

    def output(self) -> str:
        return self.log.read_text()

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def start_worker(stores: Stores, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []
    env = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE],
           "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS], "PYTHONUNBUFFERED": "1"}

    def start(environment_id: str, *args: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "runops.ops.cli", "worker", "--app", "tests.worker_app:ro",
                                     "--env", environment_id, *args],
                                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        started.append(WorkerProcess(proc, log, env))
        return started[-1]

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
            try:
                worker.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.proc.kill()


@pytest.fixture
def ticking(client: RunOps) -> Iterator[None]:
    """`runops tick --loop` in miniature: retries and durations come due while the test waits."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.2):
            client.tick()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(5)


def wait_for_status(client: RunOps, run_id: str, status: str, timeout: float = 15) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get_run(run_id)
        assert run is not None
        if run.status == status:
            return run
        assert time.monotonic() < deadline, f"{run_id} is {run.status}, never {status}"
        time.sleep(0.05)


def test_a_task_completes_with_its_functions_result(client: RunOps, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env)
    run = client.trigger_run(env, "add", {"a": 2, "b": 3})
    done = client.wait_for_run(run.run_id, timeout=20)
    assert (done.status, done.output, done.attempt_number, done.locked_by) == (
        "COMPLETED_SUCCESSFULLY", {"sum": 5}, 1, None)


def test_failures_are_retried_by_the_tasks_policy_and_max_attempts(client: RunOps, make_env, start_worker,
                                                                   ticking) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env)
    flaky = client.trigger_run(env, "flaky", {"succeed_on": 3}, max_attempts=5)
    hopeless = client.trigger_run(env, "hopeless", {}, max_attempts=5)  # the task allows only 2
    refused = client.trigger_run(env, "refuse", {})
    done = client.wait_for_run(flaky.run_id, timeout=20)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"attempt": 3})
    failed = client.wait_for_run(hopeless.run_id, timeout=20)
    assert (failed.status, failed.attempt_number) == ("COMPLETED_WITH_ERRORS", 2)
    assert failed.error["name"] == "ValueError" and failed.error["message"] == "never works"
    assert "Traceback" in failed.error["stack"]
    not_retried = client.wait_for_run(refused.run_id, timeout=20)
    assert (not_retried.status, not_retried.attempt_number) == ("COMPLETED_WITH_ERRORS", 1)


def test_a_worker_takes_only_runs_of_its_own_tasks_and_leaves_the_rest_to_others(
        stores: Stores, client: RunOps, make_env) -> None:
    """The README's reference worker and the README's send-email run: the worker serves echo, and
    leaves send-email PENDING for a worker that knows it (the console script, as a user runs it)."""
    env = make_env("ksuid").environment_id
    email = client.trigger_run(env, "send-email", {"to": "a@example.com"}, idempotency_key="order-42")
    echo = client.trigger_run(env, "echo", {"x": 1})
    urls = {"RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}
    runops = str(Path(sys.executable).parent / "runops")
    done = subprocess.run([runops, "worker", "--env", env, "--once"], env={**os.environ, **urls},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert echo.run_id in done.stdout and email.run_id not in done.stdout
    assert client.get_run(echo.run_id).status == "COMPLETED_SUCCESSFULLY"  # type: ignore[union-attr]
    left = client.get_run(email.run_id)
    assert left is not None and (left.status, left.locked_by, left.queue) == ("PENDING", None, "task/send-email")


def test_a_task_the_worker_does_not_know_fails_with_a_clear_error(client: RunOps, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env, "--all-tasks")
    run = client.trigger_run(env, "no-such-task", {"x": 1})
    done = client.wait_for_run(run.run_id, timeout=20)
    assert done.status == "SYSTEM_FAILURE" and done.output is None
    assert done.error["name"] == "UnknownTask"
    assert "'no-such-task'" in done.error["message"] and "add" in done.error["message"]


@pytest.mark.parametrize("mint_kind", ["cuid", "ksuid"])  # runs on the control plane, then on run-ops
def test_trigger_and_wait_resumes_the_parent_with_each_childs_result(client: RunOps, make_env, start_worker,
                                                                     mint_kind: str) -> None:
    env = make_env(mint_kind).environment_id
    start_worker(env)
    parent = client.trigger_run(env, "parent", {})
    done = client.wait_for_run(parent.run_id, timeout=20)
    assert done.status == "COMPLETED_SUCCESSFULLY", done.error
    assert done.output == {"first": {"sum": 3}, "second": {"sum": 13}, "status": "COMPLETED_SUCCESSFULLY"}
    assert done.attempt_number == 1  # suspended twice, one attempt throughout


def test_batch_and_wait_returns_every_run_in_item_order(client: RunOps, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env, "--concurrency", "4")
    parent = client.trigger_run(env, "fan-out", {"n": 4})
    done = client.wait_for_run(parent.run_id, timeout=20)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"sums": [0, 2, 4, 6]})


def test_wait_for_a_duration_suspends_until_tick_finds_it_due(client: RunOps, make_env, start_worker,
                                                              ticking) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env)
    began = time.monotonic()
    run = client.trigger_run(env, "nap", {"seconds": 1})
    waiting = wait_for_status(client, run.run_id, "WAITING_TO_RESUME")
    assert waiting.locked_by is None and waiting.suspended_reason == "WAIT_FOR_DURATION"
    done = client.wait_for_run(run.run_id, timeout=20)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"woke": True})
    assert time.monotonic() - began >= 1.0


def test_the_worker_runs_the_time_driven_work_itself_and_no_tick_leaves_it(client: RunOps, make_env,
                                                                          start_worker) -> None:
    """No `runops tick --loop` anywhere: a worker's own ticker wakes a duration wait; with
    --no-tick the same wait stays asleep past its time."""
    env = make_env("ksuid").environment_id
    idle = start_worker(env, "--no-tick")
    run = client.trigger_run(env, "nap", {"seconds": 1})
    wait_for_status(client, run.run_id, "WAITING_TO_RESUME")
    time.sleep(3)
    still = client.get_run(run.run_id)
    assert still is not None and still.status == "WAITING_TO_RESUME"
    assert idle.terminate() == 0
    start_worker(env)
    done = client.wait_for_run(run.run_id, timeout=20)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"woke": True})


def test_tick_when_due_makes_one_pass_per_interval_whoever_asks(stores: Stores) -> None:
    """Many workers ask; the store ticks when no pass ran within the interval, and only one of
    the concurrent askers does it."""
    url = stores.app[RUN_OPS]
    with psycopg.connect(url, autocommit=True) as first, psycopg.connect(url, autocommit=True) as second:
        time.sleep(1.1)  # past any pass another test made
        did = first.execute("SELECT runops.tick_when_due(1)").fetchone()
        assert did is not None and isinstance(did[0], dict) and "delayed" in did[0]
        assert second.execute("SELECT runops.tick_when_due(1)").fetchone() == (None,)  # within the interval
        time.sleep(1.1)
        with second.transaction():
            # While one asker holds the ticker's turn, a concurrent one skips at once.
            assert second.execute("SELECT runops.tick_when_due(1)").fetchone()[0] is not None
            started = time.monotonic()
            assert first.execute("SELECT runops.tick_when_due(1)").fetchone() == (None,)
            assert time.monotonic() - started < 1.0
        with pytest.raises(psycopg.Error) as bad:
            first.execute("SELECT runops.tick_when_due(0)")
        assert bad.value.sqlstate == "RO006"


def test_wait_for_a_token_returns_what_completed_it(client: RunOps, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env)
    token = client.create_waitpoint(env, "MANUAL")
    run = client.trigger_run(env, "approval", {"token": token.waitpoint_id})
    wait_for_status(client, run.run_id, "WAITING_TO_RESUME")
    client.complete_waitpoint(token.waitpoint_id, {"by": "alice"})
    done = client.wait_for_run(run.run_id, timeout=20)
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"approved": {"by": "alice"}})


def test_heartbeats_keep_the_lease_of_an_attempt_longer_than_it(client: RunOps, make_env, start_worker,
                                                                ticking) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env, "--lease", "3")  # a heartbeat every second; tick would take back a lapsed lease
    run = client.trigger_run(env, "slow", {"seconds": 4})
    done = client.wait_for_run(run.run_id, timeout=20)
    assert (done.status, done.attempt_number) == ("COMPLETED_SUCCESSFULLY", 1)


def test_sigterm_finishes_short_attempts_and_hands_back_the_rest(client: RunOps, make_env,
                                                                 start_worker) -> None:
    env = make_env("ksuid").environment_id
    first = start_worker(env, "--concurrency", "2", "--grace", "1.5", "--id", "first")
    short = client.trigger_run(env, "slow", {"seconds": 0.5})
    long = client.trigger_run(env, "slow", {"seconds": 60})
    wait_for_status(client, short.run_id, "EXECUTING")
    wait_for_status(client, long.run_id, "EXECUTING")
    began = time.monotonic()
    assert first.terminate() == 0, first.output()
    assert time.monotonic() - began < 6
    assert client.get_run(short.run_id).status == "COMPLETED_SUCCESSFULLY"  # type: ignore[union-attr]
    released = client.get_run(long.run_id)
    assert released is not None
    assert (released.status, released.locked_by, released.attempt_number) == ("PENDING", None, 1)
    assert "released" in first.output()
    # Another worker takes it at once (no lease to lapse), continuing the same attempt.
    start_worker(env, "--id", "second", "--grace", "0")
    again = wait_for_status(client, long.run_id, "EXECUTING")
    assert (again.locked_by, again.attempt_number) == ("second", 1)
    client.cancel_run(long.run_id, "test over")


def test_run_worker_in_process_runs_the_clients_own_tasks(stores: Stores, make_env) -> None:
    env = make_env("ksuid").environment_id
    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as ro:
        @ro.task("double")
        def double(ctx: Any, payload: Any) -> Any:
            return payload * 2

        run = ro.trigger_run(env, "double", 21)
        seen: list[Any] = []
        assert ro.run_worker(env, concurrency=2, once=True, handle_signals=False, on_outcome=seen.append) == 1
        assert [(o.run_id, o.result) for o in seen] == [(run.run_id, "completed")]
        assert ro.get_run(run.run_id).output == 42  # type: ignore[union-attr]


# -- waiting -------------------------------------------------------------------------------------------


def _finish(client: RunOps, env: str, queue: str) -> None:
    [taken] = client.dequeue_runs(env, "w", 1, queues=[queue])
    client.start_attempt(taken.run_id, "w")
    client.complete_attempt(taken.run_id, 1, {"ok": True})


def test_wait_for_run_survives_a_dropped_listen_connection(stores: Stores, client: RunOps, make_env,
                                                           ro_admin: psycopg.Connection[Any]) -> None:
    env = make_env("ksuid").environment_id
    run = client.trigger_run(env, "t", {}, queue="dropped")
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(client.wait_for_run(run.run_id, timeout=20,
                                                                            poll_interval=0.5)))
    waiter.start()
    channel = f"%LISTEN%runops_env_{env}%"
    deadline = time.monotonic() + 10
    while not ro_admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE %s "
                               "AND pid <> pg_backend_pid()", [channel]).fetchall():
        assert time.monotonic() < deadline, "no LISTEN connection appeared"
        time.sleep(0.05)
    _finish(client, env, "dropped")
    waiter.join(20)
    assert got and got[0].status == "COMPLETED_SUCCESSFULLY"


def test_wait_for_run_times_out_and_wait_for_batch_returns_the_final_batch(client: RunOps, make_env) -> None:
    env = make_env("ksuid").environment_id
    pending = client.trigger_run(env, "t", {}, queue="never")
    with pytest.raises(TimeoutError, match="still PENDING"):
        client.wait_for_run(pending.run_id, timeout=0.3)
    batch = client.batch_trigger(env, [{"task": "t", "payload": {}, "options": {"queue": "b"}} for _ in range(2)])
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(client.wait_for_batch(batch.batch_id, timeout=20)))
    waiter.start()
    time.sleep(0.2)
    _finish(client, env, "b")
    _finish(client, env, "b")
    waiter.join(20)
    assert got and got[0].status == "COMPLETED" and got[0].item_count == 2


def test_the_async_client_triggers_waits_and_completes_tokens(stores: Stores, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    start_worker(env)

    async def scenario() -> None:
        async with AsyncRunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as aro:
            run = await aro.trigger_run(env, "add", {"a": 20, "b": 22}, idempotency_key="k")
            assert (await aro.trigger_run(env, "add", {"a": 20, "b": 22}, idempotency_key="k")).is_cached
            done = await aro.wait_for_run(run.run_id, timeout=20)
            assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"sum": 42})
            token = await aro.create_waitpoint(env, "MANUAL")
            waiting = await aro.trigger_run(env, "approval", {"token": token.waitpoint_id})
            while (await aro.get_run(waiting.run_id)).status != "WAITING_TO_RESUME":  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
            assert (await aro.complete_waitpoint(token.waitpoint_id, "yes")).completed_now
            assert (await aro.wait_for_run(waiting.run_id, timeout=20)).output == {"approved": "yes"}
            batch = await aro.batch_trigger(env, [{"task": "add", "payload": {"a": i, "b": 1}} for i in range(3)])
            assert (await aro.wait_for_batch(batch.batch_id, timeout=20)).status == "COMPLETED"
            pending = await aro.trigger_run(env, "add", {"a": 0, "b": 0}, delay="1h")
            with pytest.raises(TimeoutError, match="still DELAYED"):
                await aro.wait_for_run(pending.run_id, timeout=0.3)
            assert (await aro.cancel_run(pending.run_id)).status == "CANCELED"

    asyncio.run(scenario())


# -- types and the API --------------------------------------------------------------------------------


def test_run_status_is_the_sql_vocabulary(stores: Stores, store: str) -> None:
    with psycopg.connect(stores.admin[store]) as conn:
        rows = conn.execute("SELECT from_status FROM runops.status_transitions UNION "
                            "SELECT to_status FROM runops.status_transitions").fetchall()
    assert {r[0] for r in rows} - {"NEW"} == RUN_STATUSES  # NEW: "the row does not exist yet"


def test_trigger_options_are_the_sql_option_names() -> None:
    source = (ROOT / "sql" / "functions" / "options.sql").read_text()  # parse_trigger_options
    allowed = re.search(r"allowed constant text\[\] := ARRAY\[(.*?)\];", source, re.S)
    assert allowed is not None
    assert set(re.findall(r"'(\w+)'", allowed.group(1))) == set(TriggerOptions.__optional_keys__)


def test_task_registry_refuses_duplicates_and_backoff_grows_within_bounds() -> None:
    tasks = TaskRegistry()
    tasks.task("a")(lambda ctx, payload: None)
    with pytest.raises(ValueError, match="already registered"):
        tasks.task("a")(lambda ctx, payload: None)
    policy = Backoff(initial=1, factor=2, maximum=5, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert all(0.5 <= Backoff(initial=1, jitter=0.5).delay(1) <= 1.5 for _ in range(100))


# -- last: it restarts the run-ops store under the session's other fixtures ---------------------------


def test_the_worker_waits_out_a_store_restart(stores: Stores, client: RunOps, make_env, start_worker) -> None:
    env = make_env("ksuid").environment_id
    worker = start_worker(env)
    ticker = subprocess.Popen([sys.executable, "-m", "runops.ops.cli", "tick", "--loop", "--interval", "0.2"],
                              cwd=ROOT, env=worker.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before = client.trigger_run(env, "add", {"a": 1, "b": 1})
    assert client.wait_for_run(before.run_id, timeout=20).status == "COMPLETED_SUCCESSFULLY"
    cluster, bindir = stores.local.clusters[RUN_OPS], Path(stores.local.bindir)
    cluster.stop(bindir)
    time.sleep(1.5)  # the worker's dequeues fail meanwhile
    cluster.start(bindir)
    client._pools[RUN_OPS].check()  # the session client's pooled connections died with the server
    after = client.trigger_run(env, "add", {"a": 2, "b": 2})
    assert client.wait_for_run(after.run_id, timeout=30).output == {"sum": 4}
    assert worker.proc.poll() is None, worker.output()
    assert "unavailable" in worker.output() and "back" in worker.output()
    assert ticker.poll() is None  # tick --loop lived through it too (its pool reconnects, or it backs off)
    ticker.send_signal(signal.SIGTERM)
    _, err = ticker.communicate(timeout=15)
    assert ticker.returncode == 0, err
