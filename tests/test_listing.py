"""list_runs across both stores (SPEC §4): order, cursors, filters, page sizes, and the
property that paging through any interleaving of LEGACY and NEW runs — equal created_at values
included — returns every run exactly once, in order, with no empty page before the end."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import InvalidInput
from tests.conftest import Stores, sqlstate_of
from tests.test_seam_idempotency import flip, trigger

BASE = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class TwoStoreEnv:
    """An environment with a LEGACY parent on the control plane and a NEW parent on run-ops:
    children inherit their parent's store, so a test places each run where it wants it, and
    the clock (runops.fake_now) gives it the created_at it wants."""

    def __init__(self, client: RunOps, stores: Stores) -> None:
        org = client.create_organization(f"list-{secrets.token_hex(4)}", mint_kind="cuid")
        self.env = client.create_environment(client.create_project(org, "p"), "e", "PRODUCTION")
        self.conns = {s: psycopg.connect(stores.app[s], autocommit=True) for s in (CONTROL_PLANE, RUN_OPS)}
        self.parents = {CONTROL_PLANE: self.make(CONTROL_PLANE, BASE - dt.timedelta(days=1), parent=False)}
        flip(client, org, "ksuid")
        self.parents[RUN_OPS] = self.make(RUN_OPS, BASE - dt.timedelta(days=1), parent=False)
        self.made: list[tuple[dt.datetime, str]] = []

    def make(self, store: str, at: dt.datetime, parent: bool = True, **options: Any) -> str:
        conn = self.conns[store]
        conn.execute("SELECT set_config('runops.fake_now', %s, false)", [at.isoformat()])
        if parent:
            options["parent_run_id"] = self.parents[store]
        run_id = trigger(conn, self.env, options.pop("task", "t"), **options)[0]
        conn.execute("RESET runops.fake_now")
        if parent:
            self.made.append((at, run_id[4:]))
        return run_id

    def expected(self) -> list[str]:
        """The listing order: created_at DESC, bare id DESC (byte order); the two parents last."""
        return ["run_" + i for _, i in sorted(self.made, key=lambda m: (m[0], m[1].encode()), reverse=True)]

    def close(self) -> None:
        for c in self.conns.values():
            c.close()


def page_sql(conn: psycopg.Connection[Any], env: str, size: int, cursor: str | None,
             filters: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT run_id, cursor FROM runops.list_runs(%s, %s, %s, %s)",
                        [env, size, cursor, Jsonb(filters or {})]).fetchall()
    return [(r[0], r[1]) for r in rows]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(runs=st.lists(st.tuples(st.sampled_from([CONTROL_PLANE, RUN_OPS]), st.integers(0, 4)), min_size=1, max_size=14),
       data=st.data())
def test_paging_any_interleaving_returns_every_run_once_in_order(client: RunOps, stores: Stores,
                                                                runs: list[tuple[str, int]], data: Any) -> None:
    two = TwoStoreEnv(client, stores)
    try:
        for store, second in runs:
            two.make(store, BASE + dt.timedelta(seconds=second))
        expected = two.expected()
        # Through SQL on either store, and through the client's own merge.
        for how in ("sql-" + CONTROL_PLANE, "sql-" + RUN_OPS, "client"):
            seen: list[str] = []
            cursor: str | None = None
            while True:
                size = data.draw(st.integers(1, 5), label=f"page size ({how})")
                if how == "client":
                    page = client.list_runs(two.env, size, cursor)
                    rows = [(r.run_id, r.cursor) for r in page.runs]
                else:
                    rows = page_sql(two.conns[how[4:]], two.env, size, cursor)
                if not rows:
                    break
                assert len(rows) == size or len(seen) + len(rows) == len(expected) + 2, "a short page before the end"
                seen += [r[0] for r in rows]
                cursor = rows[-1][1]
            assert [r for r in seen if r not in two.parents.values()] == expected, how
            assert len(seen) == len(set(seen)) == len(expected) + 2
    finally:
        two.close()


def test_a_cursor_from_sql_continues_in_the_client_and_back(client: RunOps, stores: Stores) -> None:
    two = TwoStoreEnv(client, stores)
    try:
        for i in range(6):
            two.make(CONTROL_PLANE if i % 2 else RUN_OPS, BASE + dt.timedelta(seconds=i // 3))
        first = page_sql(two.conns[CONTROL_PLANE], two.env, 2, None)
        middle = client.list_runs(two.env, 2, first[-1][1])
        last = page_sql(two.conns[RUN_OPS], two.env, 2, middle.next_cursor)
        assert [r[0] for r in first] + [r.run_id for r in middle.runs] + [r[0] for r in last] == two.expected()
    finally:
        two.close()


def test_filters_narrow_both_stores(client: RunOps, stores: Stores) -> None:
    two = TwoStoreEnv(client, stores)
    try:
        a = two.make(CONTROL_PLANE, BASE, task="alpha", tags=["x", "y"])
        b = two.make(RUN_OPS, BASE + dt.timedelta(seconds=1), task="alpha", tags=["x"])
        c = two.make(RUN_OPS, BASE + dt.timedelta(seconds=2), task="beta", tags=["y"])
        two.conns[RUN_OPS].execute("SELECT * FROM runops.finalize_run(%s, 'CANCELED')", [c])
        conn = two.conns[CONTROL_PLANE]
        assert [r[0] for r in page_sql(conn, two.env, 10, None, {"task_identifiers": ["alpha"]})] == [b, a]
        assert [r[0] for r in page_sql(conn, two.env, 10, None, {"tags": ["x", "y"]})] == [a]
        assert [r[0] for r in page_sql(conn, two.env, 10, None, {"statuses": ["CANCELED"]})] == [c]
        window = {"created_after": BASE.isoformat(), "created_before": (BASE + dt.timedelta(seconds=2)).isoformat()}
        assert [r[0] for r in page_sql(conn, two.env, 10, None, window)] == [b]
        assert [r.run_id for r in client.list_runs(two.env, 10, tags=["y"]).runs] == [c, a]
    finally:
        two.close()


@pytest.mark.parametrize(("size", "cursor", "filters"), [
    (0, None, {}), (201, None, {}), (10, "not-a-cursor", {}), (10, None, {"colour": "red"}),
    (10, None, {"statuses": ["NOPE"]}), (10, None, {"created_after": "yesterday"}),
])
def test_bad_page_size_cursor_or_filter_is_ro006(conn, env_id: str, size: int, cursor: str | None,
                                                 filters: dict[str, Any]) -> None:
    with pytest.raises(psycopg.Error) as refused:
        page_sql(conn, env_id, size, cursor, filters)
    assert sqlstate_of(refused.value) == "RO006"


def test_the_client_raises_invalid_input_for_a_bad_page(client: RunOps, new_env) -> None:
    with pytest.raises(InvalidInput):
        client.list_runs(new_env.environment_id, 500)


def test_the_app_role_lists_only_through_the_function(stores: Stores) -> None:
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.app[store], autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM runops.run_view LIMIT 1")


def test_the_foreign_side_ships_its_keyset_order_and_limit(stores: Stores) -> None:
    """postgres_fdw sends the keyset query — WHERE and ORDER BY — to the other store, so the
    remote index answers it in order and the fetch stops at the page (docs/listing.md)."""
    with psycopg.connect(stores.admin[CONTROL_PLANE], autocommit=True) as conn:
        conn.execute("SET ROLE runops_owner")
        # The statement list_runs runs, with its PL/pgSQL variables as parameters.
        conn.execute("""
            PREPARE side(text, timestamptz, text, boolean, integer) AS
            SELECT v.*, runops.run_cursor(v.created_at, v.id) FROM runops_peer.run_list_view AS v
            WHERE v.environment_id = $1 AND v.created_at <= $2
              AND (v.created_at < $2 OR (v.created_at = $2 AND v.id < $3) OR $4)
            ORDER BY v.created_at DESC, v.id DESC LIMIT $5""")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN (VERBOSE, COSTS OFF) EXECUTE side('e', '2030-01-01Z', 'x', false, 25)").fetchall())
    remote = next(line for line in plan.splitlines() if "Remote SQL" in line)
    assert "ORDER BY created_at DESC NULLS FIRST, id DESC" in remote and "id < $" in remote, plan
