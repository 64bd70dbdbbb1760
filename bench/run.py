"""Benchmark entry point: ``python bench/run.py [--seconds N] [--rounds N] [--quick] [--no-peers]
[--only calls|batches] [--keep]``.

Starts two throwaway local clusters (fsync and synchronous_commit on), installs the peers
(Procrastinate, graphile-worker) on demand into a bench-only place, runs every call workload —
runops's triggers and reads, the Python client, the peers' enqueue calls, a plain INSERT
baseline — in interleaved rounds, then the batch phases (batch_trigger of 10,000 items with and
without keys, stream_batch of 100,000 items, against a set-based INSERT ... SELECT of 10,000
rows), prints one table (rates, latency, CPU per call, ratios to the baseline and to each peer,
targets met or missed), writes the JSON and its chart to bench/results/ (``--chart
docs/benchmarks.png`` refreshes the docs' chart).
See docs/benchmarks.md for the method and recorded figures. Not a test: nothing here runs
under pytest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import BATCH_REPS, ROUNDS, SECTIONS, STREAM_REPS, main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="Length of each call phase (default 10).")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"Interleaved rounds of the call phases; the median is reported (default {ROUNDS}).")
    parser.add_argument("--batch-reps", type=int, default=BATCH_REPS,
                        help=f"Repetitions of each 10,000-item batch phase (default {BATCH_REPS}).")
    parser.add_argument("--stream-reps", type=int, default=STREAM_REPS,
                        help=f"Repetitions of the 100,000-item stream (default {STREAM_REPS}; 0 skips it).")
    parser.add_argument("--quick", action="store_true",
                        help="Every row once, as small as it runs (1 s phases, one round, small loops): to see "
                             "the table work, not to read its figures.")
    parser.add_argument("--no-peers", action="store_true", help="Leave Procrastinate and graphile-worker out.")
    parser.add_argument("--only", choices=SECTIONS,
                        help="Run only the call phases, the batch phases or the worker's loop phases.")
    parser.add_argument("--chart", type=Path,
                        help="Where to draw the chart (default: beside the JSON in bench/results/; "
                             "docs/benchmarks.png refreshes the docs' chart).")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="Where the JSON goes (default bench/results/).")
    parser.add_argument("--keep", action="store_true", help="Leave the clusters running and print their URLs.")
    args = parser.parse_args(argv)
    return main(args.seconds, keep=args.keep, results_dir=args.results_dir,
                sections=(args.only,) if args.only else SECTIONS, batch_reps=args.batch_reps,
                stream_reps=args.stream_reps, rounds=args.rounds, peers=not args.no_peers, chart=args.chart,
                quick=args.quick)


if __name__ == "__main__":
    sys.exit(cli())
