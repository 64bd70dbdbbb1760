"""Stores stopped and killed for real under traffic, on a pair of their own.

Each test runs keyed triggers from several threads through the client, and a worker loop
(dequeue → start → complete) with a short lease, while it stops or kills a store: an immediate
stop (pg_ctl -m immediate: crash recovery on start), a fast stop, kill -9 of a backend in the
middle of a batch (the postmaster then resets every backend), and kill -9 of the postmaster
and all its processes in the middle of a burst (a machine that lost power). Afterwards, with
the store back:

* every acknowledged trigger's run is present, exactly once;
* every key is held by exactly one run, across both stores, and a trigger repeated with an
  acknowledged key got the same run;
* no run is stranded: after one lease and a tick, nothing is DEQUEUED or EXECUTING on a lapsed
  lease;
* while the control plane is down, NEW roots keep being admitted (the client routes from the
  run-ops mirror, which stays within its freshness bound — tests/test_mirror_freshness.py
  covers the bound itself).

Group `faults` (`make test-faults`).
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import RunOpsError

from .conftest import Stores, running_stores

pytestmark = pytest.mark.faults

LEASE = "2 seconds"


@pytest.fixture(scope="module")
def own() -> Iterator[Stores]:
    with running_stores() as made:
        yield made


@pytest.fixture
def client(own: Stores) -> Iterator[RunOps]:
    # Per test: a killed server leaves a pool of dead connections behind.
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS], timeout=5.0) as c:
        yield c


def make_env(client: RunOps, kind: str) -> str:
    org = client.create_organization(f"f{kind}{time.monotonic_ns()}", mint_kind=kind)
    env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    assert client.wait_for_mirror()
    return env


@dataclass
class Traffic:
    """Keyed triggers from several threads, each key triggered twice in a row, and a worker loop."""

    client: RunOps
    envs: list[str]
    acked: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    acked_at: list[tuple[float, str, str]] = field(default_factory=list)  # (time, env, run id)
    failures: list[str] = field(default_factory=list)
    completed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, triggering: int = 3) -> Traffic:
        for i in range(triggering):
            self.threads.append(threading.Thread(target=self._trigger, args=(i,), daemon=True))
        self.threads.append(threading.Thread(target=self._work, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def _trigger(self, i: int) -> None:
        for n in itertools.count():
            if self.stop.is_set():
                return
            env = self.envs[n % len(self.envs)]
            key = f"t{i}-{n // 2}"  # every key twice: the second call must find the first's run
            try:
                res = self.client.trigger_run(env, "fault-task", {"n": n}, idempotency_key=key)
            except RunOpsError as exc:  # an outage: StoreUnavailable, or a retryable conflict
                with self.lock:
                    self.failures.append(type(exc).__name__)
                time.sleep(0.05)
                continue
            with self.lock:
                self.acked[(env, key)].add(res.run_id)
                self.acked_at.append((time.monotonic(), env, res.run_id))

    def _work(self) -> None:
        while not self.stop.is_set():
            for env in self.envs:
                try:
                    for run in self.client.dequeue_runs(env, "fault-worker", 5, lease=LEASE):
                        started = self.client.start_attempt(run.id, "fault-worker")
                        self.client.complete_attempt(run.id, started.attempt_number, {"ok": True})
                        with self.lock:
                            self.completed += 1
                except RunOpsError:
                    time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive()

    def acks_between(self, start: float, end: float, env: str) -> int:
        with self.lock:
            return sum(1 for at, e, _ in self.acked_at if start <= at <= end and e == env)


def rows(stores: Stores, store: str, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def check_invariants(own: Stores, traffic: Traffic) -> None:
    # Every key: one run holding it across both stores, and every call with it got that run.
    holders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for store in (CONTROL_PLANE, RUN_OPS):
        for env, key, run_id in rows(own, store, """
                SELECT environment_id, idempotency_key, 'run_' || id FROM runops.runs
                WHERE environment_id = ANY(%s) AND idempotency_key IS NOT NULL""", [traffic.envs]):
            holders[(env, key)].append(run_id)
    assert traffic.acked, "no trigger was acknowledged"
    for k, ids in traffic.acked.items():
        assert len(ids) == 1, (k, ids)  # the repeat of an acknowledged key got the same run
        assert holders[k] == list(ids), (k, holders[k], ids)  # present, exactly once
    assert all(len(v) == 1 for v in holders.values()), [v for v in holders.values() if len(v) > 1]
    # Nothing stranded: after one lease, tick puts lapsed leases back; none may remain.
    time.sleep(2.5)
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as fresh:
        fresh.tick()
    for store in (CONTROL_PLANE, RUN_OPS):
        stranded = rows(own, store, """
            SELECT id, status FROM runops.runs WHERE environment_id = ANY(%s)
              AND status IN ('DEQUEUED', 'EXECUTING') AND lease_expires_at < now()""", [traffic.envs])
        assert stranded == [], (store, stranded)


def run_for(seconds: float) -> None:
    time.sleep(seconds)


def cluster_pids(stores: Stores, store: str) -> tuple[int, list[int]]:
    datadir = stores.local.clusters[store].datadir
    postmaster = int(Path(datadir, "postmaster.pid").read_text().splitlines()[0])
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == postmaster]
    return postmaster, children


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_for_store(stores: Stores, store: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(stores.admin[store], connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize(("store", "mode"), [(RUN_OPS, "immediate"), (CONTROL_PLANE, "immediate"),
                                             (RUN_OPS, "fast"), (CONTROL_PLANE, "fast")])
def test_a_store_stopped_under_traffic_loses_and_duplicates_nothing(own: Stores, client: RunOps,
                                                                      store: str, mode: str) -> None:
    new_env, legacy_env = make_env(client, "ksuid"), make_env(client, "cuid")
    traffic = Traffic(client, [new_env, legacy_env]).start()
    run_for(1.5)
    cluster = own.local.clusters[store]
    bindir = Path(own.local.bindir)
    out = cluster._run(bindir, "pg_ctl", "stop", "-D", cluster.datadir, "-m", mode, "-w")
    assert out.returncode == 0, out.stderr
    down_at = time.monotonic()
    run_for(2.0)
    up_at = time.monotonic()
    cluster.start(bindir)
    run_for(2.0)
    traffic.finish()
    assert traffic.failures, "the outage was never seen"
    if store == CONTROL_PLANE:
        # The NEW hot path never needed the control plane.
        assert traffic.acks_between(down_at + 0.5, up_at, new_env) > 0
    check_invariants(own, traffic)


def test_a_backend_killed_mid_batch_leaves_the_batch_whole_or_absent(own: Stores, client: RunOps) -> None:
    env = make_env(client, "ksuid")
    traffic = Traffic(client, [env]).start(triggering=2)
    outcome: list[Any] = []

    def batch() -> None:
        try:
            outcome.append(client.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(20000)],
                                                idempotency_key="the-batch"))
        except RunOpsError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=batch)
    thread.start()
    deadline = time.monotonic() + 20
    pid = None
    while pid is None and time.monotonic() < deadline:
        found = rows(own, RUN_OPS, "SELECT pid FROM pg_stat_activity WHERE query LIKE '%%batch_trigger%%' "
                                   "AND state = 'active' AND pid <> pg_backend_pid()")
        pid = found[0][0] if found else None
    assert pid is not None, "the batch finished before it could be killed"
    os.kill(pid, signal.SIGKILL)  # the postmaster resets every backend of the cluster
    thread.join(60)
    wait_for_store(own, RUN_OPS)
    run_for(1.0)
    traffic.finish()
    assert isinstance(outcome[0], RunOpsError), outcome
    assert rows(own, RUN_OPS, "SELECT count(*) FROM runops.batches WHERE environment_id = %s", [env]) == [(0,)]
    assert rows(own, RUN_OPS, "SELECT count(*) FROM runops.runs WHERE environment_id = %s AND batch_id IS NOT NULL",
                [env]) == [(0,)]
    again = client.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(20000)],
                                 idempotency_key="the-batch")
    assert len(again.run_ids) == 20000
    assert rows(own, RUN_OPS, "SELECT count(*) FROM runops.batches WHERE environment_id = %s", [env]) == [(1,)]
    check_invariants(own, traffic)


def test_the_run_ops_postmaster_killed_mid_burst_loses_and_duplicates_nothing(own: Stores, client: RunOps) -> None:
    env = make_env(client, "ksuid")
    traffic = Traffic(client, [env]).start(triggering=4)
    run_for(1.5)
    postmaster, children = cluster_pids(own, RUN_OPS)
    for pid in [postmaster, *children]:  # all at once: the machine lost power
        os.kill(pid, signal.SIGKILL)
    for pid in [postmaster, *children]:
        while Path(f"/proc/{pid}").exists() and _ppid(pid) is not None:
            time.sleep(0.05)
    run_for(1.0)
    own.local.clusters[RUN_OPS].start(Path(own.local.bindir))
    run_for(2.0)
    traffic.finish()
    assert traffic.failures
    check_invariants(own, traffic)
