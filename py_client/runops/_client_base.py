"""What :class:`runops.RunOps` and :class:`runops.AsyncRunOps` share, none of it I/O: the pools
by store, id-shape routing, the route cache, the stores' health and versions, what this client
wrote lately (for replica reads), rows read by column name, and the small decisions the calls
make (lease gathering, the page merge, the split-identity check).

``runops.aio`` holds the calls, awaitable; ``runops.client`` is generated from it
(``python -m runops._codegen.async_to_sync``), so both clients run the same code.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import BaseRowFactory, RowMaker, no_result
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from . import dev_stores, ids
from .errors import (
    InvalidInput,
    NotFound,
    RunOpsError,
    StoreMisconfigured,
    StoreUnavailable,
    WrongStore,
    connection_cause,
    is_configuration_error,
    is_connection_failure,
    translate,
)
from .models import BatchAppended, ListedRun, Run, RunPage, StoreIdentity, TriggerOptions
from .retry import Backoff
from .tasks import Task, TaskFunction, TaskRegistry

T = TypeVar("T")
P = TypeVar("P")
log = logging.getLogger("runops")
# A library logs, the application decides where to: without this, Python's last-resort handler
# would print the client's warnings under every one-line CLI error.
log.addHandler(logging.NullHandler())

CONTROL_PLANE = "CONTROL_PLANE"
RUN_OPS = "RUN_OPS"
# The store of a NEW id that a sharded client cannot place yet (see _Router: shards).
UNRESOLVED = "RUN_OPS?"
ROUTE_CACHE_SECONDS = 1.0
# While the control plane is down, root triggers route from the run-ops mirror and ask the control
# plane again at most this often.
ROUTE_PROBE_SECONDS = 2.0
# After a store could not be connected to, its calls fail at once with that cause for this long,
# then one call tries to connect again. A replica's reads go to its primary meanwhile, for longer.
REPROBE_SECONDS = 1.0
REPLICA_REPROBE_SECONDS = 10.0
# libpq counts connect_timeout in whole seconds and treats less than 2 as 2.
MIN_CONNECT_TIMEOUT = 2

# The store revision this client needs (runops.store_version() answers the store's): stores are
# upgraded before the applications, so a client needs its own release's revision or a newer one.
# A test keeps it equal to the newest revision in migrations/.
MIN_STORE_VERSION = "r0006_fanout"
# The newest revision without runops.store_version().
LAST_UNVERSIONED = "r0004_speed"


def revision_number(version: str) -> int:
    """``r0005_hardening`` -> 5."""
    found = re.match(r"r(\d+)", version)
    return int(found.group(1)) if found else -1


def client_version() -> str:
    try:
        return importlib.metadata.version("runops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _strip_key(opts: dict[str, Any]) -> dict[str, Any]:
    key = opts.get("idempotency_key")
    if isinstance(key, str) and "\x00" in key:
        return {**opts, "idempotency_key": key.replace("\x00", "")}  # PostgreSQL text cannot hold NUL
    return opts


_NO_OPTIONS = Jsonb({})  # never mutated: the most common options, made once


def _options(values: dict[str, Any]) -> Jsonb:
    """Keyword options to the jsonb the SQL API takes: None means "not given"."""
    if not values:
        return _NO_OPTIONS
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


# -- rows by column name ----------------------------------------------------------------------------

_ROW_FACTORIES: dict[type, BaseRowFactory[Any]] = {}


def by_name(cls: type[T]) -> BaseRowFactory[T]:
    """A psycopg row factory making ``cls`` (a frozen dataclass of runops.models) from the columns
    of the same names. Columns it has no field for are ignored: stores are upgraded before their
    clients, and a later revision may add a column to what a function returns (Procrastinate's
    ``Job.from_row`` reads its rows the same way)."""
    known = _ROW_FACTORIES.get(cls)
    if known is not None:
        return known
    fields = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    # One maker per shape of result: a function answers the same columns on every call, so the
    # column names are read and matched to fields once, not on every row set.
    makers: dict[tuple[bytes | None, ...], RowMaker[T]] = {}

    def factory(cursor: Any) -> RowMaker[T]:
        result = cursor.pgresult
        if result is None or not result.nfields:
            return no_result
        # The result's own names (cursor.description would build a Column object per column on
        # every call); every name a field can have is ASCII.
        shape = tuple(result.fname(i) for i in range(result.nfields))
        known = makers.get(shape)
        if known is not None:
            return known
        names = [(name or b"").decode("ascii", "replace") for name in shape]
        wanted = [(i, name) for i, name in enumerate(names) if name in fields]

        def make(values: Sequence[Any]) -> T:
            return cls(**{name: values[i] for i, name in wanted})

        return makers.setdefault(shape, make)

    return _ROW_FACTORIES.setdefault(cls, factory)


def _ask_control_plane(failed_at: float | None, now: float) -> bool:
    """Whether a route lookup asks the control plane (else the run-ops store's mirror). The
    control plane is the authority, but a lookup that finds it down is answered by run-ops
    (SPEC §7 [1.2]: the NEW hot path never needs the control plane), and for
    ``ROUTE_PROBE_SECONDS`` after a failure it is not asked at all. The mirror is right to answer:
    nothing can change the split settings while the control plane is down, so it holds what the
    control plane last committed; a route made stale by a flip replicated late is corrected by
    RO002, as for any cached route."""
    return failed_at is None or now - failed_at >= ROUTE_PROBE_SECONDS


def _tolerable(exc: BaseException) -> bool:
    """Whether a call that asks several stores may carry on without the one that raised ``exc``:
    an outage, yes; a store that cannot be used as configured, never (it would go unnoticed)."""
    return isinstance(exc, StoreUnavailable) and not isinstance(exc, StoreMisconfigured)


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
        if isinstance(exc, StoreUnavailable) and _tolerable(exc):
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
    """What ``_each_store`` returns once every store was asked."""
    for exc in gone.values():
        if not _tolerable(exc):
            raise exc
    if gone and (not done or not partial):
        names = ", ".join(gone)
        first = next(iter(gone.values()))
        err = StoreUnavailable(f"{names} did not answer" + (f" (done on {', '.join(done)}; safe to repeat)"
                                                             if done else "") + f": {first.message}")
        err.__cause__ = first
        raise err
    return done


_TRUE = ("1", "true", "yes", "on")


def _settings_from_environment(kwargs: dict[str, Any]) -> None:
    """RUNOPS_TIMEOUT, RUNOPS_PGBOUNCER and RUNOPS_*_REPLICA_URL fill the ``kwargs`` of ``connect``
    or ``local`` that were not given."""
    if "timeout" not in kwargs and os.environ.get("RUNOPS_TIMEOUT"):
        kwargs["timeout"] = float(os.environ["RUNOPS_TIMEOUT"])
    if "pgbouncer" not in kwargs and os.environ.get("RUNOPS_PGBOUNCER"):
        kwargs["pgbouncer"] = os.environ["RUNOPS_PGBOUNCER"].strip().lower() in _TRUE
    for key, var in (("control_plane_replica_url", "RUNOPS_CONTROL_PLANE_REPLICA_URL"),
                     ("run_ops_replica_url", "RUNOPS_RUN_OPS_REPLICA_URL")):
        if key not in kwargs and os.environ.get(var):
            kwargs[key] = os.environ[var]


def split_urls(value: str) -> list[str]:
    """RUNOPS_RUN_OPS_URL as a list of shards: comma-separated URLs. A comma inside one URL (a
    multi-host postgresql://h1,h2/db) is not a separator: only one before a scheme or a key=value."""
    return [u.strip() for u in re.split(r",(?=\s*(?:postgres(?:ql)?://|\w+=))", value) if u.strip()]


def _url_list(value: str | Sequence[str] | None) -> list[str]:
    """One URL, a comma-separated list of shards' URLs, or a sequence of them, as a list."""
    if value is None:
        return []
    return split_urls(value) if isinstance(value, str) else list(value)


def _connect_urls(control_plane_url: str | None, run_ops_url: str | Sequence[str] | None,
                  kwargs: dict[str, Any]) -> tuple[str, str | Sequence[str] | None]:
    """``connect``'s URLs: the arguments, else RUNOPS_CONTROL_PLANE_URL / RUNOPS_RUN_OPS_URL,
    else (neither given) the local stores of `runops dev up`, found as the CLI finds them: the
    nearest ``.runops/`` of this user in the current directory or a parent, or RUNOPS_HOME. A
    deployment sets its URLs, which always win (docs/decisions.md, "The first hour")."""
    _settings_from_environment(kwargs)
    cp = control_plane_url or os.environ.get("RUNOPS_CONTROL_PLANE_URL")
    ro = run_ops_url or os.environ.get("RUNOPS_RUN_OPS_URL")
    if not cp and not ro:
        return _local_urls(None, kwargs)
    if not cp:
        raise RunOpsError("a run-ops URL alone is not enough: pass a control-plane URL too, or set "
                          "RUNOPS_CONTROL_PLANE_URL")
    return cp, ro


def _local_urls(home: str | Path | None, kwargs: dict[str, Any]) -> tuple[str, list[str]]:
    """``local``'s URLs: the application URLs in the state file of `runops dev up` under ``home``
    (default: the nearest ``.runops/`` found from the current directory up, or RUNOPS_HOME); with
    `dev up --shards N`, every shard's, shard 0 first."""
    _settings_from_environment(kwargs)
    urls = dev_stores.app_urls(None if home is None else Path(home))
    shards = sorted((n, url) for store, url in urls.items() if (n := ids.store_shard(store)) is not None)
    return urls[CONTROL_PLANE], [url for _, url in shards]


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


def _where(url: str) -> str:
    """Where a URL points, for messages: host:port/database (never the password)."""
    params = conninfo_to_dict(url)
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    dbname = f"/{params['dbname']}" if params.get("dbname") else ""
    return f"{host}{port}{dbname}"


class _QuietPools(logging.Filter):
    """Drops psycopg_pool's warning for each failed connection attempt of a runops pool: the
    client reports a store it cannot reach itself, once per outage and with the cause, and a
    one-line CLI error must not come with a page of retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.levelno == logging.WARNING and args and str(args[0]).startswith("runops-"))


logging.getLogger("psycopg.pool").addFilter(_QuietPools())


@dataclass
class _Health:
    """One store's (or replica's) state as this client knows it."""

    ready: bool = False                      # reached, its version checked, its pool opened
    failed_at: float | None = None           # when its last probe failed (monotonic)
    failure: StoreUnavailable | None = None  # the last failure, until a probe gets through


class _Router(Generic[P]):
    """The base of both clients: the pools by store, id-shape routing, the route cache, the
    stores' health and versions, and what this client wrote lately (for replica reads). Each
    client adds the calls, blocking or awaitable."""

    def __init__(self, control_plane_url: str, run_ops_url: str | Sequence[str] | None = None, *,
                 max_pool_size: int = 8, timeout: float = 10.0,
                 control_plane_replica_url: str | None = None, run_ops_replica_url: str | Sequence[str] | None = None,
                 read_your_writes: float = 60.0, pgbouncer: bool = False) -> None:
        """``run_ops_url``: the run-ops store, or with more than one run-ops shard every shard's
        URL in shard order, shard 0 first (a sequence, or one string with the URLs separated by
        commas, as RUNOPS_RUN_OPS_URL): the client then routes every call straight to the shard
        that owns it (docs/scale-out.md, "The client"), one pool per shard.

        ``*_replica_url``: streaming replicas that reads by id and listings may use. A read of
        anything this client wrote in the last ``read_your_writes`` seconds (a run, batch or
        waitpoint, or a listing of an environment it triggered in) goes to the primary, and a
        replica that has not replayed a row yet is never trusted with "missing": the primary is
        asked. Everything that gates a write reads the primary.

        ``pgbouncer``: the URLs lead through a pooler in transaction mode (PgBouncer's
        ``pool_mode = transaction``; env RUNOPS_PGBOUNCER=1). The client then prepares no
        statements server-side (a server connection serves many clients, which would collide on
        the statements' names) and waits for runs by polling (LISTEN needs a session of its own).

        ``timeout``: how long a call waits for a connection. A malformed URL raises
        StoreMisconfigured here."""
        self._pools: dict[str, P] = {}
        self._replicas: dict[str, P] = {}
        self._written: dict[str, float] = {}
        self._written_lock = threading.Lock()
        self._read_your_writes = read_your_writes
        self._urls: dict[str, str] = {CONTROL_PLANE: control_plane_url}
        self._replica_urls: dict[str, str] = {}
        self._timeout = timeout
        self._pgbouncer = pgbouncer
        self._routes: dict[str, tuple[str, float]] = {}
        self._routes_lock = threading.Lock()
        self._health: dict[tuple[str, bool], _Health] = {}
        shard_urls = [url for url in _url_list(run_ops_url) if url]
        if len(shard_urls) > 1 and control_plane_url in shard_urls:
            raise StoreMisconfigured("a run-ops shard's URL names the control-plane database: give every shard's "
                                     "own URL, shard 0 first")
        if len(shard_urls) > 256:
            raise StoreMisconfigured(f"{len(shard_urls)} run-ops URLs: a deployment has at most 256 shards")
        # The run-ops shards' store names, shard 0 first: [RUN_OPS] for a single run-ops store.
        self._shards: list[str] = []
        for number, url in enumerate(shard_urls):
            if url != control_plane_url:
                self._urls[ids.shard_store(number)] = url
                self._shards.append(ids.shard_store(number))
        self._sharded = len(self._shards) > 1
        # With shards: the deployment's cut-over second for shard-aware ids (every store's
        # store_config holds the same), learnt from the first store that answers; and each
        # environment's shard once asked (an assignment never changes once the environment has a
        # NEW run; a shard refuses work for another's environment, which drops the entry).
        self._shard_since: int | None = None
        self._environment_shards: dict[str, int] = {}
        replicas: list[tuple[str, str | None]] = [(CONTROL_PLANE, control_plane_replica_url),
                                                  *zip(self._shards, _url_list(run_ops_replica_url), strict=False)]
        for store, replica_url in replicas:
            if replica_url and store in self._urls:
                self._replica_urls[store] = replica_url
        for store, url in self._urls.items():
            self._check_url(store, False, url)
            self._pools[store] = self._pool(store, url, max_pool_size)
        for store, url in self._replica_urls.items():
            self._check_url(store, True, url)
            self._replicas[store] = self._pool(f"{store}-replica", url, max_pool_size)

    def _pool(self, name: str, url: str, max_size: int) -> P:
        raise NotImplementedError

    def _connect_kwargs(self, url: str, replica: bool = False) -> dict[str, Any]:
        """The connection arguments of every connection to ``url`` (pooled or not)."""
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in conninfo_to_dict(url):
            # A replica is only ever a shortcut: it gets the least libpq allows.
            kwargs["connect_timeout"] = MIN_CONNECT_TIMEOUT if replica else max(MIN_CONNECT_TIMEOUT,
                                                                                  math.ceil(self._timeout))
        if self._pgbouncer:
            kwargs["prepare_threshold"] = None  # no server-side prepared statements, even with prepare=True
        return kwargs

    @property
    def behind_pgbouncer(self) -> bool:
        """Whether the client was told it talks through PgBouncer in transaction mode (no LISTEN,
        no prepared statements)."""
        return self._pgbouncer

    @property
    def split_wired(self) -> bool:
        """Whether a run-ops store is configured (else every call goes to the control plane)."""
        return RUN_OPS in self._pools

    @property
    def run_ops_stores(self) -> list[str]:
        """The run-ops stores this client routes to by name, shard 0 first: ``[RUN_OPS]`` for a
        single run-ops store, ``[RUN_OPS, RUN_OPS_1, ...]`` with shards, ``[]`` for none."""
        return list(self._shards)

    # -- shards (docs/scale-out.md, "The client") -----------------------------------------------
    #
    # With more than one run-ops URL, a NEW id's store is the shard its byte 4 names (ids.shard_of,
    # given the cut-over second every store holds), and an environment's is the shard the control
    # plane assigned it (asked once, with the trigger route, and kept). Until the client has
    # reached a store and learnt the cut-over second, a NEW id's store is UNRESOLVED + the id,
    # which the first connection resolves. With one run-ops URL nothing is decoded: every NEW id
    # is RUN_OPS's, exactly as before.

    def _shard_store_of(self, id_: str, *, write: bool) -> str | None:
        """The shard store of a NEW id (a sharded client only): UNRESOLVED + id before the
        cut-over second is known; for an id of a shard this client lacks, None for a read (no
        such row here) and WrongStore for a write, never another shard."""
        if self._shard_since is None:
            return UNRESOLVED + id_
        shard = ids.shard_of(id_, self._shard_since)
        if shard is None:  # not a NEW id: its residency's store
            return ids.store_for(ids.classify_residency(id_))
        if shard < len(self._shards):
            return self._shards[shard]
        if not write:
            return None
        raise WrongStore(f"{id_[:100]} names run-ops shard {shard}, which this client is not configured with "
                         f"(shards 0 to {len(self._shards) - 1})", "owning_store=RUN_OPS",
                         f"owning_shard={shard}: give the client every shard's URL, shard 0 first "
                         "(RUNOPS_RUN_OPS_URL, comma-separated)")

    def _environment_shard_store(self, environment_id: str, shard: int) -> str:
        """The store of an environment's shard; refused (StoreMisconfigured, RO009) for a shard
        this client has no URL for — a shard added since it was configured — never another."""
        if shard < len(self._shards):
            return self._shards[shard]
        raise StoreMisconfigured(f"environment {environment_id[:100]} lives on run-ops shard {shard}, which this "
                                 f"client is not configured with (shards 0 to {len(self._shards) - 1}): give it "
                                 "every shard's URL, shard 0 first (RUNOPS_RUN_OPS_URL, comma-separated)")

    def _remember_environment_shard(self, environment_id: str, shard: int) -> None:
        if len(self._environment_shards) > 100_000:
            self._environment_shards.clear()  # a bound, not an eviction policy: re-asked on the next call
        self._environment_shards[environment_id] = shard

    def _forget_environment_shard(self, environment_id: str | None) -> None:
        if environment_id is not None:
            self._environment_shards.pop(environment_id, None)

    def _shard_refusal(self, store: str, config: tuple[int, int, int] | None) -> StoreMisconfigured | None:
        """Records what a sharded client's probe read from ``store`` (shard_config); refuses a
        run-ops URL whose store is another shard than its position says (routing by it would send
        every call for one shard to another), remembered for good."""
        if config is None:
            return None
        number, count, since = config
        self._shard_since = int(since)
        position = ids.store_shard(store)
        if store == CONTROL_PLANE or position == number:
            return None
        refusal = StoreMisconfigured(
            f"run-ops URL number {position + 1 if position is not None else '?'} "
            f"({_where(self._url(store, False))}) is run-ops shard {number} of {count}: give the run-ops URLs in "
            "shard order, shard 0 first (as `runops migrate` numbered them)")
        self._mark_down(store, False, refusal)
        return refusal

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
        store = ids.store_for(ids.classify_residency(id_))
        if store == RUN_OPS and self._sharded:
            return self._shard_store_of(id_, write=True) or RUN_OPS
        return store

    def _read_store_of(self, id_: str) -> str | None:
        """The configured store that owns ``id_``, or None (no such shape, or not configured)."""
        residency = ids.try_classify_residency(id_)
        if residency is None or ids.store_for(residency) not in self._pools:
            return None
        if residency == "NEW" and self._sharded:
            return self._shard_store_of(id_, write=False)
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
                if store == RUN_OPS and self._sharded:
                    return self._shard_store_of(value, write=True) or RUN_OPS
                return store if store in self._pools else CONTROL_PLANE
        return None

    def _cached_route(self, environment_id: str, now: float) -> str | None:
        with self._routes_lock:
            hit = self._routes.get(environment_id)
        return hit[0] if hit and hit[1] > now else None

    def _remember_route(self, environment_id: str, store: str, now: float) -> None:
        with self._routes_lock:
            self._routes[environment_id] = (store, now + ROUTE_CACHE_SECONDS)

    def _control_plane_failed_at(self) -> float | None:
        health = self._health.get((CONTROL_PLANE, False))
        return None if health is None else health.failed_at

    # -- the stores' health ---------------------------------------------------------------------
    #
    # A store is reached first by a connection of its own (the probe), not through its pool: a
    # pool retries a failed connection in the background and its caller learns only that no
    # connection came within the timeout, while the probe fails in milliseconds with libpq's
    # reason, and checks the store's revision. The pool opens once the probe got through. When a
    # pooled connection fails later (one session ended, or the whole store went away), the next
    # call probes again; when that probe fails, calls fail at once with its cause for
    # REPROBE_SECONDS before one probes again. A configuration error is remembered for good.

    def _name(self, store: str, replica: bool) -> str:
        shard = ids.store_shard(store)
        if self._sharded and shard is not None:
            return f"run-ops shard {shard}{' replica' if replica else ''}"
        return f"the {store} {'replica' if replica else 'store'}"

    def _check_url(self, store: str, replica: bool, url: str) -> None:
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise StoreMisconfigured(f"{self._name(store, replica)} URL is malformed: {connection_cause(exc)}") \
                from exc

    def _url(self, store: str, replica: bool) -> str:
        url = (self._replica_urls if replica else self._urls).get(store)
        if url is None:
            raise StoreUnavailable(f"no {store} {'replica' if replica else 'store'} is configured")
        return url

    def _health_of(self, store: str, replica: bool) -> _Health:
        health = self._health.get((store, replica))
        if health is None:
            health = self._health.setdefault((store, replica), _Health())
        return health

    def _must_probe(self, store: str, replica: bool) -> bool:
        """Whether the next call to ``store`` must probe it first. Raises, without any I/O, the
        cause of its last failure while that is recent (always, for a configuration error)."""
        health = self._health_of(store, replica)
        failure = health.failure
        if health.failed_at is None or failure is None:
            return not health.ready
        wait = REPLICA_REPROBE_SECONDS if replica else REPROBE_SECONDS
        if isinstance(failure, StoreMisconfigured) or time.monotonic() - health.failed_at < wait:
            again = type(failure)(failure.message)
            again.__cause__ = failure.__cause__
            raise again
        health.failed_at = time.monotonic()  # the others fail fast while this call probes
        return True

    def _probe_failed(self, store: str, replica: bool, exc: BaseException) -> StoreUnavailable:
        """The exception for a failed probe, remembered (see :meth:`_must_probe`)."""
        cause = connection_cause(exc)
        where = _where(self._url(store, replica))
        failure: StoreUnavailable
        if is_configuration_error(exc):
            failure = StoreMisconfigured(f"{self._name(store, replica)} at {where} cannot be used as configured: "
                                         f"{cause}")
        elif isinstance(exc, psycopg.Error) and not is_connection_failure(exc):
            # It answered, with an error no runops store gives (e.g. no runops schema at all).
            failure = StoreMisconfigured(f"{self._name(store, replica)} at {where} is not a runops store this "
                                         f"client can use: {cause}")
        else:
            failure = StoreUnavailable(f"{self._name(store, replica)} at {where} is unavailable: {cause}")
        failure.__cause__ = exc
        self._mark_down(store, replica, failure)
        return failure

    def _version_refusal(self, store: str, version: str | None) -> StoreMisconfigured | None:
        """Why this client refuses a store of ``version`` (None: a store without
        runops.store_version()), or None. Remembered for good, like a configuration error."""
        if version is not None and revision_number(version) >= revision_number(MIN_STORE_VERSION):
            return None
        seen = (f"is at {version}" if version is not None
                else f"is at {LAST_UNVERSIONED} or older (it has no runops.store_version())")
        refusal = StoreMisconfigured(
            f"{self._name(store, False)} at {_where(self._url(store, False))} {seen}; this client (runops "
            f"{client_version()}) needs {MIN_STORE_VERSION} or newer: upgrade the store first (`runops migrate`)")
        self._mark_down(store, False, refusal)
        return refusal

    def _mark_down(self, store: str, replica: bool, failure: StoreUnavailable, *, probed: bool = True) -> None:
        """Records a failure: of a probe (calls fail fast for a while), or of a pooled connection
        (the next call probes)."""
        health = self._health_of(store, replica)
        if health.failure is None:
            # Logged once per outage (and once when it ends): a caller that carries on with the
            # other store, such as dequeue_runs, raises nothing that would tell of it.
            log.warning("%s", failure.message)
        health.failure = failure
        if probed:
            health.failed_at = time.monotonic()
        else:
            health.ready = False

    def _reached(self, store: str, replica: bool) -> bool:
        """Records a probe that got through; whether the store was down before (then its pool may
        hold connections that died with the outage)."""
        health = self._health_of(store, replica)
        was_down = health.failure is not None
        if was_down:
            log.warning("%s is back", self._name(store, replica))
        health.ready, health.failed_at, health.failure = True, None, None
        return was_down

    def _failed(self, store: str, replica: bool, exc: psycopg.Error) -> Exception:
        """The exception a call to ``store`` raises for ``exc``; after a connection-level failure
        the next call probes the store (see :meth:`_must_probe`)."""
        if not is_connection_failure(exc):
            return translate(exc)  # the store answered, if only with an error
        if isinstance(exc, PoolTimeout):
            # Busy, or gone while the pool had no connection to find out with: the next call
            # probes it, which tells the two apart at once.
            self._health_of(store, replica).ready = False
            busy = StoreUnavailable(f"{self._name(store, replica)} gave no connection within {self._timeout:g}s "
                                    "(its pool's connections were all busy, or it stopped answering)")
            busy.__cause__ = exc
            return busy
        failure = StoreUnavailable(f"{self._name(store, replica)} at {_where(self._url(store, replica))} "
                                   f"is unavailable: {connection_cause(exc)}")
        failure.__cause__ = exc
        self._mark_down(store, replica, failure, probed=False)
        return failure

    def _refuse_listen(self) -> None:
        if self._pgbouncer:
            raise RunOpsError("listening needs a session of its own (LISTEN), which a transaction pooler does not keep "
                              "(pgbouncer=True / RUNOPS_PGBOUNCER): poll instead (wait_for_run does)")

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
