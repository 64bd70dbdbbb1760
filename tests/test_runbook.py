"""docs/splitting-a-live-database.md, walked end to end on two fresh clusters.

The installation starts as one database (a control plane with tenants and LEGACY runs) under
live traffic: threads trigger runs (half of them keyed) and a worker dequeues, starts and
completes them through the Python client. Meanwhile every runbook step runs as the installed
`runops` console script (or `psql`, where the runbook says psql), and its exit code and output
are checked as the runbook promises: provision, migrate (first refused, then done), verify the
mirror and the FDW, roll the run-ops URL out to the applications, enable the split, flip
organizations one by one, observe, roll back. Afterwards every acknowledged trigger is in
exactly one store, once; no key names two runs; NEW runs are still readable and writable; roots
mint LEGACY again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops.local_cluster import LocalStores

RUNOPS = Path(sys.executable).parent / "runops"
WORKED_TASK = "job"     # the traffic's worker works these
PROBE_TASK = "probe"    # the test's own probes; no worker takes them, so they stay PENDING


@dataclass
class Step:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Shell:
    """A DBA's shell: the `runops` script and psql, with the environment variables the runbook
    sets (no others: RUNOPS_* from the test process are dropped), run from a directory without
    local stores so a missing URL can never fall back to them."""

    def __init__(self, cwd: Path, bindir: Path) -> None:
        self.cwd = cwd
        self.bindir = bindir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}

    def runops(self, *args: str) -> Step:
        done = subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=self.env, cwd=self.cwd,
                              timeout=180, check=False)
        return Step(done.returncode, done.stdout, done.stderr)

    def psql(self, url: str, statement: str) -> str:
        done = subprocess.run([str(self.bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", url,
                               "-c", statement], capture_output=True, text=True, env=self.env, cwd=self.cwd,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@dataclass(frozen=True)
class Ack:
    """A trigger the client acknowledged: what was asked, when the call started, what came back."""

    env: str
    task: str
    key: str | None
    started: float
    run_id: str
    is_cached: bool
    residency: str


@dataclass
class Traffic:
    """Application load that keeps running through every step. `client` is what the
    applications are configured with; the rollout step replaces it (a rolling deploy)."""

    envs: list[str]
    client: RunOps
    acks: list[Ack] = field(default_factory=list)
    completed: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_error(self, where: str, exc: Exception) -> None:
        with self.lock:
            if len(self.errors) < 50:
                self.errors.append(f"{where}: {type(exc).__name__}: {exc}")

    def trigger(self, env: str, task: str, key: str | None = None, client: RunOps | None = None) -> Ack:
        started = time.monotonic()
        ro = client or self.client
        payload = {"at": started}
        result = ro.trigger_run(env, task, payload, idempotency_key=key) if key else ro.trigger_run(env, task, payload)
        ack = Ack(env, task, key, started, result.run_id, result.is_cached, result.residency)
        with self.lock:
            self.acks.append(ack)
        return ack

    def triggers(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            env = rng.choice(self.envs)
            # A key lives for about 1.5 s of traffic (a new one every 0.5 s, three in use), so
            # the same key is triggered again from both threads across whatever step runs then.
            key = f"k{int(time.monotonic() * 2) + rng.randrange(3)}" if rng.random() < 0.5 else None
            try:
                self.trigger(env, WORKED_TASK, key)
            except Exception as exc:  # noqa: BLE001 - every failure is asserted on at the end
                self.record_error("trigger", exc)
            self.stop.wait(0.05)

    def worker(self) -> None:
        while not self.stop.is_set():
            client = self.client
            for env in self.envs:
                try:
                    for run in client.dequeue_runs(env, "runbook-worker", 10, tasks=[WORKED_TASK]):
                        started = client.start_attempt(run.run_id, "runbook-worker", environment_id=env)
                        client.complete_attempt(run.run_id, started.attempt_number, {"ok": True}, environment_id=env)
                        with self.lock:
                            self.completed[run.run_id] = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - every failure is asserted on at the end
                    self.record_error("worker", exc)
            self.stop.wait(0.03)

    def ticker(self) -> None:
        """`runops tick --loop`: time-driven work on every store the applications know of."""
        while not self.stop.wait(1.0):
            try:
                self.client.tick()
            except Exception as exc:  # noqa: BLE001 - every failure is asserted on at the end
                self.record_error("tick", exc)

    def since(self, moment: float, env: str | None = None) -> list[Ack]:
        """Runs newly minted by calls that started after ``moment`` (cached answers name the key's
        holder, whatever its age, so they say nothing about minting)."""
        with self.lock:
            return [a for a in self.acks if a.started > moment and not a.is_cached and (env is None or a.env == env)]


@dataclass
class Fresh:
    local: LocalStores
    home: Path


@pytest.fixture
def fresh() -> Iterator[Fresh]:
    """Two new clusters, planned but not started: the control plane is started by the test, the
    run-ops cluster only at the runbook's "provision" step."""
    home = Path(tempfile.mkdtemp(prefix="runops-runbook-"))
    home.chmod(0o755)  # the postgres user must reach the data under it
    local, _ = LocalStores.create(home / ".runops", fsync=False)
    try:
        yield Fresh(local, home)
    finally:
        local.destroy()
        shutil.rmtree(home, ignore_errors=True)


