"""The peers `runops bench` measures runops against, installed on demand into a bench-only place.

Never project dependencies: Procrastinate (and matplotlib, for ``bench/chart.py``) go into a
virtual environment of their own in the user's cache directory,
``${XDG_CACHE_HOME:-~/.cache}/runops/bench-peers`` (the one ``worker_loop.py`` uses), made with
``python -m venv`` and ``pip install`` the first time; graphile-worker goes into its ``node/``
with ``npm install``. About 230 MB, kept between runs: a cache of this user's, not a folder
every user of a shared temporary directory writes into; deleting it costs a reinstall. Each
peer gets a database of its own on the run-ops cluster (same cluster, same settings as the runs
it is compared with), its schema installed by its own tooling as its owner ``bench_peer``, a
plain login role with ``runops_app``'s password, so that pgbench reaches it as it reaches
``runops.trigger_run``: a non-superuser role, with a password, over TCP.

The calls measured are the peers' own enqueue functions, as their clients send them
(``bench/pgbench/peer_*.sql``):

* Procrastinate: ``procrastinate_defer_jobs_v1`` (what ``defer()`` runs) with one job, without
  and with a ``queueing_lock`` (a fresh one per call: the partial unique index takes an entry,
  as a runops idempotency key does);
* graphile-worker: ``graphile_worker.add_job`` without and with a ``job_key`` (fresh per call).

When a peer cannot be installed (no network, no node), :func:`setup_peers` says why in its
:class:`Peer` and the benchmark measures the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def _cache_home() -> Path:
    """The user's cache directory (XDG Base Directory: ``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"


PEERS_HOME = _cache_home() / "runops" / "bench-peers"
NODE_DIR = PEERS_HOME / "node"
PROCRASTINATE_DATABASE = "bench_procrastinate"
GRAPHILE_DATABASE = "bench_graphile"
PEER_ROLE = "bench_peer"
INSTALL_TIMEOUT = 600


class PeerUnavailable(Exception):
    """A peer (or the chart's matplotlib) could not be installed or set up."""


@dataclass(frozen=True)
class PeerCall:
    """One peer workload: a pgbench script run in the peer's database, and how to empty it."""

    name: str        # the workload's key in the results
    label: str       # the table's first column
    script: str      # file name in bench/pgbench/
    url: str         # runops_app's URL of the peer's database
    reset_sql: str   # empties the peer's tables before each phase
    count_sql: str   # rows the phase created (a sanity check: one per call)


@dataclass
class Peer:
    """A peer system: its version once installed, or why it could not be."""

    name: str
    database: str
    workloads: tuple[str, ...]   # the workloads it serves (in the results, whether or not it installed)
    version: str | None = None
    error: str | None = None
    calls: list[PeerCall] = field(default_factory=list)


# -- installing ------------------------------------------------------------------------------------


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = INSTALL_TIMEOUT,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout, env=env)


def _tail(out: subprocess.CompletedProcess[str]) -> str:
    text = (out.stderr or out.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit {out.returncode}"


def peers_python(modules: dict[str, str], say: Callable[[str], None] = lambda _m: None,
                 home: Path = PEERS_HOME) -> Path:
    """The bench-only venv's python with every module of ``modules`` (import name → pip
    requirement) importable; makes the venv and installs what is missing on first use."""
    python = home / "bin" / "python"
    if not python.exists():
        say(f"making the bench-only venv {home}")
        out = _run([sys.executable, "-m", "venv", str(home)])
        if out.returncode != 0:
            raise PeerUnavailable(f"could not make the venv {home}: {_tail(out)}")
    missing = [req for mod, req in modules.items()
               if _run([str(python), "-c", f"import {mod}"], timeout=120).returncode != 0]
    if missing:
        say(f"installing {', '.join(missing)} into {home}")
        out = _run([str(python), "-m", "pip", "install", "-q", *missing])
        if out.returncode != 0:
            raise PeerUnavailable(f"pip install {' '.join(missing)} failed: {_tail(out)}")
    return python


def procrastinate_python(say: Callable[[str], None] = lambda _m: None) -> Path:
    return peers_python({"procrastinate": "procrastinate", "psycopg": "psycopg[binary,pool]"}, say)


def chart_python(say: Callable[[str], None] = lambda _m: None) -> Path:
    return peers_python({"matplotlib": "matplotlib"}, say)


def graphile_bin(say: Callable[[str], None] = lambda _m: None, node_dir: Path = NODE_DIR) -> Path:
    """graphile-worker's command line, installed with npm into ``node_dir`` on first use."""
    cli = node_dir / "node_modules" / ".bin" / "graphile-worker"
    if cli.exists():
        return cli
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise PeerUnavailable("node and npm are not installed (e.g. apt-get install nodejs npm)")
    node_dir.mkdir(parents=True, exist_ok=True)
    say(f"installing graphile-worker into {node_dir}")
    out = _run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(node_dir), "graphile-worker"],
               cwd=node_dir)
    if out.returncode != 0 or not cli.exists():
        raise PeerUnavailable(f"npm install graphile-worker failed: {_tail(out)}")
    return cli


