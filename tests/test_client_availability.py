"""SPEC §7 [1.2]: the client's NEW hot path never needs the control plane; per-store calls never
strand what one store handed out when the other fails; every connection-level failure is
StoreUnavailable.

These tests stop and start the servers of a private pair of stores (never the session's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg_pool import PoolTimeout

from runops import StoreUnavailable
from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import is_connection_failure, translate
from tests.client_flavours import Blocking
from tests.conftest import Stores, running_stores

pytestmark = pytest.mark.faults

# Short enough that a test waiting out a stopped store stays quick; long enough for a loaded machine.
TIMEOUT = 3.0


@pytest.fixture(scope="module")
def pair() -> Iterator[Stores]:
    with running_stores() as made:
        yield made


@pytest.fixture
def servers(pair: Stores) -> Iterator[dict[str, Any]]:
    """Stop/start the pair's servers; whatever a test stopped is started again after it."""
    bindir = Path(pair.local.bindir)
    yield {"stop": lambda store: pair.local.clusters[store].stop(bindir),
           "start": lambda store: pair.local.clusters[store].start(bindir)}
    for cluster in pair.local.clusters.values():
        cluster.start(bindir)


@pytest.fixture(params=["sync", "async"])
def pair_client(request: pytest.FixtureRequest, pair: Stores) -> Iterator[Any]:
    """Each test runs on both clients (the async one driven through Blocking). Per test: a
    stopped server leaves a pool of dead connections behind."""
    flavour = RunOps if request.param == "sync" else Blocking
    with flavour(pair.app[CONTROL_PLANE], pair.app[RUN_OPS], timeout=TIMEOUT) as c:
        yield c


def listening(client: Any, env: str, store: str) -> None:
    """Opens (and closes) a LISTEN connection with either client."""
    if isinstance(client, Blocking):
        async def listen() -> None:
            async with client.inner.listen(env, store):
                pass

        client.run(listen())
    else:
        with client.listen(env, store):
            pass


def new_org_env(client: Any, kind: str) -> tuple[str, str]:
    org = client.create_organization(f"avail-{time.monotonic_ns()}", mint_kind=kind)
    env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    assert client.wait_for_mirror()
    return org, env


def runs_in(pair: Stores, store: str, env: str) -> dict[str, str]:
    """Bare id -> status of the environment's runs in one store, read as the superuser."""
    with psycopg.connect(pair.admin[store]) as conn:
        return dict(conn.execute("SELECT id, status FROM runops.runs WHERE environment_id = %s",
                                 [env]).fetchall())


# -- the NEW hot path without the control plane ------------------------------------------------------


