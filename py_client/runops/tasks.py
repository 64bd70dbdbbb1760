"""The task API: functions registered by name, and the context they run with.

    ro = RunOps.connect()

    @ro.task("send-email", max_attempts=5, retry=Backoff(initial=2))
    def send_email(ctx: TaskContext, payload: dict) -> dict:
        child = ctx.trigger_and_wait("render", {"template": payload["template"]})
        ctx.wait_for(60)                                 # a durable wait: the worker lets go
        return {"sent": True, "html": child.output}

    ro.run_worker(env_id, concurrency=8)               # or: runops worker --app app:ro --env ...

A task function takes ``(ctx, payload)`` and returns anything JSON can hold; that is the run's
output. An exception fails the attempt; the worker retries it per ``retry`` while attempts remain
(the smaller of ``max_attempts`` and the run's own ``max_attempts``). Raise :class:`TaskError` with
``retry=False`` to fail at once, or ``retry_after=`` to choose the delay.

**Waits replay.** ``ctx.trigger_and_wait``, ``ctx.batch_trigger_and_wait``, ``ctx.wait_for``,
``ctx.wait_until`` and ``ctx.wait_for_token`` suspend the run when what they wait for is not done
yet: the worker writes a checkpoint (``create_checkpoint`` with a ``WAIT_FOR_*`` reason, SPEC §4)
and stops running the function. When the run resumes, a worker runs the function again *from the
top*, in the same attempt. Every wait is numbered by its position in the function (step 1, 2, …)
and keyed by it, so on the re-run each wait that already finished finds its child, batch or
waitpoint again (idempotency keys) and returns its recorded result at once, and the function
continues to the next one. So: the order of waits must not depend on anything but the payload and
earlier wait results, and code between waits may run more than once (make it idempotent, or put
it in a child task). docs/decisions.md has the reasoning.

**Values the store cannot hold.** JSON has no NaN or Infinity, and PostgreSQL's ``jsonb`` holds no
NUL character (U+0000). A context call refuses such a payload before sending it
(:class:`InvalidPayload`, never retried); the worker ends an attempt whose output is one, or
that the store refuses, with ``InvalidOutput`` (:mod:`runops.worker`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Unpack

from .models import ChildTriggerOptions, Run
from .retry import Backoff, call_with_retry

if TYPE_CHECKING:
    from .client import RunOps

TaskFunction = Callable[["TaskContext", Any], Any]

DEFAULT_TASK_RETRY = Backoff(initial=1.0, factor=2.0, maximum=300.0, jitter=0.2)


class TaskError(Exception):
    """Raise from a task to fail the attempt with control over the retry: ``retry=False`` fails
    the run now; ``retry_after`` (seconds) replaces the task's backoff for this failure."""

    def __init__(self, message: str, *, retry: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after


class InvalidPayload(TaskError):
    """A context call was given a value the store cannot hold (see :func:`json_problem`). Never
    retried: the task would compute the same value again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry=False)


# A \u0000 escape in JSON text: preceded by an even number of backslashes (escaped backslashes).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def json_problem(value: Any) -> str | None:
    """Why the store cannot hold ``value`` as JSON, in a short phrase; None when it can, as far
    as can be told without asking it: not JSON at all, NaN or Infinity (PostgreSQL refuses them,
    22P02), a NUL character (``jsonb`` cannot hold U+0000, 22P05). Sizes are the store's to judge:
    its limit is set per store (``store_config.max_json_bytes``)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" in str(exc):
            return "it holds NaN or Infinity, which JSON cannot carry"
        return f"it is not JSON ({str(exc)[:100]})"
    except (TypeError, RecursionError) as exc:
        return f"it is not JSON ({type(exc).__name__}: {str(exc)[:100]})"
    if _NUL_ESCAPE.search(text):
        return "it holds a NUL character (U+0000), which the store's JSON cannot hold"
    return None


def _require_storable(value: Any, what: str) -> None:
    problem = json_problem(value)
    if problem is not None:
        raise InvalidPayload(f"the {what} cannot be stored: {problem}")


class TokenFailed(Exception):
    """A waited-for token completed as an error (``is_error``), or timed out."""

    def __init__(self, waitpoint_id: str, output: Any) -> None:
        super().__init__(f"{waitpoint_id} completed with an error: {output!r}")
        self.waitpoint_id = waitpoint_id
        self.output = output


class Suspended(BaseException):  # noqa: N818 — a control-flow signal, like GeneratorExit
    """Raised by a context wait after it checkpointed the run, to unwind the task function.
    A BaseException so that a task's ``except Exception`` does not swallow it."""

    def __init__(self, run: Run, reason: str) -> None:
        super().__init__(f"{run.run_id} suspended: {reason}")
        self.run = run
        self.reason = reason


class RunLost(BaseException):  # noqa: N818 — a control-flow signal
    """Raised by a context call once the run is no longer this worker's (handed back at
    shutdown, canceled, or its lease lapsed), so an abandoned task stops touching it."""


@dataclass(frozen=True)
class Task:
    """A registered task: ``name`` is the run's task identifier."""

    name: str
    fn: TaskFunction
    max_attempts: int | None = None
    retry: Backoff = DEFAULT_TASK_RETRY

    def __call__(self, ctx: TaskContext, payload: Any) -> Any:
        return self.fn(ctx, payload)


class TaskRegistry:
    """Tasks by name. ``RunOps.task`` registers into the client's own registry; a bare registry
    works too (``runops worker --app module:registry``)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def task(self, name: str, *, max_attempts: int | None = None,
             retry: Backoff | None = None) -> Callable[[TaskFunction], Task]:
        """Decorator: registers ``fn(ctx, payload)`` as task ``name``."""
        if max_attempts is not None and not 1 <= max_attempts <= 250:
            raise ValueError(f"max_attempts must be from 1 to 250, got {max_attempts}")

        def register(fn: TaskFunction) -> Task:
            return self.register(Task(name, fn, max_attempts, retry or DEFAULT_TASK_RETRY))

        return register

    def register(self, task: Task) -> Task:
        """Adds a task; a second task with the same name is an error."""
        if not task.name or len(task.name) > 128:
            raise ValueError("a task name must be 1 to 128 characters")
        if task.name in self._tasks and self._tasks[task.name] is not task:
            raise ValueError(f"a task named {task.name!r} is already registered")
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> Task | None:
        """The task registered as ``name``, or None."""
        return self._tasks.get(name)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)


@dataclass
class TaskContext:
    """What a running task knows and can do. ``run`` is the run as its attempt started."""

    client: RunOps
    run: Run
    worker_id: str
    registry: TaskRegistry | None = None
    lost: threading.Event = field(default_factory=threading.Event)
    """Set when a heartbeat finds the run no longer this worker's (canceled, or its lease
    lapsed): a long task may check ``ctx.lost.is_set()`` and stop early."""
    _step: int = field(default=0, repr=False)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def attempt_number(self) -> int:
        return self.run.attempt_number

    @property
    def environment_id(self) -> str:
        return self.run.environment_id

    # -- the replay machinery ---------------------------------------------------------------------
    # Writes go through call_with_retry: a retryable conflict rolled the call back, so sending it
    # again is always safe (and the keys make a repeat find what the first call made).

    def _next_step(self) -> int:
        if self.lost.is_set():
            raise RunLost(f"{self.run_id} is no longer this worker's")
        self._step += 1
        return self._step

    def _key(self, kind: str, step: int) -> str:
        """An environment-wide idempotency key for this attempt's wait number ``step``."""
        return f"{self.run_id}:{self.attempt_number}:{kind}:{step}"

    def _suspend(self, reason: str, step: int) -> Suspended:
        """Checkpoints the run (it resumes at once if nothing blocks it any more)."""
        if self.lost.is_set():
            raise RunLost(f"{self.run_id} is no longer this worker's")
        suspended = call_with_retry(lambda: self.client.create_checkpoint(
            self.run_id, self.attempt_number, reason, f"runops-worker://{self.worker_id}/{self.run_id}/step-{step}",
            {"step": step}, environment_id=self.environment_id))
        return Suspended(suspended, reason)

    # -- waits ------------------------------------------------------------------------------------

    def trigger_and_wait(self, task: str, payload: Any = None, **options: Unpack[ChildTriggerOptions]) -> Run:
        """Triggers a child run and returns it once final (check ``.status``; ``.output`` holds
        the result). Suspends this run until then. Options are ``trigger_run``'s; the child's
        ``max_attempts`` defaults to that of the task registered under that name here."""
        _require_storable(payload, f"payload of child task {task[:128]!r}")
        step = self._next_step()
        known = self.registry.get(task) if self.registry is not None else None
        if known is not None and known.max_attempts is not None:
            options.setdefault("max_attempts", known.max_attempts)
        child = call_with_retry(lambda: self.client.trigger_run(
            self.environment_id, task, payload, parent_run_id=self.run_id, parent_attempt_number=self.attempt_number,
            resume_parent_on_completion=True, idempotency_key=f"step-{step}", idempotency_key_scope="attempt",
            **options))
        done = self.client.get_run(child.run_id)
        if done is not None and done.is_final:
            return done
        raise self._suspend("WAIT_FOR_TASK", step)

    def batch_trigger_and_wait(self, items: list[dict[str, Any]]) -> list[Run]:
        """Triggers a batch of child runs (items as for ``batch_trigger``: ``{task, payload,
        options}``) and returns them, in item order, once all are final. Suspends until then."""
        _require_storable(items, "batch of child tasks")
        step = self._next_step()
        batch = call_with_retry(lambda: self.client.batch_trigger(
            self.environment_id, items, parent_run_id=self.run_id, resume_parent_on_completion=True,
            idempotency_key=self._key("batch", step)))
        got = self.client.get_batch(batch.batch_id)
        if got is not None and got.status in ("COMPLETED", "ABORTED"):
            runs = [self.client.get_run(run_id) for run_id in got.run_ids]
            return [r for r in runs if r is not None]
        raise self._suspend("WAIT_FOR_BATCH", step)

    def wait_for(self, seconds: float | dt.timedelta) -> None:
        """Waits this long (whole seconds, rounded up), durably: the run is suspended and a
        worker picks it up again once ``tick`` finds the time has come."""
        total = seconds.total_seconds() if isinstance(seconds, dt.timedelta) else float(seconds)
        self._wait_datetime(f"{max(0, math.ceil(total))}s")

    def wait_until(self, at: dt.datetime) -> None:
        """Waits until ``at`` (timezone-aware), durably, like :meth:`wait_for`."""
        if at.tzinfo is None:
            raise ValueError("wait_until needs a timezone-aware datetime")
        self._wait_datetime(at.isoformat())

    def _wait_datetime(self, completed_after: str) -> None:
        step = self._next_step()
        # The key holds the due time fixed at the first run; a re-run finds the same waitpoint.
        waitpoint = call_with_retry(lambda: self.client.create_waitpoint(
            self.environment_id, "DATETIME", completed_after=completed_after, idempotency_key=self._key("wait", step)))
        self._block_until_done(waitpoint.waitpoint_id, "WAIT_FOR_DURATION", step)

    def create_token(self, *, timeout: str | None = None, tags: list[str] | None = None) -> str:
        """A MANUAL waitpoint (a token) for someone else to complete with ``complete_waitpoint``;
        the same one on every re-run of this attempt. ``timeout`` is a duration like ``1h``."""
        step = self._next_step()
        return call_with_retry(lambda: self.client.create_waitpoint(
            self.environment_id, "MANUAL", timeout=timeout, tags=tags,
            idempotency_key=self._key("token", step))).waitpoint_id

    def wait_for_token(self, waitpoint_id: str) -> Any:
        """Waits until the token (a MANUAL waitpoint) is completed and returns its output;
        raises :class:`TokenFailed` when it completed as an error (or timed out)."""
        step = self._next_step()
        done = self._block_until_done(waitpoint_id, "WAIT_FOR_TASK", step)
        if done.output_is_error:
            raise TokenFailed(waitpoint_id, done.output)
        return done.output

    def _block_until_done(self, waitpoint_id: str, reason: str, step: int) -> Any:
        # Block first, then look: a completion between the two is seen by the checkpoint, which
        # resumes at once when nothing blocks the run.
        call_with_retry(lambda: self.client.block_run(self.run_id, [waitpoint_id], environment_id=self.environment_id))
        waitpoint = self.client.get_waitpoint(waitpoint_id)
        if waitpoint is not None and waitpoint.status == "COMPLETED":
            return waitpoint
        raise self._suspend(reason, step)
