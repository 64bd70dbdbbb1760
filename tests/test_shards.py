"""Shard-aware ids and the environment -> shard assignment (SPEC §9 [1.3], docs/scale-out.md).

On the session's stores (one run-ops store: shard 0 of 1). Where a test plays another shard it
changes the run-ops store's store_config inside a transaction it rolls back, so no other test
ever sees it."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from tests.conftest import Env, Stores, sqlstate_of

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def raw_bytes(ksuid: str) -> bytes:
    """The 20 raw bytes of a KSUID (bare or friendly), decoded in full."""
    bare = ksuid.split("_", 1)[-1]
    n = 0
    for ch in bare:
        n = n * 62 + ALPHABET.index(ch)
    return n.to_bytes(20, "big")


def encode(raw: bytes) -> str:
    n = int.from_bytes(raw, "big")
    out = ""
    for _ in range(27):
        n, d = divmod(n, 62)
        out = ALPHABET[d] + out
    return out


def python_shard(environment_id: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(environment_id.encode()).digest()[:4], "big") % count


@pytest.fixture
def as_shard(stores: Stores) -> Iterator[Callable[[int, int], psycopg.Connection[Any]]]:
    """A superuser connection to the run-ops store inside an open transaction in which the store
    is shard `number` of `count`; rolled back at the end."""
    opened: list[psycopg.Connection[Any]] = []

    def open_(number: int, count: int) -> psycopg.Connection[Any]:
        conn = psycopg.connect(stores.admin[RUN_OPS])
        opened.append(conn)
        conn.execute("UPDATE runops.store_config SET shard_number = %s, shard_count = %s", [number, count])
        conn.execute("SET LOCAL search_path = runops, pg_catalog, pg_temp")  # the internal minters' path
        return conn

    yield open_
    for conn in opened:
        conn.rollback()
        conn.close()


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def test_a_single_store_is_shard_0_and_names_it_in_every_id(client: RunOps, ro: psycopg.Connection[Any],
                                                            new_env: Env) -> None:
    runs = [client.trigger_run(new_env.environment_id, "t").run_id for _ in range(5)]
    batch = client.batch_trigger(new_env.environment_id, [{"task": "t"}] * 3)
    for run_id in runs + list(batch.run_ids):
        assert raw_bytes(run_id)[4] == 0
        assert scalar(ro, "SELECT runops.shard_of(%s)", [run_id]) == 0
    assert scalar(ro, "SELECT runops.shard_of(%s)", ["run_c" + "0" * 24]) is None     # LEGACY
    assert scalar(ro, "SELECT runops.shard_of(%s)", ["nonsense"]) is None             # unclassifiable
    assert scalar(ro, "SELECT runops.shard_of(NULL)") is None


@pytest.mark.parametrize("shard", [1, 3, 200, 255])
def test_every_minter_writes_the_stores_shard(as_shard: Callable[[int, int], psycopg.Connection[Any]],
                                             shard: int) -> None:
    conn = as_shard(shard, 256)
    ids = [scalar(conn, "SELECT runops.generate_ksuid()") for _ in range(20)]
    ids += [scalar(conn, "SELECT runops.next_ksuid()") for _ in range(50)]
    ids += scalar(conn, "SELECT runops.mint_ids(500)")
    for id_ in ids:
        raw = raw_bytes(id_)
        assert raw[4] == shard, id_
        assert 1 <= raw[5] <= 127
        assert scalar(conn, "SELECT runops.shard_of(%s)", [id_]) == shard
        assert scalar(conn, "SELECT runops.classify_residency(%s)", [id_]) == "NEW"


def test_no_counter_value_changes_the_shard_byte(ro: psycopg.Connection[Any]) -> None:
    """The minter's guarantee, at its edges: any 23-character prefix it keeps (byte 5 in 1..127),
    with the lowest and highest 4-digit counter, decodes to the prefix's shard — in SQL and by
    full decoding. Byte 5 at 0 or 128+ is where a counter could reach the shard byte."""
    for shard in (0, 1, 127, 128, 254, 255):
        for b5 in (1, 2, 126, 127):
            for fill in (0x00, 0xFF):
                raw = bytes([0x12, 0x34, 0x56, 0x78, shard, b5]) + bytes([fill]) * 14
                prefix = encode(raw)[:23]
                for counter in ("0000", "zzzz"):
                    id_ = prefix + counter
                    assert raw_bytes(id_)[4] == shard
                    assert scalar(ro, "SELECT runops.shard_of(%s)", [id_]) == shard, (id_, shard, b5, fill)


def test_ids_older_than_shards_are_shard_0(ro_admin: psycopg.Connection[Any], as_shard) -> None:
    conn = as_shard(2, 4)
    minted = scalar(conn, "SELECT runops.generate_ksuid()")
    seconds = int.from_bytes(raw_bytes(minted)[:4], "big")
    assert scalar(conn, "SELECT runops.shard_of(%s)", [minted]) == 2
    conn.execute("UPDATE runops.store_config SET shard_ids_since = %s", [seconds + 1])
    assert scalar(conn, "SELECT runops.shard_of(%s)", [minted]) == 0
    conn.execute("UPDATE runops.store_config SET shard_ids_since = %s", [seconds])
    assert scalar(conn, "SELECT runops.shard_of(%s)", [minted]) == 2


def test_a_store_refuses_writes_naming_another_shards_id(client: RunOps, stores: Stores, new_env: Env,
                                                         as_shard) -> None:
    run_id = client.trigger_run(new_env.environment_id, "t").run_id
    conn = as_shard(1, 4)  # the store now plays shard 1 of 4; its runs name shard 0
    conn.execute("SET ROLE runops_app")
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM runops.cancel_run(%s)", [run_id])
    assert sqlstate_of(exc.value) == "RO002"
    assert "lives on run-ops shard 0, not on this shard 1" in str(exc.value)
    assert exc.value.diag.message_detail == "owning_store=RUN_OPS"
    conn.rollback()
    conn.execute("UPDATE runops.store_config SET shard_number = 1, shard_count = 4")
    conn.execute("SET ROLE runops_app")
    # An id of a shard the deployment does not have: a clear RO002, and a read finds no row.
    stranger = encode(bytes([0x12, 0x34, 0x56, 0x78, 9, 5]) + secrets.token_bytes(14))
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM runops.start_attempt(%s, 'w')", ["run_" + stranger])
    assert sqlstate_of(exc.value) == "RO002"
    assert "names run-ops shard 9, which this deployment does not have (shards 0 to 3)" in str(exc.value)
    conn.rollback()
    conn.execute("UPDATE runops.store_config SET shard_number = 1, shard_count = 4")
    conn.execute("SET ROLE runops_app")
    assert conn.execute("SELECT * FROM runops.get_run(%s)", ["run_" + stranger]).fetchall() == []
    # A pre-minted id of another shard is refused before anything is written.
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                     [new_env.environment_id, Jsonb({"run_id": run_id})])
    assert sqlstate_of(exc.value) == "RO002"


def test_single_store_writes_accept_any_new_id(client: RunOps, new_env: Env) -> None:
    """N = 1 behaves as before: an id with any byte 4 is this store's (not found, not RO002)."""
    from runops.errors import NotFound

    stranger = encode(bytes([0x12, 0x34, 0x56, 0x78, 9, 5]) + secrets.token_bytes(14))
    with pytest.raises(NotFound):
        client.cancel_run("run_" + stranger)


