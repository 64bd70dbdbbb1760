"""Each admission rule is one predicate, asked by every path that admits new work: the fast paths
hold it in their queries (inlined), the raising functions ask it and only explain a refusal.

The proof is the newcomer's edit: add a condition to the predicate (in a rolled-back transaction,
as superuser) and every path — trigger_run's keyless and keyed fast paths, its full path,
trigger_failed_task, batch_trigger, create_batch, append_batch_items, create_waitpoint and
reset_idempotency_key where a key is read — refuses with the rule's code. A fast path that spelled
the rule again would go on admitting the common call. And the predicates cost no call of their
own on the fast paths: they are inlined (track_functions counts every SQL function that is not).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import RunOps
from tests.conftest import Stores

ENVIRONMENT_RULE = "runops.environment_takes_new_work(runops.environment_context)"
KEY_RULE = "runops.idempotency_key_is_valid(text)"
TASK = "rules"
PAYLOAD = Jsonb({"n": 1})
ITEM = {"task": TASK, "payload": {"n": 1}}


@pytest.fixture
def admin(stores: Stores, store: str, client: RunOps) -> Iterator[psycopg.Connection[Any]]:
    """A superuser session on `store` counting function calls; the environment made for the test
    is in the run-ops mirror before it starts (the fast path reads the mirror only)."""
    assert client.wait_for_mirror()
    with psycopg.connect(stores.admin[store], autocommit=True) as conn:
        conn.execute("SET track_functions = 'all'")
        yield conn


def with_extra_condition(conn: psycopg.Connection[Any], signature: str, condition: str) -> None:
    """Replaces the predicate, in the caller's transaction, by its own rule AND `condition`: a
    new rule added where the rule lives."""
    row = conn.execute("""
        SELECT p.proname, pg_get_function_arguments(p.oid), l.lanname, p.provolatile, p.prosrc
        FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
        WHERE p.oid = %s::regprocedure""", [signature]).fetchone()
    assert row is not None
    name, arguments, language, volatility, body = row
    assert (language, volatility) == ("sql", "i"), f"{signature} must be an inlinable IMMUTABLE SQL predicate"
    expression = re.sub(r"--[^\n]*", "", body).strip()
    assert expression.upper().startswith("SELECT "), body
    conn.execute(f"CREATE OR REPLACE FUNCTION runops.{name}({arguments}) RETURNS boolean LANGUAGE sql IMMUTABLE "
                 f"AS $rule$ SELECT ({expression[len('SELECT '):]}) AND ({condition}) $rule$")


def one(conn: psycopg.Connection[Any], query: str, args: list[Any]) -> tuple[Any, ...]:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return tuple(row)


def calls(conn: psycopg.Connection[Any], signature: str) -> int:
    return int(one(conn, "SELECT coalesce(pg_stat_get_xact_function_calls(%s::regprocedure), 0)", [signature])[0])


def refusal(conn: psycopg.Connection[Any], call: Callable[[], object]) -> str | None:
    """The SQLSTATE the call raised (None when it went through), its effects rolled back."""
    try:
        with conn.transaction():
            call()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def trigger(conn: psycopg.Connection[Any], env: str, options: dict[str, Any]) -> tuple[Any, ...]:
    return one(conn, "SELECT * FROM runops.trigger_run(%s, %s, %s, %s)", [env, TASK, PAYLOAD, Jsonb(options)])


def test_the_fast_paths_hold_the_rules_inlined(admin: psycopg.Connection[Any], env_id: str) -> None:
    with admin.transaction(force_rollback=True):
        trigger(admin, env_id, {})
        trigger(admin, env_id, {"idempotency_key": "inlined"})
        assert calls(admin, "runops.trigger_run(text, text, jsonb, jsonb)") == 2  # counting is on
        assert calls(admin, "runops.admit_new_run(text, text, jsonb, jsonb, text, jsonb)") == 0  # the fast paths
        for inlined in (ENVIRONMENT_RULE, KEY_RULE, "runops.only_a_valid_key(jsonb)",
                        "runops.environment_context_of(runops.runtime_environments, runops.projects, "
                        "runops.organizations, runops.split_settings)",
                        "runops.root_admission(text, text, jsonb)", "runops.mint_id()"):
            assert calls(admin, inlined) == 0, f"{inlined} was called, not inlined"


def test_a_rule_added_to_environment_takes_new_work_holds_on_every_path(admin: psycopg.Connection[Any],
                                                                         env_id: str) -> None:
    with admin.transaction(force_rollback=True):
        batch = one(admin, "SELECT batch_id FROM runops.create_batch(%s, 10)", [env_id])[0]
        paths: dict[str, Callable[[], object]] = {
            "keyless fast path": lambda: trigger(admin, env_id, {}),
            "keyed fast path": lambda: trigger(admin, env_id, {"idempotency_key": "env-rule"}),
            "full path": lambda: trigger(admin, env_id, {"max_attempts": 2}),
            "trigger_failed_task": lambda: one(admin, "SELECT * FROM runops.trigger_failed_task(%s, %s, %s, %s)",
                                               [env_id, TASK, PAYLOAD, Jsonb({"message": "x"})]),
            "batch_trigger": lambda: one(admin, "SELECT * FROM runops.batch_trigger(%s, %s)",
                                         [env_id, Jsonb([ITEM])]),
            "create_batch": lambda: one(admin, "SELECT * FROM runops.create_batch(%s, 1)", [env_id]),
            "append_batch_items": lambda: one(admin, "SELECT * FROM runops.append_batch_items(%s, 0, %s, %s)",
                                              [batch, Jsonb([ITEM]), env_id]),
            "create_waitpoint": lambda: one(admin, "SELECT * FROM runops.create_waitpoint(%s, 'MANUAL')", [env_id]),
        }
        admitted = {name: refusal(admin, call) for name, call in paths.items()}
        assert admitted == dict.fromkeys(paths), "every path admits the environment before the new rule"
        assert calls(admin, "runops.admit_new_run(text, text, jsonb, jsonb, text, jsonb)") == 2  # full, failed task

        with_extra_condition(admin, ENVIRONMENT_RULE, f"ctx.id <> '{env_id}'")
        refused = {name: refusal(admin, call) for name, call in paths.items()}
    assert refused == dict.fromkeys(paths, "RO005")


def test_a_rule_added_to_idempotency_key_is_valid_holds_on_every_path(admin: psycopg.Connection[Any],
                                                                       env_id: str) -> None:
    def paths(key: str) -> dict[str, Callable[[], object]]:
        keyed = {"idempotency_key": key}
        return {
            "keyed fast path": lambda: trigger(admin, env_id, keyed),
            "full path": lambda: trigger(admin, env_id, {**keyed, "max_attempts": 2}),
            "trigger_failed_task": lambda: one(admin, "SELECT * FROM runops.trigger_failed_task(%s, %s, %s, %s, %s)",
                                               [env_id, TASK, PAYLOAD, Jsonb({"message": "x"}), Jsonb(keyed)]),
            "batch_trigger, an item's key": lambda: one(admin, "SELECT * FROM runops.batch_trigger(%s, %s)",
                                                        [env_id, Jsonb([{**ITEM, "options": keyed}])]),
            "batch_trigger, the batch's key": lambda: one(admin, "SELECT * FROM runops.batch_trigger(%s, %s, %s)",
                                                          [env_id, Jsonb([ITEM]), Jsonb(keyed)]),
            "create_batch": lambda: one(admin, "SELECT * FROM runops.create_batch(%s, 1, %s)", [env_id, Jsonb(keyed)]),
            "append_batch_items": lambda: one(admin, "SELECT * FROM runops.append_batch_items(%s, 0, %s, %s)",
                                              [open_batch, Jsonb([{**ITEM, "options": keyed}]), env_id]),
            "create_waitpoint": lambda: one(admin, "SELECT * FROM runops.create_waitpoint(%s, 'MANUAL', %s)",
                                            [env_id, Jsonb(keyed)]),
            "reset_idempotency_key": lambda: one(admin, "SELECT runops.reset_idempotency_key(%s, %s, %s)",
                                                 [env_id, TASK, key]),
        }

    with admin.transaction(force_rollback=True):
        open_batch = one(admin, "SELECT batch_id FROM runops.create_batch(%s, 10)", [env_id])[0]
        accepted = {name: refusal(admin, call) for name, call in paths("refused-before").items()}
        assert accepted == dict.fromkeys(accepted), "every path takes the key before the new rule"

        with_extra_condition(admin, KEY_RULE, "key NOT LIKE 'refused-%'")
        refused = {name: refusal(admin, call) for name, call in paths("refused-after").items()}
        # A key the new rule lets through still goes through the fast path.
        assert refusal(admin, lambda: trigger(admin, env_id, {"idempotency_key": "allowed"})) is None
    assert refused == dict.fromkeys(refused, "RO006")
