"""Rolling upgrades (SPEC §9 "Deployments users have"): stores are upgraded before applications.

* A client of the previous release, built from its commit into a venv of its own, keeps working
  against stores upgraded to head.
* A new client refuses, in one line naming the store, the store's revision and its own, a store
  older than it needs — before it sends any call — and ``runops.store_version()``, the client's
  minimum and the newest revision in ``migrations/`` agree.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops import RunOps, StoreMisconfigured
from runops._client_base import MIN_STORE_VERSION, client_version
from runops.client import CONTROL_PLANE, RUN_OPS
from runops.ops import migrate
from tests.client_flavours import Blocking
from tests.conftest import Stores
from tests.releases import R0005_RELEASE, release_python
from tests.test_upgrade import RELEASES, install_release

REPO = Path(__file__).resolve().parents[1]
RUNOPS = Path(sys.executable).parent / "runops"
# The commit that released the previous revision (r0005_hardening): its client is the one deployed
# applications run while their stores are upgraded to this release. It reads rows by name, so
# this release may add columns to what it reads (run_view.replayed_from_run_id).
PREVIOUS_RELEASE = R0005_RELEASE


def newest_revision() -> str:
    """The newest revision in migrations/, by the name the shared revisions carry (r0005_hardening):
    both histories' newest version file, which must agree."""
    newest = {max(p.stem for p in (REPO / "migrations" / history / "versions").glob("[0-9]*.py"))
              for history in ("control_plane", "run_ops")}
    assert len(newest) == 1, newest
    return "r" + newest.pop()


def test_the_stores_the_client_and_migrations_agree_on_the_newest_revision(stores: Stores) -> None:
    assert MIN_STORE_VERSION == newest_revision()
    for store in (CONTROL_PLANE, RUN_OPS):
        with psycopg.connect(stores.app[store]) as conn:  # the application role may ask
            assert conn.execute("SELECT runops.store_version()").fetchone() == (newest_revision(),)


