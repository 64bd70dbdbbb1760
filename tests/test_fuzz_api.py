"""Fuzzing the public functions as the app role: whatever the arguments, an
error raised inside a function is an RO SQLSTATE (or a serialization/deadlock failure), and a
call that fails leaves no row behind.

Arguments mix the real ids of a small fixture graph (an environment, a run, a batch, a waitpoint
in this store) with hostile values: huge, multibyte, wrongly prefixed or unclassifiable ids,
deep and large JSON, option objects with known names and random values, extreme integers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import one, trigger

# name -> SQL types of its arguments (all of them: defaults are fuzzed too)
FUNCTIONS: dict[str, list[str]] = {
    "trigger_run": ["text", "text", "jsonb", "jsonb"],
    "trigger_failed_task": ["text", "text", "jsonb", "jsonb", "jsonb"],
    "batch_trigger": ["text", "jsonb", "jsonb"],
    "create_batch": ["text", "integer", "jsonb"],
    "append_batch_items": ["text", "integer", "jsonb", "text"],
    "seal_batch": ["text", "text"],
    "resume_batch_run": ["text", "text"],
    "create_waitpoint": ["text", "text", "jsonb"],
    "complete_waitpoint": ["text", "jsonb", "boolean", "text"],
    "block_run": ["text", "text[]", "jsonb", "text"],
    "cancel_run": ["text", "text", "text"],
    "heartbeat_run": ["text", "text", "text"],
    "start_attempt": ["text", "text", "text"],
    "complete_attempt": ["text", "integer", "jsonb", "text"],
    "fail_attempt": ["text", "integer", "jsonb", "timestamptz", "text"],
    "create_checkpoint": ["text", "integer", "text", "text", "jsonb", "text"],
    "resume_run": ["text", "text"],
    "finalize_run": ["text", "text", "jsonb", "jsonb", "text"],
    "dequeue_runs": ["text", "text", "integer", "jsonb"],
    "get_run": ["text", "text"],
    "get_batch": ["text", "text"],
    "get_waitpoint": ["text", "text"],
    "trigger_route": ["text", "jsonb"],
    "cancel_dev_session_runs": ["text", "text"],
    "execute_tasks_waiting_for_deploy": ["text", "text[]"],
    "create_alert_channel": ["text", "text", "text", "jsonb"],
    "delete_alert_channel": ["text"],
    "claim_alerts": ["text", "integer", "jsonb"],
    "complete_alert": ["text", "text"],
    "fail_alert": ["text", "text", "text"],
}

OPTION_NAMES = ["idempotency_key", "idempotency_key_scope", "idempotency_key_ttl", "parent_run_id",
                "parent_attempt_number", "resume_parent_on_completion", "delay", "ttl", "max_duration", "queue",
                "concurrency_key", "tags", "max_attempts", "metadata", "run_id", "batch_id", "batch_index",
                "dev_session_id", "seal_timeout", "completed_after", "timeout", "lease", "queues", "tasks",
                "events", "secret", "enabled", "environment_id"]

TABLES = ["runs", "batches", "batch_items", "waitpoints", "run_waitpoints", "attempts", "checkpoints", "alert_channels",
          "alerts"]

ALLOWED_OUTSIDE_RO = {"40001", "40P01"}


def _no_nul(s: str) -> bool:
    return "\x00" not in s


plain_text = st.text(max_size=40).filter(_no_nul)
hostile_text = st.sampled_from([
    "", " ", "x" * 3000, "\U0001F600" * 2048, "run_", "batch_", "waitpoint_", "run_run_c" + "0" * 24,
    "c" + "0" * 24, "2" + "A" * 26, "run_c" + "0" * 24, "batch_2" + "A" * 26, "MANUAL", "DATETIME",
    "WAIT_FOR_TASK", "COMPLETED_SUCCESSFULLY", "CANCELED", "10s", "366d", "2030-01-01T00:00:00Z", "t",
])


def deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False,
                                                                                  allow_infinity=False) | plain_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(plain_text, inner, max_size=4), max_leaves=12)
hostile_json = st.sampled_from([deep(70), deep(200), {"s": "x" * (3 * 1024 * 1024 + 10)}, [], "x", 1, None])


@st.composite
def options(draw: st.DrawFn, ids: dict[str, str]) -> Any:
    names = draw(st.lists(st.sampled_from(OPTION_NAMES) | plain_text, max_size=4, unique=True))
    return {n: draw(st.sampled_from(list(ids.values())) | hostile_text | json_values | hostile_json) for n in names}


def argument(sql_type: str, ids: dict[str, str]) -> st.SearchStrategy[Any]:
    real = st.sampled_from(list(ids.values()))
    if sql_type == "text":
        return st.none() | real | real.map(lambda v: v + "x") | plain_text | hostile_text
    if sql_type == "text[]":
        return st.none() | st.lists(st.none() | real | plain_text | hostile_text, max_size=3)
    if sql_type == "jsonb":
        return (st.none() | json_values | hostile_json | options(ids)
                | st.lists(st.fixed_dictionaries({"task": st.just("t") | plain_text}, optional={
                    "payload": json_values | hostile_json, "options": options(ids)}), min_size=1, max_size=3))
    if sql_type == "integer":
        return st.none() | st.integers(-2**31, 2**31 - 1) | st.sampled_from([0, 1, 2, 250, 251, 99999, 100000])
    if sql_type == "boolean":
        return st.none() | st.booleans()
    if sql_type == "timestamptz":
        return st.none() | st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                                        timezones=st.just(dt.UTC))
    raise AssertionError(sql_type)


@pytest.fixture
def admin(store: str, stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        yield conn


@pytest.fixture
def graph(conn: psycopg.Connection[Any], env_id: str) -> dict[str, str]:
    """Real ids in this store for the fuzzer to aim at."""
    run_id = trigger(conn, env_id)
    batch_id = one(conn, "create_batch", env_id, 2, {})["batch_id"]
    waitpoint_id = one(conn, "create_waitpoint", env_id, "MANUAL", {})["waitpoint_id"]
    return {"env": env_id, "run": run_id, "batch": batch_id, "waitpoint": waitpoint_id,
            "run_waitpoint": "waitpoint_" + run_id.removeprefix("run_")}


def table_counts(admin: psycopg.Connection[Any]) -> tuple[int, ...]:
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM runops.{t})" for t in TABLES)
    return tuple(admin.execute(sql).fetchone())


def adapt(sql_type: str, value: Any) -> Any:
    if value is not None and sql_type == "jsonb":
        return Jsonb(value)
    return value


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_public_functions_raise_only_ro_sqlstates_and_a_failed_call_leaves_no_row(
        conn: psycopg.Connection[Any], admin: psycopg.Connection[Any], graph: dict[str, str],
        data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(FUNCTIONS)), label="function")
    types = FUNCTIONS[name]
    args = [data.draw(argument(t, graph), label=f"{name} arg {i}") for i, t in enumerate(types)]
    placeholders = ", ".join(f"%s::{t}" for t in types)
    before = table_counts(admin)
    try:
        conn.execute(f"SELECT * FROM runops.{name}({placeholders})",
                     [adapt(t, a) for t, a in zip(types, args, strict=True)]).fetchall()
    except psycopg.Error as exc:
        code = sqlstate_of(exc) or ""
        assert code.startswith("RO") or code in ALLOWED_OUTSIDE_RO, (name, code, str(exc)[:300])
        assert table_counts(admin) == before, (name, code)


# -- bounded echoes (SPEC §3 [1.2]) ---------------------------------------------------------------

BIG = "x" * (1 << 20)  # 1 MiB
LONGEST_MESSAGE = 300  # message, DETAIL and HINT each: a ~100-character quote and the wording
MOST_LOG_PER_CALL = 10 * 1024
# Plausible values by argument name, so that the one huge argument is the one a function judges.
PLAUSIBLE = {"task_identifier": "t", "idempotency_key": "k", "scope": "run", "worker_id": "w",
             "status": "COMPLETED_SUCCESSFULLY", "reason": "WAIT_FOR_TASK", "location": "l", "kind": "MANUAL",
             "type": "MANUAL", "slug": "s", "name": "n", "mint_kind": "cuid", "dev_session_id": "d",
             "environment_type": "PRODUCTION", "task_identifiers": ["t"], "waitpoint_ids": None}
HUGE_OPTION_NAMES = OPTION_NAMES + ["paused", "archived", "runs_disabled", "statuses", "tags", "task_identifiers",
                                    "created_after", "created_before", "batch_id"]


def granted_functions(conn: psycopg.Connection[Any]) -> list[tuple[str, list[str], list[str]]]:
    """(name, input argument types, input argument names) of every runops function the app role
    may execute, as the catalog says."""
    rows = conn.execute("""
        SELECT p.proname, ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS u(t, n)
                                ORDER BY n),
               coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}')
        FROM pg_proc AS p
        WHERE p.pronamespace = 'runops'::regnamespace AND p.prokind = 'f'
          AND has_function_privilege('runops_app', p.oid, 'EXECUTE')
        ORDER BY 1""").fetchall()
    out = []
    for name, types, names, modes in rows:
        inputs = [n for i, n in enumerate(names) if not modes or modes[i] in ("i", "b", "v")]
        out.append((name, list(types), (inputs + [""] * len(types))[:len(types)]))
    return out


def plausible(sql_type: str, name: str, ids: dict[str, str]) -> Any:
    if name in PLAUSIBLE:
        return PLAUSIBLE[name]
    for key in ("environment", "organization", "project", "batch", "waitpoint", "run"):
        if key in name:
            return ids[key]
    return {"text": "x", "integer": 1, "bigint": 1, "boolean": False, "jsonb": Jsonb({}),
            "text[]": [ids["waitpoint"]], "bytea": b"x" * 20}.get(sql_type)


def huge_values(sql_type: str) -> list[Any]:
    if sql_type == "text":
        return [BIG, *(f"{kind}_{BIG}" for kind in ("run", "batch", "waitpoint")), "c" + BIG, "é" * (1 << 19)]
    if sql_type == "text[]":
        return [[BIG], [f"waitpoint_{BIG}"]]
    if sql_type == "bytea":
        return [b"x" * (1 << 20)]
    if sql_type == "jsonb":
        options = [{name: value} for name in HUGE_OPTION_NAMES for value in (BIG, [BIG], {BIG: 1})]
        items = [[{"task": BIG}], [{"task": "t", "payload": {BIG: 1}}],
                 *([{"task": "t", "options": {name: BIG}}] for name in HUGE_OPTION_NAMES)]
        return [Jsonb(v) for v in (BIG, [BIG], {BIG: 1}, *options, *items)]
    return []


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_no_granted_function_echoes_more_than_a_short_prefix_of_its_input(
        stores: Stores, store: str, conn: psycopg.Connection[Any], env_id: str, make_env: Any) -> None:
    """Every function granted to runops_app, each argument in turn 1 MiB long (text, ids with each
    friendly prefix, arrays, bytea, JSON with huge values, keys and options) beside plausible
    others: no message, DETAIL or HINT over 300 characters, and the server log grows by less than
    10 kB per call."""
    graph_env = make_env("cuid" if store == CONTROL_PLANE else "ksuid")
    ids = {"environment": graph_env.environment_id, "organization": graph_env.organization_id,
           "project": graph_env.project_id, "run": trigger(conn, graph_env.environment_id),
           "batch": one(conn, "create_batch", graph_env.environment_id, 2, {})["batch_id"],
           "waitpoint": one(conn, "create_waitpoint", graph_env.environment_id, "MANUAL", {})["waitpoint_id"]}
    log = Path(stores.local.clusters[store].datadir) / "server.log"
    too_long: dict[str, int] = {}  # "function(argument)" -> the longest message it gave
    too_loud: dict[str, int] = {}  # -> the most log bytes one call wrote
    calls = 0
    for name, types, names in granted_functions(conn):
        base = [plausible(t, n, ids) for t, n in zip(types, names, strict=True)]
        placeholders = ", ".join(f"%s::{t}" for t in types)
        for i, sql_type in enumerate(types):
            for value in huge_values(sql_type):
                args = [*base[:i], value, *base[i + 1:]]
                before = log.stat().st_size
                calls += 1
                try:
                    conn.execute(f"SELECT * FROM runops.{name}({placeholders})", args).fetchall()
                except psycopg.Error as exc:
                    diag = exc.diag
                    what = f"{name}({names[i] or i})"
                    longest = max(len(diag.message_primary or ""), len(diag.message_detail or ""),
                                  len(diag.message_hint or ""))
                    if longest > LONGEST_MESSAGE:
                        too_long[what] = max(longest, too_long.get(what, 0))
                    grown = log.stat().st_size - before
                    if grown >= MOST_LOG_PER_CALL:
                        too_loud[what] = max(grown, too_loud.get(what, 0))
    assert calls > 500
    assert too_long == {}
    assert too_loud == {}