def test_new_environments_are_assigned_by_a_stable_hash(client: RunOps, cp_admin: psycopg.Connection[Any],
                                                        ro: psycopg.Connection[Any], cp: psycopg.Connection[Any],
                                                        make_env: Callable[..., Env]) -> None:
    env = make_env("ksuid")
    assert scalar(cp, "SELECT runops.environment_shard(%s)", [env.environment_id]) == 0
    assert client.wait_for_mirror()
    assert scalar(ro, "SELECT runops.environment_shard(%s)", [env.environment_id]) == 0
    assert scalar(ro, "SELECT runops.environment_shard('nope')") is None
    with cp_admin.transaction():
        cp_admin.execute("UPDATE runops.store_config SET shard_count = 8")
        project = scalar(cp_admin, "SELECT runops.create_project(%s, %s)", [env.organization_id, "p2"])
        ids = [scalar(cp_admin, "SELECT runops.create_environment(%s, %s, 'PRODUCTION')", [project, f"e{i}"])
               for i in range(40)]
        shards = [scalar(cp_admin, "SELECT runops.environment_shard(%s)", [i]) for i in ids]
        assert shards == [python_shard(i, 8) for i in ids]
        assert len(set(shards)) > 4  # 40 environments over 8 shards: spread, not all on one
        # Changing the count later moves nobody: the assignment was written at creation.
        cp_admin.execute("UPDATE runops.store_config SET shard_count = 3")
        assert [scalar(cp_admin, "SELECT runops.environment_shard(%s)", [i]) for i in ids] == shards
        raise psycopg.Rollback


def test_pinning_before_the_first_new_run_only(client: RunOps, cp_admin: psycopg.Connection[Any],
                                               cp: psycopg.Connection[Any], make_env: Callable[..., Env]) -> None:
    env = make_env("ksuid").environment_id
    with pytest.raises(psycopg.Error) as exc:
        cp.execute("SELECT runops.pin_environment_shard(%s, 1)", [env])
    assert sqlstate_of(exc.value) == "RO006"  # one shard configured: only 0 exists
    with pytest.raises(psycopg.Error) as exc:
        cp.execute("SELECT runops.pin_environment_shard('nope', 0)")
    assert sqlstate_of(exc.value) == "RO004"
    with cp_admin.transaction():
        cp_admin.execute("UPDATE runops.store_config SET shard_count = 4")
        assert scalar(cp_admin, "SELECT runops.pin_environment_shard(%s, 3)", [env]) == 3
        assert scalar(cp_admin, "SELECT runops.environment_shard(%s)", [env]) == 3
        raise psycopg.Rollback
    client.trigger_run(env, "t")  # its first NEW run, on shard 0
    with cp_admin.transaction():
        cp_admin.execute("UPDATE runops.store_config SET shard_count = 4")
        with pytest.raises(psycopg.Error) as exc:
            cp_admin.execute("SELECT runops.pin_environment_shard(%s, 3)", [env])
        assert sqlstate_of(exc.value) == "RO003"
        raise psycopg.Rollback


