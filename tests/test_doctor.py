"""`runops doctor`: green on a healthy pair, and every injected fault named on its own line with
a non-zero exit (1 for a warning, 2 for a failure), never a traceback.

Every test runs the real console script in a subprocess. The faults (a dead FDW peer, a disabled
subscription, a stale tick heartbeat, a drifted function) are injected as the superuser into a
pair of this module's own, so the session's shared stores never see them; each is undone in a
`finally`. `runops dev up` gets a test of its own: the stores it leaves are green right away.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from tests.conftest import Stores, running_stores

RUNOPS = Path(sys.executable).parent / "runops"


@pytest.fixture(scope="module")
def pair() -> Iterator[Stores]:
    # No background heartbeat: tick freshness is what doctor judges, so only these tests tick.
    with running_stores(heartbeat=False) as made:
        yield made


def runops(*args: str, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str, str]:
    done = subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}


def admin_env(pair: Stores, **overrides: str) -> dict[str, str]:
    """Doctor pointed at the pair as a DBA would: the admin URLs."""
    return {**base_env(), "RUNOPS_CONTROL_PLANE_ADMIN_URL": pair.admin[CONTROL_PLANE],
            "RUNOPS_RUN_OPS_ADMIN_URL": pair.admin[RUN_OPS], **overrides}


def tick(pair: Stores) -> None:
    """One pass on both stores, as `runops tick --loop` would have made moments ago."""
    env = {**base_env(), "RUNOPS_CONTROL_PLANE_URL": pair.app[CONTROL_PLANE], "RUNOPS_RUN_OPS_URL": pair.app[RUN_OPS]}
    code, out, err = runops("tick", env=env)
    assert code == 0, (out, err)


def doctor(pair: Stores, *args: str, **overrides: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Runs `runops --json doctor`: the exit code, the checks by name, and stderr."""
    code, out, err = runops("--json", "doctor", *args, env=admin_env(pair, **overrides))
    report = json.loads(out)
    return code, {c["name"]: c for c in report["checks"]}, err


def lines(out: str) -> dict[str, tuple[str, str]]:
    """Human output: check name -> (severity, detail), from `ok|warn|fail  CHECK  DETAIL` lines."""
    found = {}
    for line in out.splitlines():
        severity, _, rest = line.partition(" ")
        if severity in ("ok", "warn", "fail"):
            name, _, detail = rest.strip().partition(" ")
            found[name] = (severity, detail.strip())
    return found


@contextlib.contextmanager
def superuser(pair: Stores, store: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pair.admin[store], autocommit=True) as conn:
        yield conn


