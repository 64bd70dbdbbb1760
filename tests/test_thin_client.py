"""The client is thin and stands alone: it imports nothing of the tooling (``runops.ops``), sends
only the named statements of ``runops.queries``, and reads the local dev stores through
``RunOps.local()``, or as ``connect()``'s fallback when no URL is given at all; a given URL always
wins."""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

import runops
from runops import AsyncRunOps, RunOps, RunOpsError, queries
from runops.client import CONTROL_PLANE, RUN_OPS

PACKAGE = Path(runops.__file__).parent
CLIENT_MODULES = sorted(p for p in PACKAGE.glob("*.py"))
SQL_WORDS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "LISTEN ", "WITH ", "CALL ")


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (``from .x import`` inside runops is runops.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "runops" + ("." + node.module if node.module else "") if node.level else (node.module or "")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", CLIENT_MODULES, ids=lambda p: p.name)
def test_no_client_module_imports_the_tooling(path: Path) -> None:
    tooling = sorted(m for m in _imported_modules(path) if m == "runops.ops" or m.startswith("runops.ops.")
                     or m in ("click", "alembic", "sqlalchemy", "prometheus_client"))
    assert tooling == [], f"{path.name} imports {tooling}: the client must not depend on runops.ops"


def test_importing_the_client_loads_no_tooling() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, runops; print(sorted(m for m in sys.modules "
                          "if m.startswith(('runops.ops', 'click', 'alembic', 'sqlalchemy'))))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("path", [p for p in CLIENT_MODULES if p.name != "queries.py"], ids=lambda p: p.name)
def test_the_clients_sql_is_only_in_the_named_queries_module(path: Path) -> None:
    inline = [node.value for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.lstrip().upper().startswith(SQL_WORDS)]
    assert inline == [], f"{path.name} holds SQL text; name it in runops/queries.py"


def test_every_named_query_is_used_by_both_clients() -> None:
    names = [n for n in vars(queries) if n.isupper()]
    sync, aio = (PACKAGE / "client.py").read_text(), (PACKAGE / "aio.py").read_text()
    unused = [n for n in names if f"queries.{n}" not in sync or f"queries.{n}" not in aio]
    assert unused == []


def _clear_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RUNOPS_CONTROL_PLANE_URL", "RUNOPS_RUN_OPS_URL", "RUNOPS_CONTROL_PLANE_REPLICA_URL",
                "RUNOPS_RUN_OPS_REPLICA_URL", "RUNOPS_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)


def _write_state(home: Path) -> dict[str, str]:
    home.mkdir()
    (home / "state.json").write_text(json.dumps({
        "app_password": "secret", "clusters": {CONTROL_PLANE: {"port": 1}, RUN_OPS: {"port": 2}}}))
    return {CONTROL_PLANE: "postgresql://runops_app:secret@127.0.0.1:1/runops",
            RUN_OPS: "postgresql://runops_app:secret@127.0.0.1:2/runops"}


def test_connect_without_any_url_falls_back_to_the_local_stores_and_a_run_ops_url_alone_refuses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_urls(monkeypatch)
    expected = _write_state(tmp_path / ".runops")
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    with RunOps.connect() as ro:  # no connection is made before the first call
        assert (ro._urls[CONTROL_PLANE], ro._urls[RUN_OPS]) == (expected[CONTROL_PLANE], expected[RUN_OPS])
    monkeypatch.setenv("RUNOPS_RUN_OPS_URL", expected[RUN_OPS])
    with pytest.raises(RunOpsError, match="a run-ops URL alone is not enough"):
        RunOps.connect()
    with pytest.raises(RunOpsError, match="a run-ops URL alone is not enough"):
        asyncio.run(AsyncRunOps.connect())


def test_local_reads_the_dev_stores_state_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_urls(monkeypatch)
    expected = _write_state(tmp_path / ".runops")
    monkeypatch.chdir(tmp_path)
    ro = RunOps.local(timeout=0.1)
    try:
        assert ro._urls == expected
    finally:
        ro.close()

    async def local_async() -> dict[str, str]:
        aro = await AsyncRunOps.local(tmp_path / ".runops", timeout=0.1)
        try:
            return dict(aro._urls)
        finally:
            await aro.close()

    assert asyncio.run(local_async()) == expected


def test_local_without_local_stores_says_how_to_make_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_urls(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunOpsError, match="runops dev up"):
        RunOps.local()
