"""Procrastinate's side of ``bench/worker_loop.py``: its app, a no-op task, its schema, a deferrer.

Runs only inside the bench-only virtual environment that ``worker_loop.py`` makes for it
(Procrastinate is never a project dependency); the database is ``PEERS_DATABASE_URL``.

    python -m procrastinate --app procrastinate_app.app worker --concurrency 4   # a worker
    python procrastinate_app.py schema               # apply Procrastinate's schema (empty database)
    python procrastinate_app.py defer N [--threads 4] [--task noop]

``defer`` defers one warm-up job, prints ``ready`` and waits for a line on stdin; then its threads
defer N jobs (split evenly, one ``defer()`` call per job, as the runops side triggers one run
per call) and it prints ``done``. The connector's pool is at most 8 connections, like the runops
client's (``max_pool_size=8``), in the workers and in the deferrer.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(
    conninfo=os.environ.get("PEERS_DATABASE_URL", ""), min_size=1, max_size=8))


@app.task(name="noop")
async def noop() -> None:
    """The no-op task as Procrastinate's docs pair with ``--concurrency``: a coroutine."""


@app.task(name="noop_sync")
def noop_sync() -> None:
    """The same as a plain function, which Procrastinate runs in a thread (as runops runs tasks)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("schema")
    defer = sub.add_parser("defer")
    defer.add_argument("jobs", type=int)
    defer.add_argument("--threads", type=int, default=4)
    defer.add_argument("--task", default="noop", choices=["noop", "noop_sync"])
    args = parser.parse_args()
    with app.open():
        if args.command == "schema":
            app.schema_manager.apply_schema()
            print(procrastinate.__version__)
            return 0
        task = app.tasks[args.task]
        task.defer()  # warm the pool and the statement
        print("ready", flush=True)
        sys.stdin.readline()

        def produce(count: int) -> None:
            for _ in range(count):
                task.defer()

        shares = [args.jobs // args.threads + (1 if i < args.jobs % args.threads else 0) for i in range(args.threads)]
        threads = [threading.Thread(target=produce, args=(n,)) for n in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    # Through the module's own name, so the tasks belong to ``procrastinate_app.app`` (the app the
    # workers load), not to a second app of ``__main__``.
    import procrastinate_app

    sys.exit(procrastinate_app.main())