def wait_for_subscription_worker(pair: Stores, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with superuser(pair, RUN_OPS) as ro:
        while ro.execute("SELECT runops.mirror_status() ->> 'state'").fetchone() != ("applying",):
            assert time.monotonic() < deadline, "the subscription's apply worker did not come back"
            time.sleep(0.2)


def test_doctor_is_green_on_healthy_stores_and_says_what_it_examined(pair: Stores) -> None:
    tick(pair)
    code, out, err = runops("doctor", env=admin_env(pair))
    assert code == 0, out + err
    examined = [line for line in out.splitlines() if line.startswith("examining ")]
    assert len(examined) == 2 and "RUNOPS_CONTROL_PLANE_ADMIN_URL" in examined[0] \
        and "RUNOPS_RUN_OPS_ADMIN_URL" in examined[1]
    assert out.index("examining") < out.index("ok ")
    checks = lines(out)
    assert set(checks) >= {"store.control_plane", "store.run_ops", "topology", "migrations.control_plane",
                           "migrations.run_ops", "functions.control_plane", "functions.run_ops",
                           "fdw.control_plane_to_run_ops", "fdw.run_ops_to_control_plane", "mirror", "mirror.slot",
                           "tick.control_plane", "tick.run_ops", "work.control_plane", "work.run_ops"}
    assert {severity for severity, _ in checks.values()} == {"ok"}, checks


def test_json_output_parses_with_every_check_named_and_graded(pair: Stores) -> None:
    tick(pair)
    code, out, _ = runops("--json", "doctor", env=admin_env(pair))
    report = json.loads(out)
    assert code == report["exit_code"] == 0 and report["worst"] == "ok"
    assert [t["store"] for t in report["targets"]] == [CONTROL_PLANE, RUN_OPS]
    for check in report["checks"]:
        assert set(check) == {"name", "severity", "detail", "data"} and check["severity"] in ("ok", "warn", "fail")
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["mirror"]["data"]["engine"] == "subscription" and by_name["mirror"]["data"]["fresh"] is True
    assert by_name["migrations.run_ops"]["data"]["current"] == by_name["migrations.run_ops"]["data"]["head"]


@pytest.mark.parametrize(("store", "check"), [(RUN_OPS, "fdw.run_ops_to_control_plane"),
                                              (CONTROL_PLANE, "fdw.control_plane_to_run_ops")])
def test_a_dead_fdw_peer_fails_naming_the_direction(pair: Stores, store: str, check: str) -> None:
    tick(pair)
    with superuser(pair, store) as conn:
        [port] = [o.split("=", 1)[1] for o in conn.execute(
            "SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'runops_peer'").fetchone()[0]
            if o.startswith("port=")]
        conn.execute("ALTER SERVER runops_peer OPTIONS (SET port '1')")
        try:
            code, checks, _ = doctor(pair)
        finally:
            conn.execute(f"ALTER SERVER runops_peer OPTIONS (SET port '{port}')")
    assert code == 2
    assert checks[check]["severity"] == "fail" and "cannot read" in checks[check]["detail"]
    assert ":1/" in checks[check]["detail"]  # where the FDW looked
    other = ({"fdw.run_ops_to_control_plane", "fdw.control_plane_to_run_ops"} - {check}).pop()
    assert checks[other]["severity"] == "ok"
    assert doctor(pair)[0] == 0  # restored


def test_a_disabled_subscription_is_named(pair: Stores) -> None:
    tick(pair)
    with superuser(pair, RUN_OPS) as ro:
        ro.execute("ALTER SUBSCRIPTION runops_mirror DISABLE")
        try:
            code, checks, _ = doctor(pair)
        finally:
            ro.execute("ALTER SUBSCRIPTION runops_mirror ENABLE")
    assert code != 0
    assert checks["mirror"]["severity"] in ("warn", "fail") and "disabled" in checks["mirror"]["detail"]
    assert checks["mirror"]["data"]["state"] == "disabled"
    wait_for_subscription_worker(pair)
    tick(pair)
    assert doctor(pair)[0] == 0


@pytest.mark.parametrize(("store", "source", "check"), [
    (RUN_OPS, "run_ops_tick", "tick.run_ops"),
    (CONTROL_PLANE, "control_plane_tick", "tick.control_plane"),
])
def test_a_stale_tick_fails_naming_the_store(pair: Stores, store: str, source: str, check: str) -> None:
    tick(pair)
    with superuser(pair, store) as conn:
        conn.execute("UPDATE runops.heartbeats SET beat_at = now() - interval '1 hour' WHERE source = %s", [source])
    try:
        code, out, _ = runops("doctor", env=admin_env(pair))
    finally:
        tick(pair)
    assert code == 2
    severity, detail = lines(out)[check]
    assert severity == "fail" and "tick last ran" in detail
    other = ({"tick.run_ops", "tick.control_plane"} - {check}).pop()
    assert lines(out)[other][0] == "ok"


def test_a_store_that_never_ticked_is_a_warning(pair: Stores) -> None:
    tick(pair)
    with superuser(pair, RUN_OPS) as ro:
        ro.execute("UPDATE runops.heartbeats SET beat_at = NULL WHERE source = 'run_ops_tick'")
    try:
        code, checks, _ = doctor(pair)
    finally:
        tick(pair)
    assert code == 1 and checks["tick.run_ops"]["severity"] == "warn" and "never" in checks["tick.run_ops"]["detail"]


def test_a_drifted_function_is_named(pair: Stores) -> None:
    tick(pair)
    with superuser(pair, CONTROL_PLANE) as cp:
        [original] = cp.execute("SELECT pg_get_functiondef('runops.input_prefix(text)'::regprocedure)").fetchone()
        cp.execute(original.replace("AS $function$", "AS $function$\n-- edited in place", 1))
        try:
            code, checks, _ = doctor(pair)
        finally:
            cp.execute(original)
    assert code == 1
    assert checks["functions.control_plane"]["severity"] == "warn"
    assert checks["functions.control_plane"]["data"]["drifted"] == ["input_prefix/1"]
    assert checks["functions.run_ops"]["severity"] == "ok"


def test_a_lapsed_lease_tick_has_not_released_is_stuck_work(pair: Stores) -> None:
    with RunOps(pair.app[CONTROL_PLANE], pair.app[RUN_OPS]) as client:
        org = client.create_organization("doctor-stuck", mint_kind="ksuid")
        env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
        client.wait_for_mirror()
        run = client.trigger_run(env, "stuck", {})
        [taken] = client.dequeue_runs(env, "gone-worker", 1)
    assert taken.run_id == run.run_id
    tick(pair)  # everything else fresh
    with superuser(pair, RUN_OPS) as ro:
        # A worker that died an hour ago, and no tick since to hand its run back.
        ro.execute("UPDATE runops.runs SET lease_expires_at = now() - interval '1 hour' WHERE id = %s",
                   [run.run_id.removeprefix("run_")])
    code, checks, _ = doctor(pair)
    assert code == 1
    assert checks["work.run_ops"]["severity"] == "warn" and "lease ran out" in checks["work.run_ops"]["detail"]
    assert checks["work.run_ops"]["data"]["lapsed_leases"]["count"] == 1
    assert checks["work.control_plane"]["severity"] == "ok"
    tick(pair)  # tick puts the run back to PENDING: nothing stuck any more
    assert doctor(pair)[1]["work.run_ops"]["severity"] == "ok"


def test_a_store_that_is_down_is_one_fail_line_naming_it(pair: Stores) -> None:
    tick(pair)
    dead = "postgresql://postgres@127.0.0.1:1/runops?connect_timeout=2"
    code, out, err = runops("doctor", env=admin_env(pair, RUNOPS_RUN_OPS_ADMIN_URL=dead))
    assert code == 2, out + err
    checks = lines(out)
    assert checks["store.run_ops"][0] == "fail" and "StoreUnavailable" in checks["store.run_ops"][1]
    assert checks["store.control_plane"][0] == "ok"
    assert "mirror" not in checks and "tick.run_ops" not in checks  # nothing asked of a store that is not there
    code, checks_json, _ = doctor(pair, "--control-plane-url", dead)
    assert code == 2 and checks_json["store.control_plane"]["severity"] == "fail"


def test_nothing_to_examine_is_a_failure_not_a_traceback(tmp_path: Path) -> None:
    code, out, err = runops("doctor", env=base_env(), cwd=tmp_path)
    assert code == 2, out + err
    severity, detail = lines(out)["targets"]
    assert severity == "fail" and "runops dev up" in detail


def test_the_local_dev_stores_are_examined_when_no_url_is_set(pair: Stores) -> None:
    tick(pair)
    code, out, err = runops("doctor", env=base_env(), cwd=pair.home)
    assert code == 0, out + err
    assert "from the local dev stores" in out


def test_dev_up_then_demo_leaves_stores_doctor_finds_green_and_dev_down_stops_the_ticker(tmp_path: Path) -> None:
    """`make run` is `runops dev up` then `runops demo`: doctor right afterwards exits 0,
    because dev up runs tick in the background (docs/decisions.md)."""
    env = base_env()
    home = tmp_path / "project"
    home.mkdir()
    pid = None
    try:
        code, out, err = runops("dev", "up", env=env, cwd=home)
        assert code == 0, out + err
        code, out, err = runops("demo", env=env, cwd=home)
        assert code == 0, out + err
        code, out, err = runops("doctor", env=env, cwd=home)
        assert code == 0, out + err
        state = json.loads((home / ".runops" / "state.json").read_text())
        pid = state["ticker_pid"]
        assert pid and Path(f"/proc/{pid}").exists()
    finally:
        code, out, err = runops("dev", "down", env=env, cwd=home)
        with contextlib.suppress(OSError, ValueError):
            # As root the clusters' data may live outside tmp_path (the postgres user cannot
            # reach it): remove it too.
            state = json.loads((home / ".runops" / "state.json").read_text())
            for cluster in state["clusters"].values():
                shutil.rmtree(cluster["datadir"], ignore_errors=True)
                shutil.rmtree(cluster["socket_dir"], ignore_errors=True)
            if not Path(state["data_root"]).is_relative_to(tmp_path):
                shutil.rmtree(state["data_root"], ignore_errors=True)
    assert code == 0, out + err
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the background tick outlived dev down"
        time.sleep(0.1)
    assert state["ticker_pid"] is None


def test_deep_checks_the_references_the_functions_keep_instead_of_foreign_keys(pair: Stores) -> None:
    """`doctor --deep` (SPEC §5 [1.2]): green on batches the functions made, cached items
    included; a run naming a missing batch and an index held twice fail, each named."""
    with RunOps(pair.app[CONTROL_PLANE], pair.app[RUN_OPS]) as client:
        org = client.create_organization("doctor-deep", mint_kind="ksuid")
        env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
        client.wait_for_mirror()
        held = client.trigger_run(env, "t", {}, idempotency_key="deep-held")
        made = client.batch_trigger(env, [{"task": "t"}, {"task": "t"},
                                          {"task": "t", "options": {"idempotency_key": "deep-held"}}])
    assert made.run_ids[2] == held.run_id
    tick(pair)
    code, checks, _ = doctor(pair)
    assert code == 0 and not any(name.startswith("integrity.") for name in checks)  # only with --deep
    code, checks, _ = doctor(pair, "--deep")
    assert code == 0, checks
    assert {checks[f"integrity.{s}"]["severity"] for s in ("control_plane", "run_ops")} == {"ok"}
    assert checks["integrity.run_ops"]["data"]["indexes_held_twice"]["count"] == 0
    first, second = (r.removeprefix("run_") for r in made.run_ids[:2])
    batch = made.batch_id.removeprefix("batch_")
    with superuser(pair, RUN_OPS) as ro:
        [ghost] = ro.execute("SELECT runops.generate_ksuid()").fetchone()
        ro.execute("UPDATE runops.runs SET batch_id = %s WHERE id = %s", [ghost, first])
        ro.execute("INSERT INTO runops.batch_items (batch_id, item_index, run_id, created_at) "
                   "VALUES (%s, 1, %s, now())", [batch, second])
        try:
            tick(pair)
            code, checks, _ = doctor(pair, "--deep")
        finally:
            ro.execute("DELETE FROM runops.batch_items WHERE batch_id = %s AND item_index = 1", [batch])
            ro.execute("UPDATE runops.runs SET batch_id = %s WHERE id = %s", [batch, first])
    assert code == 2
    found = checks["integrity.run_ops"]
    assert found["severity"] == "fail"
    assert (found["data"]["runs_naming_no_batch"]["count"], found["data"]["runs_naming_no_batch"]["examples"]) == \
        (1, [first])
    assert found["data"]["indexes_held_twice"]["examples"] == [f"{batch}/1"]
    assert "runs whose batch_id names no batch" in found["detail"]
    assert checks["integrity.control_plane"]["severity"] == "ok"
    tick(pair)
    assert doctor(pair, "--deep")[0] == 0
