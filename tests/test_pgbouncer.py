"""Behind PgBouncer in transaction pooling mode (SPEC §9 "Deployments users have"): Debian's
PgBouncer 1.18, started here as the ``postgres`` user in front of both session stores, three server
connections per store.

* The SQL API holds on its own: keyed and unkeyed triggers from eight clients over three server
  connections (one run per key), a batch, the lifecycle and the listing, from psycopg with its
  statement preparation off (as PgBouncer's documentation asks of any client before 1.21).
* The Python client, sync and async, needs one setting (``pgbouncer=True`` / RUNOPS_PGBOUNCER=1)
  and says so when it is missing; ``wait_for_run``/``wait_for_batch`` poll there; a real
  ``runops worker`` runs tasks, children and batches through it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from runops import RunOps, RunOpsError
from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops.local_cluster import _as_server_user, free_port
from tests.client_flavours import Blocking
from tests.conftest import Env, Stores

ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER = "/usr/sbin/pgbouncer"
SERVER_CONNECTIONS = 3
CLIENTS = 8
DATABASES = {CONTROL_PLANE: "cp", RUN_OPS: "ro"}


@dataclass
class Bouncer:
    urls: dict[str, str]  # store -> the application's URL through PgBouncer
    console: str          # PgBouncer's own SHOW console, as a stats user

    def show(self, what: str) -> list[dict[str, Any]]:
        # The console speaks the simple query protocol only: a client-side cursor, no parameters.
        with psycopg.connect(self.console, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def count(self, what: str, store: str) -> int:
        return sum(1 for row in self.show(what) if row["database"] == DATABASES[store])


@pytest.fixture(scope="module")
def bouncer(stores: Stores) -> Iterator[Bouncer]:
    app = {store: conninfo_to_dict(url) for store, url in stores.app.items()}
    user, password = app[CONTROL_PLANE]["user"], app[CONTROL_PLANE]["password"]
    home = Path(tempfile.mkdtemp(prefix="runops-pgbouncer-"))
    home.chmod(0o755)  # PgBouncer runs as postgres, which must read its configuration
    port = free_port()
    databases = "\n".join(f"{DATABASES[store]} = host={p['host']} port={p['port']} dbname={p['dbname']}"
                          for store, p in app.items())
    (home / "pgbouncer.ini").write_text(f"""[databases]
{databases}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {home}/userlist.txt
stats_users = {user}
pool_mode = transaction
default_pool_size = {SERVER_CONNECTIONS}
max_client_conn = 200
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
""")
    # A clear-text password lets PgBouncer answer the clients' SCRAM and log in to the servers.
    (home / "userlist.txt").write_text(f'"{user}" "{password}"\n')
    (home / "userlist.txt").chmod(0o600)
    if os.geteuid() == 0:
        for path in (home, *home.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    proc = subprocess.Popen(_as_server_user([PGBOUNCER, str(home / "pgbouncer.ini")]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (home / "pgbouncer.log").read_text()
                time.sleep(0.05)
        base = f"postgresql://{user}:{password}@127.0.0.1:{port}"
        yield Bouncer({store: f"{base}/{db}" for store, db in DATABASES.items()}, f"{base}/pgbouncer")
    finally:
        pidfile = home / "pgbouncer.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGINT)  # PgBouncer's own pid, not runuser's
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def in_threads(n: int, body: Callable[[int], Any]) -> list[Any]:
    """``body(i)`` for i in range(n), all at once; their results (an exception is re-raised)."""
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = body(i)
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.fixture(params=["cuid", "ksuid"])
def kind_env(request: pytest.FixtureRequest, make_env: Callable[..., Env]) -> tuple[str, str]:
    """(environment id, its roots' store): the control plane's (cuid) or run-ops' (ksuid)."""
    return make_env(request.param).environment_id, CONTROL_PLANE if request.param == "cuid" else RUN_OPS


# -- the SQL API ----------------------------------------------------------------------------------------


def test_the_sql_api_holds_for_eight_clients_over_three_server_connections(
        bouncer: Bouncer, kind_env: tuple[str, str]) -> None:
    env, store = kind_env
    keys = [f"order-{i}" for i in range(10)]
    conns = [psycopg.connect(bouncer.urls[store], autocommit=True, prepare_threshold=None) for _ in range(CLIENTS)]
    try:
        def client(i: int) -> tuple[dict[str, str], list[str]]:
            keyed, plain = {}, []
            for key in keys:
                keyed[key] = conns[i].execute("SELECT run_id FROM runops.trigger_run(%s, 't', %s, %s)",
                                              [env, psycopg.types.json.Jsonb({"by": i}),
                                               psycopg.types.json.Jsonb({"idempotency_key": key})]).fetchone()[0]
                plain.append(conns[i].execute("SELECT run_id FROM runops.trigger_run(%s, 't')", [env]).fetchone()[0])
            return keyed, plain

        seen = in_threads(CLIENTS, client)
        # Eight clients connected at once, never more than three server connections behind them.
        assert bouncer.count("CLIENTS", store) >= CLIENTS
        assert 0 < bouncer.count("SERVERS", store) <= SERVER_CONNECTIONS
    finally:
        for conn in conns:
            conn.close()
    for key in keys:
        assert len({keyed[key] for keyed, _ in seen}) == 1, f"{key} made more than one run"
    plain = [run_id for _, runs in seen for run_id in runs]
    assert len(set(plain)) == len(plain) == CLIENTS * len(keys)

    with psycopg.connect(bouncer.urls[store], autocommit=True, prepare_threshold=None) as conn:
        listed = [row[0] for row in conn.execute("SELECT run_id FROM runops.list_runs(%s, 200)", [env])]
        assert sorted(listed) == sorted(plain + [seen[0][0][key] for key in keys])
        batch, run_ids = conn.execute(
            """SELECT batch_id, run_ids FROM runops.batch_trigger(%s, '[{"task": "t"}, {"task": "t"}]', '{}')""",
            [env]).fetchone()
        assert conn.execute("SELECT run_ids, is_sealed FROM runops.get_batch(%s)", [batch]).fetchone() == (run_ids,
                                                                                                              True)
        queue = f"q-{secrets.token_hex(3)}"
        made = conn.execute("SELECT run_id FROM runops.trigger_run(%s, 't', '{}', %s)",
                            [env, psycopg.types.json.Jsonb({"queue": queue})]).fetchone()[0]
        assert conn.execute("SELECT run_id FROM runops.dequeue_runs(%s, 'w', 5, %s)",
                            [env, psycopg.types.json.Jsonb({"queues": [queue]})]).fetchall() == [(made,)]
        assert conn.execute("SELECT status FROM runops.start_attempt(%s, 'w')", [made]).fetchone() == ("EXECUTING",)
        assert conn.execute("SELECT status FROM runops.complete_attempt(%s, 1, '{}')",
                            [made]).fetchone() == ("COMPLETED_SUCCESSFULLY",)


# -- the Python client -------------------------------------------------------------------------------------


def test_without_its_setting_the_client_says_what_to_set(bouncer: Bouncer) -> None:
    """psycopg prepares statements server-side; behind PgBouncer (transaction mode, before 1.21)
    two clients' statements meet on one server connection."""
    clients = [RunOps(bouncer.urls[CONTROL_PLANE], max_pool_size=1) for _ in range(3)]
    try:
        with pytest.raises(RunOpsError, match="transaction pooler .* set RUNOPS_PGBOUNCER=1"):
            for _ in range(20):
                for client in clients:
                    client.list_environments("org_none")
    finally:
        for client in clients:
            client.close()


@pytest.fixture(params=["sync", "async"])
def pooled(request: pytest.FixtureRequest, bouncer: Bouncer) -> Iterator[Any]:
    """The client under test through PgBouncer, with the setting: RunOps, or AsyncRunOps driven
    through Blocking."""
    flavour = RunOps if request.param == "sync" else Blocking
    with flavour(bouncer.urls[CONTROL_PLANE], bouncer.urls[RUN_OPS], pgbouncer=True, max_pool_size=4) as c:
        yield c


def test_the_client_through_pgbouncer(pooled: Any, bouncer: Bouncer, kind_env: tuple[str, str]) -> None:
    ro = pooled
    env, store = kind_env
    residency = "LEGACY" if store == CONTROL_PLANE else "NEW"
    queue = f"q-{secrets.token_hex(3)}"

    made = ro.trigger_run(env, "t", {"n": 1}, queue=queue)
    keyed = ro.trigger_run(env, "t", {"n": 2}, idempotency_key="k")
    again = ro.trigger_run(env, "t", {"n": 3}, idempotency_key="k")
    assert (made.residency, again.run_id, again.is_cached) == (residency, keyed.run_id, True)
    assert ro.get_run(made.run_id).payload == {"n": 1}

    [taken] = ro.dequeue_runs(env, "w", 5, queues=[queue])
    assert ro.heartbeat_run(taken.run_id, "w").lease_expires_at is not None
    assert ro.start_attempt(taken.run_id, "w").status == "EXECUTING"

    def finish_later() -> None:
        time.sleep(0.5)
        with RunOps(bouncer.urls[CONTROL_PLANE], bouncer.urls[RUN_OPS], pgbouncer=True) as other:
            other.complete_attempt(taken.run_id, 1, {"ok": True})

    finisher = threading.Thread(target=finish_later)
    finisher.start()
    began = time.monotonic()
    done = ro.wait_for_run(taken.run_id, timeout=20, poll_interval=0.2)  # polls: no LISTEN through PgBouncer
    finisher.join()
    assert (done.status, done.output) == ("COMPLETED_SUCCESSFULLY", {"ok": True})
    assert time.monotonic() - began < 5

    batch = ro.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(3)])
    streamed = ro.stream_batch(env, ({"task": "t"} for _ in range(5)), 5, chunk_size=2)
    assert ro.get_batch(batch.batch_id).run_ids == batch.run_ids
    assert len(ro.get_batch(streamed.batch_id).run_ids) == 5
    for run_id in batch.run_ids:
        ro.cancel_run(run_id, "done with it")
    assert ro.wait_for_batch(batch.batch_id, timeout=10, poll_interval=0.2).status == "COMPLETED"

    page = ro.list_runs(env, 100)
    assert {made.run_id, keyed.run_id, *batch.run_ids} <= {r.run_id for r in page.runs}
    assert len(page.runs) == 2 + 3 + 5
    assert set(ro.tick()) == {CONTROL_PLANE, RUN_OPS}

    with pytest.raises(RunOpsError, match="transaction pooler"):
        if isinstance(ro, RunOps):
            with ro.listen(env, store):
                pass
        else:
            async def listen() -> None:
                async with ro.inner.listen(env, store):
                    pass

            ro.run(listen())


