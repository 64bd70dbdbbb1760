"""Every RO SQLSTATE has one exception class; the client raises them, the CLI prints them."""

from __future__ import annotations

import re

import psycopg
from psycopg_pool import PoolTimeout


class RunOpsError(Exception):
    """Base class. ``sqlstate`` is the RO code (or None for client-side errors)."""

    sqlstate: str | None = None

    def __init__(self, message: str, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class UnclassifiableId(RunOpsError):
    sqlstate = "RO001"


class WrongStore(RunOpsError):
    sqlstate = "RO002"

    @property
    def owning_store(self) -> str | None:
        if self.detail and self.detail.startswith("owning_store="):
            return self.detail.split("=", 1)[1].strip()
        return None

    @property
    def owning_shard(self) -> int | None:
        """The run-ops shard a shard's RO002 names (``HINT: owning_shard=k: ...``), if any."""
        found = re.match(r"owning_shard=(\d+)", self.hint or "")
        return int(found.group(1)) if found else None


class IllegalTransition(RunOpsError):
    sqlstate = "RO003"


class NotFound(RunOpsError):
    sqlstate = "RO004"


class EnvironmentUnusable(RunOpsError):
    sqlstate = "RO005"


class InvalidInput(RunOpsError):
    sqlstate = "RO006"


class SplitRefused(RunOpsError):
    sqlstate = "RO007"


class RetryableConflict(RunOpsError):
    sqlstate = "RO008"


class StoreUnavailable(RunOpsError):
    sqlstate = "RO009"


class StoreMisconfigured(StoreUnavailable):
    """A store that cannot be used as configured, which trying again will not change: a malformed
    URL, a login the store refuses (bad password, unknown role or database), or a store older
    than this client needs. The client remembers it and never retries; neither do the worker and
    ``tick --loop``."""


BY_SQLSTATE: dict[str, type[RunOpsError]] = {
    cls.sqlstate: cls
    for cls in (
        UnclassifiableId, WrongStore, IllegalTransition, NotFound, EnvironmentUnusable,
        InvalidInput, SplitRefused, RetryableConflict, StoreUnavailable,
    )
    if cls.sqlstate
}

# A prepared statement another client left on a pooled server connection, or one that is on
# another server connection: what psycopg's server-side prepares meet behind PgBouncer in
# transaction mode.
POOLER_SQLSTATES = {"42P05", "26000"}

# Serialization failures and deadlocks are safe to retry, like RO008.
RETRYABLE_SQLSTATES = {"40001", "40P01"}

# The store went away under the call: a connection failure (class 08), or the server ended the
# session (an administrator's terminate or a fast shutdown, a crash, a server still starting, the
# database dropped, an idle session timed out). A query cancel (57014) is not among them: it
# passes through, as the SPEC says.
UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "57P04", "57P05"}


def is_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to a store failed (as opposed to a statement failing
    on a live connection): a pool that produced no connection in time, a connect that failed, a
    socket that dropped (psycopg raises those as OperationalError without a SQLSTATE), class 08,
    or a session the server ended. RO009 is not one: that is a live store saying *its peer* is
    unavailable."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    code = exc.diag.sqlstate or exc.sqlstate or ""
    if code:
        return code.startswith("08") or code in UNAVAILABLE_SQLSTATES
    return isinstance(exc, psycopg.OperationalError)


# What libpq and the server say while a connection is being set up carries no SQLSTATE the
# client can read, so a configuration error is known by its words: none of these is cured by
# waiting (unlike a refused connection, a server starting up or too many connections).
_CONFIGURATION_ERRORS = re.compile(
    r"password authentication failed|no pg_hba\.conf entry|role \S+ does not exist|database \S+ does not exist"
    r"|no password supplied|invalid connection option|for connection option|missing \"=\"|invalid URI"
    r"|invalid (sslmode|port|integer) value|authentication method \S+ not supported", re.IGNORECASE)


def is_configuration_error(exc: BaseException) -> bool:
    """Whether a failed connect was refused for its configuration (see _CONFIGURATION_ERRORS):
    a malformed URL (psycopg raises ProgrammingError before connecting) or a login the store
    refuses."""
    if isinstance(exc, psycopg.ProgrammingError):
        return True
    return isinstance(exc, psycopg.OperationalError) and bool(_CONFIGURATION_ERRORS.search(str(exc)))


def connection_cause(exc: BaseException) -> str:
    """Why a connection failed, on one line and without the address (the caller names the
    store): libpq's own words, e.g. ``Connection refused``, ``password authentication failed for
    user "app"``, ``database "x" does not exist``, ``failed to resolve host 'db': ...``."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # A host name with several addresses: libpq lists every attempt; the last one speaks for all.
    attempts = [line for line in lines if line.startswith("- host:")]
    line = attempts[-1] if attempts else (lines[0] if lines else type(exc).__name__)
    line = re.sub(r"^- host: .*?(?=connection (failed|to server))", "", line)
    line = re.sub(r"^connection (failed|is bad): ", "", line)
    line = re.sub(r'^connection to server (at "[^"]*"( \([^)]*\))?, port \d+|on socket "[^"]*") failed: ', "", line)
    return re.sub(r"^(FATAL|ERROR):\s+", "", line)


def translate(exc: psycopg.Error) -> Exception:
    """The named exception for a database error; anything else passes through unchanged.
    Every connection-level failure (see :func:`is_connection_failure`) is StoreUnavailable."""
    if isinstance(exc, PoolTimeout):
        gone = StoreUnavailable(f"no connection to the store within the timeout: {exc}")
        gone.__cause__ = exc
        return gone
    diag = exc.diag
    code = diag.sqlstate or exc.sqlstate or ""
    if code in POOLER_SQLSTATES:
        pooled = RunOpsError(f"{diag.message_primary or exc}: the store's URL leads through a transaction pooler "
                             "(PgBouncer?), where no statement may be prepared: set RUNOPS_PGBOUNCER=1 "
                             "(pgbouncer=True)")
        pooled.__cause__ = exc
        return pooled
    cls = BY_SQLSTATE.get(code)
    if cls is None and code in RETRYABLE_SQLSTATES:
        cls = RetryableConflict
    if cls is None:
        if is_connection_failure(exc):
            gone = StoreUnavailable(str(exc).strip() or "a store is unavailable")
            gone.__cause__ = exc
            return gone
        return exc
    err = cls(diag.message_primary or str(exc), diag.message_detail, diag.message_hint)
    err.__cause__ = exc
    return err
