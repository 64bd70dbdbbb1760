"""The chart of one `runops bench` result: ``python bench/chart.py RESULT.json OUT.png``.

Runs in the bench-only venv (``bench/peers.py`` installs matplotlib there; it is no project
dependency): ``bench/harness.py`` calls it after each run, beside the run's JSON in
``bench/results/`` (``docs/benchmarks.png`` only when asked: ``--chart``).

Two panels, from the result's ``rows`` (the printed table's):

* left: the 4-client enqueue calls, runops's and the peers', in calls per second (median of the
  rounds; the whisker spans the rounds), each of a row's targets drawn as a marker at the rate it
  asks for (its minimum times the rate of the row it is against: the baseline, a peer);
* right: every row that has a yardstick, as its ratio to it (the baseline at the same clients,
  the set INSERT for batches, the local read for reads), with each target against the
  yardstick drawn as a tick — green bars meet every such target, red ones miss one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

MET, MISSED, PLAIN, PEER = "#2e7d32", "#c62828", "#607d8b", "#8d6e63"
SHORT = {"baseline": "baseline", "trigger_no_key": "pgbench", "procrastinate_defer": "procr",
         "procrastinate_defer_lock": "procr+lock", "graphile_add_job": "graphile",
         "graphile_add_job_key": "graphile+key"}
MARKERS = {"baseline": ("|", "black"), "trigger_no_key": ("|", "#37474f"), "procrastinate_defer": ("v", "#4e342e"),
           "procrastinate_defer_lock": ("^", "#4e342e"), "graphile_add_job": ("D", "#6a1b9a"),
           "graphile_add_job_key": ("s", "#6a1b9a")}
PEERS = ("procrastinate_defer", "procrastinate_defer_lock", "graphile_add_job", "graphile_add_job_key")


def _label(row: dict[str, Any]) -> str:
    return f"{row['label']} ({row['clients']}c)" if row["unit"] == "calls" else row["label"]


def _colour(row: dict[str, Any], against: str | None = None) -> str:
    """Green when the row's targets (those against ``against`` only, when given) are all met, red
    when one is missed; otherwise a peer's or a plain colour."""
    verdicts = [t["met"] for t in row["targets"] if t["met"] is not None and against in (None, t["against"])]
    if not verdicts:
        return PEER if row["name"] in PEERS else PLAIN
    return MET if all(verdicts) else MISSED


def draw(result: dict[str, Any], out: Path) -> None:
    rows = [r for r in result["rows"] if r["rate"] is not None]
    phases = result["phases"]
    enqueue = [r for r in rows if r["peers"] or r["name"] in PEERS]
    ratios = [r for r in rows if r["ratio"] is not None]
    height = max(len(enqueue), len(ratios)) * 0.42 + 1.6
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, height), gridspec_kw={"width_ratios": [1, 1.25]})

    y = list(range(len(enqueue)))[::-1]
    rates = [r["rate"] for r in enqueue]
    lows = [r["rate"] - min(phases.get(r["name"], {}).get("rounds_calls_per_s") or [r["rate"]]) for r in enqueue]
    highs = [max(phases.get(r["name"], {}).get("rounds_calls_per_s") or [r["rate"]]) - r["rate"] for r in enqueue]
    left.barh(y, rates, xerr=[lows, highs], color=[_colour(r) for r in enqueue], capsize=3)
    left.set_yticks(y, [_label(r) for r in enqueue], fontsize=8)
    left.set_xlabel("calls per second (median of the rounds; whisker: the rounds' range; marker: a target)")
    left.set_title("Enqueue, 4 clients: runops and its peers", fontsize=10)
    by_name = {r["name"]: r for r in rows}
    shown: set[str] = set()
    for yi, r, rate, high in zip(y, enqueue, rates, highs, strict=True):
        left.text(rate + high, yi + 0.15, f" {rate:,.0f}", va="center", fontsize=7)
        # Each target as the rate it asks for: its minimum times the rate of what it is against,
        # one marker per yardstick (the legend names them).
        for i, t in enumerate(r["targets"]):
            against = by_name.get(t["against"])
            if against is None or against["rate"] is None or against["unit"] != "calls":
                continue
            marker, colour = MARKERS.get(t["against"], ("x", "black"))
            label = f"target: {t['minimum']:g} x {SHORT.get(t['against'], t['against'])}"
            left.plot([t["minimum"] * against["rate"]], [yi - 0.22 + 0.14 * i], marker=marker, color=colour,
                      linestyle="none", markersize=8, markeredgewidth=2, label=None if label in shown else label)
            shown.add(label)
    if shown:
        left.legend(fontsize=6, loc="lower right")

    y = list(range(len(ratios)))[::-1]
    values = [r["ratio"] for r in ratios]
    right.barh(y, values, color=[_colour(r, r["reference"]) for r in ratios])
    right.axvline(1.0, color="black", linewidth=0.8)
    for yi, r in zip(y, ratios, strict=True):
        for t in r["targets"]:
            if t["against"] == r["reference"]:
                right.plot([t["minimum"]] * 2, [yi - 0.4, yi + 0.4], color="black", linewidth=2)
        right.text(r["ratio"], yi, f" {r['ratio']:.2f}", va="center", fontsize=7)
    right.set_yticks(y, [f"{_label(r)} / {r['reference']}" for r in ratios], fontsize=8)
    right.set_xlabel("ratio to the row's yardstick (black tick: the target)")
    right.set_title("Against the same run's yardsticks", fontsize=10)

    s = result["machine"]["settings"]
    fig.suptitle(f"runops bench {result['started_at']} - commit {result.get('source', {}).get('git_head', '?')}, "
                 f"{result['machine']['cpus']} CPUs, PostgreSQL {s['server_version']}, "
                 f"{result.get('rounds', 1)} rounds of {result['seconds']} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
