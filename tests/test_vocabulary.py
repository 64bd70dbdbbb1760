"""The run-status vocabulary lives once, in runops.run_statuses: the IMMUTABLE functions that hot
paths inline (is_run_status, is_final_status, status_releases_key), the state machine, the
runs.status CHECK and the Python RunStatus all agree with it."""

from __future__ import annotations

from typing import Any, get_args

import psycopg
import pytest

from runops import models


def vocabulary(conn: psycopg.Connection[Any]) -> list[tuple[str, bool, bool]]:
    return conn.execute("SELECT status, is_final, releases_key FROM runops.run_statuses ORDER BY 1").fetchall()


def test_the_python_run_status_equals_the_sql_vocabulary(cp_admin: psycopg.Connection,
                                                          ro_admin: psycopg.Connection) -> None:
    assert vocabulary(cp_admin) == vocabulary(ro_admin)
    rows = vocabulary(cp_admin)
    assert {status for status, _, _ in rows} == set(get_args(models.RunStatus))
    assert {status for status, final, _ in rows if final} == set(models.FINAL_STATUSES)


@pytest.mark.parametrize("admin", ["cp_admin", "ro_admin"])
def test_the_inlined_status_functions_agree_with_the_table(request: pytest.FixtureRequest, admin: str) -> None:
    conn = request.getfixturevalue(admin)
    disagreeing = conn.execute("""
        SELECT s.status FROM runops.run_statuses AS s
        WHERE NOT runops.is_run_status(s.status)
           OR runops.is_final_status(s.status) IS DISTINCT FROM s.is_final
           OR runops.status_releases_key(s.status) IS DISTINCT FROM s.releases_key""").fetchall()
    assert disagreeing == []
    assert conn.execute("SELECT runops.is_run_status('NEW'), runops.is_run_status('pending'), "
                        "runops.is_final_status('NEW'), runops.status_releases_key('CANCELED')").fetchone() \
        == (False, False, False, False)


@pytest.mark.parametrize("admin", ["cp_admin", "ro_admin"])
def test_the_state_machine_moves_only_between_known_statuses(request: pytest.FixtureRequest, admin: str) -> None:
    conn = request.getfixturevalue(admin)
    unknown = conn.execute("""
        SELECT s FROM runops.status_transitions AS t, LATERAL (VALUES (t.from_status), (t.to_status)) AS v(s)
        WHERE s <> 'NEW' AND NOT EXISTS (SELECT FROM runops.run_statuses AS x WHERE x.status = s)""").fetchall()
    assert unknown == []
    # No move leaves a final status.
    assert conn.execute("""SELECT count(*) FROM runops.status_transitions AS t
                           JOIN runops.run_statuses AS s ON s.status = t.from_status
                           WHERE s.is_final""").fetchone() == (0,)


def test_runs_refuse_a_status_outside_the_vocabulary(ro_admin: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation), ro_admin.transaction():
        ro_admin.execute("""INSERT INTO runops.runs (id, environment_id, project_id, organization_id,
                            task_identifier, status, payload, queue, created_at, updated_at)
                            VALUES (runops.generate_ksuid(), 'e', 'p', 'o', 't', 'FINISHED', '{}', 'q',
                                    now(), now())""")
