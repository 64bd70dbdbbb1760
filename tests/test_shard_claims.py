"""One key, one run across the control plane and an environment's run-ops shard (SPEC §6, §9
[1.3]; docs/scale-out.md "Mirror and FDW per shard"): the control plane reaches every shard
through its own FDW server (runops_peer for shard 0, runops_peer_<k> for shard k), and its claims
for an environment go to the ledger of the shard that environment lives on — where that
environment's NEW triggers claim. On two shards on their own clusters, behind a router (the
fixture of tests/test_router.py)."""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.ops import migrate
from tests.concurrent_calls import race
from tests.conftest import sqlstate_of
from tests.test_router import Sharded, one, sharded_stores
from tests.test_seam_idempotency import retrying, trigger
from tests.test_shards import encode

SHARDS = 2


@pytest.fixture(scope="module")
def sharded() -> Iterator[Sharded]:
    with sharded_stores(SHARDS) as made:
        yield made


def wait_on_shard(sharded: Sharded, k: int, query: str, params: Any) -> None:
    """Until shard k's mirror answers ``query`` with true."""
    with psycopg.connect(sharded.shard_admin(k), autocommit=True) as shard:
        for _ in range(300):
            if one(shard, query, params)[0]:
                return
            time.sleep(0.1)
    raise AssertionError(f"shard {k}'s mirror did not catch up: {query}")


def environment_on_shard(sharded: Sharded, shard: int) -> tuple[str, str]:
    """(organization, environment) of a new cuid environment pinned to ``shard``, with one LEGACY
    run, whose organization then mints ksuid: from here on the control plane mints LEGACY children
    of that run while the shard mints NEW roots — both stores mint for it (the split)."""
    with psycopg.connect(sharded.admin(0), autocommit=True) as cp:
        org = one(cp, "SELECT runops.create_organization(%s, %s)",
                  [f"o{secrets.token_hex(4)}", Jsonb({"mint_kind": "cuid"})])[0]
        project = one(cp, "SELECT runops.create_project(%s, 'p')", [org])[0]
        env = one(cp, "SELECT runops.create_environment(%s, 'e', 'PRODUCTION')", [project])[0]
        assert one(cp, "SELECT runops.pin_environment_shard(%s, %s)", [env, shard])[0] == shard
    wait_on_shard(sharded, shard, "SELECT EXISTS (SELECT FROM runops.environment_shards "
                                  "WHERE environment_id = %s AND shard = %s)", [env, shard])
    return org, env


def mint_ksuid(sharded: Sharded, org: str, shard: int) -> None:
    with psycopg.connect(sharded.admin(0), autocommit=True) as cp:
        cp.execute("SELECT runops.set_mint_kind(%s, 'ksuid')", [org])
    wait_on_shard(sharded, shard, "SELECT EXISTS (SELECT FROM runops.organizations "
                                  "WHERE id = %s AND mint_kind = 'ksuid')", [org])


def key_holders(sharded: Sharded, env: str) -> list[tuple[str, str]]:
    """(id, store) of every run, in every store of the deployment, holding a live key of ``env``."""
    holders: list[tuple[str, str]] = []
    urls = {"CONTROL_PLANE": sharded.admin(0), **{f"shard {k}": sharded.shard_admin(k) for k in range(SHARDS)}}
    for store, url in urls.items():
        with psycopg.connect(url) as conn:
            rows = conn.execute("""
                SELECT id FROM runops.runs
                WHERE environment_id = %s AND idempotency_key_hash IS NOT NULL
                  AND NOT runops.idempotency_key_is_dead(status, idempotency_key_expires_at, now())""",
                                [env]).fetchall()
        holders += [(r[0], store) for r in rows]
    return holders


def doctor_check(sharded: Sharded, name: str) -> dict[str, Any]:
    """One check of `runops doctor` run as an operator runs it, given every shard's admin URL."""
    from tests.test_first_hour import runops

    _, out, err = runops("--json", "doctor", cwd=Path(tempfile.gettempdir()), timeout=300,
                         RUNOPS_CONTROL_PLANE_ADMIN_URL=sharded.admin(0),
                         RUNOPS_RUN_OPS_ADMIN_URL=",".join(sharded.shard_admin(k) for k in range(SHARDS)))
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert name in checks, (sorted(checks), err)
    return dict(checks[name])


