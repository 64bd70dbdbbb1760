"""The worker: dequeue, start the attempt, run the registered task, heartbeat, complete or fail.

    ro.run_worker(env_id, concurrency=8)                 # ro's own tasks (@ro.task)
    runops worker --app myapp.tasks:ro --env <env_id>    # the same from the shell

One thread dequeues (``dequeue_runs``, as many runs as there are free slots, each run's attempt
started in the same call: its ``start`` option) and starts a thread per run; one more heartbeats
every running attempt a third of the lease apart. A worker takes only runs of the tasks
registered with it (``dequeue_runs``' ``tasks`` option), so workers with different code share an
environment; with ``all_tasks`` it takes every run, and fails one whose task it does not know at
once (``SYSTEM_FAILURE``, error name ``UnknownTask``) — it is never faked. Each run thread
(calling ``start_attempt`` first for a run the dequeue could not start: one out of attempts,
which it crashes) runs the task function and reports ``complete_attempt`` with its result, or
``fail_attempt`` with the error and a ``retry_at`` from the task's retry policy while attempts
remain. A task that waits (``ctx.trigger_and_wait``, …) checkpoints the run and lets go of it;
see :mod:`runops.tasks` for how it continues.

Every attempt that ran its task ends with a report the store accepts, so the task never runs
again because a report failed: an output the store cannot hold (NaN, a NUL character, over the
store's size limit: checked here where it can be, else refused by the store) fails the attempt
without retry as ``InvalidOutput``; an error is cut to a bounded size before it is sent; an input
the store refused inside the task (RO006, 22P02, 22P05) is not retried; ``SystemExit``,
``KeyboardInterrupt`` and the other ``BaseException`` errors a task raises fail it without retry as
``SYSTEM_FAILURE``, and the worker carries on. What it logs is bounded too.

Stopping (SIGTERM, SIGINT or :meth:`Worker.stop`): no more dequeues; running attempts get
``grace`` seconds to finish; any still running then is released — a zero-length
``WAIT_FOR_DURATION`` checkpoint, which puts the run back to PENDING in the same transaction and
keeps its attempt (no attempt is used up, nothing waits for a lease to lapse) — so another worker
takes it at once. Its thread is abandoned; the run's next worker runs the function again.

Store outages do not stop the worker: the dequeue loop (:func:`runops.retry.run_loop`, shared
with ``tick --loop``) backs off with jitter and continues when the store is back, and reports
(complete, fail) are retried until the lease would have lapsed.

Wake-up: right after work, the next dequeue follows at once. A dequeue that finds the queue dry
registers the worker's own channel (``dequeue_runs(..., wake=)``), which a thread per store
LISTENs on: the next run to become PENDING there notifies it, once, and the worker dequeues at
once. Polling stays as the fallback (a missed notification, a dropped LISTEN connection): an
empty queue doubles the pause from ``poll_interval[0]`` up to ``poll_interval[1]``. The reference
tasks that ``runops worker`` runs without ``--app`` (echo, sleep, fail, wait-for-child, fan-out) are
tooling: :mod:`runops.ops.reference_tasks`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg

from .alerts import deliver_forever
from .errors import IllegalTransition, InvalidInput, NotFound, RunOpsError
from .models import Run
from .retry import OUTAGE_BACKOFF, TRANSIENT, run_loop
from .tasks import RunLost, Suspended, TaskContext, TaskError, TaskRegistry, json_problem

if TYPE_CHECKING:
    from .client import RunOps

log = logging.getLogger("runops.worker")

# How long a free slot may wait for others to free up, so one dequeue_runs call fills several.
BATCH_WAIT = 0.05

# Bounds on what a report quotes of a task's error and what the log quotes of anything: the
# store refuses an error over its size limit (3 MiB by default), and a log line should be read.
MESSAGE_CHARS = 4000
STACK_CHARS = 8000
LOG_CHARS = 2000
# The store refusing a value it was sent: RO006 (over a limit), or PostgreSQL's own jsonb input
# errors, raised before a function body runs: 22P02 (NaN, a lone surrogate), 22P05 (U+0000).
REFUSED_VALUE_SQLSTATES = {"22P02", "22P05"}


def cut(text: str, limit: int) -> str:
    """``text`` in at most about ``limit`` characters, and storable: no NUL, no lone surrogate."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")


