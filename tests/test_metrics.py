"""metrics (SPEC §4 [1.2]): each store's figures from runops.metrics(), the client's view of both
stores, and `runops metrics` — printed, and served in the Prometheus text format by the real
console script.

The stores are shared with every other test, so figures are asserted for this test's own
environments (metrics(environment_id)), and store-wide figures only as lower bounds.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import InvalidInput
from tests.conftest import Env, Stores, sqlstate_of

RUNOPS = Path(sys.executable).parent / "runops"


def metrics_at(conn: psycopg.Connection[Any], env: str | None, at: dt.datetime | None = None) -> dict[str, Any]:
    """runops.metrics() as the app role calls it, optionally with the clock moved to `at`."""
    conn.execute("SELECT set_config('runops.fake_now', %s, false)", [at.isoformat() if at else ""])
    try:
        row = conn.execute("SELECT runops.metrics(%s)", [env]).fetchone()
    finally:
        conn.execute("RESET runops.fake_now")
    assert row is not None
    return dict(row[0])


@pytest.fixture
def busy_envs(client: RunOps, make_env: Callable[..., Env]) -> dict[str, str]:
    """One environment per store, each with 4 runs: 2 dequeued with a 10-minute lease, 1 pending,
    1 canceled; and an open batch on each."""
    envs = {CONTROL_PLANE: make_env("cuid").environment_id, RUN_OPS: make_env("ksuid").environment_id}
    for store, env in envs.items():
        runs = [client.trigger_run(env, "t", {"n": i}, idempotency_key=f"k{i}") for i in range(4)]
        assert {r.residency for r in runs} == {"LEGACY" if store == CONTROL_PLANE else "NEW"}
        client.cancel_run(runs[3].run_id, environment_id=env)
        taken = client.dequeue_runs(env, "w1", 2, lease="10m")
        assert len(taken) == 2
        client.create_batch(env, 2)
    return envs


def test_each_store_reports_its_own_runs_queues_batches_and_claims(client: RunOps, busy_envs: dict[str, str]) -> None:
    for store, env in busy_envs.items():
        other = RUN_OPS if store == CONTROL_PLANE else CONTROL_PLANE
        figures = client.metrics(env)
        assert set(figures) == {CONTROL_PLANE, RUN_OPS}
        mine = figures[store]
        assert mine["store_role"] == store and mine["environment_id"] == env
        assert mine["runs"] == {env: {"PENDING": 1, "DEQUEUED": 2, "CANCELED": 1}}
        assert mine["queues"][env]["depth"] == 1
        assert 0 <= mine["queues"][env]["oldest_pending_seconds"] < 120
        assert mine["lapsed_leases"] == 0  # 10-minute leases, just taken
        assert mine["open_batches"] == 1
        # The other store holds nothing of this environment.
        theirs = figures[other]
        assert theirs["runs"] == {} and theirs["queues"] == {} and theirs["lapsed_leases"] == 0
        assert theirs["open_batches"] == 0
    # The claim ledger lives on the run-ops store: every keyed trigger claims there, the LEGACY
    # ones through the FDW; the control plane reports no ledger.
    for env in busy_envs.values():
        figures = client.metrics(env)
        assert figures[RUN_OPS]["claims"] == 4
        assert figures[CONTROL_PLANE]["claims"] is None


def test_without_an_environment_every_environment_is_counted(client: RunOps, busy_envs: dict[str, str]) -> None:
    figures = client.metrics()
    for store, env in busy_envs.items():
        every = figures[store]
        assert every["environment_id"] is None
        assert every["runs"][env] == {"PENDING": 1, "DEQUEUED": 2, "CANCELED": 1}
        assert every["queues"][env]["depth"] == 1
        assert every["open_batches"] >= 1
        total = sum(n for statuses in every["runs"].values() for n in statuses.values())
        assert total >= 4
    assert figures[RUN_OPS]["claims"] >= 8


def test_lapsed_leases_and_pending_age_follow_the_clock(busy_envs: dict[str, str],
                                                        store_conn: Callable[[str], psycopg.Connection[Any]]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    for store, env in busy_envs.items():
        conn = store_conn(store)
        assert metrics_at(conn, env)["lapsed_leases"] == 0
        moved = metrics_at(conn, env, later)  # an hour on, the 10-minute leases have lapsed
        assert moved["lapsed_leases"] == 2
        assert 3500 < moved["queues"][env]["oldest_pending_seconds"] < 3700
        assert moved["runs"][env]["DEQUEUED"] == 2  # lapsed, not yet moved by tick


def test_a_short_lease_lapses_in_real_time(client: RunOps, make_env: Callable[..., Env]) -> None:
    env = make_env("ksuid").environment_id
    client.trigger_run(env, "t", {})
    assert len(client.dequeue_runs(env, "w1", 1, lease="1s")) == 1
    deadline = time.monotonic() + 10
    while client.metrics(env)[RUN_OPS]["lapsed_leases"] != 1:
        assert time.monotonic() < deadline, "a 1-second lease never lapsed"
        time.sleep(0.2)
    assert client.metrics(env)[RUN_OPS]["queues"] == {}


def test_mirror_freshness_on_the_run_ops_store(client: RunOps) -> None:
    figures = client.metrics()
    assert figures[CONTROL_PLANE]["mirror"] is None
    mirror = figures[RUN_OPS]["mirror"]
    assert mirror["engine"] in ("subscription", "pull")
    assert mirror["split_settings_updated_at"] is not None  # the split is enabled: the row is mirrored
    if mirror["engine"] == "subscription":
        # The owner role reads pg_stat_subscription: a streaming worker and a measured lag.
        assert mirror["enabled"] is True and mirror["streaming"] is True
        assert mirror["latest_end_time"] is not None
        assert 0 <= mirror["lag_seconds"] < 300
    else:
        assert mirror["lag_seconds"] is None
    # The freshness bound's figures (mirror_status): the session's heartbeat keeps it fresh.
    assert mirror["fresh"] is True and mirror["bound_seconds"] == 60
    assert 0 <= mirror["age_seconds"] < 60


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_bad_environment_id_is_ro006(store: str, store_conn: Callable[[str], psycopg.Connection[Any]],
                                     client: RunOps) -> None:
    conn = store_conn(store)
    for bad in ("", "e" * 300):
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT runops.metrics(%s)", [bad])
        assert sqlstate_of(caught.value) == "RO006"
    with pytest.raises(InvalidInput):
        client.metrics("")
    # An unknown environment is no error: it has no figures.
    figures = metrics_at(conn, "no-such-environment")
    assert figures["runs"] == {} and figures["queues"] == {} and figures["lapsed_leases"] == 0


@pytest.mark.parametrize("store", [CONTROL_PLANE, RUN_OPS])
def test_the_app_role_may_call_it_and_nothing_behind_it(store: str, stores: Stores) -> None:
    with psycopg.connect(stores.app[store], autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("runops_app",)
        row = conn.execute("SELECT runops.metrics()").fetchone()
        assert row is not None and row[0]["store_role"] == store
        assert conn.execute("SELECT has_table_privilege('runops.runs', 'SELECT'), "
                            "has_table_privilege('runops.idempotency_claims', 'SELECT')").fetchone() == (False, False)


# -- the CLI ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def cli_env(stores: Stores, run_ops_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["RUNOPS_CONTROL_PLANE_URL"] = stores.app[CONTROL_PLANE]
    env["RUNOPS_RUN_OPS_URL"] = run_ops_url or stores.app[RUN_OPS]
    return env


@contextlib.contextmanager
def serving(stores: Stores, *args: str, run_ops_url: str | None = None) -> Iterator[str]:
    """`runops metrics --listen 127.0.0.1:<port>` in a subprocess; yields the /metrics URL once it
    answers, and terminates it afterwards (asserting a clean exit on SIGTERM)."""
    port = free_port()
    proc = subprocess.Popen([str(RUNOPS), "metrics", "--listen", f"127.0.0.1:{port}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(stores, run_ops_url))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the metrics endpoint never answered"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err


def scrape(url: str) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The exposition text and its samples, keyed by (name, labels)."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_listen_serves_both_stores_in_the_prometheus_format(stores: Stores, client: RunOps,
                                                             busy_envs: dict[str, str]) -> None:
    with serving(stores) as url:
        text, samples = scrape(url)
        for name in ("runops_store_up", "runops_runs", "runops_queue_depth", "runops_oldest_pending_seconds",
                     "runops_lapsed_leases", "runops_open_batches", "runops_claims", "runops_mirror_lag_seconds"):
            assert f"# HELP {name} " in text and f"# TYPE {name} gauge" in text
        for store, env in busy_envs.items():
            assert value(samples, "runops_store_up", store=store) == 1
            assert value(samples, "runops_runs", store=store, environment=env, status="PENDING") == 1
            assert value(samples, "runops_runs", store=store, environment=env, status="DEQUEUED") == 2
            assert value(samples, "runops_runs", store=store, environment=env, status="CANCELED") == 1
            assert value(samples, "runops_queue_depth", store=store, environment=env) == 1
            oldest = value(samples, "runops_oldest_pending_seconds", store=store, environment=env)
            assert oldest is not None and 0 <= oldest < 120
            assert value(samples, "runops_lapsed_leases", store=store) is not None
            open_batches = value(samples, "runops_open_batches", store=store)
            assert open_batches is not None and open_batches >= 1
        claims = value(samples, "runops_claims", store=RUN_OPS)
        assert claims is not None and claims >= 8
        assert value(samples, "runops_claims", store=CONTROL_PLANE) is None
        if client.metrics()[RUN_OPS]["mirror"]["engine"] == "subscription":
            assert value(samples, "runops_mirror_lag_seconds", store=RUN_OPS) is not None
        assert value(samples, "runops_mirror_fresh", store=RUN_OPS) == 1
        age = value(samples, "runops_mirror_age_seconds", store=RUN_OPS)
        assert age is not None and 0 <= age < 60
        assert value(samples, "runops_mirror_fresh", store=CONTROL_PLANE) is None
        # Values are read fresh on every scrape.
        env = busy_envs[RUN_OPS]
        client.trigger_run(env, "t", {})
        _, again = scrape(url)
        assert value(again, "runops_queue_depth", store=RUN_OPS, environment=env) == 2


def test_listen_narrowed_to_one_environment(stores: Stores, busy_envs: dict[str, str]) -> None:
    env = busy_envs[CONTROL_PLANE]
    with serving(stores, "--env", env) as url:
        _, samples = scrape(url)
    environments = {dict(labels).get("environment") for (name, labels) in samples if name == "runops_runs"}
    assert environments == {env}
    assert value(samples, "runops_lapsed_leases", store=CONTROL_PLANE) == 0


def test_a_store_that_does_not_answer_is_down_not_a_failed_scrape(stores: Stores, busy_envs: dict[str, str]) -> None:
    nowhere = f"postgresql://runops_app@127.0.0.1:{free_port()}/runops?connect_timeout=1"
    with serving(stores, "--timeout", "1", run_ops_url=nowhere) as url:
        _, samples = scrape(url)
    assert value(samples, "runops_store_up", store=RUN_OPS) == 0
    assert value(samples, "runops_store_up", store=CONTROL_PLANE) == 1
    env = busy_envs[CONTROL_PLANE]
    assert value(samples, "runops_queue_depth", store=CONTROL_PLANE, environment=env) == 1
    assert not any(dict(labels).get("store") == RUN_OPS for (name, labels) in samples if name != "runops_store_up")


def test_metrics_prints_a_table_and_json(stores: Stores, busy_envs: dict[str, str]) -> None:
    env = busy_envs[RUN_OPS]
    done = subprocess.run([str(RUNOPS), "--json", "metrics", "--env", env], capture_output=True, text=True,
                          env=cli_env(stores), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures[RUN_OPS]["runs"] == {env: {"PENDING": 1, "DEQUEUED": 2, "CANCELED": 1}}
    assert figures[CONTROL_PLANE]["runs"] == {}
    done = subprocess.run([str(RUNOPS), "metrics", "--env", env], capture_output=True, text=True,
                          env=cli_env(stores), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert env in done.stdout and "DEQUEUED" in done.stdout and "QUEUE DEPTH" in done.stdout
    done = subprocess.run([str(RUNOPS), "--json", "metrics", "--env", ""], capture_output=True, text=True,
                          env=cli_env(stores), timeout=60, check=False)
    assert done.returncode == 16 and json.loads(done.stderr)["error"]["sqlstate"] == "RO006"


def test_a_down_store_prints_the_other_and_exits_19(stores: Stores, busy_envs: dict[str, str]) -> None:
    nowhere = f"postgresql://runops_app@127.0.0.1:{free_port()}/runops?connect_timeout=1"
    env = dict(cli_env(stores, nowhere), RUNOPS_TIMEOUT="1")
    done = subprocess.run([str(RUNOPS), "--json", "metrics", "--env", busy_envs[CONTROL_PLANE]],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 19, done.stderr
    figures = json.loads(done.stdout)
    assert figures[CONTROL_PLANE]["queues"][busy_envs[CONTROL_PLANE]]["depth"] == 1
    assert "error" in figures[RUN_OPS]
