"""Plain-SQL helpers the lifecycle tests share: each call is one public function."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

Row = dict[str, Any]


def call(conn: psycopg.Connection[Any], function: str, *args: Any) -> list[Row]:
    placeholders = ", ".join(["%s"] * len(args))
    wrapped = [Jsonb(a) if isinstance(a, (dict, list)) and function != "block_run" else a for a in args]
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM runops.{function}({placeholders})", wrapped)  # type: ignore[arg-type]
        return cur.fetchall()


def one(conn: psycopg.Connection[Any], function: str, *args: Any) -> Row:
    rows = call(conn, function, *args)
    assert len(rows) == 1, rows
    return rows[0]


def trigger(conn: psycopg.Connection[Any], env: str, task: str = "t", payload: Any = None, **options: Any) -> str:
    return str(one(conn, "trigger_run", env, task, payload or {}, options)["run_id"])


def status(conn: psycopg.Connection[Any], run_id: str) -> str:
    return str(one(conn, "get_run", run_id)["status"])


def set_clock(conn: psycopg.Connection[Any], at: dt.datetime | None) -> None:
    conn.execute("SELECT set_config('runops.fake_now', %s, false)", [at.isoformat() if at else ""])


def run_to_executing(conn: psycopg.Connection[Any], env: str, worker: str = "w1", **options: Any) -> Row:
    """Trigger a run and take it to EXECUTING, alone in its own queue."""
    queue = f"q-{uuid.uuid4().hex}"
    run_id = trigger(conn, env, queue=queue, **options)
    taken = call(conn, "dequeue_runs", env, worker, 1, {"queues": [queue]})
    assert [r["run_id"] for r in taken] == [run_id]
    return one(conn, "start_attempt", run_id, worker)


T0 = dt.datetime(2033, 3, 1, 12, 0, tzinfo=dt.UTC)