def test_pin_is_a_control_plane_call(ro: psycopg.Connection[Any], new_env: Env) -> None:
    with pytest.raises(psycopg.Error) as exc:
        ro.execute("SELECT runops.pin_environment_shard(%s, 0)", [new_env.environment_id])
    assert sqlstate_of(exc.value) == "RO002"


def test_shard_of_is_the_same_on_both_stores(cp: psycopg.Connection[Any], ro: psycopg.Connection[Any]) -> None:
    for shard in (0, 5, 255):
        id_ = encode(bytes([0x12, 0x34, 0x56, 0x78, shard, 64]) + secrets.token_bytes(14))
        assert scalar(cp, "SELECT runops.shard_of(%s)", ["run_" + id_]) == shard
        assert scalar(ro, "SELECT runops.shard_of(%s)", [id_]) == shard
    assert CONTROL_PLANE != RUN_OPS


@pytest.mark.parametrize("options", [{}, {"idempotency_key": "k"}, {"tags": ["a"]}])
def test_a_shard_refuses_new_work_for_another_shards_environment(new_env: Env, as_shard,
                                                                options: dict[str, Any]) -> None:
    conn = as_shard(1, 4)  # the environment is assigned to shard 0
    conn.execute("SET ROLE runops_app")
    for query, params in [("SELECT * FROM runops.trigger_run(%s, 't', '{}', %s)",
                           [new_env.environment_id, Jsonb(options)]),
                          ("SELECT * FROM runops.create_waitpoint(%s, 'MANUAL', %s)",
                           [new_env.environment_id, Jsonb({k: v for k, v in options.items() if k != "tags"})]),
                          ("SELECT * FROM runops.batch_trigger(%s, %s, %s)",
                           [new_env.environment_id, Jsonb([{"task": "t"}]),
                            Jsonb({k: v for k, v in options.items() if k != "tags"})])]:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(query, params)
        assert sqlstate_of(exc.value) == "RO002", query
        assert f"environment {new_env.environment_id} lives on run-ops shard 0, not on this shard 1" in str(exc.value)
        conn.rollback()
        conn.execute("UPDATE runops.store_config SET shard_number = 1, shard_count = 4")
        conn.execute("SET ROLE runops_app")
    conn.execute("RESET ROLE")
    conn.execute("UPDATE runops.store_config SET shard_number = 0")
    conn.execute("SET ROLE runops_app")
    assert scalar(conn, "SELECT status FROM runops.trigger_run(%s, 't', '{}', %s)",
                  [new_env.environment_id, Jsonb(options)]) == "PENDING"


def test_the_mirror_pull_carries_assignments(ro_admin: psycopg.Connection[Any], new_env: Env) -> None:
    """Where replication is not applying, tick's pull through the FDW refreshes the assignment too."""
    with ro_admin.transaction():
        ro_admin.execute("UPDATE runops.environment_shards SET shard = 5, assigned_at = '2000-01-01Z' "
                         "WHERE environment_id = %s", [new_env.environment_id])
        ro_admin.execute("SELECT runops.pull_tenant_mirror()")
        assert scalar(ro_admin, "SELECT shard FROM runops.environment_shards WHERE environment_id = %s",
                      [new_env.environment_id]) == 0
        raise psycopg.Rollback


def test_the_clients_decoding_is_the_sqls(ro: psycopg.Connection[Any]) -> None:
    """runops.ids.shard_of (the client's routing, no round trip) answers what SQL shard_of_id
    answers, for every shard byte, at the cut-over second's edges, and for other shapes."""
    from runops import ids

    cases: list[tuple[str | None, int]] = []
    for shard in (0, 1, 2, 3, 127, 128, 255):
        for b5 in (1, 64, 127):
            for fill in (0x00, 0xFF, None):
                raw = bytes([0x12, 0x34, 0x56, 0x78, shard, b5]) + (secrets.token_bytes(14) if fill is None
                                                                    else bytes([fill]) * 14)
                bare = encode(raw)
                for id_ in (bare, "run_" + bare, "batch_" + bare[:23] + "zzzz"):
                    for since in (0, 0x12345678, 0x12345679):
                        cases.append((id_, since))
    cases += [("run_c" + "0" * 24, 0), ("nonsense", 0), (None, 0), ("aWgEPTl1tmebfsQzFP4bxwgy80V", 0)]
    rows = ro.execute("SELECT runops.shard_of_id(c.id, c.since) FROM unnest(%s::text[], %s::integer[]) "
                      "WITH ORDINALITY AS c(id, since, n) ORDER BY c.n",
                      [[c[0] for c in cases], [c[1] for c in cases]]).fetchall()
    assert [ids.shard_of(id_, since) for id_, since in cases] == [r[0] for r in rows]
    assert {ids.shard_of(id_, 0) for id_, _ in cases if id_ and id_.startswith("run_")} >= {0, 3, 128, 255}
