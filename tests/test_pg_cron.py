"""Optional: tick scheduled inside PostgreSQL by pg_cron (docs/pg_cron.md)."""

from __future__ import annotations

import time

import psycopg
import pytest

from runops.client import CONTROL_PLANE
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import one, trigger


def test_tick_every_ticks_repeatedly_and_commits_each_pass(cp, legacy_env) -> None:
    run_id = trigger(cp, legacy_env.environment_id, delay="1s")
    assert one(cp, "get_run", run_id)["status"] == "DELAYED"
    started = time.monotonic()
    cp.execute("CALL runops.tick_every(3, 1)")
    assert time.monotonic() - started >= 1.5  # passes at 0 s, 1 s and 2 s
    assert one(cp, "get_run", run_id)["status"] == "PENDING"  # a later pass, with the real clock, enqueued it


def test_tick_every_refuses_a_transaction_block_and_long_pins(stores: Stores) -> None:
    """The issue's reproduction: inside a transaction the first COMMIT failed with 2D000 after a
    pass had run, and the app could pin a backend for an hour."""
    with psycopg.connect(stores.app[CONTROL_PLANE]) as conn:  # not autocommit: psycopg sends BEGIN
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("CALL runops.tick_every(2, 1)")
        assert sqlstate_of(caught.value) == "RO006"
        assert "outside a transaction block" in str(caught.value)
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("CALL runops.tick_every(3600, 2)")
        assert sqlstate_of(caught.value) == "RO006"


def test_pg_cron_runs_tick_inside_postgresql(stores: Stores, legacy_env, cp) -> None:
    """Scheduled every minute (pg_cron 1.4 has minute granularity), each job ticks every 2 s."""
    with psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as admin:
        admin.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        job = admin.execute("SELECT cron.schedule('runops-tick', '* * * * *', 'CALL runops.tick_every(55, 2)')"
                            ).fetchone()[0]
        try:
            run_id = trigger(cp, legacy_env.environment_id, delay="1s")
            deadline = time.monotonic() + 75  # the first job starts at the next minute
            while time.monotonic() < deadline and one(cp, "get_run", run_id)["status"] == "DELAYED":
                time.sleep(0.5)
            assert one(cp, "get_run", run_id)["status"] == "PENDING"
            ran = admin.execute("SELECT count(*) FROM cron.job_run_details WHERE jobid = %s", [job]).fetchone()[0]
            assert ran >= 1
        finally:
            admin.execute("SELECT cron.unschedule(%s)", [job])
            # A started job would tick on for the rest of its minute: stop it for the tests after.
            admin.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                          "WHERE query LIKE 'CALL runops.tick_every%%' AND pid <> pg_backend_pid()")
