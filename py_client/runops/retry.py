"""One retry policy for the client, the worker and ``tick --loop``.

* :class:`Backoff` is the one delay schedule: exponential, capped, with jitter. Task retries
  (``@ro.task(retry=Backoff(...))``), conflict retries and outage waits all use it.
* :func:`call_with_retry` repeats one call on a retryable conflict (RO008, 40001, 40P01, which
  the client raises as :class:`RetryableConflict`) — and, when asked, on a store outage;
  :func:`call_with_retry_async` is the same for the async client.
* :func:`run_loop` is the long-running loop of the worker and of ``tick --loop``: it calls a step
  again and again and, when a store drops out, waits with a growing, jittered delay and goes on
  when the store is back, instead of exiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg

from .errors import RetryableConflict, StoreMisconfigured, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("runops")


@dataclass(frozen=True)
class Backoff:
    """Delay before try ``n`` (1-based) is ``initial * factor ** (n - 1)``, at most ``maximum``
    seconds, spread by ± ``jitter`` (a fraction) so that many callers do not retry in step."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial < 0 or self.factor < 1 or self.maximum < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("Backoff needs initial >= 0, factor >= 1, maximum >= 0 and 0 <= jitter <= 1")

    def delay(self, n: int) -> float:
        """Seconds to wait before try ``n`` (``n`` >= 1)."""
        base = min(self.maximum, self.initial * self.factor ** max(0, n - 1))
        return max(0.0, base * (1 + self.jitter * (2 * random.random() - 1)))


# A conflict clears within milliseconds; an outage takes seconds to minutes.
CONFLICT_BACKOFF = Backoff(initial=0.02, factor=2.0, maximum=1.0, jitter=0.5)
OUTAGE_BACKOFF = Backoff(initial=0.5, factor=2.0, maximum=15.0, jitter=0.3)

# psycopg errors that are not RO codes but still mean "the store went away" (a restart
# terminates sessions with 57P01; a dropped socket has no SQLSTATE at all).
TRANSIENT: tuple[type[BaseException], ...] = (StoreUnavailable, RetryableConflict, psycopg.OperationalError)


def call_with_retry(call: Callable[[], T], *, tries: int = 5, backoff: Backoff = CONFLICT_BACKOFF,
                    retry_on: tuple[type[BaseException], ...] = (RetryableConflict,)) -> T:
    """``call()``, repeated up to ``tries`` times in all while it raises one of ``retry_on``
    (by default only a retryable conflict: RO008, 40001, 40P01). Only for calls that are safe
    to repeat, which every runops write is when repeated with the same arguments."""
    for n in range(1, tries + 1):
        try:
            return call()
        except StoreMisconfigured:
            raise  # a store that cannot be used as configured stays so
        except retry_on:
            if n == tries:
                raise
            time.sleep(backoff.delay(n))
    raise AssertionError("unreachable")


async def call_with_retry_async(call: Callable[[], Awaitable[T]], *, tries: int = 5,
                                backoff: Backoff = CONFLICT_BACKOFF,
                                retry_on: tuple[type[BaseException], ...] = (RetryableConflict,)) -> T:
    """:func:`call_with_retry` for a coroutine function (the async client's), sleeping without
    blocking the event loop."""
    for n in range(1, tries + 1):
        try:
            return await call()
        except StoreMisconfigured:
            raise
        except retry_on:
            if n == tries:
                raise
            await asyncio.sleep(backoff.delay(n))
    raise AssertionError("unreachable")


def run_loop(step: Callable[[], float | None], *, wake: threading.Event,
             should_stop: Callable[[], bool], backoff: Backoff = OUTAGE_BACKOFF, what: str = "runops") -> None:
    """Calls ``step()`` until ``should_stop()`` or until the step returns None. A step returns
    how many seconds to wait before the next one; ``wake`` being set ends a wait early (and is
    cleared before each step). A store outage or conflict does not end the loop: it waits
    ``backoff.delay(failures)`` and tries again, logging once when it starts and when it ends. A
    store that cannot be used as configured (StoreMisconfigured: a bad URL or password, a store
    too old for this client) ends it: waiting would not help."""
    failures = 0
    while not should_stop():
        wake.clear()
        try:
            pause = step()
        except StoreMisconfigured:
            raise
        except TRANSIENT as exc:
            failures += 1
            pause = backoff.delay(failures)
            if failures == 1:
                log.warning("%s: a store is unavailable (%s); retrying with backoff", what,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            else:
                log.debug("%s: still unavailable after %d tries; next in %.1fs", what, failures, pause)
        else:
            if failures:
                log.warning("%s: the store is back after %d failed tries", what, failures)
                failures = 0
        if pause is None:
            return
        if pause > 0 and not should_stop():
            wake.wait(pause)
