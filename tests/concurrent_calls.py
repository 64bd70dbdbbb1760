"""One way to run calls at the same moment, for the tests that race transactions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def race(fns: list[Callable[[], Any]], timeout: float | None = 60) -> list[Any]:
    """Runs each fn on its own thread, all released together by a barrier; returns what each
    returned or raised, in order (the caller asserts on the exceptions)."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - the test asserts on what came back
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results
