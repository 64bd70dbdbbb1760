"""The CLI: readable one-line errors, exit codes that name the RO error, --json for scripts.

Every test runs the real console script (the venv's `runops`) in a subprocess, with the
environment the `cli` fixture sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ids import generate_ksuid
from runops.ops import migrate
from tests.conftest import Stores

RUNOPS = Path(sys.executable).parent / "runops"


class Cli:
    """Runs `runops` with the test's environment (monkeypatched os.environ)."""


@pytest.fixture
def cli(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", stores.app[CONTROL_PLANE])
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", stores.app[RUN_OPS])
    return Cli()


def run(cli: Cli | None, *args: str, cwd: Path | None = None, stdin: str | None = None) -> tuple[int, str, str]:
    done = subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=dict(os.environ), cwd=cwd,
                          input=stdin, timeout=120, check=False)
    return done.returncode, done.stdout, done.stderr


def test_env_create_trigger_and_show_round_trip(cli: Cli) -> None:
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
def test_errors_are_one_line_with_a_meaningful_exit_code(cli: Cli, args: list[str], code: int) -> None:
    exit_code, out, err = run(cli, *args)
    assert exit_code == code, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_an_unusable_environment_exits_15(cli: Cli, client: RunOps, new_env) -> None:
    client.update_environment(new_env.environment_id, paused=True)
    assert client.wait_for_mirror()
    exit_code, _, err = run(cli, "trigger", new_env.environment_id, "t")
    assert exit_code == 15 and "paused" in err


