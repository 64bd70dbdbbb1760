"""The tasks test_worker.py runs in real worker processes: `runops worker --app tests.worker_app:ro`.

The client connects from RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL, which the test sets.
"""

from __future__ import annotations

import time
from typing import Any

from runops import Backoff, RunOps, TaskContext, TaskError

ro = RunOps.connect()


@ro.task("add")
def add(ctx: TaskContext, payload: Any) -> Any:
    return {"sum": payload["a"] + payload["b"]}


@ro.task("flaky", max_attempts=3, retry=Backoff(initial=0.2, jitter=0))
def flaky(ctx: TaskContext, payload: Any) -> Any:
    if ctx.attempt_number < payload["succeed_on"]:
        raise RuntimeError(f"attempt {ctx.attempt_number} fails")
    return {"attempt": ctx.attempt_number}


@ro.task("hopeless", max_attempts=2, retry=Backoff(initial=0.2, jitter=0))
def hopeless(ctx: TaskContext, payload: Any) -> Any:
    raise ValueError("never works")


@ro.task("refuse")
def refuse(ctx: TaskContext, payload: Any) -> Any:
    raise TaskError("bad input, do not retry", retry=False)


@ro.task("parent")
def parent(ctx: TaskContext, payload: Any) -> Any:
    first = ctx.trigger_and_wait("add", {"a": 1, "b": 2})
    second = ctx.trigger_and_wait("add", {"a": first.output["sum"], "b": 10})
    return {"first": first.output, "second": second.output, "status": second.status}


@ro.task("fan-out")
def fan_out(ctx: TaskContext, payload: Any) -> Any:
    runs = ctx.batch_trigger_and_wait([{"task": "add", "payload": {"a": i, "b": i}} for i in range(payload["n"])])
    return {"sums": [r.output["sum"] for r in runs]}


@ro.task("nap")
def nap(ctx: TaskContext, payload: Any) -> Any:
    ctx.wait_for(payload["seconds"])
    return {"woke": True}


@ro.task("approval")
def approval(ctx: TaskContext, payload: Any) -> Any:
    answer = ctx.wait_for_token(payload["token"])
    return {"approved": answer}


@ro.task("slow")
def slow(ctx: TaskContext, payload: Any) -> Any:
    time.sleep(payload["seconds"])
    return {"slept": payload["seconds"]}
