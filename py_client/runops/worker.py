"""A reference worker: dequeue, start the attempt, run a built-in task, complete or fail.

Built-in tasks (anything else echoes its payload):
  echo            output = payload
  sleep           sleeps payload["seconds"] (heartbeating), output = {"slept": seconds}
  fail            fails with payload["message"]; retried after payload["retry_after"] seconds
                  while attempts remain
  wait-for-child  triggers payload["task"] with payload["payload"] and waits for it: the first
                  attempt checkpoints WAIT_FOR_TASK; when the child finishes the run resumes, the
                  same trigger returns the (cached) child, and the run completes with its output
  fan-out         batch-triggers payload["items"] and waits for the batch the same way
                  (WAIT_FOR_BATCH), completing with the batch's [{index, run_id, status}]
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from .client import RunOps
from .errors import IllegalTransition, NotFound
from .models import Run


class TaskFailed(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    run_id: str
    task: str
    attempt: int
    result: str  # completed, failed, retrying, suspended, crashed, lost


def _run_task(client: RunOps, run: Run, worker_id: str) -> object:
    payload = run.payload if isinstance(run.payload, dict) else {}
    task = run.task_identifier
    if task == "sleep":
        seconds = float(payload.get("seconds", 1))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            client.heartbeat_run(run.run_id, worker_id)
        return {"slept": seconds}
    if task == "fail":
        raise TaskFailed(str(payload.get("message", "the task failed")))
    return run.payload


def process(client: RunOps, run: Run, worker_id: str) -> Outcome:
    """Runs one dequeued run through one attempt."""
    try:
        started = client.start_attempt(run.run_id, worker_id)
    except (IllegalTransition, NotFound):
        return Outcome(run.run_id, run.task_identifier, run.attempt_number, "lost")
    n = started.attempt_number
    if started.status != "EXECUTING":
        return Outcome(run.run_id, run.task_identifier, n, started.status.lower())
    payload = started.payload if isinstance(started.payload, dict) else {}
    try:
        if started.task_identifier == "wait-for-child":
            # Idempotent: on the resumed attempt the same call returns the same child.
            child = client.trigger_run(started.environment_id, str(payload.get("task", "echo")),
                                       payload.get("payload", {}), parent_run_id=started.run_id,
                                       resume_parent_on_completion=True, idempotency_key="child")
            done = client.get_run(child.run_id)
            if done is None or not done.is_final:
                client.create_checkpoint(started.run_id, n, "WAIT_FOR_TASK", f"worker://{worker_id}/{started.run_id}")
                return Outcome(run.run_id, started.task_identifier, n, "suspended")
            output: object = {"child": done.run_id, "status": done.status, "output": done.output}
        elif started.task_identifier == "fan-out":
            # The batch key makes the resumed attempt find the same batch.
            batch = client.batch_trigger(started.environment_id, list(payload.get("items", [])),
                                         parent_run_id=started.run_id, resume_parent_on_completion=True,
                                         idempotency_key=f"{started.run_id}-fan-out")
            waitpoint = client.get_waitpoint(batch.batch_id.replace("batch_", "waitpoint_", 1))
            if waitpoint is None or waitpoint.status != "COMPLETED":
                client.create_checkpoint(started.run_id, n, "WAIT_FOR_BATCH", f"worker://{worker_id}/{started.run_id}")
                return Outcome(run.run_id, started.task_identifier, n, "suspended")
            output = {"batch": batch.batch_id, "items": waitpoint.output}
        else:
            output = _run_task(client, started, worker_id)
        client.complete_attempt(started.run_id, n, output)
        return Outcome(run.run_id, started.task_identifier, n, "completed")
    except TaskFailed as exc:
        retry_after = float(payload.get("retry_after", 1))
        retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry_after)
        failed = client.fail_attempt(started.run_id, n, {"message": str(exc)}, retry_at=retry_at)
        return Outcome(run.run_id, started.task_identifier, n,
                       "retrying" if failed.status == "RETRYING_AFTER_FAILURE" else "failed")
    except IllegalTransition:
        return Outcome(run.run_id, started.task_identifier, n, "lost")  # canceled while running


def run_worker(client: RunOps, environment_id: str, worker_id: str, *, max_runs: int = 4, once: bool = False,
               poll: float = 0.5, on_outcome: Callable[[Outcome], None] = lambda o: None,
               should_stop: Callable[[], bool] = lambda: False) -> int:
    """Works until should_stop() (or, with once, until the queue is empty). Returns runs handled."""
    handled = 0
    while not should_stop():
        runs = client.dequeue_runs(environment_id, worker_id, max_runs)
        for run in runs:
            on_outcome(process(client, run, worker_id))
            handled += 1
        if not runs:
            if once:
                break
            time.sleep(poll)
    return handled
