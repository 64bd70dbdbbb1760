"""Two real throwaway PostgreSQL clusters for the whole test run: a control plane and a run-ops
store, migrated and wired exactly as `runops dev up` does, with fsync off for speed.

Tests connect as the application role (runops_app), which may only EXECUTE the public
functions, and as the superuser where they must look behind the API. Each test makes its own
tenant, so tests never see each other's runs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from runops.client import CONTROL_PLANE, RUN_OPS, RunOps
from runops.ops import migrate
from runops.ops.local_cluster import LocalStores


@dataclass
class Stores:
    home: Path
    local: LocalStores
    admin: dict[str, str]
    app: dict[str, str]

    def admin_url(self, store: str, dbname: str) -> str:
        return self.local.clusters[store].admin_url(dbname)


@pytest.fixture(scope="session")
def stores() -> Iterator[Stores]:
    with running_stores() as made:
        yield made


@contextlib.contextmanager
def running_stores(*, heartbeat: bool = True, bindirs: dict[str, Path] | None = None) -> Iterator[Stores]:
    """A control plane and a run-ops store on two fresh clusters, migrated, wired and split as
    after `runops dev up`; destroyed on exit. The session's `stores`, and fault tests that need
    clusters of their own to kill.

    With `heartbeat`, a thread stamps the control plane's tick heartbeat every few seconds, as a
    deployment's scheduled tick does: replication carries it to the run-ops store and keeps its
    tenant mirror within the freshness bound (SPEC §4 [1.2]). Tests call tick() themselves and
    count what it did, so the thread stamps the heartbeat only (runops.beat), never a whole tick.
    Tests of the freshness bound itself turn it off. `bindirs` runs a store on other server
    binaries (another major) than the default."""
    # Under the system temp directory, world-traversable: the postgres user must reach it.
    home = Path(tempfile.mkdtemp(prefix="runops-test-"))
    home.chmod(0o755)
    local, _ = LocalStores.create(home / ".runops", fsync=False, bindirs=bindirs)
    local.save()  # so `runops` run from `home` finds these stores, as after `runops dev up`
    local.start()
    try:
        admin = local.admin_urls()
        migrate.migrate(admin[CONTROL_PLANE], admin[RUN_OPS])
        for url in admin.values():
            migrate.set_app_password(url, local.app_password)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("GRANT runops_clock TO runops_app")  # tests move the clock
        app = local.app_urls()
        with RunOps(app[CONTROL_PLANE], app[RUN_OPS]) as client:
            client.enable_split()
            assert client.wait_for_mirror()
        with contextlib.ExitStack() as beating:
            if heartbeat:
                beating.enter_context(_control_plane_heartbeat(admin[CONTROL_PLANE]))
            yield Stores(home, local, admin, app)
    finally:
        local.destroy()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def _control_plane_heartbeat(url: str, every: float = 3.0) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            # Fault tests stop and kill this control plane: a missed beat is what they test.
            with contextlib.suppress(psycopg.Error):
                with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
                    conn.execute("SELECT runops.beat('control_plane_tick')")

    thread = threading.Thread(target=beat, name="control-plane-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="session")
def client(stores: Stores) -> Iterator[RunOps]:
    with RunOps(stores.app[CONTROL_PLANE], stores.app[RUN_OPS], max_pool_size=40) as c:
        yield c


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


@pytest.fixture
def cp(stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with _connect(stores.app[CONTROL_PLANE]) as conn:
        yield conn


@pytest.fixture
def ro(stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with _connect(stores.app[RUN_OPS]) as conn:
        yield conn


@pytest.fixture
def cp_admin(stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with _connect(stores.admin[CONTROL_PLANE]) as conn:
        yield conn


@pytest.fixture
def ro_admin(stores: Stores) -> Iterator[psycopg.Connection[Any]]:
    with _connect(stores.admin[RUN_OPS]) as conn:
        yield conn


@pytest.fixture
def store_conn(stores: Stores) -> Callable[[str], psycopg.Connection[Any]]:
    """A new app-role connection to a store, closed at the end of the test."""
    opened: list[psycopg.Connection[Any]] = []

    def open_(store: str) -> psycopg.Connection[Any]:
        conn = _connect(stores.app[store])
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.close()


@pytest.fixture(params=[CONTROL_PLANE, RUN_OPS])
def store(request: pytest.FixtureRequest) -> str:
    """Runs the requesting test once per store (tests that parametrize `store` themselves win)."""
    return str(request.param)


@pytest.fixture
def env_id(store: str, make_env: Callable[..., Env]) -> str:
    """An environment whose roots live in `store`: a cuid organization on the control plane, a
    ksuid one on run-ops."""
    return make_env("cuid" if store == CONTROL_PLANE else "ksuid").environment_id


@pytest.fixture
def conn(store: str, store_conn: Callable[[str], psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
    """An app-role connection to `store`."""
    return store_conn(store)


@dataclass(frozen=True)
class Env:
    organization_id: str
    project_id: str
    environment_id: str


_slugs = itertools.count()


@pytest.fixture
def make_env(client: RunOps) -> Callable[..., Env]:
    """A fresh organization, project and environment (mint kind cuid, ksuid or default)."""

    def make(mint_kind: str | None = None, env_type: str = "PRODUCTION") -> Env:
        slug = f"t{next(_slugs)}-{secrets.token_hex(3)}"
        org = client.create_organization(slug, mint_kind=mint_kind)
        project = client.create_project(org, "p")
        env = client.create_environment(project, "e", env_type)
        return Env(org, project, env)

    return make


@pytest.fixture
def legacy_env(make_env: Callable[..., Env]) -> Env:
    return make_env("cuid")


@pytest.fixture
def new_env(make_env: Callable[..., Env]) -> Env:
    return make_env("ksuid")


@pytest.fixture
def scratch_db(stores: Stores) -> Iterator[Callable[[str], str]]:
    """Creates throwaway databases in the control-plane cluster; returns their admin URLs."""
    made: list[str] = []

    def create(name: str) -> str:
        dbname = f"scratch_{name}_{secrets.token_hex(3)}"
        stores.local.clusters[CONTROL_PLANE].create_database(dbname)
        made.append(dbname)
        return stores.admin_url(CONTROL_PLANE, dbname)

    yield create
    with _connect(stores.admin_url(CONTROL_PLANE, "postgres")) as conn:
        for dbname in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error (tests assert on codes, never on message text)."""
    return getattr(getattr(exc, "diag", None), "sqlstate", None)


os.environ.setdefault("RUNOPS_TESTING", "1")
