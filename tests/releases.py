"""Released code, built from git history into a venv of its own outside the checkout.

The upgrade tests install stores with what a release shipped, and the rolling-upgrade tests run
a release's client against stores at head: both need that release's package as it was, not this
tree's. ``release_python(commit)`` builds it once per test session (git archive, pip wheel, a
venv without pip) and answers the venv's python. Its dependencies are this venv's (the same
psycopg, alembic, ...): a .pth file points at them, and none of this venv's .pth files (the
editable install of the current runops among them) is read from there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The commit that released r0005_hardening: the previous release of this tree.
R0005_RELEASE = "73935fa"


@cache
def release_python(commit: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"runops-release-{commit}-"))
    atexit.register(shutil.rmtree, root, True)
    assert not root.resolve().is_relative_to(REPO)
    (root / "src").mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True,
                             check=False)
    assert archive.returncode == 0, (f"the release {commit} is read from git history: run the tests in a full "
                                     f"clone ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(root / "src")], input=archive.stdout, check=True)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(root / "dist"),
                            str(root / "src")], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    [wheel] = (root / "dist").glob("runops-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--quiet", str(wheel)], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "runops_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_released(commit: str, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` with the release's python (arguments in sys.argv[1:]), outside the checkout
    and without this environment's RUNOPS_* settings."""
    python = release_python(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_") and k != "PYTHONPATH"}
    return subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=python.parents[2], env=env, check=False)
