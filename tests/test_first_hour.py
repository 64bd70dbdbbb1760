"""A new user's first hour: `runops dev up` once at the top of a project, then every command from
wherever they are in it — `src/`, a test folder — with no variable exported.

The commands find the local stores as git finds `.git`: the nearest `.runops/` in the current
directory or a parent (`RUNOPS_HOME` names one explicitly). Every command runs the real console
script in a subprocess with no RUNOPS_* variable. Most tests use the session's stores, whose
state file sits where `dev up` writes it (`<home>/.runops/state.json`); one walks the README's
first hour on stores `dev up` itself made.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from runops import dev_stores
from runops.ops.local_cluster import free_port
from tests.conftest import Env, Stores

RUNOPS = Path(sys.executable).parent / "runops"


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user who exported nothing runops reads."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RUNOPS_")}, **extra}


def runops(*args: str, cwd: Path, timeout: float = 120, **extra: str) -> tuple[int, str, str]:
    done = subprocess.run([str(RUNOPS), *args], capture_output=True, text=True, env=user_env(**extra), cwd=cwd,
                          timeout=timeout, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def src(stores: Stores) -> Path:
    """A folder two levels below the directory whose `.runops/` holds the session's stores."""
    path = stores.home / "src" / f"app{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- finding the stores ---------------------------------------------------------------------------


def test_the_nearest_runops_folder_up_from_the_current_directory_is_found(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dev_stores.HOME_VARIABLE, raising=False)
    outer, inner = tmp_path / ".runops", tmp_path / "a" / ".runops"
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    # Nothing up to the filesystem root (tmp_path's parents hold no state of ours): here.
    assert dev_stores.find_home() is None and dev_stores.default_home() == deep / ".runops"
    outer.mkdir()
    dev_stores.state_file(outer).write_text("{}")
    assert dev_stores.default_home() == outer
    inner.mkdir()
    assert dev_stores.default_home() == outer  # a `.runops/` without a state file is not the stores
    dev_stores.state_file(inner).write_text("{}")
    assert dev_stores.default_home() == inner  # the nearest wins
    monkeypatch.setenv(dev_stores.HOME_VARIABLE, str(tmp_path / "elsewhere"))
    assert dev_stores.default_home() == tmp_path / "elsewhere"  # an explicit RUNOPS_HOME wins


def test_a_state_file_another_user_owns_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dev_stores.HOME_VARIABLE, raising=False)
    (tmp_path / ".runops").mkdir()
    dev_stores.state_file(tmp_path / ".runops").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert dev_stores.find_home() == tmp_path / ".runops"
    someone_else = os.geteuid() + 1
    monkeypatch.setattr(dev_stores.os, "geteuid", lambda: someone_else)
    assert dev_stores.find_home() is None


# -- every command from a subdirectory, nothing exported -------------------------------------------


def test_trigger_runs_ls_and_show_from_a_subdirectory(src: Path, new_env: Env) -> None:
    env = new_env.environment_id
    code, out, err = runops("--json", "trigger", env, "send-email", "--payload", '{"to": "a@example.com"}',
                            "--key", "order-42", cwd=src)
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = runops("--json", "runs", "ls", "--env", env, cwd=src)
    assert code == 0, err
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [run_id]
    code, out, err = runops("runs", "show", run_id, cwd=src)
    assert code == 0 and "send-email" in out, err
    assert not (src / ".runops").exists()


def test_runops_connect_from_a_subdirectory_uses_the_local_stores(src: Path, new_env: Env) -> None:
    """docs/worker.md's `RunOps.connect()` works after `dev up` with nothing exported."""
    program = ("import asyncio, sys\n"
               "from runops import AsyncRunOps, RunOps\n"
               "with RunOps.connect() as ro:\n"
               "    print(ro.trigger_run(sys.argv[1], 't', {}).residency)\n"
               "async def main():\n"
               "    async with await AsyncRunOps.connect() as ro:\n"
               "        print((await ro.trigger_run(sys.argv[1], 't', {})).residency)\n"
               "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", program, new_env.environment_id], capture_output=True, text=True,
                          env=user_env(), cwd=src, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NEW", "NEW"]