def bare(run_id: str) -> str:
    return run_id.split("_", 1)[1] if "_" in run_id else run_id


def lines(text: str) -> dict[str, str]:
    """`fields` output (key, two spaces, value) as a dict."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("  ")
        if sep:
            found[key.strip()] = value.strip()
    return found


def findings(doctor_out: str, severity: str) -> set[str]:
    """The checks `runops doctor` reported with this severity (lines `SEVERITY  CHECK  DETAIL`)."""
    return {line.split()[1] for line in doctor_out.splitlines() if line.split()[:1] == [severity]}


def test_a_live_single_database_installation_is_split_and_rolled_back_by_the_runbook(fresh: Fresh) -> None:
    local, bindir = fresh.local, Path(fresh.local.bindir)
    cp_cluster, ro_cluster = local.clusters[CONTROL_PLANE], local.clusters[RUN_OPS]
    admin, app = local.admin_urls(), local.app_urls()
    sh = Shell(fresh.home, bindir)

    # -- the starting point: one database, a control plane only --------------------------------
    cp_cluster.init(bindir)
    cp_cluster.start(bindir)
    cp_cluster.create_database()
    sh.env["RUNOPS_CONTROL_PLANE_ADMIN_URL"] = admin[CONTROL_PLANE]
    step = sh.runops("migrate")
    assert step.code == 0, step.err
    assert "upgraded: CONTROL_PLANE; wired: no; tenant mirror: none" in step.out
    sh.psql(admin[CONTROL_PLANE], f"ALTER ROLE runops_app LOGIN PASSWORD '{local.app_password}'")
    sh.env["RUNOPS_CONTROL_PLANE_URL"] = app[CONTROL_PLANE]

    single = RunOps(app[CONTROL_PLANE], max_pool_size=8)
    orgs: list[str] = []
    envs: list[str] = []
    for name in ("alpha", "beta", "gamma"):
        org = single.create_organization(name)
        orgs.append(org)
        envs.append(single.create_environment(single.create_project(org, "web"), "prod", "PRODUCTION"))
    traffic = Traffic(envs, single)
    legacy_before = [traffic.trigger(env, WORKED_TASK, f"before-{i}") for i, env in enumerate(envs)]
    assert {a.residency for a in legacy_before} == {"LEGACY"}
    threads = [threading.Thread(target=traffic.triggers, args=(seed,), daemon=True) for seed in (1, 2)]
    threads += [threading.Thread(target=body, daemon=True) for body in (traffic.worker, traffic.ticker)]
    for t in threads:
        t.start()
    both: RunOps | None = None
    try:
        # -- 0. where you start: the sentinel knows there is nothing to split to ------------------
        step = sh.runops("split", "status")
        assert step.code == 0, step.err
        status = lines(step.out)
        assert status["enabled"] == "no" and status["distinct"] == "no"
        assert status["reason"] == "no run-ops store is wired (run `runops migrate` with both URLs)"
        step = sh.runops("split", "enable")
        assert step.code == 17 and "RO007 split refused: no run-ops store is wired" in step.err, step.err

        # -- 1. provision the run-ops database: a fresh cluster, never a copy of the control plane
        ro_cluster.init(bindir)
        ro_cluster.start(bindir)
        ro_cluster.create_database()
        sh.env["RUNOPS_RUN_OPS_ADMIN_URL"] = admin[RUN_OPS]
        step = sh.runops("migrate", "--check")
        assert step.code == 3, step.err
        assert any(line.split()[:2] == ["RUN_OPS", "(none)"] and line.split()[-1] == "behind"
                   for line in step.out.splitlines()), step.out

        # -- 2. migrate: refused, changing nothing, while a precondition is missing; then done ----
        sh.psql(admin[CONTROL_PLANE], "ALTER SYSTEM SET max_slot_wal_keep_size = -1")
        sh.psql(admin[CONTROL_PLANE], "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10  # the reload is asynchronous
        while sh.psql(admin[CONTROL_PLANE], "SHOW max_slot_wal_keep_size") != "-1" and time.monotonic() < deadline:
            time.sleep(0.1)
        step = sh.runops("migrate")
        assert step.code == 5, (step.out, step.err)
        assert "max_slot_wal_keep_size is unlimited" in step.err and "(nothing was changed)" in step.err
        sh.psql(admin[CONTROL_PLANE], "ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'")
        sh.psql(admin[CONTROL_PLANE], "SELECT pg_reload_conf()")
        step = sh.runops("migrate", "--peer-host", "control_plane=127.0.0.1:1")
        assert step.code == 5, (step.out, step.err)
        assert "the run-ops store cannot reach the control plane at 127.0.0.1:1" in step.err
        installed = "SELECT count(*) FROM pg_namespace WHERE nspname = 'runops'"
        assert sh.psql(admin[RUN_OPS], installed) == "0", "a refused migrate changed the run-ops store"
        deadline = time.monotonic() + 10
        while sh.psql(admin[CONTROL_PLANE], "SHOW max_slot_wal_keep_size") == "-1" and time.monotonic() < deadline:
            time.sleep(0.1)
        step = sh.runops("migrate")
        assert step.code == 0, (step.out, step.err)
        assert "upgraded: CONTROL_PLANE, RUN_OPS; wired: yes; tenant mirror: logical replication" in step.out
        assert f"using control plane: postgres@127.0.0.1:{cp_cluster.port}/runops " \
               "(from RUNOPS_CONTROL_PLANE_ADMIN_URL)" in step.err
        step = sh.runops("migrate", "--check")
        assert step.code == 0 and step.out.count("current") == 2, step.out

        # -- 3. the application login on the run-ops store ----------------------------------------
        sh.psql(admin[RUN_OPS], f"ALTER ROLE runops_app LOGIN PASSWORD '{local.app_password}'")
        sh.env["RUNOPS_RUN_OPS_URL"] = app[RUN_OPS]

        # -- 4. verify the mirror -------------------------------------------------------------------
        fingerprint = "SELECT runops.mirror_fingerprint()"
        assert sh.psql(app[CONTROL_PLANE], fingerprint) == sh.psql(app[RUN_OPS], fingerprint)
        step = sh.runops("--json", "metrics")
        assert step.code == 0, step.err
        mirror = step.json()[RUN_OPS]["mirror"]
        assert mirror["engine"] == "subscription" and mirror["streaming"] is True, mirror

        # -- 5. verify the FDW, both ways -------------------------------------------------------------
        step = sh.runops("split", "status")
        assert step.code == 0, step.err
        status = lines(step.out)
        assert status["enabled"] == "no" and status["distinct"] == "yes" and status["reason"] == "distinct clusters"
        assert status["run-ops"].startswith("runops (system ")
        legacy = legacy_before[0].run_id
        through = sh.psql(app[RUN_OPS], f"SELECT run_id, residency FROM runops.get_run('{legacy}')")
        assert through == f"{legacy}|LEGACY", through
        # doctor sees the same, and what is still to do: the split is not enabled, and nothing
        # ticks the run-ops store yet (step 6 rolls that out).
        step = sh.runops("doctor")
        assert step.code == 1, step.out
        assert findings(step.out, "warn") == {"topology", "tick.run_ops"} and not findings(step.out, "fail"), step.out

        # -- 6. roll the run-ops URL out to every application, worker and tick ------------------------
        both = RunOps(app[CONTROL_PLANE], app[RUN_OPS], max_pool_size=8)
        traffic.client = both
        step = sh.runops("tick")
        assert step.code == 0, step.err
        assert [line.split()[1] for line in step.out.splitlines()] == [CONTROL_PLANE, RUN_OPS], step.out

        # -- 7. enable the split: nothing mints NEW yet (default cuid, no organization flipped) -----
        step = sh.runops("split", "enable")
        assert step.code == 0, step.err
        status = lines(step.out)
        assert status["enabled"] == "yes" and status["default mint kind"] == "cuid"
        assert status["organization overrides"] == "-"
        enabled_at = time.monotonic()
        assert {traffic.trigger(env, PROBE_TASK, client=both).residency for env in envs} == {"LEGACY"}

        held_legacy = traffic.trigger(envs[0], PROBE_TASK, "held-by-a-legacy-run", client=both)
        assert held_legacy.residency == "LEGACY" and not held_legacy.is_cached

        # -- 8. flip organizations one by one ----------------------------------------------------------
        flipped_at: dict[str, float] = {}
        new_probes: list[str] = []
        for i, (org, env) in enumerate(list(zip(orgs, envs, strict=True))[:2]):
            step = sh.runops("mint-kind", org, "ksuid")
            assert step.code == 0, step.err
            assert json.loads(lines(step.out)["organization overrides"]) == {o: "ksuid" for o in orgs[:i + 1]}
            flipped_at[env] = time.monotonic()
            for e in envs:
                probe = traffic.trigger(e, PROBE_TASK, client=both)
                assert probe.residency == ("NEW" if e in flipped_at else "LEGACY"), (e, probe)
                assert len(bare(probe.run_id)) == (27 if e in flipped_at else 25), probe.run_id
                if e in flipped_at:
                    new_probes.append(probe.run_id)
            # -- 9. observe: the listing merges both stores, the figures come from both ----------
            step = sh.runops("runs", "ls", "--env", env, "--limit", "200")
            assert step.code == 0, step.err
            listed = {row.split()[0]: row.split()[3] for row in step.out.splitlines()[1:] if row.startswith("run_")}
            assert listed[new_probes[-1]] == "NEW" and "LEGACY" in listed.values(), step.out
            if i == 0:
                step = sh.runops("doctor")
                assert step.code == 0 and findings(step.out, "ok") >= {"topology", "mirror", "tick.run_ops"}, step.out
                step = sh.runops("--json", "metrics", "--env", env)
                assert step.code == 0, step.err
                figures = step.json()
                assert figures[RUN_OPS]["runs"][env] and figures[CONTROL_PLANE]["runs"][env], figures
        held_new = traffic.trigger(envs[0], PROBE_TASK, "held-by-a-new-run", client=both)
        assert held_new.residency == "NEW" and not held_new.is_cached
        again = traffic.trigger(envs[0], PROBE_TASK, "held-by-a-legacy-run", client=both)
        assert (again.run_id, again.is_cached, again.residency) == (held_legacy.run_id, True, "LEGACY")

        # -- 10. roll back: the split off at once, then each organization's mint kind back ----------
        disabled_at = time.monotonic()  # from here on a trigger may meet the split disabled
        step = sh.runops("split", "disable")
        assert step.code == 0, step.err
        assert lines(step.out)["enabled"] == "no"
        for org in orgs[:2]:
            step = sh.runops("mint-kind", org, "default")
            assert step.code == 0, step.err
        status = lines(step.out)
        assert status["enabled"] == "no" and status["organization overrides"] == "-", step.out
        rolled_back_at = time.monotonic()
        step = sh.runops("doctor")
        assert step.code == 1 and findings(step.out, "warn") == {"topology"}, step.out
        assert "split not enabled" in step.out
        for env in envs:
            probe = traffic.trigger(env, PROBE_TASK, client=both)
            assert probe.residency == "LEGACY" and len(bare(probe.run_id)) == 25, probe

        # NEW runs stay readable and writable, and their keys still hold.
        step = sh.runops("--json", "runs", "show", new_probes[0])
        assert step.code == 0 and step.json()["residency"] == "NEW" and step.json()["status"] == "PENDING", step.out
        step = sh.runops("--json", "runs", "cancel", new_probes[0], "--reason", "rolled back")
        assert step.code == 0 and step.json()["status"] == "CANCELED", step.out
        again = traffic.trigger(envs[0], PROBE_TASK, "held-by-a-new-run", client=both)
        assert (again.run_id, again.is_cached, again.residency) == (held_new.run_id, True, "NEW")
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(timeout=30)
    try:
        assert both is not None
        # Every NEW job ends completed: what the worker had not taken before the rollback is
        # dequeued, started and completed now, with the split disabled.
        new_jobs = [a.run_id for a in traffic.since(enabled_at) if a.residency == "NEW" and a.task == WORKED_TASK]
        leftover = both.dequeue_runs(envs[0], "runbook-drain", 200, tasks=[WORKED_TASK])
        leftover += both.dequeue_runs(envs[1], "runbook-drain", 200, tasks=[WORKED_TASK])
        for run in leftover:
            started = both.start_attempt(run.run_id, "runbook-drain")
            both.complete_attempt(run.run_id, started.attempt_number, {"ok": True})
        assert new_jobs, "the traffic minted no NEW run"
        for run_id in new_jobs:
            got = both.get_run(run_id)
            assert got is not None and got.status == "COMPLETED_SUCCESSFULLY", (run_id, got)
        check_invariants(traffic, admin, envs, flipped_at, disabled_at, rolled_back_at)
    finally:
        if both is not None:
            both.close()
        single.close()


def check_invariants(traffic: Traffic, admin: dict[str, str], envs: list[str], flipped_at: dict[str, float],
                     disabled_at: float, rolled_back_at: float) -> None:
    assert not traffic.errors, traffic.errors
    assert len(traffic.acks) > 200, "too little traffic to say anything"

    # Every acknowledged run is in exactly one store, once; and no store holds a run nobody
    # was told about.
    held: dict[str, list[str]] = {}
    live_keys: dict[tuple[str, str, str], list[str]] = {}
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(admin[store]) as conn:
            for (run_id,) in conn.execute("SELECT id FROM runops.runs WHERE environment_id = ANY(%s)", [envs]):
                held.setdefault(run_id, []).append(store)
            for env, task, key_hash, run_id in conn.execute("""
                    SELECT environment_id, task_identifier, idempotency_key_hash, id FROM runops.runs
                    WHERE environment_id = ANY(%s) AND idempotency_key_hash IS NOT NULL
                      AND NOT runops.idempotency_key_is_dead(status, idempotency_key_expires_at, now())""",
                                                            [envs]):
                live_keys.setdefault((env, task, key_hash), []).append(run_id)
    minted = {bare(a.run_id) for a in traffic.acks if not a.is_cached}
    assert all(len(stores) == 1 for stores in held.values()), [r for r, s in held.items() if len(s) > 1]
    assert set(held) == minted, (set(held) ^ minted)
    assert {bare(a.run_id) for a in traffic.acks} <= set(held)
    assert len([a for a in traffic.acks if not a.is_cached]) == len(minted), "a run id came back as new twice"

    # One key, one run: across both stores, and across every answer the traffic got.
    assert all(len(runs) == 1 for runs in live_keys.values()), {k: v for k, v in live_keys.items() if len(v) > 1}
    by_key: dict[tuple[str, str, str], set[str]] = {}
    for a in traffic.acks:
        if a.key:
            by_key.setdefault((a.env, a.task, a.key), set()).add(a.run_id)
    assert all(len(runs) == 1 for runs in by_key.values()), {k: v for k, v in by_key.items() if len(v) > 1}
    assert any(a.is_cached for a in traffic.acks if a.task == WORKED_TASK), "the traffic never repeated a key"

    # Minting followed each step: flipped organizations minted NEW from their flip until the
    # rollback, the others LEGACY throughout, and everything LEGACY once the rollback was done.
    for env in envs:
        for a in traffic.since(0, env):
            if env in flipped_at and flipped_at[env] < a.started and a.started < disabled_at:
                assert a.residency == "NEW", a
            elif env not in flipped_at:
                assert a.residency == "LEGACY", a
    after = traffic.since(rolled_back_at)
    assert after and {a.residency for a in after} == {"LEGACY"}