def test_new_root_triggers_route_from_the_run_ops_mirror_while_the_control_plane_is_down(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    _, new = new_org_env(pair_client, "ksuid")
    _, legacy = new_org_env(pair_client, "cuid")
    legacy_run = pair_client.trigger_run(legacy, "t")
    servers["stop"](CONTROL_PLANE)

    began = time.monotonic()
    first = pair_client.trigger_run(new, "t", {"n": 1})
    keyed = pair_client.trigger_run(new, "t", {"n": 2}, idempotency_key="k")
    again = pair_client.trigger_run(new, "t", {"n": 2}, idempotency_key="k")
    assert (first.residency, keyed.residency, again.run_id, again.is_cached) == ("NEW", "NEW", keyed.run_id, True)
    # One failed lookup (bounded by the pool timeout), then routing from the mirror without waiting.
    assert time.monotonic() - began < TIMEOUT + 2
    began = time.monotonic()
    for n in range(5):
        pair_client.trigger_run(new, "t", {"n": n})
    assert time.monotonic() - began < 2
    assert pair_client.trigger_route(new) == RUN_OPS

    run = pair_client.get_run(first.run_id)
    assert run is not None and run.status == "PENDING" and run.payload == {"n": 1}

    with pytest.raises(StoreUnavailable):
        pair_client.get_run(legacy_run.run_id)
    with pytest.raises(StoreUnavailable):
        pair_client.trigger_run(legacy, "t")

    servers["start"](CONTROL_PLANE)
    # Back: the control plane is asked again (and the LEGACY environment works) once the probe
    # interval has passed.
    time.sleep(2.1)
    deadline = time.monotonic() + 20
    while True:
        try:
            assert pair_client.trigger_run(legacy, "t").residency == "LEGACY"
            break
        except StoreUnavailable:  # a pooled connection that died with the server
            assert time.monotonic() < deadline
            time.sleep(0.2)


# -- per-store calls never strand work ----------------------------------------------------------------


def split_environment(client: Any) -> tuple[str, list[str], list[str]]:
    """An environment with PENDING runs in both stores: LEGACY roots before a mint-kind flip,
    NEW ones after it. Returns (env, legacy ids, new ids), bare."""
    org, env = new_org_env(client, "cuid")
    legacy = [client.trigger_run(env, "t").run_id for _ in range(3)]
    client.set_mint_kind(org, "ksuid")
    assert client.wait_for_mirror()
    new = [client.trigger_run(env, "t").run_id for _ in range(3)]
    bare = [r.id for r in (client.get_run(i) for i in legacy + new) if r is not None]
    assert len(bare) == 6
    return env, bare[:3], bare[3:]


def test_dequeue_returns_what_run_ops_leased_while_the_control_plane_is_down(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    env, legacy, new = split_environment(pair_client)
    servers["stop"](CONTROL_PLANE)

    taken = pair_client.dequeue_runs(env, "w", 10)

    assert sorted(r.id for r in taken) == sorted(new)
    assert all(r.status == "DEQUEUED" and r.locked_by == "w" for r in taken)
    servers["start"](CONTROL_PLANE)
    # Nothing leased and not returned: the NEW runs leased are exactly those returned, and the
    # control plane leased nothing.
    assert {i for i, s in runs_in(pair, RUN_OPS, env).items() if s == "DEQUEUED"} == set(new)
    assert set(runs_in(pair, CONTROL_PLANE, env).values()) == {"PENDING"}


def test_dequeue_returns_the_control_planes_runs_while_run_ops_is_down(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    env, legacy, new = split_environment(pair_client)
    servers["stop"](RUN_OPS)

    taken = pair_client.dequeue_runs(env, "w", 10)

    assert sorted(r.id for r in taken) == sorted(legacy)
    servers["start"](RUN_OPS)
    assert set(runs_in(pair, RUN_OPS, env).values()) == {"PENDING"}


def test_dequeue_raises_store_unavailable_only_when_every_store_is_down(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    env, _, _ = split_environment(pair_client)
    servers["stop"](CONTROL_PLANE)
    servers["stop"](RUN_OPS)
    with pytest.raises(StoreUnavailable):
        pair_client.dequeue_runs(env, "w", 10)


def test_upkeep_runs_on_the_store_that_answers_and_commands_say_which_did_not(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    _, env = new_org_env(pair_client, "ksuid")
    keyed = pair_client.trigger_run(env, "t", idempotency_key="k", idempotency_key_scope="global")
    servers["stop"](CONTROL_PLANE)

    # tick: the run-ops store's time-driven work goes on; the control plane is left out.
    assert set(pair_client.tick()) == {RUN_OPS}
    assert pair_client.enqueue_delayed_runs() >= 0
    # A command the caller must know was done everywhere: done where possible, then it says where not.
    with pytest.raises(StoreUnavailable, match="CONTROL_PLANE did not answer"):
        pair_client.reset_idempotency_key(env, "t", "k", scope="global")
    run = pair_client.get_run(keyed.run_id)
    assert run is not None and run.idempotency_key is None


# -- connection-level failures are StoreUnavailable ------------------------------------------------------


@pytest.mark.parametrize("error", [
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),  # 57P01
    psycopg.errors.CrashShutdown("terminating connection because of crash of another server process"),  # 57P02
    psycopg.errors.CannotConnectNow("the database system is starting up"),  # 57P03
    psycopg.errors.IdleSessionTimeout("terminating connection due to idle-session timeout"),  # 57P05
    psycopg.errors.ConnectionFailure("connection failure"),  # 08006
    psycopg.errors.SqlclientUnableToEstablishSqlconnection("could not connect"),  # 08001
    psycopg.OperationalError("server closed the connection unexpectedly"),  # no SQLSTATE: a dropped socket
    PoolTimeout("couldn't get a connection after 3.00 sec"),
], ids=lambda e: type(e).__name__)
def test_every_connection_level_failure_translates_to_store_unavailable(error: psycopg.Error) -> None:
    assert is_connection_failure(error)
    assert isinstance(translate(error), StoreUnavailable)


def test_a_cancelled_statement_is_not_a_store_outage() -> None:
    cancelled = psycopg.errors.QueryCanceled("canceling statement due to user request")
    assert not is_connection_failure(cancelled)
    assert translate(cancelled) is cancelled


def test_a_terminated_session_and_a_stopped_store_raise_store_unavailable(
        pair: Stores, pair_client: Any, servers: dict[str, Any]) -> None:
    _, env = new_org_env(pair_client, "ksuid")
    run = pair_client.trigger_run(env, "t")
    with psycopg.connect(pair.admin[RUN_OPS], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'runops_app'")
    with pytest.raises(StoreUnavailable):  # the pooled session the server ended (57P01)
        for _ in range(10):  # the pool holds a few; each one the server ended fails once
            pair_client.get_run(run.run_id)
    servers["stop"](RUN_OPS)
    with pytest.raises(StoreUnavailable):
        pair_client.get_run(run.run_id)
    with pytest.raises(StoreUnavailable):
        listening(pair_client, env, RUN_OPS)