def refused_value(exc: BaseException) -> bool:
    """Whether ``exc`` is the store refusing a value it was sent (retrying sends it again)."""
    if isinstance(exc, InvalidInput):
        return True
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "") in REFUSED_VALUE_SQLSTATES


def refusal_reason(exc: BaseException) -> str:
    """The store's words for a refusal, bounded."""
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        words = f"{exc.sqlstate} {diag.message_primary or exc}" + (f" ({diag.message_detail})"
                                                                   if diag.message_detail else "")
    else:
        words = str(exc)
    return cut(words, 300)


def task_error(exc: BaseException, **extra: Any) -> dict[str, Any]:
    """A failed attempt's ``error``: the exception's name, message and stack, each bounded."""
    name = type(exc).__name__
    stack = "".join(cut(part, 1000) for part in traceback.format_exception(exc))
    return {"name": cut(name, 200), "message": cut(str(exc) or name, MESSAGE_CHARS),
            "stack": cut(stack[-STACK_CHARS:], STACK_CHARS), **extra}


def invalid_output(problem: str) -> dict[str, Any]:
    return {"name": "InvalidOutput", "message": cut(f"the task's output cannot be stored: {problem}", MESSAGE_CHARS)}


@dataclass(frozen=True)
class Outcome:
    """What one pass of the worker over one run came to."""

    run_id: str
    task: str
    attempt: int
    result: str  # completed, failed, retrying, suspended, released, crashed, lost


