"""Residency is a pure function of the id's shape, the same in SQL and in Python."""

from __future__ import annotations

import datetime as dt
import string

import psycopg
import pytest
from cyksuid.v2 import parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runops import ids
from runops.errors import UnclassifiableId
from tests.conftest import sqlstate_of

CUID = "cjld2cjxh0000qzrmn831i7rn"
KSUID = "0ujtsYcgvSTl8PAuAdqWYSMnLOv"  # Segment's reference vector

base62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
base36 = string.digits + string.ascii_lowercase

cuid_like = st.builds(lambda s: "c" + s, st.text(base36, min_size=23, max_size=25))
ksuid_like = st.text(base62, min_size=26, max_size=28)
near_max = st.builds(lambda s: "aWgEPTl1tmebfsQzFP4bxwgy8" + s, st.text(base62, min_size=2, max_size=2))
prefixed = st.builds(lambda p, s: p + s, st.sampled_from(["run_", "batch_", "Run_", "run__", "x_", "_", ""]),
                     st.one_of(cuid_like, ksuid_like))
arbitrary = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
candidates = st.one_of(cuid_like, ksuid_like, near_max, prefixed, arbitrary,
                       st.builds(lambda s: s + "\n", cuid_like))


@pytest.mark.parametrize(("value", "expected"), [
    (CUID, "LEGACY"), ("run_" + CUID, "LEGACY"), (KSUID, "NEW"), ("batch_" + KSUID, "NEW"),
    ("aWgEPTl1tmebfsQzFP4bxwgy80V", "NEW"), ("aWgEPTl1tmebfsQzFP4bxwgy80W", None),
    ("000000000000000000000000000", "NEW"), ("run_run_" + CUID, None), ("C" + CUID[1:], None),
    (CUID + "\n", None), ("", None), ("run_", None), ("0ujtsYcgvSTl8PAuAdqWYSMnLO", None),
])
def test_known_shapes_classify_the_same_in_sql_and_python(cp: psycopg.Connection, value: str,
                                                          expected: str | None) -> None:
    assert ids.try_classify_residency(value) == expected
    assert cp.execute("SELECT runops.try_classify_residency(%s)", [value]).fetchone()[0] == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(candidates, min_size=1, max_size=40))
def test_sql_and_python_classifiers_agree_on_generated_strings(cp: psycopg.Connection, values: list[str]) -> None:
    rows = cp.execute("SELECT v, runops.try_classify_residency(v) "
                      "FROM unnest(%s::text[]) WITH ORDINALITY AS t(v, i) ORDER BY i", [values]).fetchall()
    assert [r[1] for r in rows] == [ids.try_classify_residency(v) for v in values]


def test_classify_residency_raises_ro001_for_unclassifiable_ids(cp: psycopg.Connection) -> None:
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT runops.classify_residency('not-an-id')")
    assert sqlstate_of(err.value) == "RO001"
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT runops.classify_residency(NULL)")
    assert sqlstate_of(err.value) == "RO001"
    with pytest.raises(UnclassifiableId):
        ids.classify_residency("not-an-id")


def test_generated_ids_have_their_store_shapes_and_are_distinct(cp: psycopg.Connection) -> None:
    rows = cp.execute("SELECT runops.generate_ksuid(), runops.generate_cuid() FROM generate_series(1, 2000)").fetchall()
    ksuids, cuids = {r[0] for r in rows}, {r[1] for r in rows}
    assert len(ksuids) == len(cuids) == 2000
    assert {ids.try_classify_residency(k) for k in ksuids} == {"NEW"}
    assert {ids.try_classify_residency(c) for c in cuids} == {"LEGACY"}


def test_sql_ksuids_are_segment_compatible(cp: psycopg.Connection) -> None:
    raw = bytes.fromhex("0669F7EFB5A1CD34B5F99D1154FB6853345C9735")
    encoded = cp.execute("SELECT runops.ksuid_encode(%s)", [raw]).fetchone()[0]
    assert encoded == KSUID
    minted, now = cp.execute("SELECT runops.generate_ksuid(), pg_catalog.now()").fetchone()
    parsed = parse(minted.encode())
    assert abs(parsed.datetime - now) < dt.timedelta(seconds=2)


def test_ksuid_timestamp_reads_bare_and_friendly_ids(cp: psycopg.Connection) -> None:
    expected = dt.datetime(2017, 10, 10, 4, 0, 47, tzinfo=dt.UTC)
    assert cp.execute("SELECT runops.ksuid_timestamp(%s)", [KSUID]).fetchone()[0] == expected
    assert cp.execute("SELECT runops.ksuid_timestamp(%s)", ["run_" + KSUID]).fetchone()[0] == expected
    python_minted = ids.generate_ksuid()
    stamp = cp.execute("SELECT runops.ksuid_timestamp(%s)", [python_minted]).fetchone()[0]
    assert stamp == parse(python_minted.encode()).datetime
    with pytest.raises(psycopg.Error) as err:
        cp.execute("SELECT runops.ksuid_timestamp(%s)", [CUID])
    assert sqlstate_of(err.value) == "RO001"


def test_store_role_and_identity(cp: psycopg.Connection, ro: psycopg.Connection) -> None:
    assert cp.execute("SELECT runops.store_role()").fetchone()[0] == "CONTROL_PLANE"
    assert ro.execute("SELECT runops.store_role()").fetchone()[0] == "RUN_OPS"
    a = cp.execute("SELECT * FROM runops.store_identity()").fetchone()
    b = ro.execute("SELECT * FROM runops.store_identity()").fetchone()
    assert a[3] == "CONTROL_PLANE" and b[3] == "RUN_OPS"
    assert a[0] != b[0]  # two clusters, two system identifiers


def test_fake_now_is_honoured_only_for_clock_members(cp: psycopg.Connection, cp_admin: psycopg.Connection,
                                                     stores) -> None:
    cp.execute("SET runops.fake_now = '2030-01-02 03:04:05+00'")
    assert cp.execute("SELECT runops.now()").fetchone()[0] == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    cp.execute("SET runops.fake_now = ''")
    assert cp.execute("SELECT runops.now() = pg_catalog.now()").fetchone()[0]
    # A role outside runops_clock cannot move the clock.
    cp_admin.execute("CREATE ROLE runops_test_outsider LOGIN")
    cp_admin.execute("GRANT USAGE ON SCHEMA runops TO runops_test_outsider")
    cp_admin.execute("GRANT EXECUTE ON FUNCTION runops.now() TO runops_test_outsider")
    try:
        cp_admin.execute("SET SESSION AUTHORIZATION runops_test_outsider")
        cp_admin.execute("SET runops.fake_now = '2030-01-02 03:04:05+00'")
        assert cp_admin.execute("SELECT runops.now() = pg_catalog.now()").fetchone()[0]
    finally:
        cp_admin.execute("RESET SESSION AUTHORIZATION")
        cp_admin.execute("DROP OWNED BY runops_test_outsider")
        cp_admin.execute("DROP ROLE runops_test_outsider")
