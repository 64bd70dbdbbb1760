"""Bad input gets its RO SQLSTATE, in the SPEC's order, and writes nothing."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import RunOps
from runops.errors import EnvironmentUnusable, InvalidInput, NotFound
from tests.conftest import sqlstate_of

BAD_OPTIONS = [
    {"idempotency_key": "x" * 2049},
    {"idempotency_key": ""},
    {"idempotency_key": 42},
    {"idempotency_key_scope": "session"},
    {"idempotency_key_ttl": "5x"},
    {"idempotency_key_ttl": "366d"},
    {"idempotency_key_ttl": "10"},
    {"ttl": "1 hour"},
    {"max_duration": "-1s"},
    {"delay": "2030-01-01T00:00:00"},  # a timestamp without an offset
    {"delay": "tomorrow"},
    {"delay": "2030-13-45T00:00:00Z"},
    {"tags": [str(i) for i in range(11)]},
    {"tags": [1, 2]},
    {"tags": [""]},
    {"max_attempts": 0},
    {"max_attempts": 251},
    {"max_attempts": "3"},
    {"metadata": [1]},
    {"resume_parent_on_completion": True},  # needs a parent
    {"resume_parent_on_completion": "yes"},
    {"parent_run_id": "batch_cjld2cjxh0000qzrmn831i7rn"},
    {"run_id": "waitpoint_cjld2cjxh0000qzrmn831i7rn"},
    {"batch_index": -1},
    {"no_such_option": 1},
]


def trigger(conn: psycopg.Connection[Any], env: str, task: str = "t", options: Any = None,
            payload: Any = None) -> tuple[Any, ...]:
    row = conn.execute("SELECT * FROM runops.trigger_run(%s, %s, %s, %s)",
                       [env, task, Jsonb(payload if payload is not None else {}),
                        Jsonb(options if options is not None else {})]).fetchone()
    assert row is not None
    return tuple(row)


def count_runs(admin: psycopg.Connection[Any], env: str) -> int:
    return int(admin.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s", [env]).fetchone()[0])


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: next(iter(o)))
def test_bad_trigger_options_are_ro006_and_create_nothing(cp: psycopg.Connection, cp_admin: psycopg.Connection,
                                                         legacy_env, options: dict[str, Any]) -> None:
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, legacy_env.environment_id, options=options)
    assert sqlstate_of(err.value) == "RO006", err.value
    assert count_runs(cp_admin, legacy_env.environment_id) == 0


@pytest.mark.parametrize(("task", "options"), [("", {}), ("has space", {}), ("x" * 129, {}),
                                               ("t", "not an object")])
def test_bad_task_or_options_shape_is_ro006(cp: psycopg.Connection, legacy_env, task: str, options: Any) -> None:
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, legacy_env.environment_id, task, options)
    assert sqlstate_of(err.value) == "RO006"


@pytest.mark.parametrize(("env", "options", "expected"), [
    ("no-such-env", {"ttl": "bad"}, "RO006"),                           # RO006 before RO004
    ("no-such-env", {"parent_run_id": "garbage"}, "RO001"),             # RO001 before RO004
    ("no-such-env", {"run_id": "garbage", "ttl": "5y"}, "RO006"),       # RO006 before RO001
    ("no-such-env", {}, "RO004"),
])
def test_errors_come_in_the_spec_order(cp: psycopg.Connection, env: str, options: dict[str, Any],
                                       expected: str) -> None:
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, env, options=options)
    assert sqlstate_of(err.value) == expected


@pytest.mark.parametrize("change", [{"paused": True}, {"archived": True}])
def test_an_unusable_environment_refuses_new_work_on_both_stores(client: RunOps, make_env,
                                                                change: dict[str, Any]) -> None:
    for kind in ("cuid", "ksuid"):
        env = make_env(kind)
        client.update_environment(env.environment_id, **change)
        assert client.wait_for_mirror()
        with pytest.raises(EnvironmentUnusable):
            client.trigger_run(env.environment_id, "t")
        client.update_environment(env.environment_id, paused=False, archived=False)
        assert client.wait_for_mirror()
        assert client.trigger_run(env.environment_id, "t").is_cached is False


def test_tenant_functions_validate_and_refuse_the_run_ops_store(client: RunOps, ro: psycopg.Connection,
                                                               legacy_env) -> None:
    with pytest.raises(InvalidInput):
        client.create_organization("Not A Slug")
    with pytest.raises(InvalidInput):
        client.create_environment(legacy_env.project_id, "x", "QA")
    with pytest.raises(NotFound):
        client.create_project("no-such-org", "p")
    with pytest.raises(NotFound):
        client.update_environment("no-such-env", paused=True)
    with pytest.raises(InvalidInput):
        client.update_environment(legacy_env.environment_id, colour="blue")
    with pytest.raises(InvalidInput):
        client.update_environment(legacy_env.environment_id, paused="yes")
    with pytest.raises(InvalidInput):
        client.set_mint_kind(legacy_env.organization_id, "uuid")
    with pytest.raises(psycopg.Error) as err:
        ro.execute("SELECT runops.create_organization('x')")
    assert sqlstate_of(err.value) == "RO002"
    assert err.value.diag.message_detail == "owning_store=CONTROL_PLANE"


def test_delay_makes_a_delayed_run_until_its_time(cp: psycopg.Connection, legacy_env) -> None:
    cp.execute("SET runops.fake_now = '2032-05-01 12:00:00+00'")
    by_duration = trigger(cp, legacy_env.environment_id, options={"delay": "10m"})
    at_time = trigger(cp, legacy_env.environment_id, options={"delay": "2032-05-01T15:00:00+02:00"})
    past = trigger(cp, legacy_env.environment_id, options={"delay": "2032-05-01T11:00:00Z"})
    rows = {r[0]: r for r in cp.execute(
        "SELECT run_id, status, delay_until, queued_at FROM runops.get_run(%s) UNION ALL "
        "SELECT run_id, status, delay_until, queued_at FROM runops.get_run(%s) UNION ALL "
        "SELECT run_id, status, delay_until, queued_at FROM runops.get_run(%s)",
        [by_duration[0], at_time[0], past[0]]).fetchall()}
    assert rows[by_duration[0]][1] == "DELAYED" and rows[by_duration[0]][2].isoformat() == "2032-05-01T12:10:00+00:00"
    assert rows[at_time[0]][1] == "DELAYED" and rows[at_time[0]][2].isoformat() == "2032-05-01T13:00:00+00:00"
    assert rows[past[0]][1] == "PENDING" and rows[past[0]][3] is not None


def test_finalize_run_validates_and_refuses_illegal_moves(client: RunOps, cp: psycopg.Connection, legacy_env) -> None:
    run = client.trigger_run(legacy_env.environment_id, "t")
    for status, code in [("PENDING", "RO006"), ("DONE", "RO006"), (None, "RO006")]:
        with pytest.raises(psycopg.Error) as err:
            cp.execute("SELECT * FROM runops.finalize_run(%s, %s)", [run.run_id, status])
        assert sqlstate_of(err.value) == code
    final = client.finalize_run(run.run_id, "COMPLETED_SUCCESSFULLY", output={"ok": True})
    assert final.output == {"ok": True} and final.completed_at is not None
    again = client.finalize_run(run.run_id, "COMPLETED_SUCCESSFULLY", output={"ok": True})
    assert again == final  # the repeated call returns the row unchanged
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT * FROM runops.finalize_run(%s, 'CRASHED')", [run.run_id])
    assert sqlstate_of(err.value) == "RO003"
    assert client.get_run(run.run_id).status == "COMPLETED_SUCCESSFULLY"  # type: ignore[union-attr]


def test_only_the_first_friendly_prefix_is_stripped_in_writes(cp: psycopg.Connection, legacy_env) -> None:
    run = trigger(cp, legacy_env.environment_id)[0]
    for function, args in [("cancel_run", (f"run_{run}",)), ("finalize_run", (f"run_{run}", "CANCELED"))]:
        with pytest.raises(psycopg.Error) as err:
            cp.execute(f"SELECT * FROM runops.{function}(%s{', %s' * (len(args) - 1)})", list(args))
        assert sqlstate_of(err.value) == "RO001", function
    with pytest.raises(psycopg.Error) as err:
        trigger(cp, legacy_env.environment_id, options={"parent_run_id": f"run_{run}"})
    assert sqlstate_of(err.value) == "RO001"


def test_error_order_holds_where_several_checks_fail(cp: psycopg.Connection, client: RunOps, make_env) -> None:
    env = make_env("cuid")
    final_parent = trigger(cp, env.environment_id)[0]
    cp.execute("SELECT * FROM runops.finalize_run(%s, 'COMPLETED_SUCCESSFULLY')", [final_parent])
    open_batch = cp.execute("SELECT batch_id FROM runops.create_batch(%s, 1)", [env.environment_id]).fetchone()[0]
    client.update_environment(env.environment_id, paused=True)
    cases = [
        # RO005 (paused) before RO003 (a final parent cannot wait)
        ({"parent_run_id": final_parent, "resume_parent_on_completion": True}, "RO005"),
        # RO006 before RO005: batch_id without batch_index, and an index past the batch's end
        ({"batch_id": open_batch}, "RO006"),
        ({"batch_id": open_batch, "batch_index": 5}, "RO006"),
    ]
    for options, code in cases:
        with pytest.raises(psycopg.Error) as err:
            trigger(cp, env.environment_id, options=options)
        assert sqlstate_of(err.value) == code, options
    with pytest.raises(psycopg.Error) as err:  # a bad item is RO006 even in a paused environment
        cp.execute("SELECT * FROM runops.batch_trigger(%s, %s)", [env.environment_id, Jsonb([{"payload": 1}])])
    assert sqlstate_of(err.value) == "RO006"
    with pytest.raises(psycopg.Error) as err:  # RO006 (reason too long) before RO004 (no such run)
        cp.execute("SELECT * FROM runops.cancel_run(%s, %s)", ["run_c" + "0" * 24, "x" * 3000])
    assert sqlstate_of(err.value) == "RO006"
    with pytest.raises(psycopg.Error) as err:  # RO004 (missing waitpoint) before RO003 (final run)
        cp.execute("SELECT * FROM runops.block_run(%s, %s)", [final_parent, ["waitpoint_c" + "0" * 24]])
    assert sqlstate_of(err.value) == "RO004"