def ledger(sharded: Sharded, k: int, env: str) -> list[str]:
    with psycopg.connect(sharded.shard_admin(k)) as conn:
        return [r[0] for r in conn.execute("SELECT run_id FROM runops.idempotency_claims WHERE environment_id = %s",
                                           [env]).fetchall()]


def test_the_control_plane_reaches_every_shard_through_its_own_server(sharded: Sharded) -> None:
    with psycopg.connect(sharded.admin(0)) as cp:
        cp.execute("SET ROLE runops_owner")
        for k, schema in enumerate(["runops_peer", "runops_peer_1"]):
            with psycopg.connect(sharded.shard_admin(k)) as shard:
                expected = one(shard, "SELECT system_identifier, database_oid FROM runops.store_identity_view")
            seen = one(cp, f"SELECT system_identifier, database_oid FROM {schema}.store_identity_view")
            assert seen == expected, schema


@pytest.mark.parametrize("round_", range(2))
def test_a_key_raced_from_the_control_plane_and_shard_1_yields_one_run(sharded: Sharded, round_: int) -> None:
    """16 connections per store: LEGACY children on the control plane and NEW roots on shard 1
    trigger the same global keys of an environment on shard 1 at once."""
    org, env = environment_on_shard(sharded, 1)
    with psycopg.connect(sharded.app(0), autocommit=True) as conn:
        parent = trigger(conn, env, "parent")[0]
    mint_ksuid(sharded, org, 1)
    keys = [f"race-{round_}-{i}" for i in range(4)]
    conns = [psycopg.connect(url, autocommit=True) for url in [sharded.app(0), sharded.shard_app(1)] * 16]
    try:
        def call(i: int) -> Callable[[], list[tuple[str, bool, str, str]]]:
            conn = conns[i]
            options: dict[str, Any] = {"idempotency_key_scope": "global"}
            if i % 2 == 0:
                options["parent_run_id"] = parent
            return lambda: [trigger(conn, env, idempotency_key=k, **options) for k in keys]

        results = race([call(i) for i in range(len(conns))], timeout=None)
        assert not [r for r in results if isinstance(r, BaseException)], results
    finally:
        for c in conns:
            c.close()
    for j in range(len(keys)):
        assert len({r[j][0] for r in results}) == 1, [r[j] for r in results]
    holders = key_holders(sharded, env)
    assert len(holders) == len(keys), holders
    # Every claim of the environment is in its shard's ledger, none in shard 0's.
    assert sorted(ledger(sharded, 1, env)) == sorted(h[0] for h in holders)
    assert ledger(sharded, 0, env) == []


def test_a_legacy_holder_is_found_from_shard_1_and_a_new_one_from_the_control_plane(sharded: Sharded) -> None:
    org, env = environment_on_shard(sharded, 1)
    with psycopg.connect(sharded.app(0), autocommit=True) as cp, \
            psycopg.connect(sharded.shard_app(1), autocommit=True) as shard:
        parent = trigger(cp, env, "parent")[0]
        mint_ksuid(sharded, org, 1)
        legacy = trigger(cp, env, idempotency_key="a", idempotency_key_scope="global", parent_run_id=parent)
        assert legacy[1:] == (False, "PENDING", "LEGACY")
        assert trigger(shard, env, idempotency_key="a", idempotency_key_scope="global")[:2] == (legacy[0], True)
        new = trigger(shard, env, idempotency_key="b", idempotency_key_scope="global")
        assert new[1] is False and new[3] == "NEW"
        again = trigger(cp, env, idempotency_key="b", idempotency_key_scope="global", parent_run_id=parent)
        assert again[:2] == (new[0], True)
    assert len(key_holders(sharded, env)) == 2


