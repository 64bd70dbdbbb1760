"""trigger_run's fast path (r0004): a root without options, or with only a key, skips admit_new_run
through root_admission. It must write exactly the row the full path writes, be taken when it can,
and leave every error to the full path. And the ids it mints (next_ksuid) stay KSUIDs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS
from tests.conftest import Stores

# What differs between two runs of the same call: the id and the moments it was made.
VOLATILE = ("id", "created_at", "updated_at", "queued_at")


@pytest.fixture
def admin(stores: Stores, store: str) -> Iterator[psycopg.Connection[Any]]:
    """A superuser session on `store` that counts function calls in its own transaction."""
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        conn.execute("SET track_functions = 'all'")
        yield conn


def calls_in_transaction(conn: psycopg.Connection[Any], signature: str) -> int:
    row = conn.execute("SELECT coalesce(pg_stat_get_xact_function_calls(%s::regprocedure), 0)",
                       [signature]).fetchone()
    assert row is not None
    return int(row[0])


def trigger(conn: psycopg.Connection[Any], env: str, options: dict[str, Any], task: str = "fast") -> tuple[Any, ...]:
    row = conn.execute("SELECT * FROM runops.trigger_run(%s, %s, %s, %s)",
                       [env, task, Jsonb({"n": 1}), Jsonb(options)]).fetchone()
    assert row is not None
    return tuple(row)


def stored(conn: psycopg.Connection[Any], run_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT to_jsonb(r) FROM runops.runs AS r WHERE r.id = %s", [run_id[4:]]).fetchone()
    assert row is not None
    return {k: v for k, v in row[0].items() if k not in VOLATILE}


ADMIT = "runops.admit_new_run(text, text, jsonb, jsonb, text, jsonb)"
FIND_OR_CREATE = ("runops.find_or_create_run(runops.environment_context, runops.runs, text, jsonb, "
                  "runops.trigger_spec, text, jsonb)")


def test_a_root_without_options_skips_admission_and_writes_the_full_paths_row(admin, env_id: str, store: str) -> None:
    with admin.transaction():
        fast = trigger(admin, env_id, {})
        assert calls_in_transaction(admin, ADMIT) == 0
        # Options equal to the defaults take the full path, and must write the same row.
        full = trigger(admin, env_id, {"max_attempts": 3})
        assert calls_in_transaction(admin, ADMIT) == 1
    assert fast[1:] == full[1:] == (False, "PENDING", "NEW" if store == RUN_OPS else "LEGACY")
    assert stored(admin, fast[0]) == stored(admin, full[0])


def test_a_root_with_only_a_key_goes_straight_to_the_engine(admin, env_id: str) -> None:
    with admin.transaction():
        first = trigger(admin, env_id, {"idempotency_key": "fast-k"})
        again = trigger(admin, env_id, {"idempotency_key": "fast-k"})
        assert calls_in_transaction(admin, ADMIT) == 0
        assert calls_in_transaction(admin, FIND_OR_CREATE) == 2
        # The same key through the full path (an option equal to its default) finds the same run.
        full = trigger(admin, env_id, {"idempotency_key": "fast-k", "idempotency_key_scope": "run"})
        assert calls_in_transaction(admin, ADMIT) == 1
    assert (first[1], again[1], full[1]) == (False, True, True)
    assert first[0] == again[0] == full[0]
    row = stored(admin, first[0])
    assert (row["idempotency_key"], row["idempotency_key_scope"]) == ("fast-k", "global")


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_every_miss_falls_back_to_the_full_paths_error(admin, env_id: str, store: str) -> None:
    """What root_admission turns away, admit_new_run explains (and nothing is written)."""
    cases = [("no-such-environment", "t", {}, "RO004"), (env_id, "bad task!", {}, "RO006"),
             (env_id, "t", {"idempotency_key": ""}, "RO006")]
    for env, task, options, code in cases:
        with pytest.raises(psycopg.Error) as err:
            trigger(admin, env, options, task=task)
        assert err.value.sqlstate == code, (env, task, options)


def test_ids_minted_by_one_session_are_ksuids_of_their_second_and_distinct(stores: Stores, new_env) -> None:
    with psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as conn:
        before = [trigger(conn, new_env.environment_id, {})[0][4:] for _ in range(3)]
        # A rolled-back transaction hands its counter back (the session setting is
        # transactional): the next ids repeat the rolled-back ones, never a stored one.
        with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
            rolled_back = [trigger(conn, new_env.environment_id, {})[0][4:] for _ in range(3)]
            conn.execute("SELECT 1 / 0")
        made = before + [trigger(conn, new_env.environment_id, {})[0][4:] for _ in range(300)]
        rows = conn.execute("""
            SELECT r.id, r.created_at, runops.ksuid_timestamp(r.id), runops.try_classify_residency(r.id)
            FROM runops.runs AS r WHERE r.id = ANY (%s)""", [made + rolled_back]).fetchall()
    assert len(set(made)) == len(made) == len(rows)  # distinct, all stored, no rolled-back id stored
    assert {r[3] for r in rows} == {"NEW"}
    for _, created, minted_at, _ in rows:
        assert abs(created - minted_at) < dt.timedelta(seconds=2)
    # Within one second, one session's ids share a real KSUID's prefix and count up.
    by_prefix: dict[str, list[str]] = {}
    for run_id in made:
        by_prefix.setdefault(run_id[:23], []).append(run_id)
    assert any(len(ids) > 1 for ids in by_prefix.values())
    for ids in by_prefix.values():
        assert ids == sorted(ids)
