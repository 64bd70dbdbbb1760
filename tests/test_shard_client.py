"""The Python client over four run-ops shards on their own clusters (SPEC §9 [1.3],
docs/scale-out.md "The client"): given every shard's URL it routes each call straight to the
owning shard — ids by the shard their byte 4 names, environments by their assignment — with one
pool per shard; a shard that is down fails only its own environments (the fault test is in the
`faults` group: `make test-faults`)."""

from __future__ import annotations

import json
import secrets
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import psycopg
import pytest

from runops import ids
from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import StoreMisconfigured, StoreUnavailable, WrongStore
from tests.test_router import SHARDS, Sharded, make_environments, one, shard_of_env, sharded_stores
from tests.test_shards import encode


@pytest.fixture(scope="module")
def sharded() -> Iterator[Sharded]:
    with sharded_stores() as made:
        yield made


def shard_urls(sharded: Sharded, n: int = SHARDS) -> list[str]:
    return [sharded.shard_app(k) for k in range(n)]


def client_for(sharded: Sharded, **kwargs: object) -> RunOps:
    return RunOps(sharded.app(0), shard_urls(sharded), **kwargs)  # type: ignore[arg-type]


def runs_on(sharded: Sharded, k: int, envs: list[str]) -> dict[str, str]:
    """run id -> environment of every run of ``envs`` stored on shard ``k``."""
    with psycopg.connect(sharded.shard_admin(k)) as shard:
        rows = shard.execute("SELECT 'run_' || id, environment_id FROM runops.runs WHERE environment_id = ANY(%s)",
                             [envs]).fetchall()
    return dict(rows)


def test_the_client_names_one_store_per_shard(sharded: Sharded) -> None:
    with client_for(sharded) as client:
        assert client.run_ops_stores == [RUN_OPS, "RUN_OPS_1", "RUN_OPS_2", "RUN_OPS_3"]
    # One string, comma-separated, as RUNOPS_RUN_OPS_URL gives it.
    with RunOps(sharded.app(0), ",".join(shard_urls(sharded))) as client:
        assert len(client.run_ops_stores) == SHARDS
    with RunOps(sharded.app(0), sharded.shard_app(0)) as client:
        assert client.run_ops_stores == [RUN_OPS]


def test_calls_go_straight_to_the_owning_shard(sharded: Sharded) -> None:
    envs = make_environments(sharded, 8)
    with client_for(sharded) as client:
        for env in envs:
            owner = shard_of_env(sharded, env)
            run = client.trigger_run(env, "t", {"n": 1}, idempotency_key="k")
            assert ids.shard_of(run.run_id, 0) == owner
            assert run.run_id in runs_on(sharded, owner, [env])
            assert client.trigger_run(env, "t", idempotency_key="k").run_id == run.run_id
            fetched = client.get_run(run.run_id)
            assert fetched is not None and fetched.status == "PENDING"
            assert [r.run_id for r in client.dequeue_runs(env, "w", 5)] == [run.run_id]
            client.start_attempt(run.run_id, "w")
            assert client.complete_attempt(run.run_id, 1, {"ok": True}).status == "COMPLETED_SUCCESSFULLY"
            child = client.trigger_run(env, "c", parent_run_id=run.run_id)
            assert ids.shard_of(child.run_id, 0) == owner
            wp = client.create_waitpoint(env, "MANUAL")
            assert ids.shard_of(wp.waitpoint_id, 0) == owner
            assert client.complete_waitpoint(wp.waitpoint_id, {"v": 1}).completed_now
            assert client.get_waitpoint(wp.waitpoint_id) is not None
            batch = client.batch_trigger(env, [{"task": "t"}, {"task": "u"}])
            assert {ids.shard_of(i, 0) for i in [batch.batch_id, *batch.run_ids]} == {owner}
            got = client.get_batch(batch.batch_id)
            assert got is not None and got.item_count == 2
            listed = client.list_runs(env).runs
            assert sorted(r.run_id for r in listed) == sorted([run.run_id, child.run_id, *batch.run_ids])
            assert client.cancel_run(child.run_id).status == "CANCELED"
        # Per-store services run on every shard and report each.
        assert set(client.tick()) == {CONTROL_PLANE, *client.run_ops_stores}
        assert set(client.purge_runs("30d")) == {CONTROL_PLANE, *client.run_ops_stores}
        assert set(client.metrics()) == {CONTROL_PLANE, *client.run_ops_stores}
        assert client.wait_for_mirror()


