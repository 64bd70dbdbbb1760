"""Benchmark entry point: ``python bench/run.py [--seconds N] [--keep] [--only calls|batches]``.

Starts two throwaway local clusters (fsync and synchronous_commit on), runs the pgbench scripts
in bench/pgbench/ and the Python-client harness one after another, then the batch phases
(batch_trigger of 10,000 items with and without keys, stream_batch of 100,000 items, against a
set-based INSERT ... SELECT of 10,000 rows), prints each rate with its ratio to the baseline
measured in the same run, and writes the JSON to bench/results/.
See docs/benchmarks.md for the method and recorded figures. Not a test: nothing here runs
under pytest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import BATCH_REPS, SECTIONS, STREAM_REPS, main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="Length of each call phase (default 10).")
    parser.add_argument("--batch-reps", type=int, default=BATCH_REPS,
                        help=f"Repetitions of each 10,000-item batch phase (default {BATCH_REPS}).")
    parser.add_argument("--stream-reps", type=int, default=STREAM_REPS,
                        help=f"Repetitions of the 100,000-item stream (default {STREAM_REPS}; 0 skips it).")
    parser.add_argument("--only", choices=SECTIONS, help="Run only the call phases or only the batch phases.")
    parser.add_argument("--keep", action="store_true", help="Leave the clusters running and print their URLs.")
    args = parser.parse_args(argv)
    return main(args.seconds, keep=args.keep, results_dir=Path(__file__).resolve().parent / "results",
                sections=(args.only,) if args.only else SECTIONS, batch_reps=args.batch_reps,
                stream_reps=args.stream_reps)


if __name__ == "__main__":
    sys.exit(cli())
