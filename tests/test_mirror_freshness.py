"""The tenant mirror's freshness bound (SPEC §4 [1.2]), on pairs of their own.

The reproduction from the issue: with the subscription disabled, an environment paused on the
control plane kept taking NEW runs on the run-ops store, also after tick, and a slot invalidated
by max_slot_wal_keep_size froze the mirror for good. Now the run-ops store knows the mirror's
age (heartbeats: the control plane's tick as replication delivers it, and its own pull), never
admits new work on a mirror older than the bound without reading the control plane first, says
RO009 naming the mirror when it cannot, and tick's pull stands in while replication is not
applying. These pairs run without the test heartbeat (conftest), so the mirror ages for real;
the bound is lowered to a few seconds to keep the tests short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops import migrate

from .conftest import Stores, running_stores, sqlstate_of

pytestmark = pytest.mark.faults

BOUND = 3  # seconds: store_config.mirror_freshness_seconds on these pairs


@pytest.fixture
def pair() -> Iterator[Stores]:
    with running_stores(heartbeat=False) as made:
        with admin(made, RUN_OPS) as ro:
            ro.execute("UPDATE runops.store_config SET mirror_freshness_seconds = %s", [BOUND])
        yield made


def admin(stores: Stores, store: str) -> psycopg.Connection[Any]:
    return psycopg.connect(stores.admin[store], autocommit=True)


def new_env(stores: Stores) -> str:
    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as client:
        org = client.create_organization(f"o{time.monotonic_ns()}", mint_kind="ksuid")
        env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
        assert client.wait_for_mirror()
        return env


def trigger_on_run_ops(stores: Stores, env: str) -> str:
    with psycopg.connect(stores.app[RUN_OPS], autocommit=True) as conn:
        row = conn.execute("SELECT run_id, residency FROM runops.trigger_run(%s, 't', %s)",
                           [env, Jsonb({})]).fetchone()
        assert row is not None and row[1] == "NEW", row
        return str(row[0])


def trigger_error(stores: Stores, env: str) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        trigger_on_run_ops(stores, env)
    return caught.value


def mirror_status(stores: Stores) -> dict[str, Any]:
    with admin(stores, RUN_OPS) as ro:
        row = ro.execute("SELECT runops.mirror_status()").fetchone()
        assert row is not None
        return dict(row[0])


def set_subscription(stores: Stores, enabled: bool) -> None:
    with admin(stores, RUN_OPS) as ro:
        ro.execute(f"ALTER SUBSCRIPTION runops_mirror {'ENABLE' if enabled else 'DISABLE'}")


def pause_on_control_plane(stores: Stores, env: str) -> None:
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as cp:
        cp.execute("SELECT runops.update_environment(%s, %s)", [env, Jsonb({"paused": True})])


def mirrored_paused(stores: Stores, env: str) -> bool:
    with admin(stores, RUN_OPS) as ro:
        row = ro.execute("SELECT paused FROM runops.runtime_environments WHERE id = %s", [env]).fetchone()
        assert row is not None
        return bool(row[0])


def tick(stores: Stores, store: str) -> dict[str, Any]:
    with psycopg.connect(stores.app[store], autocommit=True) as conn:
        row = conn.execute("SELECT runops.tick()").fetchone()
        assert row is not None
        return dict(row[0])


def wait_until(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_fresh_mirror_admits_and_reports_itself_fresh(pair: Stores) -> None:
    env = new_env(pair)
    status = mirror_status(pair)
    assert (status["engine"], status["state"], status["fresh"], status["bound_seconds"]) == \
        ("subscription", "applying", True, BOUND)
    trigger_on_run_ops(pair, env)


def test_the_control_planes_tick_is_a_mirror_heartbeat(pair: Stores) -> None:
    """Replication carries the control plane's tick heartbeat (besides the subscription's own
    progress, below): with the subscription disabled, only a heartbeat or a pull feeds the mirror."""
    env = new_env(pair)
    set_subscription(pair, False)
    wait_until("the apply worker to stop", lambda: mirror_status(pair)["state"] == "disabled")
    time.sleep(BOUND + 1)
    assert mirror_status(pair)["fresh"] is False
    tick(pair, CONTROL_PLANE)
    set_subscription(pair, True)  # replication delivers the heartbeat
    wait_until("the replicated heartbeat", lambda: mirror_status(pair)["control_plane_tick_at"] is not None)
    trigger_on_run_ops(pair, env)


def fdw_trips(stores: Stores, env: str, triggers: int = 20) -> tuple[int, int]:
    """Triggers on the run-ops store in a session of its own; (calls that found the mirror stale,
    connections postgres_fdw opened to the control plane) in that session."""
    with admin(stores, RUN_OPS) as ro:
        ro.execute("SET track_functions = 'pl'")
        for _ in range(triggers):
            row = ro.execute("SELECT residency FROM runops.trigger_run(%s, 't', %s)", [env, Jsonb({})]).fetchone()
            assert row == ("NEW",)
        opened = ro.execute("SELECT count(*) FROM postgres_fdw_get_connections()").fetchone()
        ro.execute("SELECT pg_stat_force_next_flush()")
        ro.execute("SELECT pg_stat_clear_snapshot()")
        stale = ro.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions "
                           "WHERE schemaname = 'runops' AND funcname = 'mirror_stale'").fetchone()
        assert opened is not None and stale is not None
        return int(stale[0]), int(opened[0])


def test_a_stopped_ticker_costs_the_hot_path_nothing_while_replication_applies(pair: Stores) -> None:
    """No tick anywhere (the test heartbeat is off too), past the bound: the subscription's own
    progress keeps the mirror fresh, so a trigger on the run-ops store neither reads tenants
    through the FDW nor fails; a disabled subscription still makes the bound bite. Keepalives
    come every wal_receiver_timeout / 2 on an idle control plane: 1 s here, for a 3 s bound."""
    with admin(pair, RUN_OPS) as ro:
        ro.execute("ALTER SYSTEM SET wal_receiver_timeout = '2s'")
        ro.execute("SELECT pg_reload_conf()")
    try:
        env = new_env(pair)
        time.sleep(BOUND + 2)
        with admin(pair, RUN_OPS) as ro:  # no heartbeat within the bound: nothing ticked, nothing pulled
            assert ro.execute("SELECT coalesce(max(beat_at) < now() - make_interval(secs => %s), true) "
                              "FROM runops.heartbeats WHERE source IN ('control_plane_tick', 'mirror_pull')",
                              [BOUND]).fetchone() == (True,)
        status = mirror_status(pair)
        assert (status["state"], status["fresh"]) == ("applying", True), status
        assert status["replicated_at"] is not None and status["age_seconds"] < BOUND
        assert fdw_trips(pair, env) == (0, 0)
        set_subscription(pair, False)
        wait_until("the apply worker to stop", lambda: mirror_status(pair)["state"] == "disabled")
        time.sleep(BOUND + 1)
        assert mirror_status(pair)["fresh"] is False
        stale, opened = fdw_trips(pair, env, 3)
        assert stale == 3 and opened == 1  # each trigger read the control plane first
    finally:
        set_subscription(pair, True)
        with admin(pair, RUN_OPS) as ro:
            ro.execute("ALTER SYSTEM RESET wal_receiver_timeout")
            ro.execute("SELECT pg_reload_conf()")
    # Nothing ticks: doctor says so, whatever the mirror.
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "runops.ops.cli", "doctor"], capture_output=True, text=True,
                         env={**os.environ, "RUNOPS_CONTROL_PLANE_URL": pair.admin[CONTROL_PLANE],
                              "RUNOPS_RUN_OPS_URL": pair.admin[RUN_OPS]}, timeout=120)
    assert "tick has never run on the" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_paused_environment_is_refused_although_the_subscription_is_disabled(pair: Stores) -> None:
    env = new_env(pair)
    set_subscription(pair, False)
    pause_on_control_plane(pair, env)
    assert mirrored_paused(pair, env) is False  # the mirror is behind: nothing applies
    time.sleep(BOUND + 1)
    # Stale: the run-ops store reads the environment from the control plane before admitting.
    assert sqlstate_of(trigger_error(pair, env)) == "RO005"
    assert mirror_status(pair)["state"] == "disabled"


def test_tick_pulls_while_the_subscription_is_not_applying_and_replication_resumes_cleanly(pair: Stores) -> None:
    env = new_env(pair)
    set_subscription(pair, False)
    pause_on_control_plane(pair, env)
    time.sleep(BOUND + 1)
    counts = tick(pair, RUN_OPS)
    assert counts["mirror"] >= 1  # the paused environment, and whatever else changed
    assert mirrored_paused(pair, env) is True
    assert mirror_status(pair)["fresh"] is True  # as fresh as the pull
    assert sqlstate_of(trigger_error(pair, env)) == "RO005"
    # Re-enabled, the subscription replays what it missed over the pulled rows without a
    # conflict (the pull only updated rows it already had) and goes on applying.
    set_subscription(pair, True)
    later = new_env(pair)  # wait_for_mirror: replicated, a row the pull never wrote
    wait_until("the apply worker", lambda: mirror_status(pair)["state"] == "applying")
    trigger_on_run_ops(pair, later)
    with admin(pair, RUN_OPS) as ro:
        errors = ro.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats "
                            "WHERE subname = 'runops_mirror'").fetchone()
    assert errors == (0, 0)


def test_a_stale_mirror_with_the_control_plane_down_is_ro009_naming_the_mirror(pair: Stores) -> None:
    env = new_env(pair)
    first = trigger_on_run_ops(pair, env)  # fresh: the control plane is not needed
    cluster = pair.local.clusters[CONTROL_PLANE]
    cluster.stop(Path(pair.local.bindir))
    try:
        trigger_on_run_ops(pair, env)  # still fresh: still admitted
        time.sleep(BOUND + 1)
        error = trigger_error(pair, env)
        assert sqlstate_of(error) == "RO009"
        assert "tenant mirror" in str(error) and "bound 3 s" in str(error)
        with psycopg.connect(pair.app[RUN_OPS], autocommit=True) as ro:
            with pytest.raises(psycopg.Error) as route:
                ro.execute("SELECT runops.trigger_route(%s)", [env])
            assert sqlstate_of(route.value) == "RO009"  # nor a root mint decision
            # Work already admitted goes on: reads and the lifecycle need no tenant state.
            row = ro.execute("SELECT status FROM runops.get_run(%s)", [first]).fetchone()
            assert row == ("PENDING",)
        assert tick(pair, RUN_OPS)["mirror"] in (0, -1)  # the tick survives (-1: its pull failed)
    finally:
        cluster.start(Path(pair.local.bindir))
    tick(pair, RUN_OPS)
    trigger_on_run_ops(pair, env)


def test_a_lost_slot_is_stood_in_for_by_the_pull_and_recreated_by_migrate(pair: Stores) -> None:
    env = new_env(pair)
    with admin(pair, CONTROL_PLANE) as cp:
        cp.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        cp.execute("SELECT pg_reload_conf()")
        set_subscription(pair, False)
        # WAL past the slot, then a checkpoint: PostgreSQL invalidates the slot.
        for _ in range(3):
            cp.execute("CREATE TEMP TABLE IF NOT EXISTS filler AS SELECT 1 AS x")
            cp.execute("INSERT INTO filler SELECT generate_series(1, 20000)")
            cp.execute("SELECT pg_switch_wal()")
        cp.execute("CHECKPOINT")
        wait_until("the slot to be lost", lambda: cp.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name LIKE 'runops_mirror_%'").fetchone()
            == ("lost",))
        cp.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        cp.execute("SELECT pg_reload_conf()")
    set_subscription(pair, True)  # it cannot stream from a lost slot
    pause_on_control_plane(pair, env)
    time.sleep(BOUND + 1)
    assert mirror_status(pair)["state"] in {"not_running", "applying"}
    tick(pair, RUN_OPS)  # the pull stands in
    assert mirrored_paused(pair, env) is True
    assert sqlstate_of(trigger_error(pair, env)) == "RO005"
    notes: list[str] = []
    migrate.wire(pair.admin[CONTROL_PLANE], pair.admin[RUN_OPS], notes)
    assert any("slot was lost" in n for n in notes), notes
    later = new_env(pair)  # replicated by the new subscription
    wait_until("the apply worker", lambda: mirror_status(pair)["state"] == "applying")
    trigger_on_run_ops(pair, later)
    with admin(pair, CONTROL_PLANE) as cp:
        assert cp.execute("SELECT wal_status FROM pg_replication_slots "
                          "WHERE slot_name LIKE 'runops_mirror_%'").fetchall() == [("reserved",)]


def test_a_session_reads_the_subscriptions_progress_at_most_once_a_second(pair: Stores) -> None:
    """The hot path's fallback (mirror_feed past the bound) keeps the subscription's progress for a
    second per session: a reading remembered as very old makes the mirror stale until it lapses,
    then the subscription is asked again."""
    new_env(pair)
    with admin(pair, RUN_OPS) as ro:
        ro.execute("UPDATE runops.heartbeats SET beat_at = now() - interval '1 hour'")
        assert ro.execute("SELECT runops.mirror_replicated_at() IS NOT NULL").fetchone() == (True,)
        ro.execute("SELECT set_config('runops.mirror_progress', clock_timestamp()::text || '|2000-01-01 00:00+00', "
                   "false)")
        fresh = "SELECT runops.mirror_within_bound(f.fed_at, f.bound_seconds) FROM runops.mirror_feed() AS f"
        assert ro.execute(fresh).fetchone() == (False,)  # the remembered reading, not the subscription
        time.sleep(1.1)
        assert ro.execute(fresh).fetchone() == (True,)  # lapsed: asked again
        memo = ro.execute("SELECT current_setting('runops.mirror_progress')").fetchone()
        assert memo is not None and not str(memo[0]).endswith("|2000-01-01 00:00+00")
