"""replay_run (SPEC §9 Replay [1.3]): a new root run from an existing one, on real stores.

The original's payload, tags, queue, max attempts, metadata and concurrency key are copied,
overrides win, its key never travels, the environment's current mint kind decides the store (a
LEGACY run replays as NEW after the flip) and the new run names its origin."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import EnvironmentUnusable, InvalidInput, NotFound
from tests.conftest import Env, Stores, sqlstate_of

RUNOPS = Path(sys.executable).parent / "runops"


def _trigger(client: RunOps, env: Env) -> str:
    return client.trigger_run(env.environment_id, "send-email", {"to": "a@example.com"}, tags=["b", "a"],
                              queue="mail", max_attempts=7, metadata={"m": 1}, concurrency_key="ck",
                              idempotency_key="original-key").run_id


@pytest.mark.parametrize("kind", ["cuid", "ksuid"])
def test_a_replay_copies_the_original_and_names_it(client: RunOps, make_env: Callable[..., Env], kind: str) -> None:
    env = make_env(kind)
    original_id = _trigger(client, env)
    replay = client.replay_run(original_id)
    assert not replay.is_cached and replay.run_id != original_id and replay.status == "PENDING"
    original, copy = client.get_run(original_id), client.get_run(replay.run_id)
    assert original is not None and copy is not None
    assert copy.replayed_from_run_id == original_id and original.replayed_from_run_id is None
    same = ("environment_id", "task_identifier", "payload", "tags", "queue", "max_attempts", "metadata",
            "concurrency_key", "residency")
    assert {k: getattr(copy, k) for k in same} == {k: getattr(original, k) for k in same}
    # A new root: no key (the original's would answer the original itself), no parent.
    assert copy.idempotency_key is None and copy.parent_run_id is None and copy.root_run_id is None
    # Replaying twice without a key makes two runs.
    assert client.replay_run(original_id).run_id not in (original_id, replay.run_id)


def test_overrides_win_and_a_key_makes_the_replay_idempotent(client: RunOps, new_env: Env) -> None:
    original_id = _trigger(client, new_env)
    first = client.replay_run(original_id, payload={"to": "b@example.com"}, tags=["z"], queue="other",
                              max_attempts=2, metadata={"n": 2}, idempotency_key="replay-1", delay="1h")
    again = client.replay_run(original_id, idempotency_key="replay-1")
    assert (again.run_id, again.is_cached, first.is_cached) == (first.run_id, True, False)
    run = client.get_run(first.run_id)
    assert run is not None
    assert (run.payload, run.tags, run.queue, run.max_attempts, run.metadata, run.status, run.idempotency_key) == (
        {"to": "b@example.com"}, ["z"], "other", 2, {"n": 2}, "DELAYED", "replay-1")
    assert run.concurrency_key == "ck" and run.replayed_from_run_id == original_id


def test_a_legacy_run_replays_as_new_after_the_flip(client: RunOps, make_env: Callable[..., Env],
                                                    stores: Stores) -> None:
    env = make_env("cuid")
    original_id = _trigger(client, env)
    assert client.get_run(original_id).residency == "LEGACY"  # type: ignore[union-attr]
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    replay = client.replay_run(original_id)
    assert replay.residency == "NEW"
    copy = client.get_run(replay.run_id)
    assert copy is not None and copy.replayed_from_run_id == original_id and copy.payload == {"to": "a@example.com"}
    # The SQL itself: on the control plane the replay belongs to the run-ops store (RO002 names
    # it); on the run-ops store it reads the original through the FDW.
    with psycopg.connect(stores.app[CONTROL_PLANE]) as cp, pytest.raises(psycopg.Error) as refused:
        cp.execute("SELECT * FROM runops.replay_run(%s)", [original_id])
    assert sqlstate_of(refused.value) == "RO002" and "RUN_OPS" in str(refused.value)
    with psycopg.connect(stores.app[RUN_OPS]) as ro:
        [(run_id, cached, residency)] = ro.execute(
            "SELECT run_id, is_cached, residency FROM runops.replay_run(%s)", [original_id]).fetchall()
        assert (cached, residency) == (False, "NEW")
        assert ro.execute("SELECT replayed_from_run_id FROM runops.get_run(%s)", [run_id]).fetchone() == (original_id,)


def test_bad_input_is_refused_and_creates_nothing(client: RunOps, make_env: Callable[..., Env],
                                                  stores: Stores) -> None:
    env, stranger = make_env("ksuid"), make_env("ksuid")
    original_id = _trigger(client, env)
    def count() -> int:
        with psycopg.connect(stores.admin[RUN_OPS]) as admin:
            row = admin.execute("SELECT count(*) FROM runops.runs WHERE environment_id = %s",
                                [env.environment_id]).fetchone()
        return int(row[0]) if row else -1

    with psycopg.connect(stores.app[RUN_OPS]) as ro:

        before = count()
        cases: list[tuple[str, Any, str]] = [
            (original_id, {"idempotency_key_scope": "run"}, "RO006"),  # not a replay option
            (original_id, {"max_attempts": 0}, "RO006"),
            (original_id, {"tags": [1]}, "RO006"),
            (original_id, [], "RO006"),                                   # options not an object
            ("batch_" + original_id.removeprefix("run_"), {}, "RO006"),   # another kind's id
            ("not-an-id", {}, "RO001"),
            ("run_" + "0" * 27, {}, "RO004"),                             # well-formed, never minted
            (original_id, {"environment_id": stranger.environment_id}, "RO004"),  # the guard
        ]
        for run_id, options, code in cases:
            with pytest.raises(psycopg.Error) as err:
                ro.execute("SELECT * FROM runops.replay_run(%s, %s)", [run_id, json.dumps(options)])
            ro.rollback()
            assert sqlstate_of(err.value) == code, (run_id, options, err.value)
            assert len(str(err.value).splitlines()[0]) < 200
        assert count() == before
    with pytest.raises(NotFound):
        client.replay_run(original_id, environment_id=stranger.environment_id)
    with pytest.raises(InvalidInput):
        client.replay_run(original_id, max_attempts=0)
    client.update_environment(env.environment_id, paused=True)
    assert client.wait_for_mirror()
    with pytest.raises(EnvironmentUnusable):
        client.replay_run(original_id)


def test_the_cli_replays_a_run(client: RunOps, new_env: Env, stores: Stores) -> None:
    original_id = _trigger(client, new_env)
    env = {"RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS],
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(RUNOPS), "--json", "runs", "replay", original_id, "--payload", '{"n": 5}',
                           "--tag", "cli"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    replay = json.loads(done.stdout)
    run = client.get_run(replay["run_id"])
    assert run is not None and (run.payload, run.tags, run.replayed_from_run_id) == ({"n": 5}, ["cli"], original_id)
    missing = subprocess.run([str(RUNOPS), "runs", "replay", "run_" + "0" * 27], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
    assert missing.returncode == 14 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
