"""The thin client: one psycopg pool per store, routing by id shape, RO errors as exceptions.

Nothing here decides anything the database decides; it only picks the store to ask.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar, Unpack

import psycopg
from psycopg.rows import class_row, tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from . import dev_stores, ids, queries
from .errors import (
    InvalidInput,
    NotFound,
    RetryableConflict,
    RunOpsError,
    SplitRefused,
    StoreUnavailable,
    WrongStore,
    is_connection_failure,
    translate,
)
from .models import (
    FINAL_STATUSES,
    Batch,
    BatchAppended,
    BatchCreated,
    BatchSealed,
    BatchTriggered,
    EnvironmentInfo,
    ListedRun,
    Run,
    RunPage,
    StoreIdentity,
    TriggerOptions,
    TriggerResult,
    Waitpoint,
    WaitpointCompletion,
    WaitpointCreated,
)
from .retry import CONFLICT_BACKOFF, Backoff, call_with_retry
from .tasks import Task, TaskFunction, TaskRegistry

T = TypeVar("T")
P = TypeVar("P")
log = logging.getLogger("runops")

CONTROL_PLANE = "CONTROL_PLANE"
RUN_OPS = "RUN_OPS"
ROUTE_CACHE_SECONDS = 1.0
# How long a call waits for a pooled connection to a store whose last connection failed.
DEGRADED_WAIT = 0.25
# While the control plane is down, root triggers route from the run-ops mirror and ask the control
# plane again at most this often.
ROUTE_PROBE_SECONDS = 2.0
_ROW_FACTORIES: dict[type, Any] = {}


def _strip_key(opts: dict[str, Any]) -> dict[str, Any]:
    key = opts.get("idempotency_key")
    if isinstance(key, str) and "\x00" in key:
        return {**opts, "idempotency_key": key.replace("\x00", "")}  # PostgreSQL text cannot hold NUL
    return opts


def _options(values: dict[str, Any]) -> Jsonb:
    """Keyword options to the jsonb the SQL API takes: None means "not given"."""
    return Jsonb(_strip_key({k: v for k, v in values.items() if v is not None}))


TRIGGER_OPTION_NAMES = frozenset(TriggerOptions.__optional_keys__)


def _trigger_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``trigger_run``'s options as a plain dict, after refusing names the SQL API does not know
    (a typo would otherwise cost a round trip to learn the same RO006)."""
    unknown = sorted(set(options) - TRIGGER_OPTION_NAMES)
    if unknown:
        raise InvalidInput(f"unknown trigger option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                           hint="the options are: " + ", ".join(sorted(TRIGGER_OPTION_NAMES)))
    return dict(options)


def _items(items: list[dict[str, Any]]) -> Jsonb:
    """Batch items, with NUL bytes stripped from their keys as from a single trigger's."""
    return Jsonb([{**item, "options": _strip_key(item["options"])} if isinstance(item.get("options"), dict) else item
                  for item in items])


def _ask_control_plane(down: dict[str, float], now: float) -> bool:
    """Whether a route lookup asks the control plane (else the run-ops store's mirror). The
    control plane is the authority, but a lookup that finds it down is answered by run-ops
    (SPEC §7 [1.2]: the NEW hot path never needs the control plane), and for
    ``ROUTE_PROBE_SECONDS`` after a failure it is not asked at all. The mirror is right to answer:
    nothing can change the split settings while the control plane is down, so it holds what the
    control plane last committed; a route made stale by a flip replicated late is corrected by
    RO002, as for any cached route."""
    failed = down.get(CONTROL_PLANE)
    return failed is None or now - failed >= ROUTE_PROBE_SECONDS


class _Leasing:
    """dequeue_runs over several stores, as both clients run it (the loop is theirs, the
    decisions are here). Runs a store leased are this worker's the moment that store answers,
    so they are never dropped for another store's error: once something is leased, an error
    from a later store is logged and the leased runs returned (a lasting error shows on the next
    call, which finds nothing leased first). Before that, an unavailable store is skipped and
    any other error raised; when every store was unavailable the first StoreUnavailable is."""

    def __init__(self, stores: list[str], max_runs: int) -> None:
        self.stores, self.max_runs = stores, max_runs
        self.taken: list[Run] = []
        self.gone: list[StoreUnavailable] = []

    def wanted(self) -> int:
        return self.max_runs - len(self.taken)

    def failed(self, store: str, exc: Exception) -> None:
        """Called from an ``except Exception`` around one store's lease: re-raises what must be."""
        if isinstance(exc, StoreUnavailable):
            self.gone.append(exc)
        elif not self.taken:
            raise exc
        else:
            log.warning("dequeue_runs: the %s store failed after %d runs were leased elsewhere; returning those: %s",
                        store, len(self.taken), exc)

    def result(self) -> list[Run]:
        if self.gone and len(self.gone) == len(self.stores):
            raise self.gone[0]
        if self.gone:
            log.debug("dequeue_runs: %d of %d stores unavailable; leased from the others: %s",
                      len(self.gone), len(self.stores), self.gone[0])
        return self.taken


def _partial_or_raise(done: dict[str, Any], gone: dict[str, StoreUnavailable], partial: bool) -> dict[str, Any]:
    """What :meth:`RunOps._each_store` returns once every store was asked."""
    if gone and (not done or not partial):
        names = ", ".join(gone)
        first = next(iter(gone.values()))
        err = StoreUnavailable(f"{names} did not answer" + (f" (done on {', '.join(done)}; safe to repeat)"
                                                             if done else "") + f": {first.message}")
        err.__cause__ = first
        raise err
    return done


def _settings_from_environment(kwargs: dict[str, Any]) -> None:
    """RUNOPS_TIMEOUT and RUNOPS_*_REPLICA_URL fill the ``kwargs`` of ``connect`` or ``local``
    that were not given."""
    if "timeout" not in kwargs and os.environ.get("RUNOPS_TIMEOUT"):
        kwargs["timeout"] = float(os.environ["RUNOPS_TIMEOUT"])
    for key, var in (("control_plane_replica_url", "RUNOPS_CONTROL_PLANE_REPLICA_URL"),
                     ("run_ops_replica_url", "RUNOPS_RUN_OPS_REPLICA_URL")):
        if key not in kwargs and os.environ.get(var):
            kwargs[key] = os.environ[var]


def _connect_urls(control_plane_url: str | None, run_ops_url: str | None,
                  kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """``connect``'s URLs: the arguments, else RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL.
    Nothing else: the local dev stores are asked for by name (``local``), never found by
    accident."""
    _settings_from_environment(kwargs)
    cp = control_plane_url or os.environ.get("RUNOPS_CONTROL_PLANE_URL")
    ro = run_ops_url or os.environ.get("RUNOPS_RUN_OPS_URL")
    if not cp:
        raise RunOpsError("no control-plane URL: pass one, or set RUNOPS_CONTROL_PLANE_URL (and "
                          "RUNOPS_RUN_OPS_URL); for the local stores of `runops dev up`, use local()")
    return cp, ro


def _local_urls(home: str | Path | None, kwargs: dict[str, Any]) -> tuple[str, str]:
    """``local``'s URLs: the application URLs in the state file of `runops dev up` under ``home``
    (default ``.runops/`` in the current directory)."""
    _settings_from_environment(kwargs)
    urls = dev_stores.app_urls(None if home is None else Path(home))
    return urls[CONTROL_PLANE], urls[RUN_OPS]


def _merge_page(rows: list[ListedRun], page_size: int) -> RunPage:
    """Both stores' keyset pages merged exactly as SQL ``list_runs`` merges them."""
    rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)  # ASCII ids: str order is byte order
    page = rows[:page_size]
    return RunPage(page, page[-1].cursor if len(page) == page_size else None)


def _split_refusal(mine: StoreIdentity, control: StoreIdentity, target: dict[str, Any]) -> str | None:
    """Why ``enable_split`` must refuse before asking SQL, or None: the run-ops store the client
    talks to must be neither the control plane itself nor another database than its FDW's."""
    if (mine.system_identifier, mine.database_name) == (control.system_identifier, control.database_name):
        return "split refused: the run-ops URL names the control-plane database itself"
    if (target.get("system_identifier"), target.get("database_name")) != (mine.system_identifier,
                                                                           mine.database_name):
        return ("split refused: the control plane's FDW reaches a different database "
                f"({target.get('database_name')}, system {target.get('system_identifier')}) "
                f"than this client's run-ops URL ({mine.database_name}, "
                f"system {mine.system_identifier}); re-run `runops migrate` with the right URLs")
    return None


def _ignore_chunk(appended: BatchAppended) -> None:
    """``stream_batch``'s default ``on_chunk``."""


class _Router(Generic[P]):
    """What :class:`RunOps` and :class:`runops.aio.AsyncRunOps` share, none of it I/O: the pools
    by store, id-shape routing, the route cache, the stores' health, and what this client wrote
    lately (for replica reads). Each client adds the calls, blocking or awaitable."""

    def __init__(self, control_plane_url: str, run_ops_url: str | None = None, *,
                 max_pool_size: int = 8, timeout: float = 10.0,
                 control_plane_replica_url: str | None = None, run_ops_replica_url: str | None = None,
                 read_your_writes: float = 60.0) -> None:
        """``*_replica_url``: streaming replicas that reads by id and listings may use. A read of
        anything this client wrote in the last ``read_your_writes`` seconds (a run, batch or
        waitpoint, or a listing of an environment it triggered in) goes to the primary, and a
        replica that has not replayed a row yet is never trusted with "missing": the primary is
        asked. Everything that gates a write reads the primary."""
        self._pools: dict[str, P] = {}
        self._replicas: dict[str, P] = {}
        self._written: dict[str, float] = {}
        self._written_lock = threading.Lock()
        self._read_your_writes = read_your_writes
        self._urls: dict[str, str] = {CONTROL_PLANE: control_plane_url}
        self._timeout = timeout
        self._routes: dict[str, tuple[str, float]] = {}
        self._routes_lock = threading.Lock()
        # Stores whose connection failed most recently (monotonic time of the failure); cleared
        # by the next call that gets through.
        self._down: dict[str, float] = {}
        self._replica_down: dict[str, float] = {}
        self._pools[CONTROL_PLANE] = self._pool(control_plane_url, max_pool_size)
        if run_ops_url and run_ops_url != control_plane_url:
            self._pools[RUN_OPS] = self._pool(run_ops_url, max_pool_size)
            self._urls[RUN_OPS] = run_ops_url
        for store, url in ((CONTROL_PLANE, control_plane_replica_url), (RUN_OPS, run_ops_replica_url)):
            if url and store in self._pools:
                self._replicas[store] = self._pool(url, max_pool_size)

    @staticmethod
    def _pool(url: str, max_size: int) -> P:
        raise NotImplementedError

    @property
    def split_wired(self) -> bool:
        """Whether a run-ops store is configured (else every call goes to the control plane)."""
        return RUN_OPS in self._pools

    @staticmethod
    def classify_residency(id_: str | None) -> ids.Residency:
        """LEGACY (cuid) or NEW (ksuid) from an id's shape alone, no round trip; UnclassifiableId
        (RO001) for any other shape."""
        return ids.classify_residency(id_)

    @staticmethod
    def try_classify_residency(id_: str | None) -> ids.Residency | None:
        """As :meth:`classify_residency`, with None for an id of no known shape."""
        return ids.try_classify_residency(id_)

    def _store_of(self, id_: str) -> str:
        return ids.store_for(ids.classify_residency(id_))

    def _read_store_of(self, id_: str) -> str | None:
        """The configured store that owns ``id_``, or None (no such shape, or not configured)."""
        residency = ids.try_classify_residency(id_)
        if residency is None or ids.store_for(residency) not in self._pools:
            return None
        return ids.store_for(residency)

    def _write_store_of(self, id_: str) -> str:
        """The store to send a write naming ``id_``; NotFound for NEW ids with no run-ops store."""
        store = self._store_of(id_)
        if store == RUN_OPS and not self.split_wired:
            raise NotFound(f"{id_} not found: no run-ops store is configured")
        self._note_written(id_)
        return store

    def _anchor_store(self, environment_id: str, options: dict[str, Any]) -> str | None:
        """A trigger's store when an option anchors it (its pre-minted id, parent or batch),
        else None: a root, routed by ``trigger_route``."""
        self._note_written(environment_id)  # its listing is read fresh for a while (replicas)
        for anchor in ("run_id", "parent_run_id", "batch_id"):
            value = options.get(anchor)
            if value is not None:
                residency = ids.try_classify_residency(value)
                # An unclassifiable anchor goes to the control plane, which explains the error.
                if residency is None:
                    return CONTROL_PLANE
                store = ids.store_for(residency)
                return store if store in self._pools else CONTROL_PLANE
        return None

    def _cached_route(self, environment_id: str, now: float) -> str | None:
        with self._routes_lock:
            hit = self._routes.get(environment_id)
        return hit[0] if hit and hit[1] > now else None

    def _remember_route(self, environment_id: str, store: str, now: float) -> None:
        with self._routes_lock:
            self._routes[environment_id] = (store, now + ROUTE_CACHE_SECONDS)

    # -- the stores' health: a store that just failed gets a short wait -------------------------

    def _wait(self, store: str, replica: bool) -> float:
        """How long a call waits for a pooled connection to ``store``. A store whose connection
        failed last time gets only ``DEGRADED_WAIT`` (the pool reconnects in the background, so
        a store that is back answers at once): one store's outage must not stall every call
        that also asks the other store for the full timeout."""
        health = self._replica_down if replica else self._down
        return min(self._timeout, DEGRADED_WAIT) if store in health else self._timeout

    def _failed(self, store: str, replica: bool, exc: psycopg.Error, wait: float) -> Exception:
        """The exception a call to ``store`` raises for ``exc``; a connection-level failure marks
        the store as down until a call gets through."""
        if not is_connection_failure(exc):
            self._answered(store, replica)  # the store answered, if only with an error
            return translate(exc)
        health = self._replica_down if replica else self._down
        if store not in health:
            # Logged once per outage (and once when it ends): a caller that carries on with the
            # other store, such as dequeue_runs, raises nothing that would tell of it.
            log.warning("the %s %s is unavailable; its calls wait at most %gs for a connection until it answers: %s",
                        store, "replica" if replica else "store", DEGRADED_WAIT,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        health[store] = time.monotonic()
        if isinstance(exc, PoolTimeout):
            gone = StoreUnavailable(f"the {store} store is unavailable (no connection within {wait:g}s): {exc}")
            gone.__cause__ = exc
            return gone
        return translate(exc)

    def _answered(self, store: str, replica: bool) -> None:
        if (self._replica_down if replica else self._down).pop(store, None) is not None:
            log.warning("the %s %s is back", store, "replica" if replica else "store")

    # -- replicas: reads by id and listings, never what this client just wrote ------------------

    def _note_written(self, *keys: str | None) -> None:
        if not self._replicas:
            return
        until = time.monotonic() + self._read_your_writes
        with self._written_lock:
            if len(self._written) > 100_000:  # forget what has aged out
                now = time.monotonic()
                self._written = {k: t for k, t in self._written.items() if t > now}
            for key in keys:
                if key:
                    self._written[key] = until

    def _note_result(self, result: T) -> T:
        """Remembers the ids a creating call returned (and keeps its result)."""
        if self._replicas:
            self._note_written(*(getattr(result, a, None) for a in ("run_id", "batch_id", "waitpoint_id")),
                               *(getattr(result, "run_ids", None) or []))
        return result

    def _recently_written(self, key: str) -> bool:
        with self._written_lock:
            until = self._written.get(key)
        return until is not None and until > time.monotonic()

    # -- tasks ---------------------------------------------------------------------------------------

    _task_registry: TaskRegistry | None = None

    @property
    def tasks(self) -> TaskRegistry:
        """The tasks registered on this client with :meth:`task` (what :meth:`run_worker` runs)."""
        if self._task_registry is None:
            self._task_registry = TaskRegistry()
        return self._task_registry

    def task(self, name: str, *, max_attempts: int | None = None,
             retry: Backoff | None = None) -> Callable[[TaskFunction], Task]:
        """Decorator: registers ``fn(ctx, payload)`` as the code of task ``name``.

        ``max_attempts`` caps the attempts a worker makes (the run's own ``max_attempts``, a
        trigger option defaulting to 3, caps them too); ``retry`` is the delay between them
        (default ``Backoff(initial=1, factor=2, maximum=300, jitter=0.2)``). See runops.tasks."""
        return self.tasks.task(name, max_attempts=max_attempts, retry=retry)


class RunOps(_Router[ConnectionPool]):
    """Client for both stores. Use :meth:`connect` (or :meth:`local` for the stores of `runops dev up`);
    close it (or use ``with``) when done."""

    @staticmethod
    def _pool(url: str, max_size: int) -> ConnectionPool:
        return ConnectionPool(url, min_size=1, max_size=max_size, open=True,
                              kwargs={"autocommit": True}, name="runops")

    @classmethod
    def connect(cls, control_plane_url: str | None = None, run_ops_url: str | None = None,
                **kwargs: Any) -> RunOps:
        """URLs, else RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL; RunOpsError without a
        control-plane URL (the local dev stores are :meth:`local`). RUNOPS_TIMEOUT (seconds,
        default 10) bounds the wait for a pooled connection."""
        cp, ro = _connect_urls(control_plane_url, run_ops_url, kwargs)
        return cls(cp, ro, **kwargs)

    @classmethod
    def local(cls, home: str | Path | None = None, **kwargs: Any) -> RunOps:
        """The local stores of `runops dev up` (their state in ``home``, default ``.runops/`` in
        the current directory), for development and the demo; RunOpsError when there are none.
        ``kwargs`` and the RUNOPS_TIMEOUT / replica variables as for :meth:`connect`."""
        cp, ro = _local_urls(home, kwargs)
        return cls(cp, ro, **kwargs)

    def close(self) -> None:
        """Closes the connection pools."""
        for pool in [*self._pools.values(), *self._replicas.values()]:
            pool.close()

    def __enter__(self) -> RunOps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _connection(self, store: str, replica: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection to ``store``; any database error comes out translated, and every
        connection-level failure as StoreUnavailable (see :meth:`_wait`)."""
        pool = (self._replicas if replica else self._pools).get(store)
        if pool is None:
            raise StoreUnavailable(f"no {store} store is configured")
        wait = self._wait(store, replica)
        try:
            with pool.connection(timeout=wait) as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._failed(store, replica, exc, wait) from exc
        self._answered(store, replica)

    def _rows(self, store: str, sql: str, params: dict[str, Any], cls: type[T], replica: bool = False) -> list[T]:
        factory = _ROW_FACTORIES.get(cls)
        if factory is None:
            factory = _ROW_FACTORIES.setdefault(cls, class_row(cls))
        # prepare=True: every call is one of a few fixed statements; skip psycopg's warm-up count.
        with self._connection(store, replica) as conn, conn.cursor(row_factory=factory) as cur:
            cur.execute(sql, params, prepare=True)
            return cur.fetchall()

    def _scalar(self, store: str, sql: str, params: dict[str, Any]) -> Any:
        with self._connection(store) as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(sql, params, prepare=True)
            row = cur.fetchone()
            return None if row is None else row[0]

    def _read_rows(self, store: str, sql: str, params: dict[str, Any], cls: type[T], key: str) -> list[T]:
        """A read by id or a listing: from the store's replica when there is one and ``key`` was
        not written by this client lately; a replica that errs or has no row yet defers to the
        primary, so a row is never reported missing because of replication lag."""
        if store in self._replicas and not self._recently_written(key):
            try:
                rows = self._rows(store, sql, params, cls, replica=True)
            except StoreUnavailable:
                rows = []
            if rows:
                return rows
        return self._rows(store, sql, params, cls)

    def _with_wrong_store_retry(self, store: str, call: Any) -> Any:
        """Runs call(store); on RO002 follows the store the error names. Right after a mint-kind
        flip the two stores can disagree for the mirror's lag (about a second), so the call may
        bounce back: it follows again, with the conflict backoff, up to five hops. A retryable
        conflict (RO008, 40001, 40P01: the transaction rolled back, so nothing was created) is
        retried with the same backoff — e.g. a keyed trigger meeting a claim whose control-plane
        transaction is still committing (docs/idempotency-across-stores.md)."""
        for hop in range(1, 6):
            try:
                return self._note_result(call_with_retry(functools.partial(call, store), tries=8))
            except WrongStore as exc:
                other = exc.owning_store
                if other is None or other == store or other not in self._pools or hop == 5:
                    raise
                if hop > 1:
                    time.sleep(CONFLICT_BACKOFF.delay(hop))
                store = other
        raise AssertionError("unreachable")

    def store_identity(self, store: str = CONTROL_PLANE) -> StoreIdentity:
        """The identity (system identifier, database, role, version) of one store."""
        return self._rows(store, queries.STORE_IDENTITY, {}, StoreIdentity)[0]

    def store_role(self, store: str = CONTROL_PLANE) -> str:
        """The role one store has (CONTROL_PLANE or RUN_OPS)."""
        return str(self._scalar(store, queries.STORE_ROLE, {}))

    # -- tenants (control plane) --------------------------------------------------------------

    def create_organization(self, slug: str, *, title: str | None = None,
                            mint_kind: str | None = None) -> str:
        """Creates an organization on the control plane (``mint_kind``: cuid or ksuid, else the
        default); its id. Raises InvalidInput."""
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_ORGANIZATION,
                                {"slug": slug, "o": _options({"title": title, "mint_kind": mint_kind})}))

    def create_project(self, organization_id: str, slug: str) -> str:
        """Creates a project in an organization on the control plane; its id. Raises InvalidInput, NotFound."""
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_PROJECT,
                                {"org": organization_id, "slug": slug}))

    def create_environment(self, project_id: str, slug: str, type: str) -> str:
        """Creates an environment (``type``: PRODUCTION, STAGING, DEVELOPMENT, PREVIEW) on the
        control plane; its id. Raises InvalidInput, NotFound."""
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_ENVIRONMENT,
                                {"p": project_id, "s": slug, "t": type}))

    def list_environments(self, organization_id: str | None = None) -> list[EnvironmentInfo]:
        """Every environment (or one organization's), with its project, organization and the
        mint kind its roots follow; from the control plane."""
        return self._rows(CONTROL_PLANE, queries.LIST_ENVIRONMENTS, {"o": organization_id},
                          EnvironmentInfo)

    def update_environment(self, environment_id: str, **changes: Any) -> None:
        """Changes an environment (``paused``, ``archived``, ...) on the control plane. Raises
        InvalidInput, NotFound."""
        self._scalar(CONTROL_PLANE, queries.UPDATE_ENVIRONMENT,
                     {"e": environment_id, "c": _options(changes)})

    # -- split control (control plane) ---------------------------------------------------------

    def split_status(self) -> dict[str, Any]:
        """The split's state and both stores' identities, from the control plane."""
        return dict(self._scalar(CONTROL_PLANE, queries.SPLIT_STATUS, {}))

    def enable_split(self) -> dict[str, Any]:
        """Enables the split once three identities agree: the run-ops store this client talks to,
        the control plane's FDW target, and (checked in SQL) that store's FDW view back."""
        if RUN_OPS in self._pools:
            refusal = _split_refusal(self.store_identity(RUN_OPS), self.store_identity(CONTROL_PLANE),
                                     self.split_status().get("run_ops") or {})
            if refusal:
                raise SplitRefused(refusal)
        return dict(self._scalar(CONTROL_PLANE, queries.ENABLE_SPLIT, {}))

    def disable_split(self) -> dict[str, Any]:
        """Disables the split on the control plane (new roots are LEGACY again); the new status."""
        return dict(self._scalar(CONTROL_PLANE, queries.DISABLE_SPLIT, {}))

    def set_mint_kind(self, organization_id: str, kind: str) -> None:
        """Sets an organization's mint kind (cuid: roots LEGACY; ksuid: roots NEW), on the control
        plane. Raises InvalidInput, NotFound."""
        self._scalar(CONTROL_PLANE, queries.SET_MINT_KIND,
                     {"o": organization_id, "k": kind})

    def set_default_mint_kind(self, kind: str) -> None:
        """Sets the mint kind (cuid or ksuid) of organizations without their own, on the control
        plane. Raises InvalidInput."""
        self._scalar(CONTROL_PLANE, queries.SET_DEFAULT_MINT_KIND, {"k": kind})

    # -- triggering ---------------------------------------------------------------------------

    def trigger_route(self, environment_id: str, **options: Any) -> str:
        """The store (CONTROL_PLANE or RUN_OPS) a root trigger of the environment belongs in, from
        the control plane's ``trigger_route``; when the control plane does not answer, from the
        run-ops store's (its mirror of the split settings). StoreUnavailable when neither answers."""
        params = {"e": environment_id, "o": _options(options)}
        return self._route(params, time.monotonic())

    def _route(self, params: dict[str, Any], now: float) -> str:
        if RUN_OPS not in self._pools:
            return str(self._scalar(CONTROL_PLANE, queries.TRIGGER_ROUTE, params))
        if _ask_control_plane(self._down, now):
            try:
                return str(self._scalar(CONTROL_PLANE, queries.TRIGGER_ROUTE, params))
            except StoreUnavailable:
                pass
        return str(self._scalar(RUN_OPS, queries.TRIGGER_ROUTE, params))

    def _trigger_store(self, environment_id: str, options: dict[str, Any]) -> str:
        """The store for a trigger: its anchor's, else the environment's root route (cached for
        at most a second)."""
        anchored = self._anchor_store(environment_id, options)
        if anchored is not None:
            return anchored
        now = time.monotonic()
        store = self._cached_route(environment_id, now)
        if store is None:
            try:
                store = self._route({"e": environment_id, "o": _options({})}, now)
            except RunOpsError:
                # Let the trigger itself report the problem, so errors keep the SPEC's order
                # (a bad option is RO006 even when the environment is unknown).
                return CONTROL_PLANE
            self._remember_route(environment_id, store, now)
        # Without that store configured, ask the control plane: its RO002 names the owner.
        return store if store in self._pools else CONTROL_PLANE

    def trigger_run(self, environment_id: str, task_identifier: str, payload: Any = None,
                    **options: Unpack[TriggerOptions]) -> TriggerResult:
        """Triggers a run: roots in the environment's store (``trigger_route``, cached a second; from
        the run-ops mirror when the control plane is down), children in their anchor's. Unknown
        option names raise InvalidInput before any round trip; the SQL raises InvalidInput,
        NotFound, EnvironmentUnusable, UnclassifiableId."""
        given = _trigger_options(options)
        params = {"e": environment_id, "t": task_identifier,
                  "p": Jsonb({} if payload is None else payload), "o": _options(given)}

        def call(store: str) -> TriggerResult:
            return self._rows(store, queries.TRIGGER_RUN,
                              params, TriggerResult)[0]

        return self._with_wrong_store_retry(self._trigger_store(environment_id, given), call)  # type: ignore[no-any-return]

    def trigger_failed_task(self, environment_id: str, task_identifier: str, payload: Any, error: Any,
                            **options: Any) -> TriggerResult:
        """Records a run that failed before it could be triggered (final at once), in the
        environment's root store; options as :meth:`trigger_run`. Raises InvalidInput, NotFound."""
        params = {"e": environment_id, "t": task_identifier, "p": Jsonb(payload), "x": Jsonb(error),
                  "o": _options(options)}

        def call(store: str) -> TriggerResult:
            return self._rows(store,
                              queries.TRIGGER_FAILED_TASK,
                              params, TriggerResult)[0]

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call)  # type: ignore[no-any-return]

    def reset_idempotency_key(self, environment_id: str, task_identifier: str, idempotency_key: str, *,
                              scope: str = "run", parent_run_id: str | None = None,
                              parent_attempt_number: int | None = None) -> int:
        """Clears the key on every store (a key may predate a mint-kind flip)."""
        params = {"e": environment_id, "t": task_identifier, "k": idempotency_key.replace("\x00", ""),
                  "s": scope, "p": parent_run_id, "a": parent_attempt_number}
        query = queries.RESET_IDEMPOTENCY_KEY
        return sum(int(n) for n in self._each_store(query, params).values())

    # -- reads and per-run writes ---------------------------------------------------------------

    def wait_for_mirror(self, timeout: float = 10.0) -> bool:
        """Waits until the run-ops mirror holds what the control plane holds (tenants and split
        settings). Operator commands call it after a change; True when caught up."""
        if RUN_OPS not in self._pools:
            return True
        deadline = time.monotonic() + timeout
        query = queries.MIRROR_FINGERPRINT
        while True:
            if self._scalar(CONTROL_PLANE, query, {}) == self._scalar(RUN_OPS, query, {}):
                with self._routes_lock:
                    self._routes.clear()
                return True
            if time.monotonic() > deadline:
                return False
            self._scalar(RUN_OPS, queries.PULL_TENANT_MIRROR, {})
            time.sleep(0.05)

    def list_runs(self, environment_id: str, page_size: int = 25, cursor: str | None = None,
                  **filters: Any) -> RunPage:
        """One page of the environment's runs across both stores, newest first (``created_at``,
        then the bare id in byte order). Each store answers its own keyset page
        (``list_store_runs``, no FDW hop) and the two are merged here exactly as SQL
        ``list_runs`` merges them, so a cursor from either continues in both. Filters:
        ``statuses``, ``task_identifiers`` (any of), ``tags`` (all of), ``created_after``,
        ``created_before`` (exclusive; datetimes with a timezone), ``batch_id``."""
        doc = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in filters.items()}
        params = {"e": environment_id, "n": page_size, "c": cursor, "f": Jsonb(doc)}
        query = queries.LIST_STORE_RUNS
        rows: list[ListedRun] = []
        for store in self._pools:
            if store in self._replicas and not self._recently_written(environment_id):
                try:  # a listing may lag; an environment this client triggered in is read fresh
                    rows += self._rows(store, query, params, ListedRun, replica=True)
                    continue
                except StoreUnavailable:
                    pass
            rows += self._rows(store, query, params, ListedRun)
        return _merge_page(rows, page_size)

    def purge_runs(self, older_than: str, max_rows: int = 10000) -> dict[str, int]:
        """Deletes, on each store, final runs older than ``older_than`` (a duration such as
        ``30d``) and their subgraphs, up to ``max_rows`` runs per store; the count per store."""
        counts = self._each_store(queries.PURGE_RUNS, {"o": older_than, "n": max_rows})
        return {store: int(n) for store, n in counts.items()}

    def get_run(self, run_id: str, environment_id: str | None = None, *,
                through: str | None = None) -> Run | None:
        """The run from its owning store (no FDW hop), or None. ``through`` asks a given store
        instead, which reads through its FDW when it does not own the run."""
        residency = ids.try_classify_residency(run_id)
        if residency is None:
            return None
        store = through or ids.store_for(residency)
        if store not in self._pools:
            return None
        rows = self._read_rows(store, queries.GET_RUN,
                               {"r": run_id, "e": environment_id}, Run, run_id)
        return rows[0] if rows else None

    def finalize_run(self, run_id: str, status: str, *, error: Any = None, output: Any = None,
                     environment_id: str | None = None) -> Run:
        """Moves the run to a final ``status`` with ``error``/``output``, on the run's store.
        Raises NotFound, IllegalTransition, InvalidInput."""
        return self._rows(self._write_store_of(run_id),
                          queries.FINALIZE_RUN,
                          {"r": run_id, "s": status, "e": None if error is None else Jsonb(error),
                           "o": None if output is None else Jsonb(output), "env": environment_id}, Run)[0]

    def _run_call(self, query: str, run_id: str, params: dict[str, Any]) -> Run:
        """A per-run function, on the store that owns the run. Every one of them takes the
        environment guard last (``environment_id``: RO004 for another environment's run)."""
        return self._rows(self._write_store_of(run_id), query,
                          {"r": run_id, **params}, Run)[0]

    # -- the worker's path ------------------------------------------------------------------------

    def dequeue_runs(self, environment_id: str, worker_id: str, max_runs: int, *, lease: str | None = None,
                     queues: list[str] | None = None, tasks: list[str] | None = None,
                     wake: str | None = None) -> list[Run]:
        """Leases runs from both stores (run-ops first), at most ``max_runs`` in all. The concurrency
        limit is exact within each store (SPEC: the total may reach twice the limit during a split).
        A store that fails does not cost what the other leased: those runs are returned, and
        StoreUnavailable is raised only when every store was unavailable. ``wake``: a channel this
        worker LISTENs on in each store; a store that finds its queue dry notifies it, once, when
        new work arrives there."""
        params = {"e": environment_id, "w": worker_id,
                  "o": _options({"lease": lease, "queues": queues, "tasks": tasks, "wake": wake})}
        leasing = _Leasing([s for s in (RUN_OPS, CONTROL_PLANE) if s in self._pools], max_runs)
        for store in leasing.stores:
            if leasing.wanted() <= 0:
                break
            try:
                leasing.taken += self._rows(store, queries.DEQUEUE_RUNS, {**params, "n": leasing.wanted()}, Run)
            except Exception as exc:  # what the other store leased must reach the caller
                leasing.failed(store, exc)
        return leasing.result()

    def heartbeat_run(self, run_id: str, worker_id: str, *, environment_id: str | None = None) -> Run:
        """Extends the worker's lease on the run, on the run's store. Raises NotFound, IllegalTransition
        (the lease was lost)."""
        return self._run_call(queries.HEARTBEAT_RUN, run_id, {"w": worker_id, "env": environment_id})

    def start_attempt(self, run_id: str, worker_id: str, *, environment_id: str | None = None) -> Run:
        """DEQUEUED -> EXECUTING with the next (or the paused) attempt, on the run's store. Raises
        NotFound, IllegalTransition (another worker's lease)."""
        return self._run_call(queries.START_ATTEMPT, run_id, {"w": worker_id, "env": environment_id})

    def complete_attempt(self, run_id: str, attempt_number: int, output: Any = None, *,
                         environment_id: str | None = None) -> Run:
        """Completes the executing attempt with ``output``, on the run's store. Raises NotFound,
        IllegalTransition."""
        return self._run_call(queries.COMPLETE_ATTEMPT, run_id, {"n": attempt_number, "o": Jsonb(output),
                                                                 "env": environment_id})

    def fail_attempt(self, run_id: str, attempt_number: int, error: Any, *,
                     retry_at: dt.datetime | None = None, environment_id: str | None = None) -> Run:
        """Fails the executing attempt; retried at ``retry_at`` while attempts remain, else final.
        On the run's store. Raises NotFound, IllegalTransition, InvalidInput."""
        return self._run_call(queries.FAIL_ATTEMPT, run_id, {"n": attempt_number, "x": Jsonb(error), "t": retry_at,
                                                             "env": environment_id})

    def create_checkpoint(self, run_id: str, attempt_number: int, reason: str, location: str,
                          metadata: Any = None, *, environment_id: str | None = None) -> Run:
        """Suspends the executing run (WAITING_TO_RESUME, or PENDING when nothing blocks it any
        more), on the run's store. Raises NotFound, IllegalTransition."""
        return self._run_call(queries.CREATE_CHECKPOINT, run_id,
                              {"n": attempt_number, "c": reason, "l": location, "m": Jsonb(metadata or {}),
                               "env": environment_id})

    def resume_run(self, run_id: str, *, environment_id: str | None = None) -> Run:
        """Resumes a waiting run once nothing blocks it, on the run's store (idempotent). Raises
        NotFound, IllegalTransition."""
        return self._run_call(queries.RESUME_RUN, run_id, {"env": environment_id})

    def cancel_run(self, run_id: str, reason: str | None = None, *, environment_id: str | None = None) -> Run:
        """Cancels the run and its live descendants, on the run's store. Raises NotFound,
        IllegalTransition (already final), UnclassifiableId."""
        return self._run_call(queries.CANCEL_RUN, run_id, {"c": reason, "env": environment_id})

    def block_run(self, run_id: str, waitpoint_ids: list[str], *, environment_id: str | None = None) -> Run:
        """Makes the run wait on the waitpoints, on the run's store. Raises NotFound, IllegalTransition."""
        return self._run_call(queries.BLOCK_RUN, run_id, {"w": waitpoint_ids, "env": environment_id})

    # -- waitpoints ---------------------------------------------------------------------------------

    def create_waitpoint(self, environment_id: str, type: str, **options: Any) -> WaitpointCreated:
        """Creates a DATETIME or MANUAL waitpoint in the environment's root store (options:
        ``completed_after``, ``idempotency_key``, ...). Raises InvalidInput, NotFound."""
        params = {"e": environment_id, "t": type, "o": _options(options)}

        def call(store: str) -> WaitpointCreated:
            return self._rows(store, queries.CREATE_WAITPOINT,
                              params, WaitpointCreated)[0]

        return self._with_wrong_store_retry(self._trigger_store(environment_id, {}), call)  # type: ignore[no-any-return]

    def get_waitpoint(self, waitpoint_id: str, environment_id: str | None = None) -> Waitpoint | None:
        """The waitpoint from its owning store (or that store's replica), or None. Raises StoreUnavailable."""
        residency = ids.try_classify_residency(waitpoint_id)
        if residency is None or ids.store_for(residency) not in self._pools:
            return None
        rows = self._read_rows(ids.store_for(residency), queries.GET_WAITPOINT,
                               {"w": waitpoint_id, "e": environment_id}, Waitpoint, waitpoint_id)
        return rows[0] if rows else None

    def complete_waitpoint(self, waitpoint_id: str, output: Any = None, *,
                           is_error: bool = False, environment_id: str | None = None) -> WaitpointCompletion:
        """Completes it, then sends resume_run to the other store for the runs waiting there
        (tick there catches any follow-up lost to a crash)."""
        done = self._rows(self._write_store_of(waitpoint_id),
                          queries.COMPLETE_WAITPOINT,
                          {"w": waitpoint_id, "o": Jsonb(output), "x": is_error, "env": environment_id},
                          WaitpointCompletion)[0]
        for run_id in done.remote_run_ids:
            try:
                self.resume_run(run_id, environment_id=environment_id)
            except RunOpsError:
                # The waitpoint is complete either way; tick in that store resumes the run.
                continue
        return done

    # -- batches -----------------------------------------------------------------------------------

    def batch_trigger(self, environment_id: str, items: list[dict[str, Any]], **options: Any) -> BatchTriggered:
        """One call: the batch, sealed, with all its runs (run_ids in item order)."""
        params = {"e": environment_id, "i": _items(items), "o": _options(options)}

        def call(store: str) -> BatchTriggered:
            return self._rows(store, queries.BATCH_TRIGGER,
                              params, BatchTriggered)[0]

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call)  # type: ignore[no-any-return]

    def create_batch(self, environment_id: str, expected_count: int, **options: Any) -> BatchCreated:
        """Creates an open batch of ``expected_count`` items in the environment's root store (filled
        by :meth:`append_batch_items`, then sealed). Raises InvalidInput, NotFound, EnvironmentUnusable."""
        params = {"e": environment_id, "n": expected_count, "o": _options(options)}

        def call(store: str) -> BatchCreated:
            return self._rows(store, queries.CREATE_BATCH,
                              params, BatchCreated)[0]

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call)  # type: ignore[no-any-return]

    def append_batch_items(self, batch_id: str, start_index: int, items: list[dict[str, Any]], *,
                           environment_id: str | None = None) -> BatchAppended:
        """Adds items from ``start_index`` to an open batch, on the batch's store; a re-sent index creates
        nothing twice. Raises NotFound, InvalidInput, IllegalTransition (sealed)."""
        return self._rows(self._write_store_of(batch_id),
                          queries.APPEND_BATCH_ITEMS,
                          {"b": batch_id, "s": start_index, "i": _items(items), "env": environment_id},
                          BatchAppended)[0]

    def seal_batch(self, batch_id: str, *, environment_id: str | None = None) -> BatchSealed:
        """Seals an open batch (no more items), on the batch's store. Raises NotFound, IllegalTransition."""
        return self._rows(self._write_store_of(batch_id), queries.SEAL_BATCH,
                          {"b": batch_id, "env": environment_id}, BatchSealed)[0]

    def resume_batch_run(self, batch_id: str, *, environment_id: str | None = None) -> Batch:
        """Resumes the run waiting on this batch once all its runs are final, on the batch's store
        (idempotent); the batch. Raises NotFound."""
        return self._rows(self._write_store_of(batch_id), queries.RESUME_BATCH_RUN,
                          {"b": batch_id, "env": environment_id}, Batch)[0]

    def get_batch(self, batch_id: str, environment_id: str | None = None) -> Batch | None:
        """The batch from its owning store (or that store's replica), or None. Raises StoreUnavailable."""
        residency = ids.try_classify_residency(batch_id)
        if residency is None or ids.store_for(residency) not in self._pools:
            return None
        rows = self._read_rows(ids.store_for(residency), queries.GET_BATCH,
                               {"b": batch_id, "e": environment_id}, Batch, batch_id)
        return rows[0] if rows else None

    def stream_batch(self, environment_id: str, items: Iterable[dict[str, Any]], expected_count: int, *,
                     chunk_size: int = 1000, retries: int = 3, seal: bool = True,
                     on_chunk: Callable[[BatchAppended], None] = _ignore_chunk, **options: Any) -> BatchCreated:
        """Creates a batch and appends ``items`` in chunks, then seals it. A chunk that fails
        with a dropped connection or a retryable conflict is sent again: the server keeps the
        first content of every index, so a re-sent chunk creates nothing twice."""
        created = self.create_batch(environment_id, expected_count, **options)
        chunk: list[dict[str, Any]] = []
        start = 0

        def send() -> None:
            for attempt in range(retries + 1):
                try:
                    on_chunk(self.append_batch_items(created.batch_id, start, chunk))
                    return
                except (StoreUnavailable, RetryableConflict):
                    if attempt == retries:
                        raise
                    time.sleep(0.1 * 2 ** attempt)

        for item in items:
            chunk.append(item)
            if len(chunk) == chunk_size:
                send()
                start += len(chunk)
                chunk = []
        if chunk:
            send()
        if seal:
            self.seal_batch(created.batch_id)
        return created

    # -- services, run on every store ---------------------------------------------------------------

    def _each_store(self, sql: str, params: dict[str, Any], *, partial: bool = False) -> dict[str, Any]:
        """``sql`` on every store, each committing its own work. A store that is unavailable
        never keeps the others from doing theirs: every store is asked. Then, with ``partial``
        (upkeep that the next pass repeats), the stores that answered are returned and
        StoreUnavailable raised only if none did; without it (a command the caller must know
        was done everywhere; each is safe to repeat), StoreUnavailable names the stores that
        did not answer."""
        done: dict[str, Any] = {}
        gone: dict[str, StoreUnavailable] = {}
        for store in self._pools:
            try:
                done[store] = self._scalar(store, sql, params)
            except StoreUnavailable as exc:
                gone[store] = exc
        return _partial_or_raise(done, gone, partial)

    def metrics(self, environment_id: str | None = None, *, store: str | None = None) -> dict[str, dict[str, Any]]:
        """Each configured store's operational figures (SQL ``runops.metrics``), keyed by store:
        runs per status per environment, queue depth and oldest pending age, lapsed leases, open
        batches, and on the run-ops store the claim ledger size and the mirror's freshness.
        ``environment_id`` narrows them to one environment; ``store`` asks one store only (the
        Prometheus endpoint asks each store on its own, so one that does not answer is reported,
        not fatal)."""
        targets = [store] if store is not None else list(self._pools)
        return {s: dict(self._scalar(s, queries.METRICS, {"e": environment_id})) for s in targets}

    def tick(self, max_rows: int = 1000) -> dict[str, dict[str, int]]:
        """One pass of time-driven work on every store that answers; counts by store (a store that
        did not answer is absent). StoreUnavailable only when none answers."""
        return self._each_store(queries.TICK, {"n": max_rows}, partial=True)

    def enqueue_delayed_runs(self, max_runs: int = 1000) -> int:
        """Queues due DELAYED runs on every store that answers; the count. StoreUnavailable only
        when none answers."""
        return sum(self._each_store(queries.ENQUEUE_DELAYED_RUNS, {"n": max_runs},
                                    partial=True).values())

    def expire_enqueued_runs(self, max_runs: int = 1000) -> int:
        """Expires queued runs whose ttl ran out, on every store that answers; the count.
        StoreUnavailable only when none answers."""
        return sum(self._each_store(queries.EXPIRE_ENQUEUED_RUNS, {"n": max_runs},
                                    partial=True).values())

    def cancel_dev_session_runs(self, environment_id: str, dev_session_id: str) -> int:
        """Cancels a dev session's live runs on every store; the count. StoreUnavailable names a
        store that did not answer (the others did their part; safe to repeat)."""
        return sum(self._each_store(queries.CANCEL_DEV_SESSION_RUNS,
                                    {"e": environment_id, "d": dev_session_id}).values())

    def execute_tasks_waiting_for_deploy(self, environment_id: str, task_identifiers: list[str]) -> int:
        """Queues the environment's runs waiting for a deploy of these tasks, on every store; the
        count. StoreUnavailable names a store that did not answer (safe to repeat)."""
        return sum(self._each_store(queries.EXECUTE_TASKS_WAITING_FOR_DEPLOY,
                                    {"e": environment_id, "t": task_identifiers}).values())

    # -- notifications --------------------------------------------------------------------------------

    @contextmanager
    def listen(self, environment_id: str, store: str, *, channel: str | None = None
               ) -> Iterator[psycopg.Connection[Any]]:
        """A dedicated connection LISTENing to an environment's status changes on one store (or
        to ``channel``: a worker's wake-up channel, see :meth:`dequeue_runs`)."""
        url = self._urls.get(store)
        if url is None:
            raise StoreUnavailable(f"no {store} store is configured")
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(queries.listen(environment_id, channel))
                yield conn
        except psycopg.Error as exc:
            raise translate(exc) from exc

    # -- tasks, workers and waiting (issue 12) ---------------------------------------------------------

    def run_worker(self, environment_id: str, concurrency: int = 4, **options: Any) -> int:
        """Works ``environment_id``'s runs with this client's tasks until SIGTERM/SIGINT (or
        ``once=True`` and an empty queue); returns the number of runs handled. ``options`` go
        to :class:`runops.worker.Worker` (``worker_id``, ``lease``, ``grace``, ``queues``,
        ``poll_interval``, ``on_outcome``, ``handle_signals``)."""
        from .worker import Worker

        return Worker(self, environment_id, self.tasks, concurrency=concurrency, **options).run()

    def wait_for_run(self, run_id: str, timeout: float | None = None, *, poll_interval: float = 2.0) -> Run:
        """Blocks until the run is final and returns it; ``TimeoutError`` after ``timeout``
        seconds (None: no limit), ``NotFound`` if there is no such run. Woken by the owning
        store's notifications; it re-reads the run every ``poll_interval`` seconds as well, and
        keeps polling (and reconnecting) when the LISTEN connection drops."""
        first = self.get_run(run_id)
        if first is None:
            raise NotFound(f"run {run_id} not found")
        if first.is_final:
            return first
        canonical = first.run_id
        last = [first]

        def check() -> Run | None:
            current = self.get_run(canonical)
            if current is None:
                raise NotFound(f"run {run_id} not found (purged while waiting?)")
            last[0] = current
            return current if current.is_final else None

        def wakes(event: dict[str, Any]) -> bool:
            return event.get("run_id") == canonical and event.get("new_status") in FINAL_STATUSES

        return self._wait_until(first.environment_id, self._store_of(canonical), check, wakes, timeout,
                                poll_interval, lambda: f"run {canonical} is still {last[0].status}")

    def wait_for_batch(self, batch_id: str, timeout: float | None = None, *, poll_interval: float = 2.0) -> Batch:
        """Blocks until the batch is COMPLETED (all its runs final) or ABORTED and returns it;
        ``TimeoutError`` after ``timeout`` seconds, ``NotFound`` if there is no such batch.
        Woken by notifications of its runs turning final, with the same poll fallback as
        :meth:`wait_for_run`."""
        first = self.get_batch(batch_id)
        if first is None:
            raise NotFound(f"batch {batch_id} not found")
        last = [first]
        members = set(first.run_ids)

        def check() -> Batch | None:
            current = self.get_batch(first.batch_id)
            if current is None:
                raise NotFound(f"batch {batch_id} not found (purged while waiting?)")
            last[0] = current
            members.update(current.run_ids)
            return current if current.status in ("COMPLETED", "ABORTED") else None

        def wakes(event: dict[str, Any]) -> bool:
            return event.get("new_status") in FINAL_STATUSES and (not members or event.get("run_id") in members)

        if first.status in ("COMPLETED", "ABORTED"):
            return first
        return self._wait_until(first.environment_id, self._store_of(first.batch_id), check, wakes, timeout,
                                poll_interval, lambda: f"batch {first.batch_id} is still {last[0].status} "
                                                       f"({last[0].item_count}/{last[0].expected_count} items)")

    def _wait_until(self, environment_id: str, store: str, check: Callable[[], T | None],
                    wakes: Callable[[dict[str, Any]], bool], timeout: float | None, poll_interval: float,
                    still: Callable[[], str]) -> T:
        """``check()`` until it returns something: after LISTEN is in place (so no change slips
        between), on every notification ``wakes`` accepts, and every ``poll_interval`` seconds.
        A dropped LISTEN connection or an unavailable store falls back to polling, and LISTEN is
        tried again on the next round."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            if deadline is None:
                return poll_interval
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{still()} after {timeout:g}s")
            return min(poll_interval, remaining)

        while True:
            try:
                with self.listen(environment_id, store) as conn:
                    while True:
                        got = check()
                        if got is not None:
                            return got
                        for note in conn.notifies(timeout=left()):
                            try:
                                event = json.loads(note.payload)
                            except ValueError:
                                continue
                            if isinstance(event, dict) and wakes(event):
                                break
            except (StoreUnavailable, psycopg.OperationalError):
                try:
                    got = check()
                except (StoreUnavailable, psycopg.OperationalError):
                    got = None
                if got is not None:
                    return got
                time.sleep(left())