def test_metrics_from_a_subdirectory(src: Path, new_env: Env, client) -> None:
    client.trigger_run(new_env.environment_id, "t", {})
    code, out, err = runops("--json", "metrics", "--env", new_env.environment_id, cwd=src)
    assert code == 0, err
    figures = json.loads(out)
    assert set(figures) == {"CONTROL_PLANE", "RUN_OPS"}
    assert figures["RUN_OPS"]["runs"][new_env.environment_id] == {"PENDING": 1}


def test_metrics_listen_from_a_subdirectory(src: Path, new_env: Env, client) -> None:
    client.trigger_run(new_env.environment_id, "t", {})
    port = free_port()
    proc = subprocess.Popen([str(RUNOPS), "metrics", "--listen", f"127.0.0.1:{port}"], cwd=src, env=user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    page = resp.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the metrics endpoint never answered"
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert 'runops_store_up{store="CONTROL_PLANE"} 1.0' in page and 'runops_store_up{store="RUN_OPS"} 1.0' in page
    assert f'environment="{new_env.environment_id}"' in page


def test_without_stores_anywhere_up_the_tree_the_error_says_so(tmp_path: Path) -> None:
    code, _, err = runops("runs", "ls", "--env", "e", cwd=tmp_path)
    assert code == 1 and err.count("\n") == 1
    assert "no local stores in this directory or its parents" in err and "runops dev up" in err
    code, _, err = runops("runs", "ls", "--env", "e", cwd=tmp_path, RUNOPS_HOME=str(tmp_path / "stores"))
    assert code == 1 and f"RUNOPS_HOME={tmp_path / 'stores'}" in err


def test_runops_home_names_the_stores_from_anywhere(stores: Stores, new_env: Env, tmp_path: Path) -> None:
    code, out, err = runops("--json", "trigger", new_env.environment_id, "t", cwd=tmp_path,
                            RUNOPS_HOME=str(stores.home / ".runops"))
    assert code == 0, err
    assert json.loads(out)["residency"] == "NEW"


# -- the README's first hour, on stores `dev up` made ----------------------------------------------


@pytest.fixture
def project() -> Iterator[Path]:
    """A project folder the postgres user can reach (so the clusters' data stays inside it), and
    its stores stopped and removed afterwards whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="runops-first-hour-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([str(RUNOPS), "dev", "down"], cwd=root, env=user_env(), capture_output=True, timeout=120,
                           check=False)
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((root / ".runops" / "state.json").read_text())
            for cluster in state["clusters"].values():
                shutil.rmtree(cluster["socket_dir"], ignore_errors=True)
            shutil.rmtree(state["data_root"], ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_readme_first_hour_from_a_subdirectory(project: Path) -> None:
    code, out, err = runops("--json", "dev", "up", cwd=project, timeout=300)
    assert code == 0, err
    up = json.loads(out)
    assert up["home"] == str(project / ".runops") and Path(up["bindir"], "postgres").exists()
    src = project / "src" / "myapp"
    src.mkdir(parents=True)
    code, out, err = runops("dev", "status", cwd=src)
    assert code == 0 and out.count("running") >= 2, out + err
    code, out, err = runops("--json", "env", "create", "acme", "web", "prod", "--type", "PRODUCTION",
                            "--mint-kind", "ksuid", cwd=src)
    assert code == 0, err
    env = json.loads(out)["environment_id"]
    code, out, err = runops("--json", "trigger", env, "echo", "--payload", '{"to": "a@example.com"}',
                            "--key", "order-42", cwd=src)
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = runops("--json", "worker", "--env", env, "--once", cwd=src)
    assert code == 0, err
    code, out, err = runops("--json", "runs", "ls", "--env", env, cwd=src)
    assert code == 0, err
    assert [(r["run_id"], r["status"]) for r in json.loads(out)["runs"]] == [(run_id, "COMPLETED_SUCCESSFULLY")]
    code, out, err = runops("metrics", cwd=src)
    assert code == 0 and env in out, err
    # The Python client from the same folder: the stores of `dev up`, found the same way.
    done = subprocess.run([sys.executable, "-c", "import sys; from runops import RunOps\n"
                           "with RunOps.local() as ro: print(ro.get_run(sys.argv[1]).status)", run_id],
                          cwd=src, env=user_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "COMPLETED_SUCCESSFULLY", done.stderr
    # `dev down` and `dev up` from the subdirectory act on the project's stores, never a new pair.
    code, out, err = runops("dev", "down", cwd=src)
    assert code == 0, err
    # Binaries named now are for new stores: these keep the ones they were made with, and say so.
    other = project / "other-bin"
    other.mkdir()
    for binary in ("initdb", "pg_ctl", "postgres"):
        (other / binary).symlink_to(Path(up["bindir"]) / binary)
    code, out, err = runops("dev", "up", cwd=src, timeout=300, RUNOPS_PG_BINDIR=str(other))
    assert code == 0, err
    assert f"these stores run on {up['bindir']}" in err and f"server binaries: {up['bindir']}" in out
    assert not (src / ".runops").exists() and not (project / "src" / ".runops").exists()
    code, out, err = runops("--json", "runs", "show", run_id, cwd=src)
    assert code == 0 and json.loads(out)["status"] == "COMPLETED_SUCCESSFULLY", err


def test_runops_pg_bindir_embedded_names_the_embedded_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runops.ops.local_cluster import embedded_bindir, find_bindir

    if embedded_bindir() is None:  # the dev venv: `runops[embedded]` is not installed
        code, _, err = runops("dev", "up", cwd=tmp_path, RUNOPS_PG_BINDIR="embedded")
        assert code == 1 and err.count("\n") == 1 and "pip install 'runops[embedded]'" in err, err
        assert not (tmp_path / ".runops" / "state.json").exists()
    else:
        monkeypatch.setenv("RUNOPS_PG_BINDIR", "embedded")
        assert find_bindir() == embedded_bindir()


# -- `make run` installs what running needs, `make test` the rest ----------------------------------

REPO = Path(__file__).resolve().parents[1]


def _packages_installed(*args: str, tmp_path: Path) -> list[str]:
    """The packages `.ci/install-system-deps.sh ARGS` asks apt-get for on a machine with bash and
    coreutils but none of the PostgreSQL packages and no runuser: it runs with a PATH of those
    tools and a stand-in apt-get (and sudo) that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "id"):
        found = shutil.which(tool)
        assert found is not None
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    record = tmp_path / "apt-get.args"
    record.unlink(missing_ok=True)
    (bin_dir / "apt-get").write_text(f'#!{shutil.which("bash")}\necho "$@" >> {record}\n')
    (bin_dir / "sudo").write_text(f'#!{shutil.which("bash")}\nexec "$@"\n')
    for stub in ("apt-get", "sudo"):
        (bin_dir / stub).chmod(0o755)
    done = subprocess.run([str(bin_dir / "bash"), str(REPO / ".ci" / "install-system-deps.sh"), *args],
                          env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    install = [line.split() for line in record.read_text().splitlines() if line.startswith("install")]
    assert len(install) == 1, record.read_text()
    return [word for word in install[0] if not word.startswith("-") and word != "install"]


def test_the_system_packages_for_running_are_a_subset_of_those_for_testing(tmp_path: Path) -> None:
    for_tests = _packages_installed(tmp_path=tmp_path)
    for_running = _packages_installed("--run", tmp_path=tmp_path)
    assert "util-linux" in for_running and set(for_running) < set(for_tests)
    assert not {"libtap-parser-sourcehandler-pgtap-perl"} & set(for_running)
    assert {"libtap-parser-sourcehandler-pgtap-perl"} <= set(for_tests)


def test_make_run_installs_neither_the_test_extra_nor_the_test_packages() -> None:
    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60,
                              check=True)
        return done.stdout

    run = planned("run")
    assert "pip install --quiet -e ." in run and "[test]" not in run
    assert "install-system-deps.sh --run" in run and "runops dev up" in run
    test = planned("test")
    assert "pip install --quiet -e '.[test]'" in test
    assert [line for line in test.splitlines() if "install-system-deps.sh" in line] == \
        ["bash .ci/install-system-deps.sh"]


def test_the_readme_layout_names_every_doc_and_no_file_outside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1]
    unnamed = sorted(p.name for p in (REPO / "docs").iterdir() if f"`docs/{p.name}`" not in layout)
    assert not unnamed, f"README's Layout omits {unnamed}"
    # Links are to the repository's own files (a user has nothing else).
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert target.startswith(("http://", "https://", "#")) or (REPO / target).exists(), target
