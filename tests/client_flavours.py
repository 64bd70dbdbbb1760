"""One test body for both clients: :class:`Blocking` drives an :class:`AsyncRunOps` from
synchronous test code, so a scenario written against ``RunOps`` runs against the async client
unchanged (SPEC §7 [1.2]: ``AsyncRunOps`` with the same methods, tested the same way).

The async client lives on an event loop in a thread of its own (its pools belong to that loop);
each call submits the coroutine there and waits for its result, exceptions included.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from runops import AsyncRunOps


class Blocking:
    """``AsyncRunOps`` with its coroutine methods made blocking; everything else passes through."""

    def __init__(self, control_plane_url: str, run_ops_url: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client", daemon=True)
        self._thread.start()
        self.inner: AsyncRunOps = self.run(AsyncRunOps.connect(control_plane_url, run_ops_url, **kwargs))

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return self.run(attribute(*args, **kwargs))

        return blocking

    def close(self) -> None:
        self.run(self.inner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def public_methods(cls: type) -> dict[str, Callable[..., Any] | property]:
    """The public API of a client class: name -> function (or property)."""
    return {name: member for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and (callable(member) or isinstance(member, property))}
