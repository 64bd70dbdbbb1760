"""Benchmark entry point: ``python bench/run.py [--seconds N] [--keep]``.

Starts two throwaway local clusters (fsync and synchronous_commit on), runs the pgbench scripts
in bench/pgbench/ and the Python-client harness one after another, prints each rate with its
ratio to the baseline measured in the same run, and writes the JSON to bench/results/.
See docs/benchmarks.md for the method and recorded figures. Not a test: nothing here runs
under pytest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runops.bench import main


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="Length of each phase (default 10).")
    parser.add_argument("--keep", action="store_true", help="Leave the clusters running and print their URLs.")
    args = parser.parse_args(argv)
    return main(args.seconds, keep=args.keep, results_dir=Path(__file__).resolve().parent / "results")


if __name__ == "__main__":
    sys.exit(cli())