def test_eight_clients_one_run_per_key(bouncer: Bouncer, kind_env: tuple[str, str]) -> None:
    env, _ = kind_env
    keys = [f"k{i}" for i in range(6)]

    def client(i: int) -> dict[str, str]:
        with RunOps(bouncer.urls[CONTROL_PLANE], bouncer.urls[RUN_OPS], pgbouncer=True, max_pool_size=1) as c:
            return {key: c.trigger_run(env, "t", {"by": i}, idempotency_key=key).run_id for key in keys}

    seen = in_threads(CLIENTS, client)
    assert all(s == seen[0] for s in seen) and len(set(seen[0].values())) == len(keys)


def test_a_worker_through_pgbouncer(bouncer: Bouncer, make_env: Callable[..., Env], tmp_path: Path) -> None:
    env = make_env("ksuid").environment_id
    settings = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": bouncer.urls[CONTROL_PLANE],
                "RUNOPS_RUN_OPS_URL": bouncer.urls[RUN_OPS], "RUNOPS_PGBOUNCER": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "runops.ops.cli", "worker", "--app", "tests.worker_app:ro",
                                   "--env", env, "--concurrency", "4"],
                                  cwd=ROOT, env=settings, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        with RunOps(bouncer.urls[CONTROL_PLANE], bouncer.urls[RUN_OPS], pgbouncer=True) as ro:
            runs = {"plain": ro.trigger_run(env, "add", {"a": 1, "b": 2}),
                    "keyed": ro.trigger_run(env, "add", {"a": 3, "b": 4}, idempotency_key="sum-7"),
                    "parent": ro.trigger_run(env, "parent", {}),
                    "fan-out": ro.trigger_run(env, "fan-out", {"n": 4})}
            assert ro.trigger_run(env, "add", {"a": 0, "b": 0}, idempotency_key="sum-7").run_id == runs["keyed"].run_id
            done = {name: ro.wait_for_run(made.run_id, timeout=60, poll_interval=0.2) for name, made in runs.items()}
        assert {name: run.status for name, run in done.items()} == dict.fromkeys(runs, "COMPLETED_SUCCESSFULLY"), \
            log.read_text()
        assert (done["plain"].output, done["keyed"].output) == ({"sum": 3}, {"sum": 7})
        assert done["parent"].output["second"] == {"sum": 13}
        assert done["fan-out"].output == {"sums": [0, 2, 4, 6]}
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text() and "prepared statement" not in log.read_text()


def test_runs_watch_polls_through_pgbouncer(bouncer: Bouncer, make_env: Callable[..., Env]) -> None:
    """`runops runs watch` cannot LISTEN through a transaction pooler: there it reads the run."""
    env = make_env("ksuid").environment_id
    settings = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": bouncer.urls[CONTROL_PLANE],
                "RUNOPS_RUN_OPS_URL": bouncer.urls[RUN_OPS], "RUNOPS_PGBOUNCER": "1"}
    with RunOps(bouncer.urls[CONTROL_PLANE], bouncer.urls[RUN_OPS], pgbouncer=True) as ro:
        run_id = ro.trigger_run(env, "add", {"a": 1}).run_id
        watch = subprocess.Popen([str(Path(sys.executable).parent / "runops"), "runs", "watch", run_id,
                                  "--timeout", "60"], env=settings, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            assert watch.stdout is not None
            assert watch.stdout.readline().split()[1:] == [run_id, "PENDING"]
            ro.cancel_run(run_id, "watched")
            out, err = watch.communicate(timeout=30)
        finally:
            watch.kill()
    assert watch.returncode == 0, err
    assert out.split()[1:] == [run_id, "PENDING", "->", "CANCELED"], out