# -- databases -------------------------------------------------------------------------------------


def _database_url(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


def _create_database(admin_url: str, app_url: str, dbname: str) -> str:
    """A fresh database ``dbname`` on the cluster of ``admin_url``, owned by ``PEER_ROLE`` (which
    logs in with ``runops_app``'s password, as ``runops_app`` does: over TCP, scram); returns
    that role's URL of it. The role owns what the peer's schema creates, as an application's
    role does in a peer's usual deployment (graphile-worker's tables also enable row-level
    security with no policy: only their owner may write them)."""
    password = conninfo_to_dict(app_url).get("password") or ""
    with psycopg.connect(_database_url(admin_url, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [PEER_ROLE]).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(PEER_ROLE), sql.Literal(password)))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname),
                                                                  sql.Identifier(PEER_ROLE)))
    return make_conninfo(app_url, user=PEER_ROLE, dbname=dbname)


def setup_procrastinate(admin_url: str, app_url: str, say: Callable[[str], None]) -> Peer:
    peer = Peer("Procrastinate", PROCRASTINATE_DATABASE, ("procrastinate_defer", "procrastinate_defer_lock"))
    try:
        python = procrastinate_python(say)
        out = _run([str(python), "-c", "import importlib.metadata as m, pathlib, procrastinate, json; "
                    "print(json.dumps([m.version('procrastinate'), "
                    "str(pathlib.Path(procrastinate.__file__).parent / 'sql' / 'schema.sql')]))"], timeout=120)
        if out.returncode != 0:
            raise PeerUnavailable(f"procrastinate does not import: {_tail(out)}")
        version, schema = json.loads(out.stdout)
        url = _create_database(admin_url, app_url, PROCRASTINATE_DATABASE)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(Path(schema).read_text())
    except (PeerUnavailable, OSError, ValueError, psycopg.Error, subprocess.SubprocessError) as err:
        peer.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        return peer
    peer.version = version
    reset = "TRUNCATE procrastinate_jobs CASCADE"
    count = "SELECT count(*) FROM procrastinate_jobs"
    peer.calls = [
        PeerCall("procrastinate_defer", "Procrastinate defer", "peer_procrastinate_defer.sql", url, reset, count),
        PeerCall("procrastinate_defer_lock", "Procrastinate defer, queueing lock",
                 "peer_procrastinate_defer_lock.sql", url, reset, count),
    ]
    return peer


def setup_graphile(admin_url: str, app_url: str, say: Callable[[str], None]) -> Peer:
    peer = Peer("graphile-worker", GRAPHILE_DATABASE, ("graphile_add_job", "graphile_add_job_key"))
    try:
        cli = graphile_bin(say)
        package = json.loads((cli.parents[1] / "graphile-worker" / "package.json").read_text())
        url = _create_database(admin_url, app_url, GRAPHILE_DATABASE)
        out = _run([str(cli), "--schema-only", "-c", _as_uri(url)], cwd=cli.parents[2], timeout=180)
        if out.returncode != 0:
            raise PeerUnavailable(f"graphile-worker --schema-only failed: {_tail(out)}")
    except (PeerUnavailable, OSError, ValueError, psycopg.Error, subprocess.SubprocessError) as err:
        peer.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        return peer
    peer.version = str(package.get("version"))
    reset = "TRUNCATE graphile_worker._private_jobs, graphile_worker._private_job_queues CASCADE"
    count = "SELECT count(*) FROM graphile_worker._private_jobs"
    peer.calls = [
        PeerCall("graphile_add_job", "graphile-worker add_job", "peer_graphile_add_job.sql", url, reset, count),
        PeerCall("graphile_add_job_key", "graphile-worker add_job, job_key", "peer_graphile_add_job_key.sql",
                 url, reset, count),
    ]
    return peer


def _as_uri(conninfo: str) -> str:
    """graphile-worker takes a URI, not a key=value string."""
    d: dict[str, Any] = conninfo_to_dict(conninfo)
    user = d.get("user", "postgres")
    password = f":{d['password']}" if d.get("password") else ""
    return f"postgresql://{user}{password}@{d.get('host', '127.0.0.1')}:{d.get('port', 5432)}/{d['dbname']}"


def setup_peers(admin_url: str, app_url: str, say: Callable[[str], None] = lambda _m: None) -> list[Peer]:
    """Both peers on the cluster of ``admin_url`` (the run-ops store's), installed on demand;
    a peer that cannot be set up carries its reason in ``error`` and no calls."""
    peers = [setup_procrastinate(admin_url, app_url, say), setup_graphile(admin_url, app_url, say)]
    for p in peers:
        say(f"peer {p.name}: " + (f"version {p.version}" if p.error is None else f"unavailable ({p.error})"))
    return peers
