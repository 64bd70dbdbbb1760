"""The asyncio client: :class:`AsyncRunOps`, the application-facing methods of :class:`RunOps`
on psycopg ``AsyncConnectionPool`` s, with the same routing, SQL, results and exceptions.

    async with await AsyncRunOps.connect() as ro:
        run = await ro.trigger_run(env_id, "send-email", {"to": "a@example.com"}, idempotency_key="order-42")
        done = await ro.wait_for_run(run.run_id, timeout=60)

It covers triggering (single and batch), reads, cancel, waitpoints, the worker's per-run calls,
``tick`` and waiting; operator calls (tenants, split control, mirror, purge) stay on the sync
client. A task worker is the sync :class:`runops.worker.Worker` (one thread per running
attempt): an async application triggers and waits here and runs its workers as processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import class_row, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import ids
from .client import CONTROL_PLANE, ROUTE_CACHE_SECONDS, RUN_OPS, _items, _options
from .errors import NotFound, RunOpsError, StoreUnavailable, WrongStore, translate
from .models import (
    FINAL_STATUSES,
    Batch,
    BatchTriggered,
    Run,
    TriggerResult,
    Waitpoint,
    WaitpointCompletion,
    WaitpointCreated,
)

T = TypeVar("T")


class AsyncRunOps:
    """asyncio client for both stores. Use ``await AsyncRunOps.connect()`` (or ``async with``)."""

    def __init__(self, control_plane_url: str, run_ops_url: str | None = None, *,
                 max_pool_size: int = 8, timeout: float = 10.0) -> None:
        self._urls: dict[str, str] = {CONTROL_PLANE: control_plane_url}
        if run_ops_url and run_ops_url != control_plane_url:
            self._urls[RUN_OPS] = run_ops_url
        self._timeout = timeout
        self._routes: dict[str, tuple[str, float]] = {}
        self._pools = {store: AsyncConnectionPool(url, min_size=1, max_size=max_pool_size, open=False,
                                                  kwargs={"autocommit": True}, name="runops-async")
                       for store, url in self._urls.items()}

    @classmethod
    async def connect(cls, control_plane_url: str | None = None, run_ops_url: str | None = None,
                      **kwargs: Any) -> AsyncRunOps:
        """Like :meth:`RunOps.connect` (URLs, else RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL,
        else the local dev stores), with the pools opened."""
        if "timeout" not in kwargs and os.environ.get("RUNOPS_TIMEOUT"):
            kwargs["timeout"] = float(os.environ["RUNOPS_TIMEOUT"])
        cp = control_plane_url or os.environ.get("RUNOPS_CONTROL_PLANE_URL")
        ro = run_ops_url or os.environ.get("RUNOPS_RUN_OPS_URL")
        if not cp:
            from .local_cluster import LocalStores

            urls = LocalStores.from_cwd().app_urls()
            cp, ro = urls[CONTROL_PLANE], ro or urls[RUN_OPS]
        client = cls(cp, ro, **kwargs)
        await client.open()
        return client

    async def open(self) -> None:
        """Opens the pools (``connect`` and ``async with`` do it)."""
        for pool in self._pools.values():
            await pool.open(wait=False)

    async def close(self) -> None:
        """Closes the pools."""
        for pool in self._pools.values():
            await pool.close()

    async def __aenter__(self) -> AsyncRunOps:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def split_wired(self) -> bool:
        return RUN_OPS in self._pools

    # -- plumbing -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self, store: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        pool = self._pools.get(store)
        if pool is None:
            raise StoreUnavailable(f"no {store} store is configured")
        try:
            async with pool.connection(timeout=self._timeout) as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailable(f"the {store} store is unavailable: {exc}") from exc
        except psycopg.Error as exc:
            raise translate(exc) from exc

    async def _rows(self, store: str, query: str, params: dict[str, Any], cls: type[T]) -> list[T]:
        async with self._connection(store) as conn, conn.cursor(row_factory=class_row(cls)) as cur:
            await cur.execute(query, params, prepare=True)
            return await cur.fetchall()

    async def _scalar(self, store: str, query: str, params: dict[str, Any]) -> Any:
        async with self._connection(store) as conn, conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(query, params, prepare=True)
            row = await cur.fetchone()
            return None if row is None else row[0]

    def _write_store_of(self, id_: str) -> str:
        store = ids.store_for(ids.classify_residency(id_))
        if store == RUN_OPS and not self.split_wired:
            raise NotFound(f"{id_} not found: no run-ops store is configured")
        return store

    def _read_store_of(self, id_: str) -> str | None:
        residency = ids.try_classify_residency(id_)
        if residency is None or ids.store_for(residency) not in self._pools:
            return None
        return ids.store_for(residency)

    async def _with_wrong_store_retry(self, store: str, call: Callable[[str], Awaitable[T]]) -> T:
        try:
            return await call(store)
        except WrongStore as exc:
            other = exc.owning_store
            if other is None or other == store or other not in self._pools:
                raise
            return await call(other)

    async def _trigger_store(self, environment_id: str, options: dict[str, Any]) -> str:
        """The store for a trigger: its anchor's (run, parent, batch), else the environment's root
        route cached for a second — as :class:`RunOps` decides it."""
        for anchor in ("run_id", "parent_run_id", "batch_id"):
            value = options.get(anchor)
            if value is not None:
                residency = ids.try_classify_residency(value)
                if residency is None:
                    return CONTROL_PLANE
                store = ids.store_for(residency)
                return store if store in self._pools else CONTROL_PLANE
        now = time.monotonic()
        hit = self._routes.get(environment_id)
        if hit and hit[1] > now:
            store = hit[0]
        else:
            try:
                store = await self.trigger_route(environment_id)
            except RunOpsError:
                return CONTROL_PLANE
            self._routes[environment_id] = (store, now + ROUTE_CACHE_SECONDS)
        return store if store in self._pools else CONTROL_PLANE

    # -- triggering and reads -----------------------------------------------------------------------

    async def trigger_route(self, environment_id: str, **options: Any) -> str:
        """The store a root trigger of the environment goes to (``trigger_route``)."""
        return str(await self._scalar(CONTROL_PLANE, "SELECT runops.trigger_route(%(e)s, %(o)s)",
                                      {"e": environment_id, "o": _options(options)}))

    async def trigger_run(self, environment_id: str, task_identifier: str, payload: Any = None,
                          **options: Any) -> TriggerResult:
        """Triggers a run (``trigger_run``; options as :meth:`RunOps.trigger_run`)."""
        params = {"e": environment_id, "t": task_identifier,
                  "p": Jsonb({} if payload is None else payload), "o": _options(options)}

        async def call(store: str) -> TriggerResult:
            return (await self._rows(store, "SELECT * FROM runops.trigger_run(%(e)s, %(t)s, %(p)s, %(o)s)",
                                     params, TriggerResult))[0]

        return await self._with_wrong_store_retry(await self._trigger_store(environment_id, options), call)

    async def batch_trigger(self, environment_id: str, items: list[dict[str, Any]],
                            **options: Any) -> BatchTriggered:
        """One call: the batch, sealed, with all its runs (``batch_trigger``)."""
        params = {"e": environment_id, "i": _items(items), "o": _options(options)}

        async def call(store: str) -> BatchTriggered:
            return (await self._rows(store, "SELECT * FROM runops.batch_trigger(%(e)s, %(i)s, %(o)s)",
                                     params, BatchTriggered))[0]

        return await self._with_wrong_store_retry(await self._trigger_store(environment_id, options), call)

    async def get_run(self, run_id: str, environment_id: str | None = None) -> Run | None:
        """The run from its owning store, or None."""
        store = self._read_store_of(run_id)
        if store is None:
            return None
        rows = await self._rows(store, "SELECT * FROM runops.get_run(%(r)s, %(e)s)",
                                {"r": run_id, "e": environment_id}, Run)
        return rows[0] if rows else None

    async def get_batch(self, batch_id: str, environment_id: str | None = None) -> Batch | None:
        """The batch from its owning store, or None."""
        store = self._read_store_of(batch_id)
        if store is None:
            return None
        rows = await self._rows(store, "SELECT * FROM runops.get_batch(%(b)s, %(e)s)",
                                {"b": batch_id, "e": environment_id}, Batch)
        return rows[0] if rows else None

    # -- per-run writes (the worker's path) ----------------------------------------------------------

    async def _run_call(self, function: str, run_id: str, args: str, params: dict[str, Any]) -> Run:
        return (await self._rows(self._write_store_of(run_id), f"SELECT * FROM runops.{function}(%(r)s{args})",
                                 {"r": run_id, **params}, Run))[0]

    async def cancel_run(self, run_id: str, reason: str | None = None) -> Run:
        """Cancels the run and its live descendants (``cancel_run``)."""
        return await self._run_call("cancel_run", run_id, ", %(c)s", {"c": reason})

    async def resume_run(self, run_id: str) -> Run:
        """Resumes a waiting run once nothing blocks it (``resume_run``; idempotent)."""
        return await self._run_call("resume_run", run_id, "", {})

    async def dequeue_runs(self, environment_id: str, worker_id: str, max_runs: int, *, lease: str | None = None,
                           queues: list[str] | None = None, tasks: list[str] | None = None) -> list[Run]:
        """Runs from both stores (run-ops first), at most ``max_runs`` in all (``dequeue_runs``)."""
        params = {"e": environment_id, "w": worker_id,
                  "o": _options({"lease": lease, "queues": queues, "tasks": tasks})}
        taken: list[Run] = []
        for store in (RUN_OPS, CONTROL_PLANE):
            if store not in self._pools or len(taken) >= max_runs:
                continue
            taken += await self._rows(store, "SELECT * FROM runops.dequeue_runs(%(e)s, %(w)s, %(n)s, %(o)s)",
                                      {**params, "n": max_runs - len(taken)}, Run)
        return taken

    async def heartbeat_run(self, run_id: str, worker_id: str) -> Run:
        """Extends the worker's lease (``heartbeat_run``)."""
        return await self._run_call("heartbeat_run", run_id, ", %(w)s", {"w": worker_id})

    async def start_attempt(self, run_id: str, worker_id: str) -> Run:
        """DEQUEUED → EXECUTING with the next (or the paused) attempt (``start_attempt``)."""
        return await self._run_call("start_attempt", run_id, ", %(w)s", {"w": worker_id})

    async def complete_attempt(self, run_id: str, attempt_number: int, output: Any = None) -> Run:
        """Completes the attempt with its output (``complete_attempt``)."""
        return await self._run_call("complete_attempt", run_id, ", %(n)s, %(o)s",
                                    {"n": attempt_number, "o": Jsonb(output)})

    async def fail_attempt(self, run_id: str, attempt_number: int, error: Any, *,
                           retry_at: dt.datetime | None = None) -> Run:
        """Fails the attempt; retried at ``retry_at`` while attempts remain (``fail_attempt``)."""
        return await self._run_call("fail_attempt", run_id, ", %(n)s, %(x)s, %(t)s",
                                    {"n": attempt_number, "x": Jsonb(error), "t": retry_at})

    async def create_checkpoint(self, run_id: str, attempt_number: int, reason: str, location: str,
                                metadata: Any = None) -> Run:
        """Suspends the executing run (``create_checkpoint``)."""
        return await self._run_call("create_checkpoint", run_id, ", %(n)s, %(c)s, %(l)s, %(m)s",
                                    {"n": attempt_number, "c": reason, "l": location, "m": Jsonb(metadata or {})})

    async def block_run(self, run_id: str, waitpoint_ids: list[str]) -> Run:
        """Makes the run wait on the waitpoints (``block_run``)."""
        return await self._run_call("block_run", run_id, ", %(w)s", {"w": waitpoint_ids})

    # -- waitpoints and services ---------------------------------------------------------------------

    async def create_waitpoint(self, environment_id: str, type: str, **options: Any) -> WaitpointCreated:
        """A DATETIME or MANUAL waitpoint (``create_waitpoint``)."""
        params = {"e": environment_id, "t": type, "o": _options(options)}

        async def call(store: str) -> WaitpointCreated:
            return (await self._rows(store, "SELECT * FROM runops.create_waitpoint(%(e)s, %(t)s, %(o)s)",
                                     params, WaitpointCreated))[0]

        return await self._with_wrong_store_retry(await self._trigger_store(environment_id, {}), call)

    async def get_waitpoint(self, waitpoint_id: str, environment_id: str | None = None) -> Waitpoint | None:
        """The waitpoint from its owning store, or None."""
        store = self._read_store_of(waitpoint_id)
        if store is None:
            return None
        rows = await self._rows(store, "SELECT * FROM runops.get_waitpoint(%(w)s, %(e)s)",
                                {"w": waitpoint_id, "e": environment_id}, Waitpoint)
        return rows[0] if rows else None

    async def complete_waitpoint(self, waitpoint_id: str, output: Any = None, *,
                                 is_error: bool = False) -> WaitpointCompletion:
        """Completes it, then sends ``resume_run`` to the other store for the runs waiting there."""
        done = (await self._rows(self._write_store_of(waitpoint_id),
                                 "SELECT * FROM runops.complete_waitpoint(%(w)s, %(o)s, %(x)s)",
                                 {"w": waitpoint_id, "o": Jsonb(output), "x": is_error}, WaitpointCompletion))[0]
        for run_id in done.remote_run_ids:
            try:
                await self.resume_run(run_id)
            except RunOpsError:
                continue  # tick in that store resumes it
        return done

    async def tick(self, max_rows: int = 1000) -> dict[str, Any]:
        """One pass of time-driven work on every store (``tick``)."""
        return {store: await self._scalar(store, "SELECT runops.tick(%(n)s)", {"n": max_rows})
                for store in self._pools}

    # -- waiting -----------------------------------------------------------------------------------------

    async def wait_for_run(self, run_id: str, timeout: float | None = None, *, poll_interval: float = 2.0) -> Run:
        """As :meth:`RunOps.wait_for_run`: the final run; ``TimeoutError`` after ``timeout``."""
        first = await self.get_run(run_id)
        if first is None:
            raise NotFound(f"run {run_id} not found")
        if first.is_final:
            return first
        last = [first]

        async def check() -> Run | None:
            current = await self.get_run(first.run_id)
            if current is None:
                raise NotFound(f"run {run_id} not found (purged while waiting?)")
            last[0] = current
            return current if current.is_final else None

        def wakes(event: dict[str, Any]) -> bool:
            return event.get("run_id") == first.run_id and event.get("new_status") in FINAL_STATUSES

        return await self._wait_until(first.environment_id, self._write_store_of(first.run_id), check, wakes,
                                      timeout, poll_interval, lambda: f"run {first.run_id} is still {last[0].status}")

    async def wait_for_batch(self, batch_id: str, timeout: float | None = None, *,
                             poll_interval: float = 2.0) -> Batch:
        """As :meth:`RunOps.wait_for_batch`: the COMPLETED or ABORTED batch."""
        first = await self.get_batch(batch_id)
        if first is None:
            raise NotFound(f"batch {batch_id} not found")
        if first.status in ("COMPLETED", "ABORTED"):
            return first
        last = [first]
        members = set(first.run_ids)

        async def check() -> Batch | None:
            current = await self.get_batch(first.batch_id)
            if current is None:
                raise NotFound(f"batch {batch_id} not found (purged while waiting?)")
            last[0] = current
            members.update(current.run_ids)
            return current if current.status in ("COMPLETED", "ABORTED") else None

        def wakes(event: dict[str, Any]) -> bool:
            return event.get("new_status") in FINAL_STATUSES and (not members or event.get("run_id") in members)

        return await self._wait_until(first.environment_id, self._write_store_of(first.batch_id), check, wakes,
                                      timeout, poll_interval,
                                      lambda: f"batch {first.batch_id} is still {last[0].status}")

    async def _wait_until(self, environment_id: str, store: str, check: Callable[[], Awaitable[T | None]],
                          wakes: Callable[[dict[str, Any]], bool], timeout: float | None, poll_interval: float,
                          still: Callable[[], str]) -> T:
        """The loop of :meth:`RunOps._wait_until`, on an async LISTEN connection."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            if deadline is None:
                return poll_interval
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{still()} after {timeout:g}s")
            return min(poll_interval, remaining)

        channel = sql.SQL("LISTEN {}").format(sql.Identifier(f"runops_env_{environment_id}"))
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._urls[store], autocommit=True) as conn:
                    await conn.execute(channel)
                    while True:
                        got = await check()
                        if got is not None:
                            return got
                        async for note in conn.notifies(timeout=left()):
                            try:
                                event = json.loads(note.payload)
                            except ValueError:
                                continue
                            if isinstance(event, dict) and wakes(event):
                                break
            except (StoreUnavailable, psycopg.OperationalError):
                try:
                    got = await check()
                except (StoreUnavailable, psycopg.OperationalError):
                    got = None
                if got is not None:
                    return got
                await asyncio.sleep(left())
