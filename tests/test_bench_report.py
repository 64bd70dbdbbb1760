"""The benchmark table's arithmetic (bench/harness.py): ratios, targets and the verdict. Pure
Python; no clusters, nothing measured."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import harness  # noqa: E402 - bench/ is not a package


def test_every_target_and_yardstick_names_a_workload() -> None:
    names = {w.name for w in harness.WORKLOADS}
    assert {t.name for t in harness.TARGETS} <= names
    assert {t.against for t in harness.TARGETS} <= names
    assert {w.reference for w in harness.WORKLOADS if w.reference} <= names
    assert set(harness.PEER_WORKLOADS) <= names


def test_ratios_targets_and_verdict() -> None:
    rates = {"baseline": 1000.0, "trigger_no_key": 800.0, "procrastinate_defer": 700.0, "graphile_add_job": 300.0,
             "trigger_new_key": 500.0}
    rows = {r["name"]: r for r in harness.report_rows(rates, {"procrastinate_defer_lock": "no network"})}
    no_key = rows["trigger_no_key"]
    assert no_key["ratio"] == 0.8
    assert no_key["peers"]["procrastinate_defer"] == 800 / 700
    assert no_key["peers"]["graphile_add_job_key"] is None
    met = {t["against"]: t["met"] for t in no_key["targets"]}
    assert met == {"baseline": True, "procrastinate_defer": False, "graphile_add_job": True}
    new_key = {t["against"]: t for t in rows["trigger_new_key"]["targets"]}
    assert new_key["baseline"]["met"] is False
    assert new_key["procrastinate_defer_lock"]["met"] is None
    assert new_key["procrastinate_defer_lock"]["not_measured"] == "no network"
    assert rows["procrastinate_defer_lock"]["rate"] is None
    assert "read_local" not in rows
    assert harness.verdict(list(rows.values())) is False


def test_a_peer_not_measured_neither_passes_nor_fails() -> None:
    rates = {"baseline": 1000.0, "trigger_no_key": 800.0}
    rows = harness.report_rows(rates, {"procrastinate_defer": "no network", "graphile_add_job": "no node"})
    assert harness.verdict(rows) is True


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert harness.percentile(values, 50) == 50.0
    assert harness.percentile(values, 99) == 99.0
    assert harness.percentile([5.0], 99) == 5.0
    assert harness.percentile([], 50) is None


def test_table_rows_render_every_row() -> None:
    rows = harness.report_rows({"baseline": 1000.0, "trigger_no_key": 650.0}, {"graphile_add_job": "no node"})
    result: dict[str, Any] = {"rows": rows, "phases": {"baseline": {"p50_ms": 1.0, "p99_ms": 3.0, "spread": 0.1}}}
    cells = harness.table_rows(result)
    assert len(cells) == 3 and all(len(c) == len(harness.TABLE_HEADERS) for c in cells)
    assert "MISSED" in cells[1][-1] and "not measured" in cells[1][-1]
    assert cells[2][-1] == "no node"


def test_a_run_writes_its_chart_beside_its_json_and_leaves_the_docs_chart_alone(tmp_path: Path) -> None:
    drawn: list[Path] = []

    def draw(results: Path, png: Path, say: Any) -> bool:  # bench/chart.py needs matplotlib's venv
        png.write_bytes(b"png")
        drawn.append(png)
        return True

    docs_chart = harness.DOCS_CHART.read_bytes()
    result = {"started_at": "2026-01-02T03:04:05+0000", "rows": []}
    path, png = harness.save_results(result, tmp_path / "results", None, print, draw)
    assert path.parent == tmp_path / "results" and png == path.with_suffix(".png") and png.exists()
    assert harness.DOCS_CHART.read_bytes() == docs_chart
    _, png = harness.save_results(result, tmp_path / "results", tmp_path / "asked.png", print, draw)
    assert png == tmp_path / "asked.png" and drawn == [path.with_suffix(".png"), tmp_path / "asked.png"]


def test_the_peers_live_in_the_users_cache_directory(tmp_path: Path) -> None:
    import os
    import subprocess

    def peers_home(**env: str) -> Path:
        clean = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "HOME")}
        out = subprocess.run([sys.executable, "-c", "import peers; print(peers.PEERS_HOME)"], cwd=Path(harness.HERE),
                             env={**clean, **env}, capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())

    xdg = peers_home(XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path))
    assert xdg == tmp_path / "cache" / "runops" / "bench-peers"
    assert peers_home(HOME=str(tmp_path)) == tmp_path / ".cache" / "runops" / "bench-peers"