def test_enable_splits_backfill_claims_each_key_in_its_environments_shard(sharded: Sharded) -> None:
    """The first enable_split claims every live key of the control plane (SPEC §6): a key of an
    environment on shard 1 in shard 1's ledger. Played in one transaction, rolled back, in which
    the split was never enabled."""
    _, env = environment_on_shard(sharded, 1)
    with psycopg.connect(sharded.admin(0)) as cp:
        cp.execute("UPDATE runops.split_settings SET ever_enabled = false")
        cp.execute("SET LOCAL ROLE runops_owner")
        cp.execute("SET LOCAL search_path = runops, pg_catalog, pg_temp")
        for key in ("a", "b", "c"):
            cp.execute("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)", [env, Jsonb({"idempotency_key": key})])
        claimed = "SELECT count(*) FROM {}.idempotency_claims WHERE environment_id = %s"
        assert one(cp, claimed.format("runops_peer_1"), [env])[0] == 0
        assert one(cp, "SELECT runops.backfill_claims()")[0] >= 3
        assert one(cp, claimed.format("runops_peer_1"), [env])[0] == 3
        assert one(cp, claimed.format("runops_peer"), [env])[0] == 0
        cp.rollback()


def test_the_control_plane_reads_a_new_id_on_the_shard_it_names(sharded: Sharded) -> None:
    org, env = environment_on_shard(sharded, 1)
    mint_ksuid(sharded, org, 1)
    with psycopg.connect(sharded.shard_app(1), autocommit=True) as shard:
        run_id = trigger(shard, env)[0]
    with psycopg.connect(sharded.app(0), autocommit=True) as cp:
        assert one(cp, "SELECT runops.shard_of(%s)", [run_id])[0] == 1
        row = one(cp, "SELECT id, environment_id, status FROM runops.get_run(%s)", [run_id])
        assert row == (run_id.removeprefix("run_"), env, "PENDING")
        assert one(cp, "SELECT count(*) FROM runops.get_run(%s, %s)", [run_id, env])[0] == 1
        assert one(cp, "SELECT count(*) FROM runops.get_run(%s, 'env_other')", [run_id])[0] == 0
        # An id naming a shard this deployment does not have: no row, as on the router.
        stranger = "run_" + encode(bytes([0x7F, 0, 0, 0, 9, 5]) + secrets.token_bytes(14))
        assert one(cp, "SELECT count(*) FROM runops.get_run(%s)", [stranger])[0] == 0


def test_an_environment_with_runs_on_shard_1_cannot_be_pinned_elsewhere(sharded: Sharded) -> None:
    org, env = environment_on_shard(sharded, 1)
    _, idle = environment_on_shard(sharded, 1)
    mint_ksuid(sharded, org, 1)
    with psycopg.connect(sharded.shard_app(1), autocommit=True) as shard:
        trigger(shard, env)
    with psycopg.connect(sharded.admin(0), autocommit=True) as cp:
        with pytest.raises(psycopg.Error) as refused:
            cp.execute("SELECT runops.pin_environment_shard(%s, 0)", [env])
        assert sqlstate_of(refused.value) == "RO003"
        assert "already has runs on shard 1" in str(refused.value)
        assert one(cp, "SELECT runops.environment_shard(%s)", [env])[0] == 1
        # Without runs it may still move.
        assert one(cp, "SELECT runops.pin_environment_shard(%s, 0)", [idle])[0] == 0


