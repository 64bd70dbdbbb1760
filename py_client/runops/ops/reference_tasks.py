"""The reference tasks: what ``runops worker`` runs without ``--app``, and what the demo and the
tests trigger (echo, sleep, fail, wait-for-child, fan-out). Tooling, not the client: an
application registers its own tasks (``@ro.task``) and runs them with ``ro.run_worker``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from runops.client import RunOps
from runops.tasks import TaskContext, TaskError, TaskRegistry
from runops.worker import Outcome, Worker


def run_worker(client: RunOps, environment_id: str, worker_id: str | None = None, *,
               tasks: TaskRegistry | None = None, concurrency: int | None = None, max_runs: int | None = None,
               once: bool = False, on_outcome: Callable[[Outcome], None] = lambda o: None,
               should_stop: Callable[[], bool] | None = None, **options: Any) -> int:
    """Runs a :class:`Worker` (the reference tasks unless ``tasks`` is given) and returns the
    number of runs handled. ``max_runs`` is the older name of ``concurrency``; ``should_stop``
    is polled every 0.1 s; ``options`` go to :class:`Worker`."""
    worker = Worker(client, environment_id, REFERENCE_TASKS if tasks is None else tasks, worker_id=worker_id,
                    concurrency=concurrency or max_runs or 4, once=once, on_outcome=on_outcome, **options)
    if should_stop is not None:
        def watch() -> None:
            while not worker._stopping.wait(0.1):
                if should_stop():
                    worker.stop()

        threading.Thread(target=watch, daemon=True).start()
    return worker.run()


# -- the reference tasks --------------------------------------------------------------------------------

REFERENCE_TASKS = TaskRegistry()


@REFERENCE_TASKS.task("echo")
def _echo(ctx: TaskContext, payload: Any) -> Any:
    """output = payload"""
    return payload


@REFERENCE_TASKS.task("sleep")
def _sleep(ctx: TaskContext, payload: Any) -> Any:
    """Sleeps payload["seconds"] (the worker heartbeats meanwhile)."""
    seconds = float((payload or {}).get("seconds", 1))
    time.sleep(seconds)
    return {"slept": seconds}


@REFERENCE_TASKS.task("fail")
def _fail(ctx: TaskContext, payload: Any) -> Any:
    """Fails with payload["message"]; retried after payload["retry_after"] seconds while attempts remain."""
    p = payload or {}
    raise TaskError(str(p.get("message", "the task failed")), retry_after=float(p.get("retry_after", 1)))


@REFERENCE_TASKS.task("wait-for-child")
def _wait_for_child(ctx: TaskContext, payload: Any) -> Any:
    """Triggers payload["task"] with payload["payload"], waits for it, returns its outcome."""
    p = payload or {}
    child = ctx.trigger_and_wait(str(p.get("task", "echo")), p.get("payload", {}))
    return {"child": child.run_id, "status": child.status, "output": child.output}


@REFERENCE_TASKS.task("fan-out")
def _fan_out(ctx: TaskContext, payload: Any) -> Any:
    """Batch-triggers payload["items"], waits for all, returns [{index, run_id, status}]."""
    runs = ctx.batch_trigger_and_wait(list((payload or {}).get("items", [])))
    return {"batch": runs[0].batch_id if runs else None,
            "items": [{"index": i, "run_id": r.run_id, "status": r.status} for i, r in enumerate(runs)]}
