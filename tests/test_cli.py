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
