# Generated from aio.py by `python -m runops._codegen.async_to_sync`: edit aio.py, not this file.
"""The blocking client, :class:`RunOps`: every call of the SQL API on psycopg ``ConnectionPool`` s,
one pool per store.

    with RunOps.connect() as ro:
        run = ro.trigger_run(env_id, "send-email", {"to": "a@example.com"}, idempotency_key="order-42")
        done = ro.wait_for_run(run.run_id, timeout=60)

Generated from runops/aio.py, the one source of both clients; a test fails when this file is
stale. What decides anything without I/O lives in runops._client_base; every statement is one of
runops.queries.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, Unpack

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from . import ids, queries
from ._client_base import (
    CONTROL_PLANE,
    RUN_OPS,
    UNRESOLVED,
    _ask_control_plane,
    _connect_urls,
    _ignore_chunk,
    _items,
    _Leasing,
    _local_urls,
    _merge_page,
    _options,
    _partial_or_raise,
    _Router,
    _split_refusal,
    _tolerable,
    _trigger_options,
    by_name,
)
from .errors import NotFound, RetryableConflict, RunOpsError, SplitRefused, StoreUnavailable, WrongStore
from .models import (
    FINAL_STATUSES,
    Alert,
    AlertChannel,
    AlertState,
    Batch,
    BatchAppended,
    BatchCreated,
    BatchSealed,
    BatchTriggered,
    BulkAction,
    BulkActionCreated,
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
from .retry import CONFLICT_BACKOFF, call_with_retry

__all__ = ["CONTROL_PLANE", "RUN_OPS", "RunOps"]

T = TypeVar("T")


class RunOps(_Router[ConnectionPool]):
    """Client for both stores. Use ``RunOps.connect()`` (or :meth:`local` for the stores of
    `runops dev up`); close it (or use ``with``) when done."""

    def _pool(self, name: str, url: str, max_size: int) -> ConnectionPool:
        # Opened by the store's first call, once it answered (see _client_base: the stores' health).
        return ConnectionPool(url, min_size=1, max_size=max_size, open=False,
                              kwargs=self._connect_kwargs(url, replica=name.endswith("-replica")),
                              name=f"runops-{name}")

    @classmethod
    def connect(cls, control_plane_url: str | None = None, run_ops_url: str | Sequence[str] | None = None,
                **kwargs: Any) -> RunOps:
        """URLs (with run-ops shards, every shard's URL in shard order: a list, or one string
        separated by commas), else RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL, else (neither set) the
        local stores of `runops dev up` found from the current directory up, as :meth:`local`
        finds them; RunOpsError for a run-ops URL alone. RUNOPS_TIMEOUT (seconds,
        default 10) bounds the wait for a connection; RUNOPS_PGBOUNCER=1 is ``pgbouncer=True``.
        Nothing is connected before the first call."""
        cp, ro = _connect_urls(control_plane_url, run_ops_url, kwargs)
        return cls(cp, ro, **kwargs)

    @classmethod
    def local(cls, home: str | Path | None = None, **kwargs: Any) -> RunOps:
        """The local stores of `runops dev up` (their state in ``home``, default the nearest
        ``.runops/`` from the current directory up, or RUNOPS_HOME), for development and the
        demo; RunOpsError when there are none.
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
        connection-level failure as StoreUnavailable (see _client_base: the stores' health)."""
        if store.startswith(UNRESOLVED):
            store = self._resolved(store)
        pool = (self._replicas if replica else self._pools).get(store)
        if pool is None:
            raise StoreUnavailable(f"no {store} store is configured")
        if self._must_probe(store, replica):
            self._probe(store, replica, pool)
        try:
            with pool.connection(timeout=self._timeout) as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._failed(store, replica, exc) from exc

    def _probe(self, store: str, replica: bool, pool: ConnectionPool) -> None:
        """Connects to ``store`` on a connection of its own: libpq's reason if that fails, the
        store's revision if it does not (refused when too old). Then the pool opens, or, after an
        outage, drops the connections that died with it."""
        url = self._url(store, replica)
        version: str | None = None
        shard_config: tuple[int, int, int] | None = None
        try:
            with psycopg.Connection.connect(url, **self._connect_kwargs(url, replica)) as conn:
                if not replica:  # a replica replays its primary's revision
                    try:
                        cur = conn.execute(queries.STORE_VERSION)
                        row = cur.fetchone()
                        version = None if row is None else str(row[0])
                        if self._sharded:  # one client, many shards: which one this is (the URL's order)
                            cur = conn.execute(queries.SHARD_CONFIG)
                            shard_config = cur.fetchone()
                    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
                        version = None
        except psycopg.Error as exc:
            raise self._probe_failed(store, replica, exc) from exc
        if not replica:
            refusal = self._version_refusal(store, version) or self._shard_refusal(store, shard_config)
            if refusal is not None:
                raise refusal
        was_down = self._reached(store, replica)
        pool.open(wait=False)
        if was_down:
            pool.check()

    def _rows(self, store: str, sql: str, params: dict[str, Any], cls: type[T], replica: bool = False) -> list[T]:
        # prepare=True: every call is one of a few fixed statements; skip psycopg's warm-up count
        # (no effect with pgbouncer=True, whose connections never prepare).
        with self._connection(store, replica) as conn, conn.cursor(row_factory=by_name(cls)) as cur:
            cur.execute(sql, params, prepare=True)
            return cur.fetchall()

    def _one(self, store: str, sql: str, params: dict[str, Any], cls: type[T]) -> T:
        """The row a function that answers exactly one row answers."""
        rows = self._rows(store, sql, params, cls)
        return rows[0]

    def _scalar(self, store: str, sql: str, params: dict[str, Any]) -> Any:
        with self._connection(store) as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(sql, params, prepare=True)
            row = cur.fetchone()
            return None if row is None else row[0]

    def _read_rows(self, store: str, sql: str, params: dict[str, Any], cls: type[T], key: str) -> list[T]:
        """A read by id or a listing: from the store's replica when there is one and ``key`` was
        not written by this client lately; a replica that is down or has no row yet defers to
        the primary, so a row is never reported missing because of replication lag."""
        if store in self._replicas and not self._recently_written(key):
            try:
                rows = self._rows(store, sql, params, cls, replica=True)
            except StoreUnavailable as exc:
                if not _tolerable(exc):
                    raise
                rows = []
            if rows:
                return rows
        return self._rows(store, sql, params, cls)

    def _with_wrong_store_retry(self, store: str, call: Callable[[str], T],
                                environment_id: str | None = None) -> T:
        """Runs call(store); on RO002 follows the store the error names. Right after a mint-kind
        flip the two stores can disagree for the mirror's lag (about a second), so the call may
        bounce back: it follows again, with the conflict backoff, up to five hops. A retryable
        conflict (RO008, 40001, 40P01: the transaction rolled back, so nothing was created) is
        retried with the same backoff — e.g. a keyed trigger meeting a claim whose control-plane
        transaction is still committing (docs/idempotency-across-stores.md). With shards, RO002
        from a shard names the owning shard (``HINT: owning_shard=k``), and the environment's
        remembered shard is dropped (it was pinned elsewhere before its first run)."""
        for hop in range(1, 6):
            try:
                return self._note_result(call_with_retry(functools.partial(call, store), tries=8))
            except WrongStore as exc:
                other = exc.owning_store
                if other == RUN_OPS and self._sharded:
                    self._forget_environment_shard(environment_id)
                    shard = exc.owning_shard
                    if shard is not None:
                        other = self._shards[shard] if shard < len(self._shards) else None
                    elif environment_id is not None:
                        other = self._environment_store(environment_id)
                if other is None or other == store or other not in self._pools or hop == 5:
                    raise
                if hop > 1:
                    time.sleep(CONFLICT_BACKOFF.delay(hop))
                store = other
        raise AssertionError("unreachable")

    # -- shards: where a sharded client sends a call (docs/scale-out.md, "The client") -------------

    def _resolved(self, unresolved: str) -> str:
        """The shard store of the NEW id in ``unresolved`` (UNRESOLVED + id), once the cut-over
        second is known (asked of the first store that answers)."""
        self._learn_shards()
        store = self._shard_store_of(unresolved[len(UNRESOLVED):], write=True)
        assert store is not None and not store.startswith(UNRESOLVED)
        return store

    def _learn_shards(self) -> None:
        """Reaches stores, shards first, until one has told the cut-over second (each probe reads
        it); StoreUnavailable when none answers."""
        first: StoreUnavailable | None = None
        for store in [*self._shards, CONTROL_PLANE]:
            if self._shard_since is not None:
                return
            try:
                with self._connection(store):
                    pass
            except StoreUnavailable as exc:
                first = first or exc
        if self._shard_since is None:
            raise first or StoreUnavailable("no run-ops shard answered")

    def _environment_store(self, environment_id: str | None) -> str:
        """The run-ops store of an environment: RUN_OPS, or with shards the store of its shard —
        remembered, else asked of the control plane, else (control plane down) of the shards'
        mirrors. An environment no store knows goes to shard 0, which answers for it as any
        run-ops store does (RO004, or no rows)."""
        if not self._sharded or environment_id is None:
            return RUN_OPS
        shard = self._environment_shards.get(environment_id)
        if shard is None:
            shard = self._ask_environment_shard(environment_id)
        return self._environment_shard_store(environment_id, 0 if shard is None else shard)

    def _ask_environment_shard(self, environment_id: str) -> int | None:
        params = {"e": environment_id}
        first: StoreUnavailable | None = None
        asked = [CONTROL_PLANE] if _ask_control_plane(self._control_plane_failed_at(), time.monotonic()) else []
        for store in [*asked, *self._shards]:
            try:
                shard = self._scalar(store, queries.ENVIRONMENT_SHARD, params)
            except StoreUnavailable as exc:
                if not _tolerable(exc):
                    raise
                first = first or exc
                continue
            if shard is not None:
                self._remember_environment_shard(environment_id, int(shard))
            return None if shard is None else int(shard)
        assert first is not None
        raise first

    def _environment_stores(self, environment_id: str) -> list[str]:
        """The stores holding an environment's runs: the control plane and its run-ops store."""
        if not self.split_wired:
            return [CONTROL_PLANE]
        return [CONTROL_PLANE, self._environment_store(environment_id)]

    def _read_owner(self, id_: str) -> str | None:
        """:meth:`_read_store_of`, placed (a sharded client learns the cut-over second first)."""
        store = self._read_store_of(id_)
        if store is not None and store.startswith(UNRESOLVED):
            self._learn_shards()
            store = self._read_store_of(id_)
        return store

    def store_identity(self, store: str = CONTROL_PLANE) -> StoreIdentity:
        """The identity (system identifier, database, role, version) of one store."""
        return self._one(store, queries.STORE_IDENTITY, {}, StoreIdentity)

    def store_role(self, store: str = CONTROL_PLANE) -> str:
        """The role one store has (CONTROL_PLANE or RUN_OPS)."""
        return str(self._scalar(store, queries.STORE_ROLE, {}))

    # -- tenants (control plane) --------------------------------------------------------------

    def create_organization(self, slug: str, *, title: str | None = None,
                            mint_kind: str | None = None) -> str:
        """Creates an organization on the control plane (``mint_kind``: cuid or ksuid, else the
        default); its id. Raises InvalidInput."""
        params = {"slug": slug, "o": _options({"title": title, "mint_kind": mint_kind})}
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_ORGANIZATION, params))

    def create_project(self, organization_id: str, slug: str) -> str:
        """Creates a project in an organization on the control plane; its id. Raises InvalidInput, NotFound."""
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_PROJECT, {"org": organization_id, "slug": slug}))

    def create_environment(self, project_id: str, slug: str, type: str) -> str:
        """Creates an environment (``type``: PRODUCTION, STAGING, DEVELOPMENT, PREVIEW) on the
        control plane; its id. Raises InvalidInput, NotFound."""
        params = {"p": project_id, "s": slug, "t": type}
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_ENVIRONMENT, params))

    def list_environments(self, organization_id: str | None = None) -> list[EnvironmentInfo]:
        """Every environment (or one organization's), with its project, organization and the
        mint kind its roots follow; from the control plane."""
        return self._rows(CONTROL_PLANE, queries.LIST_ENVIRONMENTS, {"o": organization_id}, EnvironmentInfo)

    def update_environment(self, environment_id: str, **changes: Any) -> None:
        """Changes an environment (``paused``, ``archived``, ...) on the control plane. Raises
        InvalidInput, NotFound."""
        self._scalar(CONTROL_PLANE, queries.UPDATE_ENVIRONMENT, {"e": environment_id, "c": _options(changes)})

    # -- split control (control plane) ---------------------------------------------------------

    def split_status(self) -> dict[str, Any]:
        """The split's state and both stores' identities, from the control plane."""
        return dict(self._scalar(CONTROL_PLANE, queries.SPLIT_STATUS, {}))

    def enable_split(self) -> dict[str, Any]:
        """Enables the split once three identities agree: the run-ops store this client talks to,
        the control plane's FDW target, and (checked in SQL) that store's FDW view back."""
        if RUN_OPS in self._pools:
            mine = self.store_identity(RUN_OPS)
            control = self.store_identity(CONTROL_PLANE)
            status = self.split_status()
            refusal = _split_refusal(mine, control, status.get("run_ops") or {})
            if refusal:
                raise SplitRefused(refusal)
        return dict(self._scalar(CONTROL_PLANE, queries.ENABLE_SPLIT, {}))

    def disable_split(self) -> dict[str, Any]:
        """Disables the split on the control plane (new roots are LEGACY again); the new status."""
        return dict(self._scalar(CONTROL_PLANE, queries.DISABLE_SPLIT, {}))

    def set_mint_kind(self, organization_id: str, kind: str) -> None:
        """Sets an organization's mint kind (cuid: roots LEGACY; ksuid: roots NEW), on the control
        plane. Raises InvalidInput, NotFound."""
        self._scalar(CONTROL_PLANE, queries.SET_MINT_KIND, {"o": organization_id, "k": kind})

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
        if _ask_control_plane(self._control_plane_failed_at(), now):
            try:
                return self._route_on(CONTROL_PLANE, params)
            except StoreUnavailable as exc:
                if not _tolerable(exc):
                    raise
        if not self._sharded:
            return str(self._scalar(RUN_OPS, queries.TRIGGER_ROUTE, params))
        # Any shard's mirror holds the split settings: the environment's own shard first.
        known = self._environment_shards.get(params["e"])
        order = sorted(self._shards, key=lambda s: s != self._shards[known]) if known is not None \
            and known < len(self._shards) else self._shards
        for store in order:
            try:
                return self._route_on(store, params)
            except StoreUnavailable as exc:
                if not _tolerable(exc) or store == order[-1]:
                    raise
        raise AssertionError("unreachable")

    def _route_on(self, store: str, params: dict[str, Any]) -> str:
        """``trigger_route`` on one store; with shards, the environment's shard in the same round
        trip (remembered)."""
        if not self._sharded:
            return str(self._scalar(store, queries.TRIGGER_ROUTE, params))
        with self._connection(store) as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(queries.TRIGGER_ROUTE_AND_SHARD, params, prepare=True)
            row = cur.fetchone()
        assert row is not None
        if row[1] is not None and params.get("e") is not None:
            self._remember_environment_shard(params["e"], int(row[1]))
        return str(row[0])

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
        if store == RUN_OPS and self._sharded:
            return self._environment_store(environment_id)
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
            return self._one(store, queries.TRIGGER_RUN, params, TriggerResult)

        return self._with_wrong_store_retry(self._trigger_store(environment_id, given), call,
                                                 environment_id)

    def trigger_failed_task(self, environment_id: str, task_identifier: str, payload: Any, error: Any,
                            **options: Any) -> TriggerResult:
        """Records a run that failed before it could be triggered (final at once), in the
        environment's root store; options as :meth:`trigger_run`. Raises InvalidInput, NotFound."""
        params = {"e": environment_id, "t": task_identifier, "p": Jsonb(payload), "x": Jsonb(error),
                  "o": _options(options)}

        def call(store: str) -> TriggerResult:
            return self._one(store, queries.TRIGGER_FAILED_TASK, params, TriggerResult)

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call,
                                                 environment_id)

    def replay_run(self, run_id: str, *, environment_id: str | None = None, payload: Any = None,
                   **overrides: Any) -> TriggerResult:
        """A new root run from ``run_id`` (its payload, tags, queue, max attempts, metadata and
        concurrency key), minted by its environment's current mint kind, so a LEGACY run replays
        as NEW after the flip. ``overrides``: ``tags``, ``delay``, ``queue``, ``max_attempts``,
        ``metadata``, ``idempotency_key``; ``payload`` replaces the original's (None keeps it).
        Sent first to the store of the environment's roots when ``environment_id`` (a guard) is
        given, else to the original's store, following RO002. Raises NotFound, InvalidInput,
        EnvironmentUnusable."""
        given = {**overrides, "payload": payload, "environment_id": environment_id}
        params = {"r": run_id, "o": _options(given)}

        def call(store: str) -> TriggerResult:
            return self._one(store, queries.REPLAY_RUN, params, TriggerResult)

        first = (self._trigger_store(environment_id, {}) if environment_id is not None
                 else self._write_store_of(run_id))
        return self._with_wrong_store_retry(first, call)

    def reset_idempotency_key(self, environment_id: str, task_identifier: str, idempotency_key: str, *,
                              scope: str = "run", parent_run_id: str | None = None,
                              parent_attempt_number: int | None = None) -> int:
        """Clears the key on every store (a key may predate a mint-kind flip)."""
        params = {"e": environment_id, "t": task_identifier, "k": idempotency_key.replace("\x00", ""),
                  "s": scope, "p": parent_run_id, "a": parent_attempt_number}
        counts = self._each_store(queries.RESET_IDEMPOTENCY_KEY, params,
                                  stores=self._environment_stores(environment_id))
        return sum(int(n) for n in counts.values())

    # -- reads and per-run writes ---------------------------------------------------------------

    def wait_for_mirror(self, timeout: float = 10.0) -> bool:
        """Waits until the run-ops mirror holds what the control plane holds (tenants and split
        settings). Operator commands call it after a change; True when caught up."""
        if RUN_OPS not in self._pools:
            return True
        deadline = time.monotonic() + timeout
        query = queries.MIRROR_FINGERPRINT
        behind = list(self._shards)  # every shard has a mirror of its own
        while True:
            control = self._scalar(CONTROL_PLANE, query, {})
            behind = [store for store in behind if self._scalar(store, query, {}) != control]
            if not behind:
                with self._routes_lock:
                    self._routes.clear()
                return True
            if time.monotonic() > deadline:
                return False
            for store in behind:
                self._scalar(store, queries.PULL_TENANT_MIRROR, {})
            time.sleep(0.05)

    def list_runs(self, environment_id: str, page_size: int = 25, cursor: str | None = None,
                  **filters: Any) -> RunPage:
        """One page of the environment's runs across both stores, newest first (``created_at``,
        then the bare id in byte order). Each store answers its own keyset page
        (``list_store_runs``, no FDW hop) and the two are merged here exactly as SQL
        ``list_runs`` merges them, so a cursor from either continues in both. With shards the
        run-ops side is the environment's shard, which holds every NEW run of it (the others
        refuse its work), so a shard that is down fails only its own environments' listings.
        Filters:
        ``statuses``, ``task_identifiers`` (any of), ``tags`` (all of), ``created_after``,
        ``created_before`` (exclusive; datetimes with a timezone), ``batch_id``."""
        doc = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in filters.items()}
        params = {"e": environment_id, "n": page_size, "c": cursor, "f": Jsonb(doc)}
        query = queries.LIST_STORE_RUNS
        rows: list[ListedRun] = []
        for store in self._environment_stores(environment_id):
            if store in self._replicas and not self._recently_written(environment_id):
                try:  # a listing may lag; an environment this client triggered in is read fresh
                    rows += self._rows(store, query, params, ListedRun, replica=True)
                    continue
                except StoreUnavailable as exc:
                    if not _tolerable(exc):
                        raise
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
        store = through or self._read_owner(run_id)
        if store is None or store not in self._pools:
            return None
        rows = self._read_rows(store, queries.GET_RUN, {"r": run_id, "e": environment_id}, Run, run_id)
        return rows[0] if rows else None

    def finalize_run(self, run_id: str, status: str, *, error: Any = None, output: Any = None,
                     environment_id: str | None = None) -> Run:
        """Moves the run to a final ``status`` with ``error``/``output``, on the run's store.
        Raises NotFound, IllegalTransition, InvalidInput."""
        return self._run_call(queries.FINALIZE_RUN, run_id,
                              {"s": status, "e": None if error is None else Jsonb(error),
                               "o": None if output is None else Jsonb(output), "env": environment_id})

    def _run_call(self, query: str, run_id: str, params: dict[str, Any]) -> Run:
        """A per-run function, on the store that owns the run. Every one of them takes the
        environment guard last (``environment_id``: RO004 for another environment's run)."""
        return self._one(self._write_store_of(run_id), query, {"r": run_id, **params}, Run)

    # -- the worker's path ------------------------------------------------------------------------

    def dequeue_runs(self, environment_id: str, worker_id: str, max_runs: int, *, lease: str | None = None,
                     queues: list[str] | None = None, tasks: list[str] | None = None,
                     wake: str | None = None, start: bool = False) -> list[Run]:
        """Leases runs from both stores (run-ops first), at most ``max_runs`` in all. The concurrency
        limit is exact within each store (SPEC: the total may reach twice the limit during a split).
        A store that fails does not cost what the other leased: those runs are returned, and
        StoreUnavailable is raised only when every store was unavailable. ``wake``: a channel this
        worker LISTENs on in each store; a store that finds its queue dry notifies it, once, when
        new work arrives there. ``start``: each run's attempt starts in the same call (EXECUTING,
        as ``start_attempt`` would make it); a run out of attempts comes back DEQUEUED, for
        ``start_attempt`` to crash."""
        params = {"e": environment_id, "w": worker_id,
                  "o": _options({"lease": lease, "queues": queues, "tasks": tasks, "wake": wake,
                                 "start": start or None})}
        leasing = _Leasing((self._environment_stores(environment_id))[::-1], max_runs)
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
        params = {"n": attempt_number, "o": Jsonb(output), "env": environment_id}
        return self._run_call(queries.COMPLETE_ATTEMPT, run_id, params)

    def fail_attempt(self, run_id: str, attempt_number: int, error: Any, *,
                     retry_at: dt.datetime | None = None, environment_id: str | None = None) -> Run:
        """Fails the executing attempt; retried at ``retry_at`` while attempts remain, else final.
        On the run's store. Raises NotFound, IllegalTransition, InvalidInput."""
        params = {"n": attempt_number, "x": Jsonb(error), "t": retry_at, "env": environment_id}
        return self._run_call(queries.FAIL_ATTEMPT, run_id, params)

    def create_checkpoint(self, run_id: str, attempt_number: int, reason: str, location: str,
                          metadata: Any = None, *, environment_id: str | None = None) -> Run:
        """Suspends the executing run (WAITING_TO_RESUME, or PENDING when nothing blocks it any
        more), on the run's store. Raises NotFound, IllegalTransition."""
        params = {"n": attempt_number, "c": reason, "l": location, "m": Jsonb(metadata or {}), "env": environment_id}
        return self._run_call(queries.CREATE_CHECKPOINT, run_id, params)

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
            return self._one(store, queries.CREATE_WAITPOINT, params, WaitpointCreated)

        return self._with_wrong_store_retry(self._trigger_store(environment_id, {}), call,
                                                 environment_id)

    def get_waitpoint(self, waitpoint_id: str, environment_id: str | None = None) -> Waitpoint | None:
        """The waitpoint from its owning store (or that store's replica), or None. Raises StoreUnavailable."""
        store = self._read_owner(waitpoint_id)
        if store is None:
            return None
        params = {"w": waitpoint_id, "e": environment_id}
        rows = self._read_rows(store, queries.GET_WAITPOINT, params, Waitpoint, waitpoint_id)
        return rows[0] if rows else None

    def complete_waitpoint(self, waitpoint_id: str, output: Any = None, *,
                           is_error: bool = False, environment_id: str | None = None) -> WaitpointCompletion:
        """Completes it, then sends resume_run to the other store for the runs waiting there
        (tick there catches any follow-up lost to a crash)."""
        params = {"w": waitpoint_id, "o": Jsonb(output), "x": is_error, "env": environment_id}
        done = self._one(self._write_store_of(waitpoint_id), queries.COMPLETE_WAITPOINT, params,
                         WaitpointCompletion)
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
            return self._one(store, queries.BATCH_TRIGGER, params, BatchTriggered)

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call,
                                                 environment_id)

    def create_batch(self, environment_id: str, expected_count: int, **options: Any) -> BatchCreated:
        """Creates an open batch of ``expected_count`` items in the environment's root store (filled
        by :meth:`append_batch_items`, then sealed). Raises InvalidInput, NotFound, EnvironmentUnusable."""
        params = {"e": environment_id, "n": expected_count, "o": _options(options)}

        def call(store: str) -> BatchCreated:
            return self._one(store, queries.CREATE_BATCH, params, BatchCreated)

        return self._with_wrong_store_retry(self._trigger_store(environment_id, options), call,
                                                 environment_id)

    def append_batch_items(self, batch_id: str, start_index: int, items: list[dict[str, Any]], *,
                           environment_id: str | None = None) -> BatchAppended:
        """Adds items from ``start_index`` to an open batch, on the batch's store; a re-sent index creates
        nothing twice. Raises NotFound, InvalidInput, IllegalTransition (sealed)."""
        params = {"b": batch_id, "s": start_index, "i": _items(items), "env": environment_id}
        return self._one(self._write_store_of(batch_id), queries.APPEND_BATCH_ITEMS, params, BatchAppended)

    def seal_batch(self, batch_id: str, *, environment_id: str | None = None) -> BatchSealed:
        """Seals an open batch (no more items), on the batch's store. Raises NotFound, IllegalTransition."""
        params = {"b": batch_id, "env": environment_id}
        return self._one(self._write_store_of(batch_id), queries.SEAL_BATCH, params, BatchSealed)

    def resume_batch_run(self, batch_id: str, *, environment_id: str | None = None) -> Batch:
        """Resumes the run waiting on this batch once all its runs are final, on the batch's store
        (idempotent); the batch. Raises NotFound."""
        params = {"b": batch_id, "env": environment_id}
        return self._one(self._write_store_of(batch_id), queries.RESUME_BATCH_RUN, params, Batch)

    def get_batch(self, batch_id: str, environment_id: str | None = None) -> Batch | None:
        """The batch from its owning store (or that store's replica), or None. Raises StoreUnavailable."""
        store = self._read_owner(batch_id)
        if store is None:
            return None
        rows = self._read_rows(store, queries.GET_BATCH, {"b": batch_id, "e": environment_id}, Batch, batch_id)
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

    # -- bulk actions (SPEC §9): the action lives on the control plane; each store acts on its part --

    def create_bulk_action(self, environment_id: str, kind: str, filters: dict[str, Any] | None = None, *,
                           idempotency_key: str | None = None, reason: str | None = None,
                           chunk_size: int | None = None) -> BulkActionCreated:
        """Cancels (``kind`` ``CANCEL``) or replays (``REPLAY``) every run of the environment that
        matches ``filters`` — :meth:`list_runs`' filters — and was created no later than the
        action, in both stores. The set is fixed now; ``tick`` and worker processes act on it in
        chunks (or call :meth:`advance_bulk_actions`). A second call with the same
        ``idempotency_key`` answers the first action (``is_cached``). Raises InvalidInput,
        NotFound (environment), EnvironmentUnusable (a REPLAY on a paused environment)."""
        doc = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in (filters or {}).items()}
        params = {"e": environment_id, "k": kind, "f": Jsonb(doc),
                  "o": _options({"idempotency_key": idempotency_key, "reason": reason, "chunk_size": chunk_size})}

        def call(store: str) -> BulkActionCreated:
            return self._one(store, queries.CREATE_BULK_ACTION, params, BulkActionCreated)

        return self._with_wrong_store_retry(CONTROL_PLANE, call)

    def get_bulk_action(self, bulk_action_id: str, environment_id: str | None = None) -> BulkAction | None:
        """The action and its counts over both stores, or None. Asked of the control plane (its
        home); a client of the run-ops store only reads it there through the FDW."""
        store = CONTROL_PLANE if CONTROL_PLANE in self._pools else RUN_OPS
        rows = self._rows(store, queries.GET_BULK_ACTION, {"b": bulk_action_id, "e": environment_id}, BulkAction)
        return rows[0] if rows else None

    def abort_bulk_action(self, bulk_action_id: str) -> BulkAction:
        """Stops the action: no chunk starts after this; what was done stays (a chunk the run-ops
        store had under way may still finish). Aborting an action that is over answers it as it
        is. Raises NotFound, InvalidInput."""
        return self._one(CONTROL_PLANE, queries.ABORT_BULK_ACTION, {"b": bulk_action_id}, BulkAction)

    def advance_bulk_actions(self, max_runs: int | None = None) -> dict[str, int]:
        """One chunk of every open bulk action's part on each store that answers (``max_runs``
        per chunk; default each action's chunk size); runs processed by store. Safe to call from
        any number of processes: a part another process is working on is skipped."""
        done = self._each_store(queries.ADVANCE_BULK_ACTIONS, {"n": max_runs}, partial=True)
        return {store: int(n) for store, n in done.items()}

    # -- services, run on every store ---------------------------------------------------------------

    def _each_store(self, sql: str, params: dict[str, Any], *, partial: bool = False,
                    stores: list[str] | None = None) -> dict[str, Any]:
        """``sql`` on every store, each committing its own work. A store that is unavailable
        never keeps the others from doing theirs: every store is asked. Then, with ``partial``
        (upkeep that the next pass repeats), the stores that answered are returned and
        StoreUnavailable raised only if none did; without it (a command the caller must know
        was done everywhere; each is safe to repeat), StoreUnavailable names the stores that
        did not answer. ``stores``: only these (an environment's), else every store, every shard."""
        done: dict[str, Any] = {}
        gone: dict[str, StoreUnavailable] = {}
        for store in self._pools if stores is None else stores:
            try:
                done[store] = self._scalar(store, sql, params)
            except StoreUnavailable as exc:
                gone[store] = exc
        return _partial_or_raise(done, gone, partial)

    def metrics(self, environment_id: str | None = None, *,
                store: str | None = None) -> dict[str, dict[str, Any]]:
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

    def tick_when_due(self, every_seconds: int = 1, max_rows: int = 1000) -> dict[str, dict[str, int] | None]:
        """:meth:`tick` on every store that answers, but only where no pass ran within
        ``every_seconds`` and no other process is ticking that store now (None there): what a
        worker process calls so that many workers make about one pass per interval."""
        return self._each_store(queries.TICK_WHEN_DUE, {"i": every_seconds, "n": max_rows}, partial=True)

    def enqueue_delayed_runs(self, max_runs: int = 1000) -> int:
        """Queues due DELAYED runs on every store that answers; the count. StoreUnavailable only
        when none answers."""
        counts = self._each_store(queries.ENQUEUE_DELAYED_RUNS, {"n": max_runs}, partial=True)
        return sum(counts.values())

    def expire_enqueued_runs(self, max_runs: int = 1000) -> int:
        """Expires queued runs whose ttl ran out, on every store that answers; the count.
        StoreUnavailable only when none answers."""
        counts = self._each_store(queries.EXPIRE_ENQUEUED_RUNS, {"n": max_runs}, partial=True)
        return sum(counts.values())

    def cancel_dev_session_runs(self, environment_id: str, dev_session_id: str) -> int:
        """Cancels a dev session's live runs on every store; the count. StoreUnavailable names a
        store that did not answer (the others did their part; safe to repeat)."""
        counts = self._each_store(queries.CANCEL_DEV_SESSION_RUNS, {"e": environment_id, "d": dev_session_id},
                                  stores=self._environment_stores(environment_id))
        return sum(counts.values())

    def execute_tasks_waiting_for_deploy(self, environment_id: str, task_identifiers: list[str]) -> int:
        """Queues the environment's runs waiting for a deploy of these tasks, on every store; the
        count. StoreUnavailable names a store that did not answer (safe to repeat)."""
        params = {"e": environment_id, "t": task_identifiers}
        counts = self._each_store(queries.EXECUTE_TASKS_WAITING_FOR_DEPLOY, params,
                                  stores=self._environment_stores(environment_id))
        return sum(counts.values())

    # -- alerts (SPEC §9 [1.3]; delivery itself: runops.alerts) ---------------------------------------

    def create_alert_channel(self, environment_id: str, kind: str, target: str, *,
                             events: list[str] | None = None, secret: str | None = None,
                             enabled: bool | None = None) -> str:
        """Creates an alert channel of the environment on the control plane (``kind`` WEBHOOK,
        ``target`` an http(s) URL; ``events``: the final statuses that alert, default every one
        but COMPLETED_SUCCESSFULLY and CANCELED; ``secret`` signs each delivery); its id. The
        run-ops store sees it once the tenant mirror has it (:meth:`wait_for_mirror`). Raises
        InvalidInput, NotFound."""
        params = {"e": environment_id, "k": kind, "t": target,
                  "o": _options({"events": events, "secret": secret, "enabled": enabled})}
        return str(self._scalar(CONTROL_PLANE, queries.CREATE_ALERT_CHANNEL, params))

    def delete_alert_channel(self, channel_id: str) -> AlertChannel:
        """Retires a channel on the control plane: no new alert goes to it, and its undelivered
        alerts are not delivered (they fail out). Raises NotFound, InvalidInput."""
        return self._one(CONTROL_PLANE, queries.DELETE_ALERT_CHANNEL, {"c": channel_id}, AlertChannel)

    def claim_alerts(self, worker_id: str, max_rows: int = 10, *, lease: str | None = None,
                     environment_id: str | None = None) -> list[Alert]:
        """Leases up to ``max_rows`` due alerts from the stores (each store's outbox holds its own
        runs' alerts): the run-ops store is asked for half, the control plane for the rest. An
        unavailable store is skipped (StoreUnavailable only when none answers). ``lease``: how
        long they stay this deliverer's (default 2m); report each with :meth:`complete_alert` or
        :meth:`fail_alert` before it lapses, or another deliverer takes it again.
        ``environment_id``: that environment's alerts only."""
        params = {"w": worker_id, "o": _options({"lease": lease, "environment_id": environment_id})}
        stores = [s for s in (RUN_OPS, CONTROL_PLANE) if s in self._pools]
        taken: list[Alert] = []
        gone: list[StoreUnavailable] = []
        for i, store in enumerate(stores):
            wanted = max_rows - len(taken) if i == len(stores) - 1 else -(-max_rows // len(stores))
            if wanted <= 0:
                break
            try:
                taken += self._rows(store, queries.CLAIM_ALERTS, {**params, "n": wanted}, Alert)
            except StoreUnavailable as exc:
                if not _tolerable(exc):
                    raise
                gone.append(exc)
        if gone and len(gone) == len(stores):
            raise gone[0]
        return taken

    def complete_alert(self, alert_id: str, worker_id: str) -> AlertState:
        """Marks a claimed alert DELIVERED, on its store (repeating the call is harmless). Raises
        IllegalTransition when the lease is another deliverer's now, NotFound."""
        params = {"a": alert_id, "w": worker_id}
        return self._one(self._write_store_of(alert_id), queries.COMPLETE_ALERT, params, AlertState)

    def fail_alert(self, alert_id: str, worker_id: str, error: str) -> AlertState:
        """Records a failed delivery of a claimed alert, on its store: due again after the backoff
        (5 s, doubling, at most 1 h), FAILED once its attempts are used up. ``error`` is cut to
        1,000 characters. Raises IllegalTransition when the lease is another deliverer's now, NotFound."""
        text = (error or "unknown error").replace("\x00", "")
        params = {"a": alert_id, "w": worker_id, "x": text if len(text) <= 1000 else text[:997] + "..."}
        return self._one(self._write_store_of(alert_id), queries.FAIL_ALERT, params, AlertState)

    # -- notifications --------------------------------------------------------------------------------

    @contextmanager
    def listen(self, environment_id: str, store: str, *, channel: str | None = None
               ) -> Iterator[psycopg.Connection[Any]]:
        """A dedicated connection LISTENing to an environment's status changes on one store (or to
        ``channel``: a worker's wake-up channel) (StoreUnavailable when the store cannot be reached;
        RunOpsError with ``pgbouncer=True``, where a LISTEN would be lost with its server connection)."""
        if store == RUN_OPS and self._sharded:  # the run-ops side of this environment: its shard
            store = self._environment_store(environment_id)
        url = self._urls.get(store)
        if url is None:
            raise StoreUnavailable(f"no {store} store is configured")
        self._refuse_listen()
        try:
            with psycopg.Connection.connect(url, **self._connect_kwargs(url)) as conn:
                conn.execute(queries.listen(environment_id, channel))
                yield conn
        except psycopg.Error as exc:
            raise self._failed(store, False, exc) from exc

    # -- tasks, workers and waiting -----------------------------------------------------------------------

    def run_worker(self, environment_id: str, concurrency: int = 4, **options: Any) -> int:
        """Works ``environment_id``'s runs with this client's tasks until SIGTERM/SIGINT (or
        ``once=True`` and an empty queue); returns the number of runs handled. ``options`` go
        to :class:`runops.worker.Worker` (``worker_id``, ``lease``, ``grace``, ``queues``,
        ``poll_interval``, ``on_outcome``, ``handle_signals``). The worker runs task functions
        (plain callables) in threads; from the asyncio client it runs in a thread of its own on
        a blocking client with the same settings, and cancelling the coroutine stops it and waits
        for its drain."""
        from .worker import Worker

        return Worker(self, environment_id, self.tasks, concurrency=concurrency, **options).run()

    def wait_for_run(self, run_id: str, timeout: float | None = None, *, poll_interval: float = 2.0) -> Run:
        """Blocks until the run is final and returns it; ``TimeoutError`` after ``timeout``
        seconds (None: no limit), ``NotFound`` if there is no such run. Woken by the owning
        store's notifications; it re-reads the run every ``poll_interval`` seconds as well, and
        keeps polling (and reconnecting) when the LISTEN connection drops. With
        ``pgbouncer=True`` it only polls."""
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

        def still() -> str:
            return f"run {canonical} is still {last[0].status}"

        store = self._store_of(canonical)
        return self._wait_until(first.environment_id, store, check, wakes, timeout, poll_interval, still)

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

        def still() -> str:
            now = last[0]
            return f"batch {first.batch_id} is still {now.status} ({now.item_count}/{now.expected_count} items)"

        if first.status in ("COMPLETED", "ABORTED"):
            return first
        store = self._store_of(first.batch_id)
        return self._wait_until(first.environment_id, store, check, wakes, timeout, poll_interval, still)

    def _wait_until(self, environment_id: str, store: str, check: Callable[[], T | None],
                    wakes: Callable[[dict[str, Any]], bool], timeout: float | None, poll_interval: float,
                    still: Callable[[], str]) -> T:
        """``check()`` until it returns something: after LISTEN is in place (so no change slips
        between), on every notification ``wakes`` accepts, and every ``poll_interval`` seconds.
        A dropped LISTEN connection or an unavailable store falls back to polling, and LISTEN is
        tried again on the next round; with ``pgbouncer=True`` it polls only."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            if deadline is None:
                return poll_interval
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{still()} after {timeout:g}s")
            return min(poll_interval, remaining)

        while True:
            if self._pgbouncer:
                got = check()
                if got is not None:
                    return got
                time.sleep(left())
                continue
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
