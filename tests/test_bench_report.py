"""The benchmark table's arithmetic (bench/harness.py): ratios, targets and the verdict, in pure
Python; and one real quick run of the worker rows (marked slow: `make test-slow`)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

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


LOOP_ROWS = ("full_loop", "procrastinate_loop", "dequeue_c1", "dequeue_c4", "dequeue_c16",
             "procrastinate_dequeue_c16", "pickup", "trigger_ticker_on", "trigger_no_ticker")


def test_the_loop_rows_carry_their_targets() -> None:
    """The worker's side: the loop against Procrastinate's (rate and server CPU per run), dequeue
    at 16 against one dequeuer and the peer's fetch, pickup p50/p99 ceilings, the no-ticker trigger
    against the ticker-on one."""
    rates = {"full_loop": 300.0, "procrastinate_loop": 200.0, "dequeue_c1": 400.0, "dequeue_c4": 900.0,
             "dequeue_c16": 1000.0, "procrastinate_dequeue_c16": 900.0, "trigger_ticker_on": 1000.0,
             "trigger_no_ticker": 950.0}
    figures = {"full_loop": {"server_cpu_us_per_call": 3000.0},
               "procrastinate_loop": {"server_cpu_us_per_call": 2500.0},
               "pickup": {"p50_ms": 4.0, "p99_ms": 120.0}}
    rows = {r["name"]: r for r in harness.report_rows(rates, {}, figures)}
    assert set(LOOP_ROWS) <= set(rows)
    assert rows["pickup"]["rate"] is None
    loop = rows["full_loop"]["targets"]
    assert [(t["against"], t["met"]) for t in loop] == [("procrastinate_loop", True), ("procrastinate_loop", False)]
    assert loop[1]["value"] == 3000 / 2500
    assert {t["against"]: t["met"] for t in rows["dequeue_c16"]["targets"]} == \
        {"dequeue_c1": False, "procrastinate_dequeue_c16": True}
    assert [(t["metric"], t["met"]) for t in rows["pickup"]["targets"]] == [("p50_ms", True), ("p99_ms", False)]
    assert [t["met"] for t in rows["trigger_no_ticker"]["targets"]] == [True]
    assert harness.verdict(list(rows.values())) is False
    cells = {c[0]: c[-1] for c in harness.table_rows({"rows": list(rows.values()), "phases": figures})}
    assert cells["pickup latency, idle worker (ms)"] == "p50 ms <=15 met; p99 ms <=100 MISSED"
    assert "srv us <=1.00 x procr loop MISSED" in cells[rows["full_loop"]["label"]]


@pytest.mark.slow
def test_the_quick_run_prints_every_loop_row_with_a_verdict(tmp_path: Path) -> None:
    """`python bench/run.py --quick --only loop --no-peers`: real clusters, worker processes and
    pgbench, every phase as small as it runs; the rows are there, each with its targets judged
    (the figures of so short a run are not read)."""
    import subprocess

    out = subprocess.run([sys.executable, "run.py", "--quick", "--only", "loop", "--no-peers",
                          "--results-dir", str(tmp_path)], cwd=harness.HERE,
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode in (0, harness.EXIT_TARGET_MISSED), out.stderr[-3000:]
    table = out.stdout
    for w in harness.WORKLOADS:
        if w.section == "loop":
            assert w.label in table, w.name
    def judged(label: str, target: str) -> None:
        lines = [line for line in table.splitlines() if line.startswith(label)]
        assert any(re.search(re.escape(target) + r" (met|MISSED|not measured)", line) for line in lines), lines

    judged("full loop: trigger->dequeue->start->complete", ">=1.20 x procr loop")
    judged("dequeue_runs only, one environment", ">=3.00 x 1 dequeuer")
    judged("pickup latency, idle worker (ms)", "p99 ms <=100")
    judged("trigger_run, no key, ticker stopped past bound", ">=0.90 x ticker on")
    assert "peers not measured (--no-peers)" in table
    assert "targets: " in table
    assert list(tmp_path.glob("bench-*.json"))


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
