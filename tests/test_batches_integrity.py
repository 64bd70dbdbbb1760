"""Where batch membership lives (SPEC §4 [1.2]) and the invariants that replaced foreign keys
(SPEC §5 [1.2]).

A run a batch created is a member through its own runs.batch_id/batch_index and has no
batch_items row; an index resolved to any other run (a held key, a duplicate key inside the
batch, a run the single trigger found cached) is a batch_items row. runs.batch_id and
batch_items.batch_id have no foreign key to batches: the checks `runops doctor --deep` runs
(runops.ops.doctor.INTEGRITY) must find nothing wrong in the shared stores, after this module's
batches and whatever the test session made before.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from runops.ops import doctor
from tests.conftest import Stores, sqlstate_of
from tests.lifecycle_helpers import one, trigger


def bare(prefixed: str) -> str:
    return prefixed.split("_", 1)[1]


def membership(stores: Stores, store: str, batch_id: str) -> tuple[dict[int, str], dict[int, str]]:
    """(index -> run through runs.batch_id/batch_index, index -> run through batch_items)."""
    with psycopg.connect(stores.admin[store]) as admin:
        created = admin.execute("SELECT batch_index, 'run_' || id FROM runops.runs WHERE batch_id = %s",
                                [bare(batch_id)]).fetchall()
        cached = admin.execute("SELECT item_index, 'run_' || run_id FROM runops.batch_items WHERE batch_id = %s",
                               [bare(batch_id)]).fetchall()
    return dict(created), dict(cached)


def test_created_runs_are_members_through_runs_and_only_cached_items_are_batch_items(
        conn, stores: Stores, store: str, env_id: str) -> None:
    held = trigger(conn, env_id, "t", idempotency_key="held")
    made = one(conn, "batch_trigger", env_id, [
        {"task": "t"},                                         # 0 new, no key
        {"task": "t", "options": {"idempotency_key": "k1"}},   # 1 new, keyed
        {"task": "t", "options": {"idempotency_key": "k1"}},   # 2 the same key: run of 1
        {"task": "t", "options": {"idempotency_key": "held"}},  # 3 a live holder: cached
        {"task": "t", "options": {"tags": ["x"]}},             # 4 new, with options
    ], {})
    runs = made["run_ids"]
    assert runs[2] == runs[1] and runs[3] == held and len({runs[0], runs[1], runs[4], held}) == 4
    created, cached = membership(stores, store, made["batch_id"])
    assert created == {0: runs[0], 1: runs[1], 4: runs[4]}
    assert cached == {2: runs[1], 3: held}
    got = one(conn, "get_batch", made["batch_id"])
    assert (got["run_ids"], got["item_count"]) == (runs, 5)


def test_a_keyless_chunk_writes_no_batch_items_and_reads_back_in_order(conn, stores: Stores, store: str,
                                                                         env_id: str) -> None:
    b = str(one(conn, "create_batch", env_id, 6, {})["batch_id"])
    first = one(conn, "append_batch_items", b, 3, [{"task": "t", "payload": {"i": i}} for i in (3, 4, 5)])["run_ids"]
    second = one(conn, "append_batch_items", b, 0, [{"task": "t", "payload": {"i": i}} for i in (0, 1, 2)])["run_ids"]
    # Re-sent: the same runs, from the membership the first calls wrote.
    assert one(conn, "append_batch_items", b, 2, [{"task": "u"}, {"task": "u"}])["run_ids"] == [second[2], first[0]]
    created, cached = membership(stores, store, b)
    assert cached == {} and created == dict(enumerate(second + first))
    assert [one(conn, "get_run", r)["payload"] for r in second + first] == [{"i": i} for i in range(6)]
    one(conn, "seal_batch", b)
    assert one(conn, "get_batch", b)["run_ids"] == second + first


def test_single_triggers_into_a_batch_index_are_created_or_cached_members(conn, stores: Stores, store: str,
                                                                          env_id: str) -> None:
    held = trigger(conn, env_id, "t", idempotency_key="held-single")
    b = str(one(conn, "create_batch", env_id, 3, {})["batch_id"])
    new = trigger(conn, env_id, "t", batch_id=b, batch_index=0)
    cached = trigger(conn, env_id, "t", batch_id=b, batch_index=1, idempotency_key="held-single")
    failed = one(conn, "trigger_failed_task", env_id, "t", {}, {"m": "could not trigger"},
                 {"batch_id": b, "batch_index": 2})["run_id"]
    assert cached == held
    created, items = membership(stores, store, b)
    assert created == {0: new, 2: failed} and items == {1: held}
    # An index taken either way keeps its run.
    assert trigger(conn, env_id, "other", batch_id=b, batch_index=0) == new
    assert trigger(conn, env_id, "other", batch_id=b, batch_index=1) == held
    one(conn, "seal_batch", b)
    for run_id in (new, held):
        one(conn, "finalize_run", run_id, "COMPLETED_SUCCESSFULLY")
    done = one(conn, "get_batch", b)
    assert done["status"] == "COMPLETED" and done["run_ids"] == [new, held, failed]


def test_an_index_cannot_hold_two_created_runs(stores: Stores, store: str, conn, env_id: str) -> None:
    """The unique membership index backs the batch lock every writer takes."""
    made = one(conn, "batch_trigger", env_id, [{"task": "t"}, {"task": "t"}], {})
    with psycopg.connect(stores.admin[store]) as admin, pytest.raises(psycopg.Error) as err:
        admin.execute("UPDATE runops.runs SET batch_index = 0 WHERE id = %s", [bare(made["run_ids"][1])])
    assert sqlstate_of(err.value) == "23505"


def integrity(stores: Stores, store: str) -> dict[str, Any]:
    found = {}
    with psycopg.connect(stores.admin[store]) as admin:
        for key, _, query in [*doctor.INTEGRITY, ("remote", "", doctor.REMOTE_ITEMS)]:
            if key == "remote":
                admin.execute("SET ROLE runops_owner")  # the FDW's user mapping is the owner's
            row = admin.execute(query).fetchone()
            assert row is not None
            found[key] = (row[0], row[1])
    return found


def test_the_invariants_foreign_keys_no_longer_guard_hold_in_the_whole_store(stores: Stores, store: str) -> None:
    found = integrity(stores, store)
    assert set(found) == {"runs_naming_no_batch", "runs_off_their_batch", "items_naming_no_batch",
                          "items_off_their_batch", "indexes_held_twice", "open_items_naming_no_run",
                          "open_batches_miscounted", "remote"}
    assert {k: v for k, v in found.items() if v[0] != 0} == {}
    # And the checks see a store with batches in it, cached items included.
    with psycopg.connect(stores.admin[store]) as admin:
        counts = admin.execute("SELECT (SELECT count(*) FROM runops.runs WHERE batch_id IS NOT NULL), "
                               "(SELECT count(*) FROM runops.batch_items)").fetchone()
    assert counts is not None and counts[0] > 0 and counts[1] > 0, counts
