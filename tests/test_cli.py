"""The CLI: readable one-line errors, exit codes that name the RO error, --json for scripts."""

from __future__ import annotations

import json

import psycopg
import pytest
from click.testing import CliRunner

from runops import migrate
from runops.cli import main
from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ids import generate_ksuid
from tests.conftest import Stores


@pytest.fixture
def cli(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", stores.app[CONTROL_PLANE])
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", stores.app[RUN_OPS])
    return CliRunner()


def run(cli: CliRunner, *args: str) -> tuple[int, str, str]:
    result = cli.invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_env_create_trigger_and_show_round_trip(cli: CliRunner) -> None:
    code, out, _ = run(cli, "--json", "env", "create", f"cli-{generate_ksuid()[-6:].lower()}", "p", "e",
                       "--mint-kind", "ksuid")
    assert code == 0, out
    env = json.loads(out)["environment_id"]
    code, out, _ = run(cli, "--json", "trigger", env, "send", "--payload", '{"a": 1}', "--key", "k", "--tag", "x")
    assert code == 0, out
    first = json.loads(out)
    assert first["residency"] == "NEW" and first["is_cached"] is False
    code, out, _ = run(cli, "--json", "trigger", env, "send", "--key", "k")
    assert json.loads(out)["run_id"] == first["run_id"] and json.loads(out)["is_cached"] is True
    code, out, _ = run(cli, "--json", "runs", "show", first["run_id"])
    assert code == 0 and json.loads(out)["payload"] == {"a": 1} and json.loads(out)["tags"] == ["x"]
    code, out, _ = run(cli, "runs", "show", first["run_id"])
    assert code == 0 and "NEW" in out and "PENDING" in out


@pytest.mark.parametrize(("args", "code"), [
    (["trigger", "no-such-env", "t"], 14),
    (["trigger", "no-such-env", "t", "--parent", "garbage"], 11),
    (["trigger", "no-such-env", "t", "--ttl", "forever"], 16),
    (["runs", "show", "run_" + "c" + "0" * 24], 14),
    (["mint-kind", "no-such-org", "ksuid"], 14),
])
def test_errors_are_one_line_with_a_meaningful_exit_code(cli: CliRunner, args: list[str], code: int) -> None:
    exit_code, out, err = run(cli, *args)
    assert exit_code == code, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_an_unusable_environment_exits_15(cli: CliRunner, client: RunOps, new_env) -> None:
    client.update_environment(new_env.environment_id, paused=True)
    assert client.wait_for_mirror()
    exit_code, _, err = run(cli, "trigger", new_env.environment_id, "t")
    assert exit_code == 15 and "paused" in err


def test_wrong_store_exits_12(cli: CliRunner, stores: Stores, new_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL")
    exit_code, _, err = run(cli, "trigger", new_env.environment_id, "t")
    assert exit_code == 12 and "RUN_OPS" in err


def test_an_unreachable_store_exits_19(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", "postgresql://runops_app:x@127.0.0.1:1/runops?connect_timeout=1")
    monkeypatch.setenv("RUNOPS_TIMEOUT", "1")
    exit_code, _, err = run(cli, "runs", "show", "run_" + generate_ksuid())
    assert exit_code == 19, err


def test_split_enable_refused_exits_17(cli: CliRunner, scratch_db, monkeypatch: pytest.MonkeyPatch) -> None:
    url = scratch_db("clisentinel")
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.wire_to_self(conn, url)
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", url)
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL")
    exit_code, _, err = run(cli, "split", "enable")
    assert exit_code == 17 and "same physical database" in err


def test_split_status_and_mint_kind(cli: CliRunner, new_env) -> None:
    code, out, _ = run(cli, "--json", "split", "status")
    assert code == 0 and json.loads(out)["enabled"] is True
    code, out, _ = run(cli, "--json", "mint-kind", new_env.organization_id, "cuid")
    assert code == 0 and json.loads(out)["org_mint_kinds"][new_env.organization_id] == "cuid"
    code, out, _ = run(cli, "split", "status")
    assert code == 0 and "distinct clusters" in out


def test_runs_cancel_tick_and_worker(cli: CliRunner, client: RunOps, new_env) -> None:
    env = new_env.environment_id
    doomed = client.trigger_run(env, "echo", {"x": 1}, queue="cancel-me")
    code, out, _ = run(cli, "--json", "runs", "cancel", doomed.run_id, "--reason", "not needed")
    assert code == 0 and json.loads(out)["status"] == "CANCELED"
    echo = client.trigger_run(env, "echo", {"x": 1})
    failing = client.trigger_run(env, "fail", {"message": "nope", "retry_after": 0}, max_attempts=1)
    parent = client.trigger_run(env, "wait-for-child", {"task": "echo", "payload": {"y": 2}})
    code, out, err = run(cli, "--json", "worker", "--env", env, "--once")
    assert code == 0, err
    outcomes = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert {(o["run_id"], o["result"]) for o in outcomes} >= {(echo.run_id, "completed"), (failing.run_id, "failed"),
                                                             (parent.run_id, "suspended"), (parent.run_id, "completed")}
    assert client.get_run(parent.run_id).output["output"] == {"y": 2}  # type: ignore[union-attr]
    code, out, _ = run(cli, "--json", "tick")
    assert code == 0 and set(json.loads(out)) == {"CONTROL_PLANE", "RUN_OPS"}


def test_runs_watch_prints_live_transitions_until_final(stores: Stores, client: RunOps, new_env) -> None:
    import os
    import subprocess
    import sys
    import time

    run_ = client.trigger_run(new_env.environment_id, "echo", {}, queue="watched")
    env = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE],
           "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}
    watcher = subprocess.Popen([sys.executable, "-m", "runops.cli", "runs", "watch", run_.run_id, "--timeout", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert watcher.stdout is not None
    first = watcher.stdout.readline()  # the current status, printed once LISTEN is in place
    assert "PENDING" in first
    time.sleep(0.2)
    [taken] = client.dequeue_runs(new_env.environment_id, "w", 1, queues=["watched"])
    client.start_attempt(taken.run_id, "w")
    client.complete_attempt(taken.run_id, 1, {"done": True})
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    lines = (first + out).splitlines()
    assert [line.split()[-1] for line in lines] == ["PENDING", "DEQUEUED", "EXECUTING", "COMPLETED_SUCCESSFULLY"]


def test_the_demo_runs_on_the_local_stores(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNOPS_CONTROL_PLANE_URL", raising=False)
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL", raising=False)
    monkeypatch.chdir(stores.home)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    for expected in ("LEGACY", "NEW", "yes", "CRASHED", "through the FDW", "COMPLETED_SUCCESSFULLY", "fan-out",
                     "COMPLETED_WITH_ERRORS", "RO007"):
        assert expected in result.output, expected


def test_batch_from_a_jsonl_file_with_wait(cli: CliRunner, client: RunOps, new_env, tmp_path) -> None:
    env = new_env.environment_id
    lines = [json.dumps({"task": "echo", "payload": {"i": i}}) for i in range(7)]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run(cli, "--json", "batch", str(path), "--env", env, "--key", "nightly", "--chunk-size", "3")
    assert code == 0, err
    first = json.loads(out)
    assert first["batch"]["item_count"] == 7 and first["batch"]["status"] == "PROCESSING"
    from runops.worker import run_worker

    assert run_worker(client, env, "cli-test-worker", once=True) >= 7
    code, out, err = run(cli, "--json", "batch", str(path), "--env", env, "--key", "nightly",
                         "--wait", "--timeout", "30")
    assert code == 0, err
    again = json.loads(out)
    assert again["cached"] is True and again["batch"]["batch_id"] == first["batch"]["batch_id"]
    assert again["batch"]["status"] == "COMPLETED" and again["statuses"] == {"COMPLETED_SUCCESSFULLY": 7}
    code, out, _ = run(cli, "batch", str(path), "--env", env, "--key", "nightly")
    assert code == 0 and "COMPLETED" in out


def test_batch_rejects_a_bad_file_line(cli: CliRunner, new_env, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "echo"}\nnot json\n')
    code, _, err = run(cli, "batch", str(path), "--env", new_env.environment_id)
    assert code == 2 and "line 2" in err
