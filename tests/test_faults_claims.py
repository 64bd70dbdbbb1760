"""The claim ledger survives a crash at the instant between the remote and the local commit
(SPEC §6: postgres_fdw commits the remote transaction just before the local one).

How the instant is reached, for real: the run-ops store runs with a synchronous standby that never
connects, and only the control plane's FDW login commits synchronously. A control-plane keyed
trigger then stops inside its commit, after its claim is durable on run-ops and before its own
run commits. The test kills the control-plane backend (pg_terminate_backend) or stops the whole
control-plane server (pg_ctl -m immediate) right there, releases the standby wait, and checks that
the key is neither blocked for good nor ever yields two runs. A mirror image stalls the *local*
commit instead, so a run-ops trigger sees a claim whose control-plane transaction is still
committing (RO008, then the run).

These tests own their clusters (they kill them): group `faults`, run by `make test-faults`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from tests.conftest import Stores, running_stores, sqlstate_of
from tests.test_seam_idempotency import key_holders, one, trigger

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def own() -> Iterator[Stores]:
    with running_stores() as made:
        yield made


@pytest.fixture
def own_client(own: Stores) -> Iterator[RunOps]:
    # Per test: a killed server leaves a pool of dead connections behind.
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as c:
        yield c


def make_env(client: RunOps, kind: str, name: str) -> tuple[str, str]:
    org = client.create_organization(f"{name}-{time.monotonic_ns()}", mint_kind=kind)
    env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    assert client.wait_for_mirror()
    return org, env


def admin(stores: Stores, store: str) -> psycopg.Connection[Any]:
    return psycopg.connect(stores.admin[store], autocommit=True)


def stall_synchronous_commits(stores: Stores, store: str, role: str) -> None:
    """Commits of `role`'s new sessions on `store` wait for a standby that never comes."""
    with admin(stores, store) as conn:
        conn.execute("ALTER SYSTEM SET synchronous_commit = 'local'")
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'runops_never'")
        conn.execute(f'ALTER ROLE "{role}" SET synchronous_commit = on')
        conn.execute("SELECT pg_reload_conf()")


def release_synchronous_commits(stores: Stores, store: str, role: str) -> None:
    with admin(stores, store) as conn:
        conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("ALTER SYSTEM RESET synchronous_commit")
        conn.execute(f'ALTER ROLE "{role}" RESET synchronous_commit')
        conn.execute("SELECT pg_reload_conf()")


def fdw_login(stores: Stores) -> str:
    """The role the control plane's FDW logs into the run-ops store as."""
    with admin(stores, RUN_OPS) as conn:
        return str(one(conn, "SELECT 'runops_fdw_' || current_database()"))


def wait_for_sync_rep_waiter(stores: Stores, store: str, role: str, timeout: float = 20.0) -> None:
    """Until a commit of ``role`` (the stalled one) waits for the standby: another session's
    commit that happens to wait then (a new session of any role that reads the stalled settings)
    must not be taken for it."""
    deadline = time.monotonic() + timeout
    with admin(stores, store) as conn:
        while one(conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND usename = %s",
                  [role]) == 0:
            assert time.monotonic() < deadline, "no commit ever waited for the standby"
            time.sleep(0.02)


def start_trigger(url: str, env: str, key: str) -> tuple[threading.Thread, list[Any], int]:
    """A keyed trigger on its own new connection (so its FDW session is new too), in a thread."""
    conn = psycopg.connect(url, autocommit=True)
    pid = conn.info.backend_pid
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append(trigger(conn, env, idempotency_key=key))
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            outcome.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome, pid


def claim_of(stores: Stores, env: str) -> list[tuple[Any, ...]]:
    with admin(stores, RUN_OPS) as conn:
        return conn.execute("SELECT run_id, claimant_xid FROM runops.idempotency_claims WHERE environment_id = %s",
                            [env]).fetchall()


def run_exists(stores: Stores, store: str, bare: str) -> bool:
    with admin(stores, store) as conn:
        return bool(one(conn, "SELECT count(*) FROM runops.runs WHERE id = %s", [bare]))