@dataclass
class _InFlight:
    run: Run
    attempt: int | None = None  # set once start_attempt returned EXECUTING
    released: bool = False      # handed back at shutdown: this thread reports nothing more
    reporting: bool = False     # its final report is under way: too late to hand it back
    lost: threading.Event = field(default_factory=threading.Event)  # the task's ctx.lost


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Works one environment's runs with the tasks of ``tasks``. :meth:`run` blocks until
    :meth:`stop` (or a signal, when ``handle_signals``) and returns the number of runs handled."""

    def __init__(self, client: RunOps, environment_id: str, tasks: TaskRegistry, *,
                 worker_id: str | None = None, concurrency: int = 4, lease: float = 60.0, grace: float = 30.0,
                 queues: list[str] | None = None, poll_interval: tuple[float, float] = (0.05, 1.0),
                 once: bool = False, handle_signals: bool = True, all_tasks: bool = False,
                 tick: float | None = 1.0, on_outcome: Callable[[Outcome], None] = lambda o: None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if lease < 3:
            raise ValueError("lease must be at least 3 seconds")
        if tick is not None and not 1 <= tick <= 3600:
            raise ValueError("tick must be 1 to 3600 seconds, or None for a worker that does no time-driven work")
        if not all_tasks and not len(tasks):
            raise ValueError("no task is registered, so this worker would take no run (register tasks, "
                             "or work every run with all_tasks)")
        self.client = client
        self.environment_id = environment_id
        self.tasks = tasks
        self.worker_id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease = lease
        self.grace = grace
        self.queues = queues
        self.all_tasks = all_tasks
        self.poll_interval = poll_interval
        self.once = once
        # A worker that runs until stopped carries the ticker (retries, delays, leases, waits,
        # the mirror's pull): no separate process is needed. A `once` pass is a drain, not a
        # service, and leaves time-driven work to whoever runs the stores' ticker.
        self.tick = None if once else tick
        self.handle_signals = handle_signals
        self.on_outcome = on_outcome
        self.handled = 0
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._releasing = False
        self._wake = threading.Event()
        self._done = threading.Event()
        self._idle = poll_interval[0]
        self._free_since: float | None = None  # when a slot first freed up, while others were busy
        # Where the stores tell this worker that new work arrived (sql/schema/46_waiting_workers.sql).
        self._wake_channel = f"runops_wake_{secrets.token_hex(8)}"

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop dequeuing and drain (from any thread or a signal handler)."""
        self._stopping.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping.is_set():
            self.grace = 0  # a second signal: release now
        log.info("%s: %s received; draining", self.worker_id, signal.Signals(signum).name)
        self.stop()

    def run(self) -> int:
        """Works until stopped (or, with ``once``, until the queue is empty and nothing runs);
        then drains and returns the number of runs handled."""
        previous: dict[int, Any] = {}
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"{self.worker_id}-heartbeat", daemon=True)
        heartbeat.start()
        if self.tick is not None:
            threading.Thread(target=self._tick_loop, name=f"{self.worker_id}-tick", daemon=True).start()
            # The environment's alerts too, like the ticker, on every long-running worker (runops.alerts).
            threading.Thread(target=deliver_forever, args=(self.client, self.worker_id, self._done),
                             kwargs={"environment_id": self.environment_id}, name=f"{self.worker_id}-alerts",
                             daemon=True).start()
        # Behind PgBouncer a LISTEN would be lost with its server connection: polling alone.
        stores = () if self.client.behind_pgbouncer else ("RUN_OPS", "CONTROL_PLANE") if self.client.split_wired \
            else ("CONTROL_PLANE",)
        for store in stores:
            threading.Thread(target=self._wake_loop, args=(store,), name=f"{self.worker_id}-wake-{store}",
                             daemon=True).start()
        try:
            run_loop(self._dequeue_step, wake=self._wake, should_stop=self._stopping.is_set,
                     what=f"worker {self.worker_id}")
            self._drain()
        finally:
            self._stopping.set()
            self._done.set()
            for restored, handler in previous.items():
                signal.signal(restored, handler)
        return self.handled

    # -- the dequeue loop ----------------------------------------------------------------------------

    def _dequeue_step(self) -> float | None:
        with self._lock:
            free = self.concurrency - len(self._in_flight)
            busy = bool(self._in_flight)
        if free <= 0:
            self._free_since = None
            return self.poll_interval[1]  # a finishing run sets _wake
        # Each dequeue_runs call is a transaction with its commit flush: while runs are in flight,
        # a single free slot waits up to BATCH_WAIT for others to free up, so one call fills
        # several slots; a slot never stays empty for longer than that.
        if busy and free < max(1, self.concurrency // 2):
            now = time.monotonic()
            if self._free_since is None:
                self._free_since = now
            if now - self._free_since < BATCH_WAIT:
                return self._free_since + BATCH_WAIT - now
        self._free_since = None
        runs = self.client.dequeue_runs(self.environment_id, self.worker_id, free, lease=f"{int(self.lease)}s",
                                        queues=self.queues, tasks=None if self.all_tasks else self.tasks.names(),
                                        wake=None if self.client.behind_pgbouncer else self._wake_channel,
                                        start=True)
        for run in runs:
            with self._lock:
                self._in_flight[run.run_id] = _InFlight(run)
            threading.Thread(target=self._process, args=(run,), name=f"{self.worker_id}-{run.run_id}",
                             daemon=True).start()
        if runs:
            self._idle = self.poll_interval[0]
            return 0.0
        if self.once and not busy:
            return None
        pause = self._idle
        self._idle = min(self._idle * 2, self.poll_interval[1])
        return pause

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._in_flight:
                    return
            self._wake.clear()
            self._wake.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        with self._lock:
            self._releasing = True
            running = [f for f in self._in_flight.values() if f.attempt is not None and not f.reporting]
            for flight in running:
                flight.released = True
                flight.lost.set()  # the task's further context calls stop (RunLost)
        for flight in running:
            self._release(flight)
        # Runs dequeued but not yet started release themselves right after start_attempt.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with self._lock:
                if all(f.attempt is not None or f.released for f in self._in_flight.values()):
                    return
            time.sleep(0.02)

    def _release(self, flight: _InFlight) -> None:
        """Hands a running attempt back: PENDING at once, the same attempt number kept."""
        assert flight.attempt is not None and flight.released
        try:
            self._report(lambda: self.client.create_checkpoint(
                flight.run.run_id, flight.attempt or 0, "WAIT_FOR_DURATION",
                f"runops-worker://{self.worker_id}/{flight.run.run_id}/released",
                {"released_by": self.worker_id, "why": "worker shutdown"}, environment_id=self.environment_id),
                patience=5.0)
        except IllegalTransition:
            return  # it finished (or was canceled) meanwhile
        except RunOpsError as exc:
            log.warning("%s: could not release %s (%s); its lease will lapse", self.worker_id, flight.run.run_id, exc)
            return
        self._outcome(flight.run, flight.attempt, "released")

    # -- one run -------------------------------------------------------------------------------------

    def _outcome(self, run: Run, attempt: int, result: str) -> None:
        with self._lock:
            self.handled += 1
        try:
            self.on_outcome(Outcome(run.run_id, run.task_identifier, attempt, result))
        except Exception:  # a reporting callback never takes the worker down
            log.exception("on_outcome failed")

    def _report(self, call: Callable[[], Run], patience: float | None = None) -> Run:
        """A write that must land: retried through outages and conflicts until ``patience``
        seconds (default: the lease, after which the run is no longer ours anyway)."""
        deadline = time.monotonic() + (self.lease if patience is None else patience)
        failures = 0
        while True:
            try:
                return call()
            except TRANSIENT:
                failures += 1
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(OUTAGE_BACKOFF.delay(failures), max(0.0, deadline - time.monotonic())))

    def _process(self, run: Run) -> None:
        try:
            self._attempt(run)
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc))
            log.error("%s: unexpected error on %s: %s", self.worker_id, run.run_id, cut(trace[-LOG_CHARS:], LOG_CHARS))
        finally:
            with self._lock:
                self._in_flight.pop(run.run_id, None)
            self._wake.set()

    def _attempt(self, run: Run) -> None:
        flight = self._in_flight[run.run_id]
        if run.status == "EXECUTING":
            started = run  # the dequeue started its attempt (its start option)
        else:
            try:  # handed out DEQUEUED: out of attempts, start_attempt crashes it
                started = self._report(lambda: self.client.start_attempt(run.run_id, self.worker_id,
                                                                         environment_id=self.environment_id))
            except (IllegalTransition, NotFound):
                self._outcome(run, run.attempt_number, "lost")
                return
        n = started.attempt_number
        if started.status != "EXECUTING":
            self._outcome(run, n, started.status.lower())  # e.g. crashed: all attempts used
            return
        with self._lock:
            flight.attempt = n
            release_now = flight.released = self._releasing
        if release_now:
            self._release(flight)
            return
        task = self.tasks.get(started.task_identifier)
        if task is None:
            known = ", ".join(self.tasks.names()) or "none"
            error = {"name": "UnknownTask", "status": "SYSTEM_FAILURE",
                     "message": f"no task named {started.task_identifier!r} is registered with worker "
                                f"{self.worker_id} (it knows: {known})"}
            self._finish(flight, lambda: self.client.fail_attempt(run.run_id, n, error,
                                                                  environment_id=self.environment_id), "failed")
            return
        ctx = TaskContext(self.client, started, self.worker_id, self.tasks, flight.lost)
        try:
            output = task(ctx, started.payload)
        except Suspended:
            self._outcome(run, n, "suspended")
            return
        except RunLost:
            if not flight.released:
                self._outcome(run, n, "lost")
            return
        except Exception as exc:  # the task failed: report it, retry per policy
            limit = min(started.max_attempts, task.max_attempts or started.max_attempts)
            retry_at = None
            # A value the store refused inside the task would be refused again.
            if n < limit and not (isinstance(exc, TaskError) and not exc.retry) and not refused_value(exc):
                delay = exc.retry_after if isinstance(exc, TaskError) and exc.retry_after is not None \
                    else task.retry.delay(n)
                retry_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            self._fail(flight, task_error(exc), retry_at)
            return
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, ...: this attempt ends, the worker goes on
            self._fail(flight, task_error(exc, status="SYSTEM_FAILURE"))
            return
        problem = json_problem(output)
        if problem is not None:
            self._fail(flight, invalid_output(problem))
            return
        self._finish(flight, lambda: self.client.complete_attempt(run.run_id, n, output,
                                                                   environment_id=self.environment_id),
                     "completed", if_refused=lambda reason: invalid_output(f"the store refused it: {reason}"))

    def _fail(self, flight: _InFlight, error: dict[str, Any], retry_at: dt.datetime | None = None) -> None:
        n = flight.attempt or 0

        def refused(reason: str) -> dict[str, Any]:  # left: what the store accepts of any error
            return {"name": error["name"], "message": cut(f"the store refused the error report: {reason}", 1000),
                    **({"status": error["status"]} if "status" in error else {})}

        self._finish(flight, lambda: self.client.fail_attempt(flight.run.run_id, n, error, retry_at=retry_at,
                                                              environment_id=self.environment_id),
                     "retrying" if retry_at else "failed", if_refused=refused)

    def _finish(self, flight: _InFlight, call: Callable[[], Run], result: str,
                if_refused: Callable[[str], dict[str, Any]] | None = None) -> None:
        """Sends the attempt's report. Should the store refuse a value in it, the attempt fails
        instead, without retry, with the bounded error ``if_refused`` makes of the store's words:
        a dropped report would leave the run to a lapsed lease and its task to run again."""
        with self._lock:
            if flight.released:
                return  # handed back at shutdown: its next worker reports it
            flight.reporting = True
        assert flight.attempt is not None
        run_id, n = flight.run.run_id, flight.attempt
        try:
            try:
                done = self._report(call)
            except Exception as exc:
                if if_refused is None or not refused_value(exc):
                    raise
                error = if_refused(refusal_reason(exc))
                log.warning("%s: %s attempt %s: %s", self.worker_id, run_id, n, error["message"])
                done = self._report(lambda: self.client.fail_attempt(run_id, n, error,
                                                                     environment_id=self.environment_id))
                result = "failed"
        except (IllegalTransition, NotFound):
            if not flight.released:
                self._outcome(flight.run, flight.attempt, "lost")  # canceled, or the lease lapsed
            return
        if result == "retrying" and done.status != "RETRYING_AFTER_FAILURE":
            result = "failed"
        self._outcome(flight.run, flight.attempt, result)

    # -- wake-ups ------------------------------------------------------------------------------------

    def _wake_loop(self, store: str) -> None:
        """LISTENs on the worker's channel in one store and wakes the dequeue loop on each
        notification; reconnects after a failure (polling covers the gap)."""
        while not self._done.is_set():
            try:
                with self.client.listen(self.environment_id, store, channel=self._wake_channel) as conn:
                    while not self._done.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except Exception as exc:  # an outage: try again later
                log.debug("%s: wake-up channel on %s: %s", self.worker_id, store, exc)
                self._done.wait(1.0)

    # -- the ticker ------------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        """About every ``tick`` seconds, a turn at each store's time-driven work: the store runs
        a pass only when none ran within the interval and no other process is ticking it
        (``tick_when_due``), so any number of workers make one pass per interval, and a store
        that does not answer is skipped until it does."""
        assert self.tick is not None
        every = max(1, round(self.tick))
        while not self._done.wait(self.tick):
            try:
                passes = self.client.tick_when_due(every)
                # The worker whose pass found bulk-action work keeps at it at full chunk size for
                # about the interval (the pass bounds it by max_rows); idle workers ask nothing more.
                until = time.monotonic() + self.tick
                busy = any(c and c.get("bulk_processed") for c in passes.values())
                while busy and not self._done.is_set() and time.monotonic() < until:
                    busy = any(self.client.advance_bulk_actions().values())
            except Exception as exc:  # an outage, or a store too busy: the next turn tries again
                log.debug("%s: tick: %s", self.worker_id, cut(str(exc), 300))

    # -- heartbeats ----------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        every = self.lease / 3
        while not self._done.wait(every):
            with self._lock:
                beating = [f for f in self._in_flight.values() if f.attempt is not None and not f.released]
            for flight in beating:
                try:
                    self.client.heartbeat_run(flight.run.run_id, self.worker_id,
                                              environment_id=self.environment_id)
                except IllegalTransition:
                    flight.lost.set()  # canceled or taken back; its thread learns when it reports
                except Exception as exc:  # an outage: the next beat tries again
                    log.warning("%s: heartbeat of %s failed: %s", self.worker_id, flight.run.run_id,
                                cut(str(exc), LOG_CHARS))
