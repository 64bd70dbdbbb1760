"""The PL/Proxy router over four run-ops shards on their own clusters (SPEC §9 [1.3],
docs/scale-out.md): the run-ops SQL API by the same names, routed by id and by environment, with
the shards' SQLSTATEs; a stale cluster definition refuses; a stopped shard fails only its own
environments (the `faults` group: `make test-faults`)."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import RunOps
from runops.dev_stores import DATABASE, app_url
from runops.ops import migrate
from runops.ops.local_cluster import Cluster, find_bindir, free_port
from tests.conftest import sqlstate_of

SHARDS = 4
ROUTER_DB = "runops_router"


@dataclass
class Sharded:
    bindir: Path
    clusters: list[Cluster]       # [control plane, shard 0, ..., shard N-1]
    password: str

    def admin(self, i: int, dbname: str = DATABASE) -> str:
        return self.clusters[i].admin_url(dbname)

    def app(self, i: int, dbname: str = DATABASE) -> str:
        return app_url(self.password, self.clusters[i].port).rsplit("/", 1)[0] + f"/{dbname}"

    @property
    def router_app(self) -> str:
        return self.app(0, ROUTER_DB)

    @property
    def router_admin(self) -> str:
        return self.admin(0, ROUTER_DB)

    def shard_admin(self, k: int) -> str:
        return self.admin(k + 1)

    def shard_app(self, k: int) -> str:
        return self.app(k + 1)


@contextlib.contextmanager
def sharded_stores(shards: int = SHARDS) -> Iterator[Sharded]:
    home = Path(tempfile.mkdtemp(prefix="runops-shards-"))
    home.chmod(0o755)
    bindir = find_bindir()
    clusters = [Cluster(datadir=str(home / f"c{i}"), port=free_port(), socket_dir=str(home / f"s{i}"), fsync=False)
                for i in range(shards + 1)]
    made = Sharded(bindir, clusters, secrets.token_urlsafe(18))
    try:
        for c in clusters:
            c.init(bindir)
            c.start(bindir)
            c.create_database()
        clusters[0].create_database(ROUTER_DB)
        migrate.migrate_shards(made.admin(0), [made.shard_admin(k) for k in range(shards)],
                               router_url=made.router_admin)
        for i in range(shards + 1):
            migrate.set_app_password(made.admin(i), made.password)
            with psycopg.connect(made.admin(i), autocommit=True) as conn:
                conn.execute("GRANT runops_clock TO runops_app")
                # The router's login on every store may set the clock its callers set (tests only).
                conn.execute(f"GRANT runops_clock TO runops_router_{ROUTER_DB}")
        with RunOps(made.app(0), made.shard_app(0)) as client:
            client.enable_split()
        yield made
    finally:
        for c in clusters:
            with contextlib.suppress(Exception):
                c.stop(bindir)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def sharded() -> Iterator[Sharded]:
    with sharded_stores() as made:
        yield made


def one(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row


def make_environments(sharded: Sharded, n: int) -> list[str]:
    """n ksuid environments, created on the control plane; waits until every shard's mirror has
    their assignments."""
    with psycopg.connect(sharded.app(0), autocommit=True) as cp:
        org = one(cp, "SELECT runops.create_organization(%s, %s)",
                  [f"o{secrets.token_hex(4)}", Jsonb({"mint_kind": "ksuid"})])[0]
        project = one(cp, "SELECT runops.create_project(%s, 'p')", [org])[0]
        envs = [one(cp, "SELECT runops.create_environment(%s, %s, 'PRODUCTION')", [project, f"e{i}"])[0]
                for i in range(n)]
    for k in range(len(sharded.clusters) - 1):
        with psycopg.connect(sharded.shard_admin(k), autocommit=True) as shard:
            for _ in range(200):
                row = one(shard, "SELECT count(*) FROM runops.environment_shards WHERE environment_id = ANY(%s)",
                          [envs])
                env_rows = one(shard, "SELECT count(*) FROM runops.runtime_environments WHERE id = ANY(%s)", [envs])
                if row[0] == n and env_rows[0] == n:
                    break
                threading.Event().wait(0.1)
            else:
                raise AssertionError(f"shard {k}'s mirror did not receive the environments")
    return envs


def shard_of_env(sharded: Sharded, env: str) -> int:
    with psycopg.connect(sharded.app(0), autocommit=True) as cp:
        return int(one(cp, "SELECT runops.environment_shard(%s)", [env])[0])


def test_shards_are_numbered_and_environments_spread(sharded: Sharded) -> None:
    for k in range(SHARDS):
        with psycopg.connect(sharded.shard_admin(k)) as conn:
            assert one(conn, "SELECT shard_number, shard_count FROM runops.store_config") == (k, SHARDS)
    envs = make_environments(sharded, 40)
    assert {shard_of_env(sharded, e) for e in envs} == set(range(SHARDS))


def test_the_router_runs_the_api_on_the_owning_shard(sharded: Sharded) -> None:
    envs = make_environments(sharded, 8)
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        for env in envs:
            run_id, cached, status, residency = one(router, "SELECT * FROM runops.trigger_run(%s, 't', %s, %s)",
                                                    [env, Jsonb({"n": 1}), Jsonb({"idempotency_key": "k"})])
            assert (cached, status, residency) == (False, "PENDING", "NEW")
            owner = shard_of_env(sharded, env)
            assert one(router, "SELECT runops.shard_of(%s)", [run_id])[0] == owner
            with psycopg.connect(sharded.shard_app(owner)) as shard:
                assert one(shard, "SELECT run_id FROM runops.get_run(%s)", [run_id])[0] == run_id
            again = one(router, "SELECT run_id, is_cached FROM runops.trigger_run(%s, 't', '{}', %s)",
                        [env, Jsonb({"idempotency_key": "k"})])
            assert again == (run_id, True)
            # The run's whole life through the router.
            rows = router.execute("SELECT run_id FROM runops.dequeue_runs(%s, 'w', 5)", [env]).fetchall()
            assert [r[0] for r in rows] == [run_id]
            assert one(router, "SELECT status FROM runops.start_attempt(%s, 'w')", [run_id])[0] == "EXECUTING"
            assert one(router, "SELECT status FROM runops.complete_attempt(%s, 1, %s)",
                       [run_id, Jsonb({"ok": True})])[0] == "COMPLETED_SUCCESSFULLY"
            assert one(router, "SELECT status, output FROM runops.get_run(%s, %s)", [run_id, env]) == (
                "COMPLETED_SUCCESSFULLY", {"ok": True})
            assert router.execute("SELECT * FROM runops.get_run(%s, 'another-env')", [run_id]).fetchall() == []
            # Waitpoints and batches live with their environment too.
            wp, _ = one(router, "SELECT * FROM runops.create_waitpoint(%s, 'MANUAL')", [env])
            assert one(router, "SELECT runops.shard_of(%s)", [wp])[0] == owner
            assert one(router, "SELECT completed_now FROM runops.complete_waitpoint(%s, %s)",
                       [wp, Jsonb({"v": 1})])[0] is True
            batch_id, _, run_ids = one(router, "SELECT * FROM runops.batch_trigger(%s, %s)",
                                       [env, Jsonb([{"task": "t"}, {"task": "u"}])])
            assert {one(router, "SELECT runops.shard_of(%s)", [r])[0] for r in [batch_id, *run_ids]} == {owner}
            assert one(router, "SELECT item_count FROM runops.get_batch(%s)", [batch_id])[0] == 2
        counts = one(router, "SELECT runops.tick()")[0]
        assert isinstance(counts, dict)


def test_the_shards_sqlstates_reach_the_routers_caller_unchanged(sharded: Sharded) -> None:
    env = make_environments(sharded, 1)[0]
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        run_id = one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])[0]
        with psycopg.connect(sharded.shard_app(shard_of_env(sharded, env)), autocommit=True) as shard:
            cases = [("SELECT * FROM runops.complete_attempt(%s, 1, '{}')", [run_id]),       # RO003
                     ("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)", [env, Jsonb({"delay": "soon"})]),
                     ("SELECT * FROM runops.cancel_run(%s)", ["run_nonsense"]),               # RO001
                     ("SELECT * FROM runops.cancel_run(%s)", ["run_c" + "0" * 24]),          # RO002
                     ("SELECT * FROM runops.trigger_run('no-such-env', 't')", None)]          # RO004
            for query, params in cases:
                errors = []
                for conn in (shard, router):
                    with pytest.raises(psycopg.Error) as exc:
                        conn.execute(query, params)
                    d = exc.value.diag
                    errors.append((d.sqlstate, d.message_primary, d.message_detail, d.message_hint))
                assert errors[0] == errors[1], query
                assert errors[0][0] is not None and errors[0][0].startswith("RO")


def test_keyed_triggers_from_32_connections_over_40_environments(sharded: Sharded) -> None:
    envs = make_environments(sharded, 40)
    keys = [f"key-{i}" for i in range(6)]
    calls = [(env, key) for env in envs for key in keys] * 2

    def work(chunk: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
        out = []
        with psycopg.connect(sharded.router_app, autocommit=True) as conn:
            for env, key in chunk:
                run_id = one(conn, "SELECT run_id FROM runops.trigger_run(%s, 't', '{}', %s)",
                             [env, Jsonb({"idempotency_key": key})])[0]
                out.append((env, key, run_id))
        return out

    chunks = [calls[i::32] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = [r for chunk in pool.map(work, chunks) for r in chunk]
    by_key: dict[tuple[str, str], set[str]] = {}
    for env, key, run_id in results:
        by_key.setdefault((env, key), set()).add(run_id)
    assert all(len(ids) == 1 for ids in by_key.values())  # every key one run
    assert len(by_key) == len(envs) * len(keys)
    owners = {env: shard_of_env(sharded, env) for env in envs}
    seen: dict[str, str] = {}
    for k in range(SHARDS):
        with psycopg.connect(sharded.shard_admin(k)) as shard:
            rows = shard.execute("SELECT 'run_' || id, environment_id FROM runops.runs "
                                 "WHERE environment_id = ANY(%s)", [envs]).fetchall()
        for run_id, env in rows:
            assert owners[env] == k   # every environment's runs on its shard
            assert run_id not in seen
            seen[run_id] = env
    assert set(seen) == {next(iter(ids)) for ids in by_key.values()}
    # Listing through the router: every run exactly once, pages in order.
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        for env in envs[:10]:
            listed: list[str] = []
            cursor = None
            while True:
                page = router.execute("SELECT run_id, cursor FROM runops.list_runs(%s, 4, %s)",
                                      [env, cursor]).fetchall()
                if not page:
                    break
                listed += [r[0] for r in page]
                cursor = page[-1][1]
            assert sorted(listed) == sorted(r for r, e in seen.items() if e == env)
            assert len(listed) == len(set(listed)) == len(keys)


def test_the_routers_callers_test_clock_reaches_the_shard(sharded: Sharded) -> None:
    """runops.fake_now set on the router session is the shards' clock for that caller's calls
    (and only theirs: the next caller on the same pooled shard connection has the real one)."""
    env = make_environments(sharded, 1)[0]
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        run_id, _, status, _ = one(router, "SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                                   [env, Jsonb({"delay": "1h"})])
        assert status == "DELAYED"
        assert one(router, "SELECT runops.enqueue_delayed_runs()")[0] == 0
        router.execute("SELECT set_config('runops.fake_now', (now() + interval '2 hours')::text, false)")
        assert one(router, "SELECT runops.enqueue_delayed_runs()")[0] >= 1
        assert one(router, "SELECT status FROM runops.get_run(%s)", [run_id])[0] == "PENDING"
        # A delay measured from the frozen clock: due only once that clock passes it.
        later = one(router, "SELECT run_id FROM runops.trigger_run(%s, 't', '{}', %s)",
                    [env, Jsonb({"delay": "30m"})])[0]
        router.execute("RESET runops.fake_now")
        assert one(router, "SELECT status FROM runops.get_run(%s)", [later])[0] == "DELAYED"
        run_at = one(router, "SELECT delay_until FROM runops.get_run(%s)", [later])[0]
        assert run_at > one(router, "SELECT now() + interval '2 hours'")[0]


def test_ids_of_a_shard_the_router_does_not_know(sharded: Sharded) -> None:
    from tests.test_shards import encode

    stranger = "run_" + encode(bytes([0x12, 0x34, 0x56, 0x78, 9, 5]) + secrets.token_bytes(14))
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        assert router.execute("SELECT * FROM runops.get_run(%s)", [stranger]).fetchall() == []
        with pytest.raises(psycopg.Error) as exc:
            router.execute("SELECT * FROM runops.cancel_run(%s)", [stranger])
        assert sqlstate_of(exc.value) == "RO002"
        assert "names run-ops shard 9, which this router's cluster definition does not have" in str(exc.value)


def test_a_stale_cluster_definition_refuses(sharded: Sharded) -> None:
    """A shard added (here: the definition shrunk by hand to two shards, as a router not yet
    rewritten would be): calls for the shards it lacks are refused, never sent elsewhere."""
    envs = make_environments(sharded, 12)
    far = [e for e in envs if shard_of_env(sharded, e) >= 2]
    near = [e for e in envs if shard_of_env(sharded, e) < 2]
    assert far and near
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        run_id = one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [far[0]])[0]
    with psycopg.connect(sharded.router_admin, autocommit=True) as admin:
        admin.execute("UPDATE runops.router_config SET shard_count = 2, version = version + 1")
        admin.execute("TRUNCATE runops.router_environment_cache")
    try:
        with psycopg.connect(sharded.router_app, autocommit=True) as router:
            with pytest.raises(psycopg.Error) as exc:
                router.execute("SELECT * FROM runops.trigger_run(%s, 't')", [far[0]])
            assert sqlstate_of(exc.value) == "RO009"
            assert "run runops migrate with every --run-ops-url" in (exc.value.diag.message_hint or "")
            with pytest.raises(psycopg.Error) as exc:
                router.execute("SELECT * FROM runops.cancel_run(%s)", [run_id])
            assert sqlstate_of(exc.value) == "RO002"
            one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [near[0]])
    finally:
        with psycopg.connect(sharded.router_admin, autocommit=True) as admin:
            admin.execute("UPDATE runops.router_config SET shard_count = %s, version = version + 1", [SHARDS])
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        assert one(router, "SELECT status FROM runops.cancel_run(%s)", [run_id])[0] == "CANCELED"


@pytest.mark.faults
def test_a_stopped_shard_fails_only_its_environments(sharded: Sharded) -> None:
    envs = make_environments(sharded, 16)
    victim = 3
    down = [e for e in envs if shard_of_env(sharded, e) == victim]
    up = [e for e in envs if shard_of_env(sharded, e) != victim]
    assert down and up
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        for env in envs:  # warms the router's assignment cache and its connections
            one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])
    stop = threading.Event()
    failures: list[str] = []

    def traffic() -> None:
        with psycopg.connect(sharded.router_app, autocommit=True) as conn:
            while not stop.is_set():
                for env in up:
                    try:
                        one(conn, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])
                    except psycopg.Error as exc:  # pragma: no cover - the assertion below reports it
                        failures.append(f"{env}: {exc}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        sharded.clusters[victim + 1].stop(sharded.bindir)
        with psycopg.connect(sharded.router_app, autocommit=True) as router:
            for env in down:
                with pytest.raises(psycopg.Error) as exc:
                    router.execute("SELECT * FROM runops.trigger_run(%s, 't')", [env])
                assert sqlstate_of(exc.value) == "RO009"
                assert f"run-ops shard {victim} is unavailable" in str(exc.value)
            for env in up:
                one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])
    finally:
        stop.set()
        thread.join()
        sharded.clusters[victim + 1].start(sharded.bindir)
    assert failures == []
    with psycopg.connect(sharded.router_app, autocommit=True) as router:
        one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [down[0]])


def test_dev_up_with_shards_migrates_them_behind_a_router() -> None:
    """`runops dev up --shards 2` as a user runs it: two shards, a router, and `runops migrate`
    with no URLs acting on all of them again."""
    from tests.test_first_hour import RUNOPS, runops, user_env

    root = Path(tempfile.mkdtemp(prefix="runops-dev-shards-"))
    root.chmod(0o755)
    try:
        code, out, err = runops("--json", "dev", "up", "--shards", "2", cwd=root, timeout=300)
        assert code == 0, err
        up = json.loads(out)
        assert set(up["urls"]) == {"CONTROL_PLANE", "RUN_OPS", "RUN_OPS_1"}
        router_url = up["router_url"]
        code, out, err = runops("--json", "env", "create", "acme", "web", "prod", "--mint-kind", "ksuid", cwd=root)
        assert code == 0, err
        env = json.loads(out)["environment_id"]
        with psycopg.connect(router_url, autocommit=True) as router:
            run_id = one(router, "SELECT run_id FROM runops.trigger_run(%s, 't')", [env])[0]
            shard = one(router, "SELECT runops.shard_of(%s)", [run_id])[0]
            assert one(router, "SELECT status FROM runops.get_run(%s)", [run_id])[0] == "PENDING"
        with psycopg.connect(up["urls"]["CONTROL_PLANE"]) as cp:
            assert one(cp, "SELECT runops.environment_shard(%s)", [env])[0] == shard
        code, out, err = runops("dev", "up", "--shards", "3", cwd=root)
        assert code != 0 and "have 2 run-ops shard(s)" in err
        code, out, err = runops("migrate", cwd=root, timeout=300)
        assert code == 0, err
        assert "(shard 1)" in err and "router: 2 shards" in out
    finally:
        subprocess.run([str(RUNOPS), "dev", "down"], cwd=root, env=user_env(), capture_output=True, timeout=120,
                       check=False)
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((root / ".runops" / "state.json").read_text())
            shutil.rmtree(state["data_root"], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_python_client_uses_the_router_as_its_run_ops_store(sharded: Sharded) -> None:
    """A client given one run-ops URL that is a router's: the router routes (the client itself
    routes only when given every shard's URL, tests/test_shard_client.py)."""
    envs = make_environments(sharded, 6)
    with RunOps(sharded.app(0), sharded.router_app) as client:
        for env in envs:
            run = client.trigger_run(env, "t", {"x": 1}, idempotency_key="k")
            assert client.trigger_run(env, "t", idempotency_key="k").run_id == run.run_id
            assert client.get_run(run.run_id).status == "PENDING"
            leased = client.dequeue_runs(env, "w", 5)
            assert [r.run_id for r in leased] == [run.run_id]
            client.start_attempt(run.run_id, "w")
            done = client.complete_attempt(run.run_id, 1, {"ok": True})
            assert done.status == "COMPLETED_SUCCESSFULLY"
            assert [r.run_id for r in client.list_runs(env).runs] == [run.run_id]
        client.tick()