def test_a_fresh_clients_first_call_may_name_an_id(sharded: Sharded) -> None:
    """Before it has reached any store the client cannot place a NEW id (it needs the cut-over
    second every store holds): the first connection learns it, then the call goes to the id's
    shard."""
    env = next(e for e in make_environments(sharded, 8) if shard_of_env(sharded, e) != 0)
    with client_for(sharded) as client:
        run_id = client.trigger_run(env, "t").run_id
    with client_for(sharded) as fresh:
        assert fresh.cancel_run(run_id).status == "CANCELED"
    with client_for(sharded) as fresh:
        got = fresh.get_run(run_id)
        assert got is not None and got.status == "CANCELED"


def test_ids_and_environments_of_shards_the_client_lacks(sharded: Sharded) -> None:
    envs = make_environments(sharded, 12)
    far = [e for e in envs if shard_of_env(sharded, e) >= 2]
    near = [e for e in envs if shard_of_env(sharded, e) < 2]
    assert far and near
    with client_for(sharded) as full:
        far_run = full.trigger_run(far[0], "t").run_id
    stranger = "run_" + encode(bytes([0x12, 0x34, 0x56, 0x78, 9, 5]) + secrets.token_bytes(14))
    # A client given two of the four shards (a shard added since it was configured).
    with RunOps(sharded.app(0), shard_urls(sharded, 2)) as client:
        assert client.get_run(stranger) is None
        assert client.get_run(far_run) is None
        with pytest.raises(WrongStore) as exc:
            client.cancel_run(far_run)
        assert "which this client is not configured with (shards 0 to 1)" in exc.value.message
        with pytest.raises(StoreMisconfigured) as refused:
            client.trigger_run(far[0], "t")
        assert f"lives on run-ops shard {shard_of_env(sharded, far[0])}" in refused.value.message
        assert "give it every shard's URL" in refused.value.message
        assert client.trigger_run(near[0], "t").residency == "NEW"
    with client_for(sharded) as client, pytest.raises(WrongStore) as exc:
        client.cancel_run(stranger)
    assert "names run-ops shard 9" in exc.value.message


def test_shard_urls_out_of_order_are_refused(sharded: Sharded) -> None:
    urls = shard_urls(sharded)
    with RunOps(sharded.app(0), [urls[1], urls[0], *urls[2:]]) as client:
        with pytest.raises(StoreMisconfigured) as exc:
            client.metrics()
        assert "is run-ops shard" in exc.value.message and "shard order" in exc.value.message


def test_a_stale_environment_shard_is_corrected_by_the_shard(sharded: Sharded) -> None:
    """An environment pinned elsewhere after this client remembered its shard (before its first
    run): the old shard refuses (RO002 naming the owner) and the client follows, once."""
    env = make_environments(sharded, 1)[0]
    before = shard_of_env(sharded, env)
    target = (before + 1) % SHARDS
    with client_for(sharded) as client:
        client.trigger_route(env)  # remembers the environment's shard
        assert client._environment_shards[env] == before
        with psycopg.connect(sharded.app(0), autocommit=True) as cp:
            one(cp, "SELECT runops.pin_environment_shard(%s, %s)", [env, target])
        for k in range(SHARDS):  # every shard's mirror has the new assignment
            with psycopg.connect(sharded.shard_admin(k), autocommit=True) as shard:
                for _ in range(200):
                    if one(shard, "SELECT runops.environment_shard(%s)", [env])[0] == target:
                        break
                    threading.Event().wait(0.05)
        run = client.trigger_run(env, "t")
        assert ids.shard_of(run.run_id, 0) == target
        assert client._environment_shards[env] == target


