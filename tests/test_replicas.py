"""Replica reads (SPEC §7): reads by id and listings may go to a streaming replica; a read of
what the same client just wrote goes to the primary, and a replica that has not replayed a row
yet never makes it look missing. The fixtures start real replicas of both stores with
`pg_basebackup -R`; the run-ops replica applies WAL three seconds late."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.models import Run
from runops.ops.local_cluster import Cluster, _as_server_user, _give_to_server_user, free_port
from tests.conftest import Stores

LAG = 3.0


@pytest.fixture(scope="module")
def replica_urls(stores: Stores) -> Iterator[dict[str, str]]:
    bindir = Path(stores.local.bindir)
    made: list[Cluster] = []
    urls: dict[str, str] = {}
    try:
        for store, delay in ((CONTROL_PLANE, 0.0), (RUN_OPS, LAG)):
            primary = stores.local.clusters[store]
            replica = Cluster(datadir=f"{primary.datadir}_replica", port=free_port(),
                              socket_dir=f"{primary.socket_dir}_replica", fsync=False)
            for d in (replica.datadir, replica.socket_dir):
                Path(d).mkdir(parents=True, exist_ok=True)
                _give_to_server_user(Path(d))
            Path(replica.datadir).chmod(0o700)
            out = subprocess.run(_as_server_user([str(bindir / "pg_basebackup"), "-D", replica.datadir, "-R",
                                                  "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                                                  "-X", "stream", "-c", "fast"]),
                                 capture_output=True, text=True, check=False)
            assert out.returncode == 0, out.stderr
            settings = (f"port = {replica.port}\nunix_socket_directories = '{replica.socket_dir}'\n"
                        f"recovery_min_apply_delay = '{int(delay * 1000)}ms'\n")
            out = subprocess.run(_as_server_user(["sh", "-c", f"cat >> {replica.datadir}/postgresql.auto.conf"]),
                                 input=settings, capture_output=True, text=True, check=False)
            assert out.returncode == 0, out.stderr
            replica.start(bindir)
            made.append(replica)
            urls[store] = stores.app[store].replace(f":{primary.port}/", f":{replica.port}/")
        yield urls
    finally:
        for replica in made:
            replica.stop(bindir)
            shutil.rmtree(replica.datadir, ignore_errors=True)


@pytest.fixture
def replicated(stores: Stores, replica_urls: dict[str, str]) -> Iterator[RunOps]:
    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS], control_plane_replica_url=replica_urls[CONTROL_PLANE],
                run_ops_replica_url=replica_urls[RUN_OPS]) as client:
        yield client


def test_the_replicas_are_streaming_replicas(replica_urls: dict[str, str]) -> None:
    for url in replica_urls.values():
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)


def test_a_run_just_triggered_is_never_reported_missing_to_its_caller(replicated: RunOps, new_env) -> None:
    for _ in range(5):
        run = replicated.trigger_run(new_env.environment_id, "t", {})
        got = replicated.get_run(run.run_id)
        assert got is not None and got.run_id == run.run_id


def test_a_run_another_client_just_triggered_is_found_through_the_primary(client: RunOps, replicated: RunOps,
                                                                          new_env) -> None:
    run = client.trigger_run(new_env.environment_id, "t", {})
    got = replicated.get_run(run.run_id)  # the lagging replica has no row yet: the primary answers
    assert got is not None and got.status == "PENDING"


def test_reads_of_runs_this_client_did_not_write_come_from_the_replica(client: RunOps, replicated: RunOps,
                                                                        new_env) -> None:
    run = client.trigger_run(new_env.environment_id, "t", {})
    deadline = time.monotonic() + 5 * LAG
    while not _on_replica(replicated, run.run_id):
        assert time.monotonic() < deadline, "the replica never replayed the run"
        time.sleep(0.2)
    client.cancel_run(run.run_id)  # another client's write: this one may read it stale
    stale = replicated.get_run(run.run_id)
    assert stale is not None and stale.status == "PENDING"


def test_reads_of_what_this_client_wrote_come_from_the_primary(client: RunOps, replicated: RunOps, new_env) -> None:
    run = client.trigger_run(new_env.environment_id, "t", {})
    deadline = time.monotonic() + 5 * LAG
    while not _on_replica(replicated, run.run_id):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    replicated.cancel_run(run.run_id)
    fresh = replicated.get_run(run.run_id)
    assert fresh is not None and fresh.status == "CANCELED"


def test_a_listing_of_an_environment_this_client_triggered_in_is_read_fresh(replicated: RunOps, new_env) -> None:
    runs = [replicated.trigger_run(new_env.environment_id, "t", {}).run_id for _ in range(3)]
    page = replicated.list_runs(new_env.environment_id, 10)
    assert [r.run_id for r in page.runs] == runs[::-1]


def _on_replica(client: RunOps, run_id: str) -> bool:
    """Whether the run-ops replica has replayed the run (asked of the replica alone)."""
    return bool(client._rows(RUN_OPS, "SELECT * FROM runops.get_run(%(r)s, NULL)", {"r": run_id}, Run, replica=True))