def test_a_shard_the_control_plane_has_no_server_for_refuses_until_migrate_wires_it(sharded: Sharded) -> None:
    org, env = environment_on_shard(sharded, 1)
    with psycopg.connect(sharded.app(0), autocommit=True) as cp:
        parent = trigger(cp, env, "parent")[0]
    mint_ksuid(sharded, org, 1)
    with psycopg.connect(sharded.shard_app(1), autocommit=True) as shard:
        new_run = trigger(shard, env)[0]
    wired = doctor_check(sharded, "fdw.control_plane_to_run_ops_shard_1")
    assert wired["severity"] == "ok", wired
    with psycopg.connect(sharded.admin(0), autocommit=True) as admin:
        admin.execute("DROP SCHEMA runops_peer_1 CASCADE")
        admin.execute("DROP SERVER runops_peer_1 CASCADE")
    try:
        with psycopg.connect(sharded.app(0), autocommit=True) as cp:
            with pytest.raises(psycopg.Error) as refused:
                cp.execute("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                           [env, Jsonb({"idempotency_key": "k", "idempotency_key_scope": "global",
                                        "parent_run_id": parent})])
            assert sqlstate_of(refused.value) == "RO009"
            diag = refused.value.diag
            assert diag.message_primary is not None and "lives on run-ops shard 1" in diag.message_primary
            assert "runops_peer_1" in diag.message_primary
            assert diag.message_hint is not None and "runops migrate" in diag.message_hint
        assert key_holders(sharded, env) == [] and ledger(sharded, 0, env) == []
        with psycopg.connect(sharded.app(0), autocommit=True) as cp:
            with pytest.raises(psycopg.Error) as unread:
                cp.execute("SELECT * FROM runops.get_run(%s)", [new_run])
            assert sqlstate_of(unread.value) == "RO009"
            assert "lives on run-ops shard 1" in str(unread.value)
            # Nor can it tell whether the environment has runs there: no pin.
            with pytest.raises(psycopg.Error) as unpinned:
                cp.execute("SELECT runops.pin_environment_shard(%s, 0)", [env])
            assert sqlstate_of(unpinned.value) == "RO009"
        unwired = doctor_check(sharded, "fdw.control_plane_to_run_ops_shard_1")
        assert unwired["severity"] == "fail" and "no FDW server for run-ops shard 1" in unwired["detail"], unwired
    finally:
        # The next migrate wires it again (and re-running migrate changes nothing else).
        migrate.migrate_shards(sharded.admin(0), [sharded.shard_admin(k) for k in range(SHARDS)],
                               router_url=sharded.router_admin)
        for i in range(SHARDS + 1):
            migrate.set_app_password(sharded.admin(i), sharded.password)
    with psycopg.connect(sharded.app(0), autocommit=True) as cp:
        run = retrying(lambda: trigger(cp, env, idempotency_key="k", idempotency_key_scope="global",
                                       parent_run_id=parent))
    assert ledger(sharded, 1, env) == [run[0].removeprefix("run_")] and ledger(sharded, 0, env) == []


@pytest.mark.faults
def test_a_stopped_shard_fails_only_the_claims_of_its_environments(sharded: Sharded) -> None:
    """The control plane's keyed LEGACY trigger for an environment on a stopped shard is RO009
    naming that shard (never a claim elsewhere); an environment on shard 0 goes on."""
    environments = {}
    for k in (0, 1):
        org, env = environment_on_shard(sharded, k)
        with psycopg.connect(sharded.app(0), autocommit=True) as cp:
            parent = trigger(cp, env, "parent")[0]
        mint_ksuid(sharded, org, k)
        environments[k] = (env, parent)

    def keyed(k: int, key: str) -> tuple[str, bool, str, str]:
        env, parent = environments[k]
        with psycopg.connect(sharded.app(0), autocommit=True) as cp:
            return trigger(cp, env, idempotency_key=key, idempotency_key_scope="global", parent_run_id=parent)

    sharded.clusters[2].stop(sharded.bindir)  # clusters[0] is the control plane: shard 1
    try:
        with pytest.raises(psycopg.Error) as refused:
            keyed(1, "down")
        assert sqlstate_of(refused.value) == "RO009"
        assert "run-ops shard 1, which keeps this environment's idempotency claim ledger, is unavailable" \
            in str(refused.value)
        assert keyed(0, "up")[1:] == (False, "PENDING", "LEGACY")
    finally:
        sharded.clusters[2].start(sharded.bindir)
    for _ in range(100):
        try:
            run = keyed(1, "down")
            break
        except psycopg.Error as exc:
            assert sqlstate_of(exc) == "RO009", exc
            time.sleep(0.2)
    else:
        raise AssertionError("shard 1 did not come back")
    assert run[1:] == (False, "PENDING", "LEGACY")
    assert ledger(sharded, 1, environments[1][0]) == [run[0].removeprefix("run_")]
