"""Split control: status, the fail-closed sentinel, audit, and the client's identity check."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.errors import SplitRefused, WrongStore
from runops.ops import migrate
from tests.conftest import Stores, sqlstate_of


def test_split_status_reports_both_identities_and_the_kinds(client: RunOps, new_env) -> None:
    status = client.split_status()
    assert set(status) >= {"enabled", "distinct", "reason", "control_plane", "run_ops", "default_mint_kind",
                           "org_mint_kinds"}
    assert status["enabled"] is True and status["distinct"] is True
    assert status["control_plane"]["store_role"] == "CONTROL_PLANE"
    assert status["run_ops"]["store_role"] == "RUN_OPS"
    assert status["org_mint_kinds"][new_env.organization_id] == "ksuid"


def test_split_control_functions_belong_to_the_control_plane(ro: psycopg.Connection) -> None:
    for call in ("runops.split_status()", "runops.enable_split()", "runops.disable_split()",
                 "runops.set_default_mint_kind('cuid')"):
        with pytest.raises(psycopg.Error) as err:
            ro.execute(f"SELECT {call}")
        assert sqlstate_of(err.value) == "RO002", call


@pytest.fixture
def self_wired(scratch_db) -> str:
    """A control plane whose FDW points at its own database."""
    url = scratch_db("selfwired")
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.wire_to_self(conn, url)
    return url


def test_enable_split_refuses_the_same_database(self_wired: str) -> None:
    with psycopg.connect(self_wired, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT runops.enable_split()")
        assert sqlstate_of(err.value) == "RO007"
        assert conn.execute("SELECT enabled, ever_enabled FROM runops.split_settings").fetchone() == (False, False)
        assert conn.execute("SELECT count(*) FROM runops.split_audit").fetchone()[0] == 0
    with RunOps(self_wired) as single, pytest.raises(SplitRefused):
        single.enable_split()


def test_enable_split_refuses_when_the_probe_fails(self_wired: str) -> None:
    with psycopg.connect(self_wired, autocommit=True) as conn:
        conn.execute("ALTER SERVER runops_peer OPTIONS (SET port '1')")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT runops.enable_split()")
        assert sqlstate_of(err.value) == "RO007"
        assert "probe failed" in err.value.diag.message_primary


def test_enable_split_refuses_a_store_that_is_not_wired(scratch_db) -> None:
    url = scratch_db("unwired")
    migrate.upgrade(CONTROL_PLANE, url)
    with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT runops.enable_split()")
    assert sqlstate_of(err.value) == "RO007"


@pytest.fixture
def same_cluster_pair(stores: Stores, scratch_db) -> Iterator[tuple[str, str]]:
    """A control plane and a run-ops store as two databases of one cluster, wired by `migrate`."""
    cp_url, ro_url = scratch_db("samecp"), scratch_db("samero")
    migrate.migrate(cp_url, ro_url)
    yield cp_url, ro_url
    migrate.drop_mirror(cp_url, ro_url)


def test_same_cluster_different_database_is_accepted_with_a_warning(same_cluster_pair: tuple[str, str]) -> None:
    cp_url, _ = same_cluster_pair
    notices: list[str] = []
    with psycopg.connect(cp_url, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        status = conn.execute("SELECT runops.enable_split()").fetchone()[0]
        assert status["enabled"] is True and status["distinct"] is True
        assert any("same cluster" in n or "cluster" in n for n in notices), notices
        audit = conn.execute("SELECT actor, action, verdict FROM runops.split_audit ORDER BY id").fetchall()
        assert audit == [("postgres", "enable_split", "ACCEPTED_WITH_WARNING")]
        conn.execute("SELECT runops.disable_split()")
        assert conn.execute("SELECT action, verdict FROM runops.split_audit ORDER BY id DESC LIMIT 1").fetchone() == \
            ("disable_split", "ACCEPTED")


def test_the_client_refuses_when_its_run_ops_url_is_not_the_fdw_target(stores: Stores,
                                                                      same_cluster_pair: tuple[str, str]) -> None:
    _, other_run_ops = same_cluster_pair
    migrate.set_app_password(other_run_ops, stores.local.app_password)
    wrong = other_run_ops.replace("postgres@", f"runops_app:{stores.local.app_password}@")
    with RunOps(stores.app[CONTROL_PLANE], wrong) as c, pytest.raises(SplitRefused) as err:
        c.enable_split()
    assert "different database" in err.value.message


def test_split_control_through_the_client_on_the_wrong_store(stores: Stores) -> None:
    with RunOps(stores.app[RUN_OPS]) as c, pytest.raises(WrongStore):
        c.split_status()
