"""Bulk actions (SPEC §9 [1.3]): cancel or replay every run matching a filter, across both
stores; the matched set fixed at creation; each matched run acted on exactly once, with two
processors at once and a processor's backend killed mid-chunk; abort keeps what was done; bad
input creates nothing."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import EnvironmentUnusable, InvalidInput, NotFound
from runops.models import BulkAction
from runops.tasks import TaskRegistry
from runops.worker import Worker
from tests.conftest import Stores, running_stores, sqlstate_of
from tests.test_cli import Cli, run
from tests.test_faults_stores import wait_for_store
from tests.test_seam_idempotency import flip


def two_store_env(client: RunOps, legacy: int, new: int, task: str = "t") -> tuple[str, str, list[str], list[str]]:
    """An environment with `legacy` runs on the control plane and `new` runs on run-ops (its
    organization mints cuids, then flips to ksuids): (org, env, legacy ids, new ids)."""
    org = client.create_organization(f"bulk-{secrets.token_hex(4)}", mint_kind="cuid")
    env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
    old = [client.trigger_run(env, task, {"i": i}).run_id for i in range(legacy)]
    flip(client, org, "ksuid")
    young = [client.trigger_run(env, task, {"i": i}).run_id for i in range(new)]
    assert {client.get_run(r).residency for r in old} <= {"LEGACY"}  # type: ignore[union-attr]
    assert {client.get_run(r).residency for r in young} <= {"NEW"}  # type: ignore[union-attr]
    return org, env, old, young


def statuses(client: RunOps, run_ids: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in run_ids:
        run = client.get_run(r)
        assert run is not None
        out[r] = run.status
    return out


def action(client: RunOps, bulk_id: str) -> BulkAction:
    got = client.get_bulk_action(bulk_id)
    assert got is not None
    return got


def drain(client: RunOps, bulk_id: str, max_runs: int | None = None, limit: int = 200) -> BulkAction:
    """Advances every store until the action is over."""
    for _ in range(limit):
        client.advance_bulk_actions(max_runs)
        got = action(client, bulk_id)
        if got.is_over:
            return got
    raise AssertionError(f"bulk action {bulk_id} did not finish: {action(client, bulk_id)}")


def kill_a_processor_mid_chunk(stores: Stores, store: str, first: str, how: str) -> None:
    """A processor on `store` takes its part's first chunk, whose lowest member is `first` (bare),
    and waits on that run, which the test holds locked; a second processor there skips the part
    at once instead of waiting; then the first one's backend dies: `terminate`
    (pg_terminate_backend) or `kill` (SIGKILL: the postmaster resets every backend and recovers)."""
    holder = psycopg.connect(stores.admin[store])
    holder.execute("SELECT 1 FROM runops.runs WHERE id = %s FOR UPDATE", [first])
    stuck = psycopg.connect(stores.app[store], autocommit=True)
    pid = stuck.info.backend_pid
    outcome: dict[str, Any] = {}

    def process() -> None:
        try:
            outcome["n"] = stuck.execute("SELECT runops.advance_bulk_actions()").fetchone()
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=process)
    thread.start()
    with psycopg.connect(stores.admin[store], autocommit=True) as watcher:
        for _ in range(200):
            waiting = watcher.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
            if waiting and waiting[0] == "Lock":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the processor never reached the locked run")
        # A second processor on the same store skips the part at once instead of waiting.
        with psycopg.connect(stores.app[store], autocommit=True) as second:
            second.execute("SET statement_timeout = '5s'")
            assert second.execute("SELECT runops.advance_bulk_actions()").fetchone() == (0,)
        if how == "terminate":
            assert watcher.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
    thread.join(30)
    assert "error" in outcome and "n" not in outcome
    stuck.close()
    if how == "kill":
        holder.close()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        wait_for_store(stores, store)
    else:
        holder.rollback()
        holder.close()


def test_bulk_cancel_across_both_stores_with_two_processors_and_a_killed_backend(
        client: RunOps, stores: Stores) -> None:
    _, env, old, young = two_store_env(client, 25, 25)
    # Already final runs are matched but skipped (processed, not affected).
    for r in old[:3] + young[:3]:
        client.finalize_run(r, "COMPLETED_SUCCESSFULLY", output={})
    created = client.create_bulk_action(env, "CANCEL", {"task_identifiers": ["t"]}, chunk_size=7, reason="bad deploy")
    assert created.bulk_action_id.startswith("bulk_") and not created.is_cached and created.status == "PENDING"
    # Runs triggered afterwards, in both stores, are not the action's.
    after_new = client.trigger_run(env, "t", {}).run_id
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as cp:
        after_old = cp.execute("SELECT run_id FROM runops.trigger_run(%s, 't', '{}', %s)",
                               [env, Jsonb({"parent_run_id": old[-1]})]).fetchone()[0]  # type: ignore[index]
    got = action(client, created.bulk_action_id)
    assert (got.matched_count, got.processed_count, got.affected_count, got.status) == (50, 0, 0, "PENDING")

    kill_a_processor_mid_chunk(stores, RUN_OPS, min(r[4:] for r in young[3:]), "terminate")
    got = action(client, created.bulk_action_id)
    assert got.processed_count == 0 and got.affected_count == 0  # the killed chunk left nothing

    # Two processors on each store at once, until the action is over.
    def processor() -> None:
        with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as c:
            for _ in range(100):
                c.advance_bulk_actions()
                if action(c, created.bulk_action_id).is_over:
                    return

    threads = [threading.Thread(target=processor) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    got = action(client, created.bulk_action_id)
    assert got.status == "COMPLETED" and got.completed_at is not None
    assert (got.matched_count, got.processed_count, got.affected_count) == (50, 50, 44)
    final = statuses(client, old + young)
    assert [r for r in old[:3] + young[:3] if final[r] != "COMPLETED_SUCCESSFULLY"] == []
    assert {final[r] for r in old[3:] + young[3:]} == {"CANCELED"}
    for r in old[3:] + young[3:]:
        run = client.get_run(r)
        assert run is not None and run.error == {"message": "bad deploy", "status": "CANCELED"}
    # after_old is a child of a cancelled run, so cancel_run's cascade took it (it is no member).
    assert statuses(client, [after_new, after_old]) == {after_new: "PENDING", after_old: "CANCELED"}
    # The control plane's tick records it, and prunes its matched set.
    with psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as cp_admin:
        cp_admin.execute("SELECT runops.tick()")
        bare = created.bulk_action_id[5:]
        assert cp_admin.execute("SELECT status, members_pruned FROM runops.bulk_actions WHERE id = %s",
                                [bare]).fetchone() == ("COMPLETED", True)
        assert cp_admin.execute("SELECT count(*) FROM runops.bulk_action_members WHERE bulk_action_id = %s",
                                [bare]).fetchone() == (0,)
    assert action(client, created.bulk_action_id) == got


def test_runs_created_after_the_action_are_untouched(client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 4, 4)
    created = client.create_bulk_action(env, "CANCEL")
    later = [client.trigger_run(env, "t", {}).run_id for _ in range(3)]
    got = drain(client, created.bulk_action_id)
    assert (got.matched_count, got.processed_count, got.affected_count) == (8, 8, 8)
    assert set(statuses(client, old + young).values()) == {"CANCELED"}
    assert set(statuses(client, later).values()) == {"PENDING"}


def test_filters_are_list_runs_filters(client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 3, 3, task="a")
    others = [client.trigger_run(env, "b", {}).run_id for _ in range(2)]
    tagged = client.trigger_run(env, "a", {}, tags=["x"]).run_id
    created = client.create_bulk_action(env, "CANCEL", {"task_identifiers": ["a"], "statuses": ["PENDING"]})
    got = drain(client, created.bulk_action_id)
    assert (got.matched_count, got.affected_count) == (7, 7)
    assert set(statuses(client, others).values()) == {"PENDING"}
    created = client.create_bulk_action(env, "CANCEL", {"tags": ["x"]})
    assert action(client, created.bulk_action_id).matched_count == 1
    assert drain(client, created.bulk_action_id).affected_count == 0  # cancelled already by the first
    assert statuses(client, [tagged]) == {tagged: "CANCELED"}


def test_abort_keeps_what_was_done(client: RunOps, stores: Stores) -> None:
    _, env, old, young = two_store_env(client, 12, 0)
    created = client.create_bulk_action(env, "CANCEL", chunk_size=5)
    assert client.advance_bulk_actions()[CONTROL_PLANE] == 5
    aborted = client.abort_bulk_action(created.bulk_action_id)
    assert (aborted.status, aborted.processed_count, aborted.affected_count) == ("ABORTED", 5, 5)
    assert aborted.completed_at is not None
    for _ in range(3):
        assert client.advance_bulk_actions() == {CONTROL_PLANE: 0, RUN_OPS: 0}
    client.tick()
    got = action(client, created.bulk_action_id)
    assert (got.status, got.processed_count, got.affected_count) == ("ABORTED", 5, 5)
    assert sorted(statuses(client, old).values()).count("CANCELED") == 5
    assert sorted(statuses(client, old).values()).count("PENDING") == 7
    # Aborting again answers the same row.
    assert client.abort_bulk_action(created.bulk_action_id) == got


def test_tick_advances_bulk_actions_in_bounded_chunks(client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 6, 6)
    created = client.create_bulk_action(env, "CANCEL")
    counts = client.tick(max_rows=4)
    assert counts[CONTROL_PLANE]["bulk_processed"] == 4 and counts[RUN_OPS]["bulk_processed"] == 4
    assert action(client, created.bulk_action_id).status == "PROCESSING"
    client.tick(max_rows=4)
    got = action(client, created.bulk_action_id)
    assert (got.status, got.processed_count, got.affected_count) == ("COMPLETED", 12, 12)


def test_idempotency_key_answers_the_first_action(client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 2, 2)
    first = client.create_bulk_action(env, "CANCEL", idempotency_key="incident-7")
    again = client.create_bulk_action(env, "CANCEL", idempotency_key="incident-7")
    assert again.bulk_action_id == first.bulk_action_id and again.is_cached and not first.is_cached
    other = client.create_bulk_action(env, "CANCEL", idempotency_key="incident-8")
    assert other.bulk_action_id != first.bulk_action_id


def test_an_action_matching_nothing_is_completed_at_once(client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 1, 1)
    created = client.create_bulk_action(env, "CANCEL", {"task_identifiers": ["nothing"]})
    assert created.status == "COMPLETED"
    got = action(client, created.bulk_action_id)
    assert (got.status, got.matched_count, got.processed_count) == ("COMPLETED", 0, 0)


def test_get_reads_through_either_store_and_guards_the_environment(client: RunOps, stores: Stores) -> None:
    _, env, old, young = two_store_env(client, 2, 2)
    created = client.create_bulk_action(env, "CANCEL")
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.app[store], autocommit=True) as conn:
            rows = conn.execute("SELECT bulk_action_id, environment_id, kind, status, matched_count "
                                "FROM runops.get_bulk_action(%s)", [created.bulk_action_id]).fetchall()
            assert rows == [(created.bulk_action_id, env, "CANCEL", "PENDING", 4)]
            assert conn.execute("SELECT * FROM runops.get_bulk_action(%s, 'env_other')",
                                [created.bulk_action_id]).fetchall() == []
            for missing in ("bulk_c" + "0" * 24, "run_" + created.bulk_action_id[5:], "nonsense", ""):
                assert conn.execute("SELECT * FROM runops.get_bulk_action(%s)", [missing]).fetchall() == []


def test_writes_on_run_ops_name_the_control_plane(stores: Stores, client: RunOps) -> None:
    _, env, old, young = two_store_env(client, 1, 1)
    created = client.create_bulk_action(env, "CANCEL")
    with psycopg.connect(stores.app[RUN_OPS], autocommit=True) as ro:
        for query, args in (("SELECT * FROM runops.create_bulk_action(%s, 'CANCEL')", [env]),
                            ("SELECT * FROM runops.abort_bulk_action(%s)", [created.bulk_action_id])):
            with pytest.raises(psycopg.Error) as err:
                ro.execute(query, args)
            assert sqlstate_of(err.value) == "RO002"
            assert err.value.diag.message_detail == "owning_store=CONTROL_PLANE"


@pytest.mark.parametrize(("kind", "filters", "options", "code"), [
    ("DELETE", {}, {}, "RO006"),
    (None, {}, {}, "RO006"),
    ("CANCEL", {"colour": "red"}, {}, "RO006"),
    ("CANCEL", [], {}, "RO006"),
    ("CANCEL", "PENDING", {}, "RO006"),
    ("CANCEL", {"statuses": ["NOPE"]}, {}, "RO006"),
    ("CANCEL", {"statuses": []}, {}, "RO006"),
    ("CANCEL", {}, {"chunk_size": 0}, "RO006"),
    ("CANCEL", {}, {"chunk_size": 100001}, "RO006"),
    ("CANCEL", {}, {"colour": "red"}, "RO006"),
    ("CANCEL", {}, [], "RO006"),
    ("CANCEL", {}, {"reason": "x" * 3000}, "RO006"),
    ("REPLAY", {}, {"reason": "why"}, "RO006"),
    ("CANCEL", {}, {"idempotency_key": 7}, "RO006"),
])
def test_bad_input_is_one_error_and_creates_nothing(stores: Stores, client: RunOps, kind: str | None,
                                                    filters: Any, options: Any, code: str) -> None:
    _, env, old, young = two_store_env(client, 1, 0)
    with psycopg.connect(stores.app[CONTROL_PLANE], autocommit=True) as cp, \
         psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as cp_admin:
        before = cp_admin.execute("SELECT count(*) FROM runops.bulk_actions").fetchone()
        with pytest.raises(psycopg.Error) as err:
            cp.execute("SELECT * FROM runops.create_bulk_action(%s, %s, %s, %s)",
                       [env, kind, Jsonb(filters), Jsonb(options)])
        assert sqlstate_of(err.value) == code
        assert len(err.value.diag.message_primary or "") < 200
        assert cp_admin.execute("SELECT count(*) FROM runops.bulk_actions").fetchone() == before


def test_environment_errors(client: RunOps) -> None:
    org, env, old, young = two_store_env(client, 1, 0)
    with pytest.raises(NotFound):
        client.create_bulk_action("env_" + "x" * 20, "CANCEL")
    with pytest.raises(InvalidInput):
        client.create_bulk_action(env, "CANCEL", {"batch_id": "run_abc"})
    client.update_environment(env, paused=True)
    with pytest.raises(EnvironmentUnusable):
        client.create_bulk_action(env, "REPLAY")
    # Cancelling is not new work: allowed on a paused environment.
    created = client.create_bulk_action(env, "CANCEL")
    assert drain(client, created.bulk_action_id).affected_count == 1
    with pytest.raises(NotFound):
        client.abort_bulk_action("bulk_c" + "0" * 24)
    with pytest.raises(InvalidInput):
        client.abort_bulk_action("run_" + created.bulk_action_id[5:])


def replays_of(stores: Stores, originals: list[str]) -> dict[str, list[str]]:
    """Every replay in either store, by original: {original: [replay ids]}."""
    found: dict[str, list[str]] = {r: [] for r in originals}
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.admin[store]) as conn:
            for replay, original in conn.execute(
                    "SELECT id, replayed_from_run_id FROM runops.runs WHERE replayed_from_run_id = ANY(%s)",
                    [[r[4:] for r in originals]]):
                found["run_" + original].append(replay)
    return found


def test_bulk_replay_makes_exactly_one_replay_per_run_after_repeated_ticks(client: RunOps, stores: Stores) -> None:
    org, env, old, young = two_store_env(client, 5, 5)
    for r in old[:2] + young[:2]:
        client.finalize_run(r, "CRASHED", error={"message": "bad deploy"})
    created = client.create_bulk_action(env, "REPLAY", {"statuses": ["CRASHED"]}, chunk_size=3)
    assert action(client, created.bulk_action_id).matched_count == 4

    # A paused environment takes no replays: the chunk is undone whole and says why.
    client.update_environment(env, paused=True)
    assert client.wait_for_mirror()
    assert client.advance_bulk_actions() == {CONTROL_PLANE: 0, RUN_OPS: 0}
    with psycopg.connect(stores.admin[RUN_OPS]) as ro_admin:
        errors = ro_admin.execute("SELECT last_error FROM runops.bulk_action_progress WHERE bulk_action_id = %s",
                                  [created.bulk_action_id[5:]]).fetchall()
        assert errors and all(e[0].startswith("RO005") for e in errors)
    assert action(client, created.bulk_action_id).processed_count == 0
    client.update_environment(env, paused=False)
    assert client.wait_for_mirror()

    # Ticks and two processors at once, again and again, even after it completed.
    def processor() -> None:
        with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as c:
            for _ in range(10):
                c.advance_bulk_actions()

    threads = [threading.Thread(target=processor) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(10):
        client.tick(max_rows=2)
    for t in threads:
        t.join(120)
    got = action(client, created.bulk_action_id)
    assert (got.status, got.matched_count, got.processed_count, got.affected_count) == ("COMPLETED", 4, 4, 4)
    made = replays_of(stores, old + young)
    assert {r: len(v) for r, v in made.items() if v} == {r: 1 for r in old[:2] + young[:2]}
    # The environment mints NEW runs: every replay is there, LEGACY originals included.
    for replay_ids in made.values():
        for bare in replay_ids:
            run = client.get_run("run_" + bare)
            assert run is not None and run.residency == "NEW" and run.status == "PENDING"



def test_a_replay_part_walked_again_after_a_flip_makes_no_second_replay(client: RunOps, stores: Stores) -> None:
    org, env, old, young = two_store_env(client, 3, 3)
    created = client.create_bulk_action(env, "REPLAY", chunk_size=2)
    # Run-ops (where the environment mints now) replays one chunk of each part...
    assert client.advance_bulk_actions() == {CONTROL_PLANE: 0, RUN_OPS: 4}
    # ... then the organization flips back to cuids: the control plane mints the environment's
    # runs now, and walks both parts from the start. The keyed replays it meets are the ones
    # run-ops made (one key across both stores): it makes only the missing ones.
    flip(client, org, "cuid")
    for _ in range(5):
        client.advance_bulk_actions()
    got = action(client, created.bulk_action_id)
    assert (got.status, got.matched_count, got.processed_count, got.affected_count) == ("COMPLETED", 6, 6, 6)
    made = replays_of(stores, old + young)
    assert {r: len(v) for r, v in made.items()} == {r: 1 for r in old + young}
    residencies = sorted(client.get_run("run_" + v[0]).residency for v in made.values())  # type: ignore[union-attr]
    assert residencies == ["LEGACY", "LEGACY", "NEW", "NEW", "NEW", "NEW"]


@pytest.fixture
def cli(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """test_cli's: `runops` with both stores' URLs in its environment."""
    monkeypatch.setenv("RUNOPS_CONTROL_PLANE_URL", stores.app[CONTROL_PLANE])
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", stores.app[RUN_OPS])
    return Cli()


def test_cli_bulk_cancel_and_replay_with_a_progress_bar_show_and_abort(client: RunOps, cli: Cli) -> None:
    _, env, old, young = two_store_env(client, 3, 3)
    later = client.trigger_run(env, "other", {}).run_id
    # --no-wait: the action, at once.
    code, out, err = run(cli, "--json", "runs", "cancel", "--env", env, "--task", "t", "--no-wait", "--key", "k1")
    assert code == 0, err
    created = json.loads(out)
    assert created["status"] == "PENDING" and created["matched_count"] == 6 and created["is_cached"] is False
    code, out, err = run(cli, "--json", "bulk", "abort", created["bulk_action_id"])
    assert code == 0, err
    assert json.loads(out)["status"] == "ABORTED"
    # Waiting: the command drives the action to its end behind a progress bar.
    code, out, err = run(cli, "runs", "cancel", "--env", env, "--filter", '{"task_identifiers": ["t"]}',
                         "--reason", "bad deploy", "--chunk-size", "2")
    assert code == 0, err
    # Not a terminal: the bar shows its label once (click), and the action at the end.
    assert err.startswith("cancel bulk_") and "COMPLETED" in out
    assert set(statuses(client, old + young).values()) == {"CANCELED"}
    assert statuses(client, [later]) == {later: "PENDING"}
    bulk_id = next(line.split()[1] for line in out.splitlines() if line.startswith("bulk_action_id"))
    code, out, err = run(cli, "--json", "bulk", "show", bulk_id)
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["matched_count"], shown["processed_count"], shown["affected_count"]) == (6, 6, 6)
    # The same key answers the first action.
    code, out, err = run(cli, "--json", "runs", "cancel", "--env", env, "--task", "t", "--no-wait", "--key", "k1")
    assert code == 0 and json.loads(out)["bulk_action_id"] == created["bulk_action_id"]
    assert json.loads(out)["is_cached"] is True
    # Bulk replay of the cancelled runs, one replay each.
    code, out, err = run(cli, "--json", "runs", "replay", "--env", env, "--status", "CANCELED")
    assert code == 0, err
    replayed = json.loads(out)
    assert (replayed["status"], replayed["matched_count"], replayed["affected_count"]) == ("COMPLETED", 6, 6)
    # The single forms keep working.
    code, out, err = run(cli, "--json", "runs", "cancel", later)
    assert code == 0 and json.loads(out)["status"] == "CANCELED", err
    code, out, err = run(cli, "--json", "runs", "replay", later)
    assert code == 0 and json.loads(out)["residency"] == "NEW", err


@pytest.mark.parametrize(("args", "code"), [
    (["runs", "cancel", "--env", "ENV", "--status", "NOPE"], 16),       # RO006
    (["runs", "cancel", "--env", "env_missing"], 14),                   # RO004
    (["runs", "replay", "--env", "ENV", "--chunk-size", "0"], 16),     # RO006
    (["bulk", "show", "bulk_c000000000000000000000000"], 14),
    (["bulk", "abort", "run_x"], 16),
    (["runs", "cancel"], 2),                                           # neither a run nor --env
    (["runs", "cancel", "run_x", "--env", "ENV"], 2),                  # both
    (["runs", "replay", "--env", "ENV", "--payload", "{}"], 2),        # overrides are for one run
])
def test_cli_bulk_errors_are_one_line_and_an_exit_code(client: RunOps, cli: Cli, args: list[str], code: int) -> None:
    _, env, old, young = two_store_env(client, 1, 0)
    got, out, err = run(cli, *[env if a == "ENV" else a for a in args])
    assert got == code, (out, err)
    assert out == "" and err.strip().count("\n") <= (0 if code != 2 else 10)


def test_a_worker_process_finishes_a_bulk_action_by_itself(client: RunOps, stores: Stores) -> None:
    """No tick, no advance from the test: the worker's ticker takes a bounded chunk per pass and,
    having found bulk work, keeps at it at full chunk size."""
    _, env, old, young = two_store_env(client, 0, 0)
    runs = client.batch_trigger(env, [{"task": "t", "payload": {}, "options": {}} for _ in range(2500)]).run_ids
    idle_org = client.create_organization(f"bulk-idle-{secrets.token_hex(4)}")
    idle_env = client.create_environment(client.create_project(idle_org, "p"), "e", "PRODUCTION")
    created = client.create_bulk_action(env, "CANCEL")
    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS]) as own:
        worker = Worker(own, idle_env, TaskRegistry(), all_tasks=True, handle_signals=False, tick=1)
        thread = threading.Thread(target=worker.run)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not action(client, created.bulk_action_id).is_over and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            worker.stop()
            thread.join(60)
    got = action(client, created.bulk_action_id)
    assert (got.status, got.matched_count, got.processed_count, got.affected_count) == ("COMPLETED", 2500, 2500, 2500)
    assert {client.get_run(r).status for r in runs[::250]} == {"CANCELED"}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def own() -> Iterator[Stores]:
    """A pair of its own: SIGKILL resets every backend of the killed cluster."""
    with running_stores() as made:
        yield made


@pytest.mark.faults
def test_bulk_cancel_survives_a_processor_killed_with_sigkill_on_each_store(own: Stores) -> None:
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as client:
        _, env, old, young = two_store_env(client, 20, 20)
        created = client.create_bulk_action(env, "CANCEL", chunk_size=6)
    for store, ids in ((RUN_OPS, young), (CONTROL_PLANE, old)):
        kill_a_processor_mid_chunk(own, store, min(r[4:] for r in ids), "kill")
    with RunOps(own.app[CONTROL_PLANE], own.app[RUN_OPS]) as client:
        got = action(client, created.bulk_action_id)
        assert (got.processed_count, got.affected_count) == (0, 0)
        processors = [threading.Thread(target=drain, args=(client, created.bulk_action_id)) for _ in range(2)]
        for t in processors:
            t.start()
        for t in processors:
            t.join(120)
        got = action(client, created.bulk_action_id)
        assert (got.status, got.matched_count, got.processed_count, got.affected_count) == ("COMPLETED", 40, 40, 40)
        assert set(statuses(client, old + young).values()) == {"CANCELED"}


def test_tick_still_runs_on_a_store_whose_fdw_predates_bulk_actions(client: RunOps, stores: Stores) -> None:
    """Upgraded but not yet re-wired (`runops migrate` re-imports the foreign tables): each
    store's tick goes on, its bulk-action steps doing nothing; the read says RO009."""
    _, env, old, young = two_store_env(client, 1, 1)
    created = client.create_bulk_action(env, "CANCEL")
    for store, table in ((RUN_OPS, "bulk_actions"), (CONTROL_PLANE, "bulk_action_progress")):
        with psycopg.connect(stores.admin[store]) as admin:  # one transaction, rolled back
            admin.execute(f"DROP FOREIGN TABLE runops_peer.{table}")
            counts = admin.execute("SELECT runops.tick()").fetchone()[0]  # type: ignore[index]
            assert counts["bulk_processed"] == (1 if store == CONTROL_PLANE else 0)
            with pytest.raises(psycopg.Error) as err:
                admin.execute("SELECT * FROM runops.get_bulk_action(%s)", [created.bulk_action_id])
            assert sqlstate_of(err.value) == "RO009"
            admin.rollback()