def test_wrong_store_exits_12(cli: Cli, stores: Stores, new_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL")
    exit_code, _, err = run(cli, "trigger", new_env.environment_id, "t")
    assert exit_code == 12 and "RUN_OPS" in err


def test_an_unreachable_store_exits_19(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", "postgresql://runops_app:x@127.0.0.1:1/runops?connect_timeout=1")
    monkeypatch.setenv("RUNOPS_TIMEOUT", "1")
    exit_code, _, err = run(cli, "runs", "show", "run_" + generate_ksuid())
    assert exit_code == 19, err


def test_split_enable_refused_exits_17(cli: Cli, scratch_db, monkeypatch: pytest.MonkeyPatch) -> None:
    url = scratch_db("clisentinel")
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.wire_to_self(conn, url)
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", url)
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL")
    exit_code, _, err = run(cli, "split", "enable")
    assert exit_code == 17 and "same physical database" in err


def test_split_status_and_mint_kind(cli: Cli, new_env) -> None:
    code, out, _ = run(cli, "--json", "split", "status")
    assert code == 0 and json.loads(out)["enabled"] is True
    code, out, _ = run(cli, "--json", "mint-kind", new_env.organization_id, "cuid")
    assert code == 0 and json.loads(out)["org_mint_kinds"][new_env.organization_id] == "cuid"
    code, out, _ = run(cli, "split", "status")
    assert code == 0 and "distinct clusters" in out


def test_runs_cancel_tick_and_worker(cli: Cli, client: RunOps, new_env) -> None:
    env = new_env.environment_id
    doomed = client.trigger_run(env, "echo", {"x": 1}, queue="cancel-me")
    code, out, _ = run(cli, "--json", "runs", "cancel", doomed.run_id, "--reason", "not needed")
    assert code == 0 and json.loads(out)["status"] == "CANCELED"
    echo = client.trigger_run(env, "echo", {"x": 1})
    failing = client.trigger_run(env, "fail", {"message": "nope", "retry_after": 0}, max_attempts=1)
    parent = client.trigger_run(env, "wait-for-child", {"task": "echo", "payload": {"y": 2}})
    code, out, err = run(cli, "--json", "worker", "--env", env, "--once")
    assert code == 0, err
    outcomes = [json.loads(line) for line in out.splitlines()]  # JSON Lines: one outcome a line
    assert {(o["run_id"], o["result"]) for o in outcomes} >= {(echo.run_id, "completed"), (failing.run_id, "failed"),
                                                             (parent.run_id, "suspended"), (parent.run_id, "completed")}
    assert client.get_run(parent.run_id).output["output"] == {"y": 2}  # type: ignore[union-attr]
    code, out, _ = run(cli, "--json", "tick")
    assert code == 0 and set(json.loads(out)) == {"CONTROL_PLANE", "RUN_OPS"}


def _watch(stores: Stores, client: RunOps, env_id: str, pause: float) -> list[str]:
    """The statuses `runops runs watch` prints for a run taken through the lifecycle, ``pause``
    seconds between the moves."""
    import os
    import subprocess
    import sys
    import time

    run_ = client.trigger_run(env_id, "echo", {}, queue="watched")
    env = {**os.environ, "RUNOPS_CONTROL_PLANE_URL": stores.app[CONTROL_PLANE],
           "RUNOPS_RUN_OPS_URL": stores.app[RUN_OPS]}
    watcher = subprocess.Popen([sys.executable, "-m", "runops.ops.cli", "runs", "watch", run_.run_id,
                                "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert watcher.stdout is not None
    first = watcher.stdout.readline()  # the current status, printed once LISTEN is in place
    assert "PENDING" in first
    time.sleep(0.2)
    [taken] = client.dequeue_runs(env_id, "w", 1, queues=["watched"])
    time.sleep(pause)
    client.start_attempt(taken.run_id, "w")
    time.sleep(pause)
    client.complete_attempt(taken.run_id, 1, {"done": True})
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    return [line.split()[-1] for line in (first + out).splitlines()]


def test_runs_watch_prints_live_transitions_until_final(stores: Stores, client: RunOps, new_env) -> None:
    """Every change notified (notifications 'all'), however fast the moves."""
    client.update_environment(new_env.environment_id, notifications="all")
    assert client.wait_for_mirror()
    assert _watch(stores, client, new_env.environment_id, 0) == ["PENDING", "DEQUEUED", "EXECUTING",
                                                                 "COMPLETED_SUCCESSFULLY"]


def test_runs_watch_polls_for_the_statuses_that_are_not_notified(stores: Stores, client: RunOps, new_env) -> None:
    """By default only the final status is notified (SPEC §4 [1.3]): watch still shows each status
    that lasts longer than its poll, and exits on the final one."""
    assert _watch(stores, client, new_env.environment_id, 1.5) == ["PENDING", "DEQUEUED", "EXECUTING",
                                                                   "COMPLETED_SUCCESSFULLY"]


def test_the_demo_runs_on_the_local_stores(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNOPS_CONTROL_PLANE_URL", raising=False)
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL", raising=False)
    code, out, err = run(None, "demo", cwd=stores.home)
    assert code == 0, out + err
    for expected in ("LEGACY", "NEW", "yes", "CRASHED", "through the FDW", "COMPLETED_SUCCESSFULLY", "fan-out",
                     "COMPLETED_WITH_ERRORS", "RO007"):
        assert expected in out, expected


def test_batch_from_a_jsonl_file_with_wait(cli: Cli, client: RunOps, new_env, tmp_path) -> None:
    env = new_env.environment_id
    lines = [json.dumps({"task": "echo", "payload": {"i": i}}) for i in range(7)]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = run(cli, "--json", "batch", str(path), "--env", env, "--key", "nightly", "--chunk-size", "3")
    assert code == 0, err
    first = json.loads(out)
    assert first["batch"]["item_count"] == 7 and first["batch"]["status"] == "PROCESSING"
    from runops.ops.reference_tasks import run_worker

    assert run_worker(client, env, "cli-test-worker", once=True) >= 7
    code, out, err = run(cli, "--json", "batch", str(path), "--env", env, "--key", "nightly",
                         "--wait", "--timeout", "30")
    assert code == 0, err
    again = json.loads(out)
    assert again["cached"] is True and again["batch"]["batch_id"] == first["batch"]["batch_id"]
    assert again["batch"]["status"] == "COMPLETED" and again["statuses"] == {"COMPLETED_SUCCESSFULLY": 7}
    code, out, _ = run(cli, "batch", str(path), "--env", env, "--key", "nightly")
    assert code == 0 and "COMPLETED" in out


def test_batch_rejects_a_bad_file_line(cli: Cli, new_env, tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "echo"}\nnot json\n')
    code, _, err = run(cli, "batch", str(path), "--env", new_env.environment_id)
    assert code == 2 and "line 2" in err


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    code, out, _ = run(None, "--version")
    assert code == 0 and out.strip() == f"runops, version {version('runops')}"


def test_mint_kind_with_only_a_kind_sets_the_default(cli: Cli) -> None:
    before = json.loads(run(cli, "--json", "split", "status")[1])["default_mint_kind"]
    other = "cuid" if before == "ksuid" else "ksuid"
    try:
        code, out, err = run(cli, "--json", "mint-kind", other)
        assert code == 0, err
        assert json.loads(out)["default_mint_kind"] == other
    finally:
        code, out, err = run(cli, "--json", "mint-kind", before)
    assert code == 0 and json.loads(out)["default_mint_kind"] == before, err
    code, _, err = run(cli, "mint-kind", "sometimes")
    assert code == 2 and err.count("\n") == 1 and "KIND" in err


@pytest.mark.parametrize("line", ["[1,2]", "42", '{"payload": {}}', '{"task": "echo", "when": "now"}',
                                  '{"task": "echo", "options": []}'])
def test_a_bad_batch_item_is_one_line_and_creates_nothing(cli: Cli, stores: Stores, new_env, line: str) -> None:
    code, out, err = run(cli, "batch", "-", "--env", new_env.environment_id, stdin=line + "\n")
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "line 1" in err and "Traceback" not in err
    for url in stores.admin.values():
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM runops.batches WHERE environment_id = %s",
                               [new_env.environment_id]).fetchone()
            assert row == (0,)


def test_json_errors_are_json(cli: Cli) -> None:
    code, out, err = run(cli, "--json", "runs", "show", "run_" + "c" + "0" * 24)
    assert code == 14 and out == ""
    assert json.loads(err) == {"error": {"message": f"run run_c{'0' * 24} not found", "sqlstate": "RO004",
                                         "exit_code": 14}}
    code, _, err = run(cli, "--json", "no-such-command")
    assert code == 2 and json.loads(err)["error"]["exit_code"] == 2


@pytest.mark.parametrize(("run_id", "code"), [("run_" + generate_ksuid(), 14), ("run_c" + "0" * 24, 14),
                                              ("run_garbage", 11)])
def test_runs_show_and_runs_cancel_agree_on_a_missing_run(cli: Cli, run_id: str, code: int) -> None:
    shown = run(cli, "runs", "show", run_id)
    canceled = run(cli, "runs", "cancel", run_id)
    assert shown[0] == canceled[0] == code, (shown, canceled)
    assert shown[2].split(" ")[:2] == canceled[2].split(" ")[:2]  # "error: RO00n"


def test_a_store_that_is_not_configured_is_not_reported_as_not_found(cli: Cli, monkeypatch: pytest.MonkeyPatch
                                                                      ) -> None:
    monkeypatch.delenv("RUNOPS_RUN_OPS_URL")
    for command in ("show", "cancel", "watch"):
        code, _, err = run(cli, "runs", command, "run_" + generate_ksuid())
        assert code == 19 and "not configured" in err and "not found" not in err, (command, err)


def test_the_state_file_is_readable_by_its_owner_only(stores: Stores) -> None:
    assert (stores.home / ".runops" / "state.json").stat().st_mode & 0o777 == 0o600


def test_env_list_runs_ls_and_purge(cli: Cli, client: RunOps, make_env) -> None:
    env = make_env("cuid")
    code, out, _ = run(cli, "--json", "env", "list", "--org", env.organization_id)
    assert code == 0, out
    assert [(e["environment_id"], e["mint_kind"]) for e in json.loads(out)] == [(env.environment_id, "cuid")]
    legacy = client.trigger_run(env.environment_id, "ls-task", {}).run_id
    client.set_mint_kind(env.organization_id, "ksuid")
    assert client.wait_for_mirror()
    new = client.trigger_run(env.environment_id, "ls-task", {}).run_id
    code, out, _ = run(cli, "--json", "runs", "ls", "--env", env.environment_id, "--limit", "1")
    assert code == 0, out
    first = json.loads(out)
    assert [r["run_id"] for r in first["runs"]] == [new] and first["next_cursor"]
    code, out, _ = run(cli, "--json", "runs", "ls", "--env", env.environment_id, "--cursor", first["next_cursor"])
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [legacy]
    code, out, _ = run(cli, "runs", "ls", "--env", env.environment_id, "--status", "PENDING", "--task", "ls-task")
    assert code == 0 and legacy in out and new in out and "LEGACY" in out and "NEW" in out
    code, out, _ = run(cli, "runs", "ls", "--env", env.environment_id, "--limit", "500")
    assert code == 2  # click refuses the page size before any call
    code, out, _ = run(cli, "--json", "purge", "--older-than", "365d", "--batch-size", "10")
    assert code == 0 and set(json.loads(out)["purged"]) == {"CONTROL_PLANE", "RUN_OPS"}
    code, _, err = run(cli, "purge", "--older-than", "soon")
    assert code == 16 and err.count("\n") == 1  # RO006: one line


def test_migrate_check_of_a_store_that_cannot_be_reached_exits_19_not_1() -> None:
    """Found by the runbook's author: a connection failure outside the client exited 1."""
    dead = "postgresql://postgres@127.0.0.1:1/runops?connect_timeout=2"
    code, _, err = run(None, "migrate", "--check", "--control-plane-url", dead)
    assert code == 19, err
    using, error = err.strip().splitlines()  # which database it looked at, then one error line
    assert using.startswith("using control plane") and error.startswith("error: ")


# -- JSON Lines, a quiet ticker, environments added to existing tenants -----------------------------


def test_worker_json_is_json_lines(cli: Cli, client: RunOps, new_env) -> None:
    env = new_env.environment_id
    made = {client.trigger_run(env, "echo", {"i": i}).run_id for i in range(3)}
    code, out, err = run(cli, "--json", "worker", "--env", env, "--once")
    assert code == 0, err
    lines = out.splitlines()
    outcomes = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in outcomes) and len(lines) == len(outcomes) == 3
    assert {o["run_id"] for o in outcomes} == made and {o["result"] for o in outcomes} == {"completed"}


def _tick_loop(cli: Cli, *args: str, until: Callable[[], bool]) -> tuple[str, str, int]:
    """`runops [args] tick --loop --interval 0.1` until ``until()`` holds and a second more has
    passed (about ten idle passes); its stdout, stderr and how long it ran, in tenths."""
    import signal
    import time

    proc = subprocess.Popen([str(RUNOPS), *args, "tick", "--loop", "--interval", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    started = time.monotonic()
    try:
        deadline = started + 30
        while not until():
            assert time.monotonic() < deadline and proc.poll() is None, "the due run was never moved"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err, int((time.monotonic() - started) * 10)


@pytest.mark.parametrize("as_json", [False, True])
def test_tick_loop_prints_only_the_passes_that_did_something(cli: Cli, client: RunOps, new_env,
                                                             as_json: bool) -> None:
    due = client.trigger_run(new_env.environment_id, "later", {}, delay="1s")

    def moved() -> bool:
        run_ = client.get_run(due.run_id)
        return run_ is not None and run_.status == "PENDING"

    out, err, tenths = _tick_loop(cli, *(["--json"] if as_json else []), until=moved)
    lines = out.splitlines()
    # Two stores, a pass every 0.1 s for over two seconds: a line per store and pass would be
    # dozens; the delayed run's pass (and what other tests left due) are a few.
    assert 1 <= len(lines) < tenths / 4, out
    if as_json:
        passes = [json.loads(line) for line in lines]
        assert all(any(n for counts in p.values() for n in counts.values()) for p in passes), out
        assert any(p.get("RUN_OPS", {}).get("delayed") for p in passes), out
    else:
        assert "nothing due" not in out and any("RUN_OPS" in line and "delayed" in line for line in lines), out
        assert "a line for each pass that does something" in err


def test_env_create_adds_to_an_existing_organization_and_project(cli: Cli) -> None:
    org_slug = f"grow-{generate_ksuid()[-6:].lower()}"
    code, out, err = run(cli, "--json", "env", "create", org_slug, "web", "prod", "--type", "PRODUCTION",
                         "--mint-kind", "ksuid")
    assert code == 0, err
    first = json.loads(out)
    assert first["created"] == ["organization", "project", "environment"]
    # By slug: another environment in the same project.
    code, out, err = run(cli, "--json", "env", "create", org_slug, "web", "staging", "--type", "STAGING")
    assert code == 0, err
    staging = json.loads(out)
    assert (staging["organization_id"], staging["project_id"]) == (first["organization_id"], first["project_id"])
    assert staging["created"] == ["environment"]
    # By id: a new project in the organization, then an environment in that project by its id.
    code, out, err = run(cli, "--json", "env", "create", first["organization_id"], "api", "prod")
    assert code == 0, err
    api = json.loads(out)
    assert api["organization_id"] == first["organization_id"] and api["created"] == ["project", "environment"]
    code, out, err = run(cli, "env", "create", org_slug, api["project_id"], "dev")
    assert code == 0 and "environment" in out, err
    code, out, _ = run(cli, "--json", "env", "list", "--org", first["organization_id"])
    listed = {(e["project_slug"], e["environment_slug"], e["mint_kind"]) for e in json.loads(out)}
    assert listed == {("web", "prod", "ksuid"), ("web", "staging", "ksuid"), ("api", "prod", "ksuid"),
                      ("api", "dev", "ksuid")}
    # The environment itself is what is created: naming an existing one is an error, as before.
    code, _, err = run(cli, "env", "create", org_slug, "web", "prod")
    assert code == 16 and "already exists" in err and err.count("\n") == 1
    # An existing organization's mint kind is changed by `mint-kind`, not here.
    code, _, err = run(cli, "env", "create", org_slug, "web", "qa", "--mint-kind", "cuid")
    assert code == 2 and f"runops mint-kind {first['organization_id']} cuid" in err


def test_env_create_names_what_it_made_before_a_later_step_failed(cli: Cli) -> None:
    org_slug = f"half-{generate_ksuid()[-6:].lower()}"
    code, _, err = run(cli, "env", "create", org_slug, "web", "Not A Slug")
    assert code == 16 and err.count("\n") == 1 and "environment slug" in err, err
    made = dict(part.split() for part in err.split("(created meanwhile: ")[1].rstrip(")\n").split(", "))
    # The organization has no environment yet, so only its id finds it; so does the project's.
    code, _, err = run(cli, "env", "create", made["organization"], made["project"], "prod", "--mint-kind", "ksuid")
    assert code == 2 and "mint-kind" in err  # it exists: its kind is not env create's to change
    code, out, err = run(cli, "--json", "env", "create", made["organization"], made["project"], "prod")
    assert code == 0, err
    done = json.loads(out)
    assert (done["organization_id"], done["project_id"], done["created"]) == (made["organization"], made["project"],
                                                                              ["environment"])


# -- the documentation that ships with the package -------------------------------------------------


def test_docs_lists_the_pages_and_prints_one() -> None:
    code, out, err = run(None, "docs")
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()[:-1]]
    assert "sql-api" in names and "worker" in names and out.splitlines()[-1].startswith("(in ")
    code, out, err = run(None, "docs", "sql-api")
    assert code == 0 and out.startswith("# The SQL API"), err
    code, _, err = run(None, "docs", "no-such-page")
    assert code == 2 and "sql-api" in err and err.count("\n") == 1


def test_the_sql_api_reference_documents_every_function_the_app_role_may_call() -> None:
    """docs/sql-api.md is the users' reference (they have no SPEC): every function granted to
    runops_api (what services may call) in sql/after_functions.sql has an entry, named with its arguments."""
    import re

    root = Path(__file__).resolve().parents[1]
    grants = (root / "sql" / "after_functions.sql").read_text()
    granted: set[str] = set()
    for block in re.findall(r"GRANT EXECUTE ON (?:FUNCTION|PROCEDURE)(.*?)TO ([^;]*);", grants, re.S):
        if "runops_api" in block[1]:
            granted |= set(re.findall(r"runops\.(\w+)\(", block[0]))
    # The base62/base36 digit writers and ksuid_encode are granted because generate_ksuid and
    # generate_cuid (plain functions) call them as the caller, and input_prefix because the plain
    # identity functions quote bad input through it: helpers, not API.
    # shard_of's decoding steps likewise (shard_of is plain and inlines them).
    helpers = {name for name in granted
               if re.fullmatch(r"base(36|62)_digits\d+|ksuid_encode|input_prefix|base62_digit|ksuid_top40|"
                               r"shard_of_id|shard_of_top40", name)}
    reference = (root / "docs" / "sql-api.md").read_text()
    missing = sorted(name for name in granted - helpers if not re.search(rf"`{name}\(", reference))
    assert len(granted - helpers) > 50 and not missing, missing

@pytest.mark.parametrize("command", [["runs", "ls"], ["metrics"]])
def test_a_mistyped_environment_is_not_found_not_an_empty_one(cli: Cli, new_env, command: list[str]) -> None:
    mistyped = new_env.environment_id[:-1] + ("x" if new_env.environment_id[-1] != "x" else "y")
    code, out, err = run(cli, *command, "--env", mistyped)
    assert (code, out) == (14, "") and err.count("\n") == 1, err
    assert err.startswith("error: RO004 ") and mistyped in err
    code, out, err = run(cli, "--json", *command, "--env", mistyped)
    assert code == 14 and json.loads(err)["error"]["sqlstate"] == "RO004"
    # The real environment, empty, is an empty table (exit 0); with a run, the run.
    code, out, err = run(cli, *command, "--env", new_env.environment_id)
    assert code == 0, err
    code, out, err = run(cli, "--json", "trigger", new_env.environment_id, "echo")
    run_id = json.loads(out)["run_id"]
    code, out, err = run(cli, *command, "--env", new_env.environment_id)
    assert code == 0 and (run_id in out if command == ["runs", "ls"] else "PENDING" in out), out + err
