"""One client implementation: ``runops/client.py`` (RunOps) is generated from ``runops/aio.py``
(AsyncRunOps) by ``python -m runops._codegen.async_to_sync``, so the two cannot drift. These tests
fail when client.py is stale, and pin what the generator does to a piece of async source.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from runops._codegen import async_to_sync


def test_client_py_is_what_aio_py_generates() -> None:
    wanted = async_to_sync.generate(async_to_sync.SOURCE.read_text())
    current = async_to_sync.TARGET.read_text()
    assert current.startswith(async_to_sync.GENERATED), "client.py must say it is generated"
    assert current == wanted, "client.py is stale: run `python -m runops._codegen.async_to_sync`"


def test_the_check_mode_says_so_too() -> None:
    done = subprocess.run([sys.executable, "-m", "runops._codegen.async_to_sync", "--check"],
                          capture_output=True, text=True, check=False)
    assert (done.returncode, done.stderr) == (0, "")


SAMPLE = textwrap.dedent('''\
    """Module docstring, replaced."""

    from __future__ import annotations

    import asyncio  # NOSYNC
    import time
    from collections.abc import AsyncIterator, Awaitable, Callable
    from contextlib import asynccontextmanager

    from psycopg_pool import AsyncConnectionPool


    class AsyncRunOps:
        """Use ``await AsyncRunOps.connect()`` or ``async with``."""

        async def open(self) -> None:  # NOSYNC
            """Async only."""

        async def call(self, pool: AsyncConnectionPool, f: Callable[[], Awaitable[int]]) -> int:
            # AsyncRunOps waits here
            total = await self.add(await f(),
                                   await f())
            await asyncio.sleep(time.monotonic())
            if True:  # ASYNC
                await asyncio.shield(asyncio.sleep(0))
            else:
                total += 1
            return total

        @asynccontextmanager
        async def listen(self) -> AsyncIterator[int]:
            async with self.lock() as held:
                yield held
''')


def test_what_the_generator_does_to_async_source() -> None:
    out = async_to_sync.generate(SAMPLE)
    body = out.split('"""\n', 2)[-1]  # after the replaced module docstring
    assert "async" not in body.replace("async_to_sync", "") and "await" not in body and "Awaitable" not in body
    assert "import asyncio" not in out and "def open" not in out
    assert "from collections.abc import Callable, Iterator\n" in out  # pruned, renamed and re-sorted
    assert "from contextlib import contextmanager\n" in out and "from psycopg_pool import ConnectionPool\n" in out
    assert 'class RunOps:\n    """Use ``RunOps.connect()`` or ``with``."""' in out
    assert "    def call(self, pool: ConnectionPool, f: Callable[[], int]) -> int:\n" \
           "        # RunOps waits here\n" \
           "        total = self.add(f(),\n" \
           "                         f())\n" \
           "        time.sleep(time.monotonic())\n" \
           "        total += 1\n" \
           "        return total\n" in out
    assert "    @contextmanager\n    def listen(self) -> Iterator[int]:\n        with self.lock() as held:\n" in out
    compile(out, "client.py", "exec")
