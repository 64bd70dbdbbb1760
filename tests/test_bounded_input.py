"""Bounded input (SPEC §3 [1.2]): nothing the API accepts may break a reader or an index.

Payload, metadata, output and error have a size limit (store_config.max_json_bytes, default
3 MiB serialized) and a nesting limit (max_json_depth, default 64), checked in SQL (RO006); every
indexed text is limited in bytes as well as characters; every entry point that admits runs
applies the same validation and the same RO005 gate; messages quote at most a short prefix of
any input. A refused call leaves no row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import RunOps
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import one, run_to_executing, trigger

DEFAULT_DEPTH = 64
DEFAULT_BYTES = 3 * 1024 * 1024


def deep_sql(depth: int) -> str:
    """A JSON text of exactly `depth` nested containers: [[...[]...]]."""
    return "[" * depth + "]" * depth


@pytest.fixture
def admin(store: str, stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        yield conn


def refused(conn: psycopg.Connection[Any], sql: str, params: list[Any]) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as err:
        conn.execute(sql, params)
    return err.value


def runs_of(admin: psycopg.Connection[Any], env: str) -> int:
    return int(admin.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s", [env]).fetchone()[0])


def rows_of(admin: psycopg.Connection[Any], env: str) -> tuple[int, int, int]:
    """Runs, batches and waitpoints of an environment: a refused call adds none."""
    return admin.execute(
        "SELECT (SELECT count(*) FROM runops.runs WHERE environment_id = %(e)s),"
        "       (SELECT count(*) FROM runops.batches WHERE environment_id = %(e)s),"
        "       (SELECT count(*) FROM runops.waitpoints WHERE environment_id = %(e)s)", {"e": env}).fetchone()


# -- nesting ------------------------------------------------------------------------------------------------

def test_a_payload_nested_1500_levels_is_ro006_and_creates_nothing(conn, admin, env_id: str) -> None:
    # The reproduction: accepted before, then psycopg's json loader raised RecursionError
    # in every worker that dequeued it.
    err = refused(conn, "SELECT * FROM runops.trigger_run(%s, 't', (repeat('[', 1500) || repeat(']', 1500))::jsonb)",
                  [env_id])
    assert sqlstate_of(err) == "RO006"
    assert runs_of(admin, env_id) == 0


def test_a_payload_at_the_depth_limit_is_accepted_and_one_level_more_is_not(conn, admin, env_id: str) -> None:
    run_id = conn.execute("SELECT run_id FROM runops.trigger_run(%s, 't', %s::jsonb)",
                          [env_id, deep_sql(DEFAULT_DEPTH)]).fetchone()[0]
    # Readers load it: the client's json loader recurses once per level.
    assert one(conn, "get_run", run_id)["payload"] is not None
    err = refused(conn, "SELECT * FROM runops.trigger_run(%s, 't', %s::jsonb)", [env_id, deep_sql(DEFAULT_DEPTH + 1)])
    assert sqlstate_of(err) == "RO006"
    deep_object = '{"a":' * (DEFAULT_DEPTH + 1) + "1" + "}" * (DEFAULT_DEPTH + 1)
    err = refused(conn, "SELECT * FROM runops.trigger_run(%s, 't', %s::jsonb)", [env_id, deep_object])
    assert sqlstate_of(err) == "RO006"
    assert runs_of(admin, env_id) == 1


def test_brackets_inside_strings_do_not_count_as_nesting(conn, env_id: str) -> None:
    payload = {"text": "[" * 5000, "list": [{"k": i} for i in range(100)]}
    assert trigger(conn, env_id, payload=payload)


def test_metadata_nested_too_deep_is_ro006(conn, admin, env_id: str) -> None:
    err = refused(conn, "SELECT * FROM runops.trigger_run(%s, 't', '{}', jsonb_build_object('metadata', "
                        "jsonb_build_object('m', %s::jsonb)))", [env_id, deep_sql(DEFAULT_DEPTH)])
    assert sqlstate_of(err) == "RO006"
    assert runs_of(admin, env_id) == 0


# -- size ---------------------------------------------------------------------------------------------------

def test_a_payload_over_3_mib_serialized_is_ro006_and_creates_nothing(conn, admin, env_id: str) -> None:
    big = {"s": "x" * DEFAULT_BYTES}
    err = refused(conn, "SELECT * FROM runops.trigger_run(%s, 't', %s)", [env_id, Jsonb(big)])
    assert sqlstate_of(err) == "RO006"
    assert runs_of(admin, env_id) == 0
    assert trigger(conn, env_id, payload={"s": "x" * (DEFAULT_BYTES - 100)})


def test_the_json_limits_are_configured_per_store(admin, env_id: str) -> None:
    # One transaction, rolled back: the lowered limits never reach another session.
    with admin.transaction(force_rollback=True):
        admin.execute("UPDATE runops.store_config SET max_json_bytes = 65536, max_json_depth = 32")
        with pytest.raises(psycopg.Error) as err, admin.transaction():
            admin.execute("SELECT * FROM runops.trigger_run(%s, 't', %s)", [env_id, Jsonb({"s": "x" * 70000})])
        assert sqlstate_of(err.value) == "RO006"
        with pytest.raises(psycopg.Error) as err, admin.transaction():
            admin.execute("SELECT * FROM runops.trigger_run(%s, 't', %s::jsonb)", [env_id, deep_sql(33)])
        assert sqlstate_of(err.value) == "RO006"
        admin.execute("SELECT * FROM runops.trigger_run(%s, 't', %s::jsonb)", [env_id, deep_sql(32)])
        with pytest.raises(psycopg.Error) as err, admin.transaction():
            admin.execute("UPDATE runops.store_config SET max_json_depth = 4")  # below the fast path's floor
        assert sqlstate_of(err.value) == "23514"


# -- every entry point that admits runs ---------------------------------------------------------------------

DEEP = deep_sql(200)


def test_every_entry_point_that_admits_runs_refuses_a_deep_payload(conn, admin, env_id: str) -> None:
    batch_id = one(conn, "create_batch", env_id, 2, {})["batch_id"]
    before = rows_of(admin, env_id)
    calls = [
        ("SELECT * FROM runops.trigger_run(%s, 't', %s::jsonb)", [env_id, DEEP]),
        ("SELECT * FROM runops.trigger_failed_task(%s, 't', %s::jsonb, '{}')", [env_id, DEEP]),
        ("SELECT * FROM runops.trigger_failed_task(%s, 't', '{}', %s::jsonb)", [env_id, DEEP]),
        ("SELECT * FROM runops.batch_trigger(%s, jsonb_build_array(jsonb_build_object('task', 't'),"
         " jsonb_build_object('task', 't', 'payload', %s::jsonb)))", [env_id, DEEP]),
        ("SELECT * FROM runops.append_batch_items(%s, 0, jsonb_build_array(jsonb_build_object('task', 't',"
         " 'payload', %s::jsonb)))", [batch_id, DEEP]),
        ("SELECT * FROM runops.append_batch_items(%s, 0, jsonb_build_array(jsonb_build_object('task', 't',"
         " 'options', jsonb_build_object('metadata', jsonb_build_object('m', %s::jsonb)))))", [batch_id, DEEP]),
    ]
    for sql, params in calls:
        assert sqlstate_of(refused(conn, sql, params)) == "RO006", sql
    assert rows_of(admin, env_id) == before


def test_a_batch_item_over_the_size_limit_names_its_index(conn, admin, env_id: str) -> None:
    items = [{"task": "t"}, {"task": "t", "payload": {"s": "x" * DEFAULT_BYTES}}]
    err = refused(conn, "SELECT * FROM runops.batch_trigger(%s, %s)", [env_id, Jsonb(items)])
    assert sqlstate_of(err) == "RO006" and "batch item 1" in str(err)
    assert rows_of(admin, env_id) == (0, 0, 0)


def test_trigger_failed_task_checks_the_task_identifier(conn, admin, env_id: str) -> None:
    for task in ["not a task!", "", "x" * 129]:
        err = refused(conn, "SELECT * FROM runops.trigger_failed_task(%s, %s, '{}', '{}')", [env_id, task])
        assert sqlstate_of(err) == "RO006"
    assert runs_of(admin, env_id) == 0


def test_append_batch_items_in_a_paused_or_archived_environment_is_ro005(client: RunOps, conn, admin,
                                                                       env_id: str) -> None:
    batch_id = one(conn, "create_batch", env_id, 2, {})["batch_id"]
    for change in ({"paused": True}, {"archived": True}):
        client.update_environment(env_id, **change)
        assert client.wait_for_mirror()
        err = refused(conn, "SELECT * FROM runops.append_batch_items(%s, 0, %s)", [batch_id, Jsonb([{"task": "t"}])])
        assert sqlstate_of(err) == "RO005"
        client.update_environment(env_id, paused=False, archived=False)
        assert client.wait_for_mirror()
    assert runs_of(admin, env_id) == 0
    assert one(conn, "append_batch_items", batch_id, 0, [{"task": "t"}])["first_index"] == 0


def test_trigger_failed_task_in_a_paused_environment_is_ro005(client: RunOps, conn, admin, env_id: str) -> None:
    client.update_environment(env_id, paused=True)
    assert client.wait_for_mirror()
    try:
        err = refused(conn, "SELECT * FROM runops.trigger_failed_task(%s, 't', '{}', '{}')", [env_id])
        assert sqlstate_of(err) == "RO005"
        assert runs_of(admin, env_id) == 0
    finally:
        client.update_environment(env_id, paused=False)
        assert client.wait_for_mirror()


# -- what lifecycle and waitpoint calls store ----------------------------------------------------------------

def test_outputs_errors_and_metadata_over_the_limits_are_ro006_and_change_nothing(conn, admin, env_id: str) -> None:
    run = run_to_executing(conn, env_id)
    run_id = run["run_id"]
    bad = [
        ("SELECT * FROM runops.complete_attempt(%s, 1, %s::jsonb)", [run_id, DEEP]),
        ("SELECT * FROM runops.fail_attempt(%s, 1, %s::jsonb)", [run_id, DEEP]),
        ("SELECT * FROM runops.finalize_run(%s, 'CRASHED', %s::jsonb)", [run_id, DEEP]),
        ("SELECT * FROM runops.finalize_run(%s, 'COMPLETED_SUCCESSFULLY', NULL, %s::jsonb)", [run_id, DEEP]),
        ("SELECT * FROM runops.create_checkpoint(%s, 1, 'MANUAL', 'loc', jsonb_build_object('m', %s::jsonb))",
         [run_id, DEEP]),
        ("SELECT * FROM runops.complete_attempt(%s, 1, %s)", [run_id, Jsonb({"s": "x" * DEFAULT_BYTES})]),
    ]
    for sql, params in bad:
        assert sqlstate_of(refused(conn, sql, params)) == "RO006", sql
    after = one(conn, "get_run", run_id)
    assert (after["status"], after["output"], after["error"]) == ("EXECUTING", None, None)
    assert admin.execute("SELECT count(*) FROM runops.checkpoints WHERE run_id = %s",
                         [run_id.removeprefix("run_")]).fetchone()[0] == 0


def test_a_waitpoint_output_over_the_limits_is_ro006_and_leaves_it_pending(conn, env_id: str) -> None:
    wp = one(conn, "create_waitpoint", env_id, "MANUAL", {})["waitpoint_id"]
    err = refused(conn, "SELECT * FROM runops.complete_waitpoint(%s, %s::jsonb)", [wp, DEEP])
    assert sqlstate_of(err) == "RO006"
    assert one(conn, "get_waitpoint", wp)["status"] == "PENDING"


# -- indexed texts in bytes ----------------------------------------------------------------------------------

FOUR_BYTE_KEY = "\U0001F600" * 2048   # 2048 characters, 8192 bytes: past any btree entry


def test_multibyte_keys_within_2048_characters_but_over_2048_bytes_are_ro006_not_54000(conn, admin,
                                                                                     env_id: str) -> None:
    key = {"idempotency_key": FOUR_BYTE_KEY}
    batch_id = one(conn, "create_batch", env_id, 1, {})["batch_id"]
    before = rows_of(admin, env_id)
    calls = [
        ("SELECT * FROM runops.create_batch(%s, 1, %s)", [env_id, Jsonb(key)]),
        ("SELECT * FROM runops.batch_trigger(%s, %s, %s)", [env_id, Jsonb([{"task": "t"}]), Jsonb(key)]),
        ("SELECT * FROM runops.create_waitpoint(%s, 'MANUAL', %s)", [env_id, Jsonb(key)]),
        ("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)", [env_id, Jsonb(key)]),
        ("SELECT * FROM runops.batch_trigger(%s, %s)", [env_id, Jsonb([{"task": "t", "options": key}])]),
        ("SELECT * FROM runops.append_batch_items(%s, 0, %s)", [batch_id, Jsonb([{"task": "t", "options": key}])]),
    ]
    for sql, params in calls:
        assert sqlstate_of(refused(conn, sql, params)) == "RO006", sql
    assert rows_of(admin, env_id) == before
    # Shorter indexed texts are bounded by their characters: 256 four-byte characters fit an entry.
    assert trigger(conn, env_id, queue="\U0001F600" * 256, tags=["\U0001F600" * 128],
                   concurrency_key="\U0001F600" * 256)


def test_a_key_of_exactly_2048_bytes_is_accepted(conn, env_id: str) -> None:
    key = "\u00e9" * 1024  # two bytes each
    assert one(conn, "create_waitpoint", env_id, "MANUAL", {"idempotency_key": key})["is_cached"] is False
    assert one(conn, "create_batch", env_id, 1, {"idempotency_key": key})["is_cached"] is False
    assert trigger(conn, env_id, idempotency_key=key)


# -- messages ---------------------------------------------------------------------------------------------------

HUGE = "e" * 1_000_000


@pytest.mark.parametrize("sql, params", [
    ("SELECT * FROM runops.trigger_run(%s, 't')", [HUGE]),
    ("SELECT * FROM runops.trigger_run('env', %s)", [HUGE]),
    ("SELECT * FROM runops.trigger_failed_task(%s, 't', '{}', '{}')", [HUGE]),
    ("SELECT * FROM runops.create_waitpoint(%s, 'MANUAL')", [HUGE]),
    ("SELECT * FROM runops.create_batch(%s, 1)", [HUGE]),
    ("SELECT * FROM runops.batch_trigger(%s, '[{\"task\": \"t\"}]')", [HUGE]),
    ("SELECT * FROM runops.dequeue_runs(%s, 'w', 1)", [HUGE]),
    ("SELECT * FROM runops.get_run(%s)", [HUGE]),
    ("SELECT * FROM runops.cancel_run(%s)", [HUGE]),
    ("SELECT * FROM runops.cancel_run('run_' || %s)", [HUGE]),
    ("SELECT * FROM runops.complete_waitpoint(%s)", [HUGE]),
    ("SELECT * FROM runops.trigger_run('env', 't', '{}', jsonb_build_object(%s::text, 1))", [HUGE]),
    ("SELECT * FROM runops.trigger_run('env', 't', '{}', jsonb_build_object('ttl', %s::text))", [HUGE]),
    ("SELECT * FROM runops.trigger_run('env', 't', '{}', jsonb_build_object('max_attempts', %s::text))", [HUGE]),
    ("SELECT * FROM runops.finalize_run('run_cjld2cjxh0000qzrmn831i7rn', %s)", [HUGE]),
    ("SELECT * FROM runops.update_environment(%s, '{}')", [HUGE]),
], ids=lambda v: v[:60] if isinstance(v, str) else "huge")
def test_error_messages_quote_at_most_a_short_prefix_of_any_input(store: str, conn, sql: str,
                                                                  params: list[Any]) -> None:
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        assert (sqlstate_of(exc) or "").startswith("RO"), exc
        diag = exc.diag
        for part in (diag.message_primary, diag.message_detail, diag.message_hint):
            assert part is None or ("e" * 101 not in part and len(part) <= 600), part[:200]
    else:
        assert "get_run" in sql  # reads never refuse