def test_keyed_triggers_from_32_connections_over_40_environments(sharded: Sharded) -> None:
    """The SPEC's correctness test through the client: every key one run, every environment's
    runs on its shard, and listing every run exactly once."""
    envs = make_environments(sharded, 40)
    keys = [f"key-{i}" for i in range(6)]
    calls = [(env, key) for env in envs for key in keys] * 2
    with client_for(sharded, max_pool_size=32) as client:

        def work(chunk: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
            return [(env, key, client.trigger_run(env, "t", idempotency_key=key).run_id) for env, key in chunk]

        with ThreadPoolExecutor(32) as pool:
            results = [r for chunk in pool.map(work, [calls[i::32] for i in range(32)]) for r in chunk]
        by_key: dict[tuple[str, str], set[str]] = {}
        for env, key, run_id in results:
            by_key.setdefault((env, key), set()).add(run_id)
        assert len(by_key) == len(envs) * len(keys)
        assert all(len(found) == 1 for found in by_key.values())  # every key one run
        owners = {env: shard_of_env(sharded, env) for env in envs}
        assert set(owners.values()) == set(range(SHARDS))
        seen: dict[str, str] = {}
        for k in range(SHARDS):
            for run_id, env in runs_on(sharded, k, envs).items():
                assert owners[env] == k  # every environment's runs on its shard
                assert run_id not in seen
                seen[run_id] = env
        assert set(seen) == {next(iter(found)) for found in by_key.values()}
        for env in envs:
            listed: list[str] = []
            cursor = None
            while True:
                page = client.list_runs(env, 4, cursor)
                listed += [r.run_id for r in page.runs]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert len(listed) == len(set(listed)) == len(keys)  # exactly once
            assert set(listed) == {r for r, e in seen.items() if e == env}


def cli(sharded: Sharded, *args: str, admin: bool = False) -> tuple[int, str, str]:
    """The installed `runops` as an operator runs it, with every shard's URL comma-separated."""
    from tests.test_first_hour import runops

    if admin:
        urls = {"RUNOPS_CONTROL_PLANE_ADMIN_URL": sharded.admin(0),
                "RUNOPS_RUN_OPS_ADMIN_URL": ",".join(sharded.shard_admin(k) for k in range(SHARDS))}
    else:
        urls = {"RUNOPS_CONTROL_PLANE_URL": sharded.app(0), "RUNOPS_RUN_OPS_URL": ",".join(shard_urls(sharded))}
    return runops("--json", *args, cwd=Path(tempfile.gettempdir()), timeout=300, **urls)


def test_doctor_metrics_and_purge_cover_every_shard(sharded: Sharded) -> None:
    envs = make_environments(sharded, 8)
    with client_for(sharded) as client:
        for env in envs:
            client.trigger_run(env, "t")
        client.tick()
    code, out, err = cli(sharded, "doctor", admin=True)
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    for k in range(SHARDS):
        for kind in ("store", "migrations", "functions", "tick", "work"):
            assert checks[f"{kind}.run_ops_shard_{k}"]["severity"] == "ok", checks[f"{kind}.run_ops_shard_{k}"]
        assert checks[f"fdw.run_ops_shard_{k}_to_control_plane"]["severity"] == "ok"
        assert f"mirror.run_ops_shard_{k}" in checks
    assert checks["shards"]["severity"] == "ok", checks["shards"]
    assert "4 shards numbered in URL order" in checks["shards"]["detail"]
    assert len(checks["mirror.slot"]["data"]["subscription_slots"]) == SHARDS
    # Shard URLs in the wrong order: the shards check says which URL leads where.
    from tests.test_first_hour import runops

    swapped = [sharded.shard_admin(k) for k in (1, 0, 2, 3)]
    code, out, err = runops("--json", "doctor", cwd=Path(tempfile.gettempdir()), timeout=300,
                            RUNOPS_CONTROL_PLANE_ADMIN_URL=sharded.admin(0), RUNOPS_RUN_OPS_ADMIN_URL=",".join(swapped))
    assert code == 2
    shards_check = next(c for c in json.loads(out)["checks"] if c["name"] == "shards")
    assert "run-ops shard 0's URL leads to shard 1" in shards_check["detail"]

    code, out, err = cli(sharded, "metrics")
    assert code == 0, err
    figures = json.loads(out)
    assert set(figures) == {CONTROL_PLANE, RUN_OPS, "RUN_OPS_1", "RUN_OPS_2", "RUN_OPS_3"}
    owners = {env: shard_of_env(sharded, env) for env in envs}
    for env, k in owners.items():
        store = RUN_OPS if k == 0 else f"RUN_OPS_{k}"
        assert env in figures[store]["runs"]
        assert all(env not in figures[other]["runs"] for other in figures if other != store)
    code, out, err = cli(sharded, "purge", "--older-than", "30d")
    assert code == 0, err
    assert set(json.loads(out)["purged"]) == set(figures)


@pytest.mark.faults
def test_a_stopped_shard_fails_only_its_environments(sharded: Sharded) -> None:
    envs = make_environments(sharded, 16)
    victim = 2
    down = [e for e in envs if shard_of_env(sharded, e) == victim]
    up = [e for e in envs if shard_of_env(sharded, e) != victim]
    assert down and up
    stop = threading.Event()
    failures: list[str] = []
    done = [0]
    with client_for(sharded, timeout=3) as client:
        down_runs = {env: client.trigger_run(env, "t").run_id for env in envs if env in down}
        for env in up:  # every shard's pool is open before the stop
            client.trigger_run(env, "t")

        def traffic() -> None:
            while not stop.is_set():
                for env in up:
                    try:
                        run = client.trigger_run(env, "t", idempotency_key=secrets.token_hex(4))
                        client.list_runs(env, 5)
                        client.get_run(run.run_id)
                        done[0] += 1
                    except Exception as exc:  # pragma: no cover - the assertion below reports it
                        failures.append(f"{env}: {exc!r}")

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            sharded.clusters[victim + 1].stop(sharded.bindir)
            before = done[0]
            for env in down:
                for call in (partial(client.trigger_run, env, "t"), partial(client.list_runs, env),
                             partial(client.get_run, down_runs[env]), partial(client.cancel_run, down_runs[env])):
                    with pytest.raises(StoreUnavailable) as exc:
                        call()
                    assert f"run-ops shard {victim}" in exc.value.message, exc.value.message
                    assert exc.value.sqlstate == "RO009"
            # The client's upkeep goes on on the others and names the one that did not answer.
            ticked = client.tick()
            assert f"RUN_OPS_{victim}" not in ticked and len(ticked) == SHARDS
            with pytest.raises(StoreUnavailable) as exc:
                client.purge_runs("30d")
            assert f"RUN_OPS_{victim}" in exc.value.message
            # `runops metrics` reports every shard that answers and names the one that did not.
            code, out, _ = cli(sharded, "metrics")
            figures = json.loads(out)
            assert code != 0 and set(figures[f"RUN_OPS_{victim}"]) == {"error"}
            assert all("runs" in figures[s] for s in figures if s != f"RUN_OPS_{victim}")
            threading.Event().wait(1.0)
            assert done[0] > before  # the other shards' traffic went on meanwhile
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            sharded.clusters[victim + 1].start(sharded.bindir)
        assert failures == []
        for _ in range(100):  # back once the shard is: the next probe gets through
            try:
                client.trigger_run(down[0], "t")
                break
            except StoreUnavailable:
                threading.Event().wait(0.2)
        else:
            raise AssertionError(f"shard {victim} did not come back")