# -- a new client, an older store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch_store(stores: Stores) -> Iterator[tuple[str, str]]:
    """(admin URL, application URL) of a database of the session's control-plane cluster, for a
    control-plane store at whatever revision a test installs."""
    dbname = f"rolling_{secrets.token_hex(3)}"
    stores.local.clusters[CONTROL_PLANE].create_database(dbname)
    try:
        yield stores.admin_url(CONTROL_PLANE, dbname), stores.app[CONTROL_PLANE].rsplit("/", 1)[0] + f"/{dbname}"
    finally:
        with psycopg.connect(stores.admin_url(CONTROL_PLANE, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _refusal(url: str, flavour: type) -> str:
    with flavour(url) as client:
        with pytest.raises(StoreMisconfigured) as refused:
            client.list_environments()
        began = time.monotonic()
        with pytest.raises(StoreMisconfigured) as again:  # remembered: not asked again
            client.create_organization("x")
        assert time.monotonic() - began < 0.05 and again.value.message == refused.value.message
    return refused.value.message


def test_a_new_client_refuses_a_store_older_than_it_needs(scratch_store: tuple[str, str], stores: Stores) -> None:
    admin, app = scratch_store
    install_release(CONTROL_PLANE, admin, RELEASES["r0004"])  # the previous release: no runops.store_version()
    where = app.split("@", 1)[1]
    for flavour in (RunOps, Blocking):
        message = _refusal(app, flavour)
        assert "\n" not in message
        assert f"the CONTROL_PLANE store at {where} is at r0004_speed or older" in message, message
        assert f"this client (runops {client_version()}) needs {MIN_STORE_VERSION} or newer" in message, message

    # The CLI says it in one line (StoreMisconfigured is a StoreUnavailable: exit 19).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}
    done = subprocess.run([str(RUNOPS), "env", "list"], env={**env, "RUNOPS_CONTROL_PLANE_URL": app},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 19 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "is at r0004_speed or older" in done.stderr and MIN_STORE_VERSION in done.stderr

    # Upgraded, the store is accepted; a store that says it is older is refused by its version.
    migrate.upgrade(CONTROL_PLANE, admin)
    with RunOps(app) as client:
        assert client.list_environments() == []
    with psycopg.connect(admin, autocommit=True) as conn:
        for said, accepted in (("r0099_from_the_future", True), ("r0004_speed", False)):
            conn.execute(f"CREATE OR REPLACE FUNCTION runops.store_version() RETURNS text LANGUAGE sql "
                         f"AS $$ SELECT '{said}'::text $$")
            with RunOps(app) as client:
                if accepted:
                    assert client.list_environments() == []
                else:
                    with pytest.raises(StoreMisconfigured, match=f"is at {said}; this client"):
                        client.list_environments()


# -- the previous release's client, the stores at head -----------------------------------------------------

# What an application of the previous release does: run with that release's venv (its runops, the
# dependencies of this one), the stores' application URLs as arguments; prints what it saw.
SCENARIO = textwrap.dedent('''\
    import json, sys, secrets
    import runops
    from runops import RunOps

    cp, ro = sys.argv[1], sys.argv[2]
    seen = {"runops": runops.__file__}
    with RunOps(cp, ro) as c:
        for kind in ("cuid", "ksuid"):
            org = c.create_organization(f"old-{kind}-{secrets.token_hex(3)}", mint_kind=kind)
            env = c.create_environment(c.create_project(org, "p"), "e", "PRODUCTION")
            assert c.wait_for_mirror()
            queue = f"q-{secrets.token_hex(3)}"
            plain = c.trigger_run(env, "t", {"n": 1}, queue=queue)
            keyed = c.trigger_run(env, "t", {"n": 2}, idempotency_key="k")
            again = c.trigger_run(env, "t", {"n": 3}, idempotency_key="k")
            run = c.get_run(plain.run_id)
            page = c.list_runs(env, 10)
            [taken] = c.dequeue_runs(env, "w", 1, queues=[queue])
            started = c.start_attempt(taken.run_id, "w")
            done = c.complete_attempt(taken.run_id, started.attempt_number, {"ok": True})
            batch = c.batch_trigger(env, [{"task": "t", "payload": {"i": i}} for i in range(3)])
            got = c.get_batch(batch.batch_id)
            seen[kind] = {
                "residency": plain.residency, "cached": [keyed.is_cached, again.is_cached],
                "same_key_run": again.run_id == keyed.run_id, "payload": run.payload,
                "listed": sorted(r.run_id for r in page.runs) == sorted([plain.run_id, keyed.run_id]),
                "dequeued": taken.run_id == plain.run_id, "final": done.status, "output": done.output,
                "batch": [got.run_ids == batch.run_ids, got.item_count, got.is_sealed],
            }
    print(json.dumps(seen))
''')


@pytest.fixture(scope="module")
def previous_release() -> Path:
    """The python of a venv outside the checkout holding the previous release's wheel (tests/releases.py)."""
    return release_python(PREVIOUS_RELEASE)


def test_the_previous_releases_client_works_against_stores_at_head(previous_release: Path, stores: Stores) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_") and k != "PYTHONPATH"}
    done = subprocess.run([str(previous_release), "-c", SCENARIO, stores.app[CONTROL_PLANE], stores.app[RUN_OPS]],
                          capture_output=True, text=True, timeout=300, cwd=previous_release.parent, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)
    assert Path(seen.pop("runops")).is_relative_to(previous_release.parents[1])  # the old wheel's client
    for kind, residency in (("cuid", "LEGACY"), ("ksuid", "NEW")):
        assert seen[kind] == {"residency": residency, "cached": [False, True], "same_key_run": True,
                              "payload": {"n": 1}, "listed": True, "dequeued": True,
                              "final": "COMPLETED_SUCCESSFULLY", "output": {"ok": True},
                              "batch": [True, 3, True]}, kind


def test_the_previous_release_is_a_real_other_client(previous_release: Path) -> None:
    """It is the old code indeed: it asks for the previous revision, which this release moved on from."""
    found = subprocess.run([str(previous_release), "-c", "from runops._client_base import MIN_STORE_VERSION; "
                            "print(MIN_STORE_VERSION)"],
                           capture_output=True, text=True, check=True, cwd=previous_release.parent)
    assert found.stdout.strip() == "r0005_hardening" != MIN_STORE_VERSION
