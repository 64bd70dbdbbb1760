"""Every RO SQLSTATE has one exception class; the client raises them, the CLI prints them."""

from __future__ import annotations

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


BY_SQLSTATE: dict[str, type[RunOpsError]] = {
    cls.sqlstate: cls
    for cls in (
        UnclassifiableId, WrongStore, IllegalTransition, NotFound, EnvironmentUnusable,
        InvalidInput, SplitRefused, RetryableConflict, StoreUnavailable,
    )
    if cls.sqlstate
}

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


def translate(exc: psycopg.Error) -> Exception:
    """The named exception for a database error; anything else passes through unchanged.
    Every connection-level failure (see :func:`is_connection_failure`) is StoreUnavailable."""
    if isinstance(exc, PoolTimeout):
        gone = StoreUnavailable(f"no connection to the store within the timeout: {exc}")
        gone.__cause__ = exc
        return gone
    diag = exc.diag
    code = diag.sqlstate or exc.sqlstate or ""
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
