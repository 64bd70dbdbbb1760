"""Every RO SQLSTATE has a named client exception and a CLI exit code; retryable server errors
map to RetryableConflict. The errors are raised by a real server, not constructed."""

from __future__ import annotations

import psycopg
import pytest

from runops import errors
from runops.ops.cli import exit_code

CODES = {
    "RO001": errors.UnclassifiableId, "RO002": errors.WrongStore, "RO003": errors.IllegalTransition,
    "RO004": errors.NotFound, "RO005": errors.EnvironmentUnusable, "RO006": errors.InvalidInput,
    "RO007": errors.SplitRefused, "RO008": errors.RetryableConflict, "RO009": errors.StoreUnavailable,
    "40001": errors.RetryableConflict, "40P01": errors.RetryableConflict,
}


@pytest.mark.parametrize(("code", "cls"), list(CODES.items()))
def test_server_errors_map_to_named_exceptions_and_exit_codes(cp_admin: psycopg.Connection, code: str,
                                                               cls: type[errors.RunOpsError]) -> None:
    with pytest.raises(psycopg.Error) as raised:
        cp_admin.execute(f"DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '{code}', "
                         "DETAIL = 'owning_store=RUN_OPS', HINT = 'do this'; END $$")
    mapped = errors.translate(raised.value)
    assert type(mapped) is cls
    assert isinstance(mapped, errors.RunOpsError)
    assert (mapped.message, mapped.detail, mapped.hint) == ("boom", "owning_store=RUN_OPS", "do this")
    expected_exit = 10 + int(code[2:]) if code.startswith("RO") else 18
    assert exit_code(mapped) == expected_exit


def test_other_errors_pass_through_unchanged(cp_admin: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as raised:
        cp_admin.execute("SELECT 1 / 0")
    assert errors.translate(raised.value) is raised.value


def test_wrong_store_names_the_owner() -> None:
    assert errors.WrongStore("x", "owning_store=CONTROL_PLANE").owning_store == "CONTROL_PLANE"
    assert errors.WrongStore("x", None).owning_store is None


def test_an_illegal_transition_through_the_cli_exits_13(stores, client, new_env, monkeypatch) -> None:
    from click.testing import CliRunner

    from runops.client import CONTROL_PLANE, RUN_OPS
    from runops.ops.cli import main

    parent = client.trigger_run(new_env.environment_id, "p")
    client.finalize_run(parent.run_id, "COMPLETED_SUCCESSFULLY")
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", stores.app[CONTROL_PLANE])
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", stores.app[RUN_OPS])
    result = CliRunner().invoke(main, ["trigger", new_env.environment_id, "child", "--parent", parent.run_id,
                                       "--options", '{"resume_parent_on_completion": true}'])
    assert result.exit_code == 13 and result.stderr.startswith("error: RO003")


def test_a_session_the_server_ended_is_store_unavailable(stores, new_env) -> None:
    """57P01 (terminated by an administrator, or a fast shutdown) and a dropped socket are
    connection-level failures: StoreUnavailable, which callers retry, never a raw psycopg error."""
    from runops.client import CONTROL_PLANE, RUN_OPS, RunOps

    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS], max_pool_size=1) as client, \
            psycopg.connect(stores.admin[RUN_OPS], autocommit=True) as admin:
        pid = client._scalar(RUN_OPS, "SELECT pg_backend_pid()", {})
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        with pytest.raises(errors.StoreUnavailable):
            client.trigger_run(new_env.environment_id, "t", {})
        assert client.trigger_run(new_env.environment_id, "t", {}).is_cached is False  # the pool reconnects


def test_a_cancelled_query_passes_through(cp_admin: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as cancelled:
        cp_admin.execute("SET statement_timeout = '10ms'; SELECT pg_sleep(1)")
    assert type(errors.translate(cancelled.value)) is type(cancelled.value)
