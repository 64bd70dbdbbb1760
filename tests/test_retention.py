"""purge_runs (SPEC §4): final runs older than the duration go with their subgraphs, in bounded
batches; live runs, runs still waited on and parents of remaining children stay."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import Stores, sqlstate_of
from tests.test_seam_idempotency import trigger


def run_ids(stores: Stores, store: str, env: str) -> set[str]:
    with psycopg.connect(stores.admin[store]) as conn:
        return {"run_" + r[0] for r in conn.execute("SELECT id FROM runops.runs WHERE environment_id = %s",
                                                      [env]).fetchall()}


def backdate(stores: Stores, store: str, env: str, days: int) -> None:
    """Ages this test's runs only (the store is shared with every other test)."""
    with psycopg.connect(stores.admin[store], autocommit=True) as admin:
        admin.execute("UPDATE runops.runs SET updated_at = updated_at - make_interval(days => %s) "
                      "WHERE environment_id = %s", [days, env])


def test_purge_removes_old_final_runs_with_their_subgraphs_and_keeps_the_rest(conn, env_id: str, store: str,
                                                                               stores: Stores) -> None:
    parent = trigger(conn, env_id, "parent")[0]
    child = trigger(conn, env_id, "child", parent_run_id=parent)[0]
    done = trigger(conn, env_id, "done")[0]
    live = trigger(conn, env_id, "live")[0]
    conn.execute("SELECT * FROM runops.dequeue_runs(%s, 'w', 10, '{\"tasks\": [\"done\"]}')", [env_id])
    conn.execute("SELECT * FROM runops.start_attempt(%s, 'w')", [done])
    conn.execute("SELECT * FROM runops.complete_attempt(%s, 1, '{}')", [done])
    for run in (parent, child):
        conn.execute("SELECT * FROM runops.finalize_run(%s, 'CANCELED')", [run])
    before = run_ids(stores, store, env_id)
    conn.execute("SELECT runops.purge_runs('30d', 100000)")
    assert run_ids(stores, store, env_id) == before  # nothing of ours is old yet
    backdate(stores, store, env_id, 31)
    # The child and the finished run go first; their parent once no child is left.
    conn.execute("SELECT runops.purge_runs('30d', 100000)")
    assert run_ids(stores, store, env_id) == {parent, live}
    conn.execute("SELECT runops.purge_runs('30d', 100000)")
    assert run_ids(stores, store, env_id) == {live}
    with psycopg.connect(stores.admin[store]) as admin:
        assert admin.execute("SELECT count(*) FROM runops.attempts WHERE run_id = %s", [done[4:]]).fetchone() == (0,)


def test_purge_works_in_bounded_batches(conn, env_id: str, store: str, stores: Stores) -> None:
    runs = [trigger(conn, env_id, "t")[0] for _ in range(5)]
    for run in runs:
        conn.execute("SELECT * FROM runops.finalize_run(%s, 'CANCELED')", [run])
    backdate(stores, store, env_id, 2)
    for _ in range(2):  # at least our five are old: each call takes exactly its bound
        assert conn.execute("SELECT runops.purge_runs('1d', 2)").fetchone() == (2,)
    while conn.execute("SELECT runops.purge_runs('1d', 100000)").fetchone() != (0,):
        pass
    assert run_ids(stores, store, env_id) == set()


@pytest.mark.parametrize(("older_than", "max_rows"), [("30 days", 10), ("30d", 0), ("-1d", 10)])
def test_purge_refuses_bad_input(conn, older_than: str, max_rows: int) -> None:
    with pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT runops.purge_runs(%s, %s)", [older_than, max_rows])
    assert sqlstate_of(refused.value) == "RO006"


def test_the_client_purges_both_stores(client, make_env) -> None:
    counts = client.purge_runs("365d", 10)
    assert set(counts) == {"CONTROL_PLANE", "RUN_OPS"} and all(v >= 0 for v in counts.values())