def orphan_a_claim(own: Stores, env: str, key: str, kill: str) -> str:
    """Leaves a claim on run-ops naming a LEGACY run whose transaction never committed; returns
    the orphan's bare id."""
    login = fdw_login(own)
    stall_synchronous_commits(own, RUN_OPS, login)
    try:
        thread, outcome, pid = start_trigger(own.app[CONTROL_PLANE], env, key)
        wait_for_sync_rep_waiter(own, RUN_OPS, login)
        if kill == "backend":
            with admin(own, CONTROL_PLANE) as conn:
                assert one(conn, "SELECT pg_terminate_backend(%s)", [pid])
        else:
            cluster = own.local.clusters[CONTROL_PLANE]
            out = cluster._run(Path(own.local.bindir), "pg_ctl", "stop", "-D", cluster.datadir, "-m", "immediate", "-w")
            assert out.returncode == 0, out.stderr
    finally:
        release_synchronous_commits(own, RUN_OPS, login)
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome[0], psycopg.Error), outcome  # the caller never got an answer
    if kill == "server":
        own.local.clusters[CONTROL_PLANE].start(Path(own.local.bindir))
    claims = claim_of(own, env)
    assert len(claims) == 1 and claims[0][1] is not None  # the remote claim committed ...
    orphan = str(claims[0][0])
    assert not run_exists(own, CONTROL_PLANE, orphan)  # ... its run did not
    return orphan


@pytest.mark.parametrize("kill", ["backend", "server"])
@pytest.mark.parametrize("first", [CONTROL_PLANE, RUN_OPS])
def test_a_claim_orphaned_between_the_two_commits_is_taken_over_once(own: Stores, own_client: RunOps,
                                                                    kill: str, first: str) -> None:
    org, env = make_env(own_client, "cuid", f"orphan-{kill}")
    orphan = orphan_a_claim(own, env, "k", kill)
    own_client.close()  # its pooled connections died with the server
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as client:
        check_one_run_after_orphan(own, client, org, env, orphan, first)


def check_one_run_after_orphan(own: Stores, own_client: RunOps, org: str, env: str, orphan: str, first: str) -> None:
    if first == RUN_OPS:
        own_client.set_mint_kind(org, "ksuid")
        assert own_client.wait_for_mirror()
    results = []
    with psycopg.connect(own.app[first], autocommit=True) as conn:
        results.append(trigger(conn, env, idempotency_key="k"))
        results.append(trigger(conn, env, idempotency_key="k"))
    assert results[0][1] is False and results[0][0] != f"run_{orphan}"
    assert results[1][:2] == (results[0][0], True)
    # The other store agrees.
    own_client.set_mint_kind(org, "ksuid" if first == CONTROL_PLANE else "cuid")
    assert own_client.wait_for_mirror()
    other = RUN_OPS if first == CONTROL_PLANE else CONTROL_PLANE
    with psycopg.connect(own.app[other], autocommit=True) as conn:
        assert trigger(conn, env, idempotency_key="k")[:2] == (results[0][0], True)
    assert [h[0] for h in key_holders(own, env)] == [results[0][0][4:]]


def test_a_claim_whose_control_plane_commit_is_in_flight_is_never_taken_over(own: Stores,
                                                                           own_client: RunOps) -> None:
    """The remote claim is committed and the control plane's run is committing (its commit
    waits for a standby): a run-ops trigger gets RO008, not a second run; once the commit
    lands it gets the run."""
    org, env = make_env(own_client, "cuid", "inflight")
    # A login of its own, so no other session's commits stall.
    with admin(own, CONTROL_PLANE) as conn:
        conn.execute("DROP ROLE IF EXISTS runops_stalled")
        conn.execute("CREATE ROLE runops_stalled LOGIN PASSWORD %s IN ROLE runops_api".replace(
            "%s", "'" + own.local.app_password + "'"))
    url = own.app[CONTROL_PLANE].replace("runops_app:", "runops_stalled:")
    stall_synchronous_commits(own, CONTROL_PLANE, "runops_stalled")
    released = False
    try:
        thread, outcome, _ = start_trigger(url, env, "k")
        wait_for_sync_rep_waiter(own, CONTROL_PLANE, "runops_stalled")
        own_client.set_mint_kind(org, "ksuid")
        # The mirror pull runs through the FDW on the control plane, which is not stalled.
        with psycopg.connect(own.app[RUN_OPS], autocommit=True) as ro:
            deadline = time.monotonic() + 10
            while one(ro, "SELECT runops.trigger_route(%s, '{}')", [env]) != RUN_OPS:
                assert time.monotonic() < deadline
                ro.execute("SELECT runops.pull_tenant_mirror()")
                time.sleep(0.05)
            with pytest.raises(psycopg.Error) as refused:
                ro.execute("SELECT * FROM runops.trigger_run(%s, 't', '{}', '{\"idempotency_key\": \"k\"}')", [env])
            assert sqlstate_of(refused.value) == "RO008"
            release_synchronous_commits(own, CONTROL_PLANE, "runops_stalled")
            released = True
            thread.join(30)
            legacy = outcome[0]
            assert not isinstance(legacy, BaseException), legacy
            assert trigger(ro, env, idempotency_key="k")[:2] == (legacy[0], True)
    finally:
        if not released:
            release_synchronous_commits(own, CONTROL_PLANE, "runops_stalled")
    assert [h[0] for h in key_holders(own, env)] == [legacy[0][4:]]
