"""Accuracy vs round and vs wall time from run directories' metrics.jsonl, as one PNG.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] [--metric generalized_accuracy] [--out accuracy.png]
"""
import os
import sys

from spryjax.metrics import read_metrics
from spryjax.plots import curves
from spryjax.errors import ArgumentParser, run_command


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--metric", default="generalized_accuracy")
    parser.add_argument("--out", default="accuracy.png")
    args = parser.parse_args()
    runs = {}
    for run in args.runs:
        records = read_metrics(run)
        if not records:
            print(f"plot: error: no metrics.jsonl in {run}", file=sys.stderr)
            return 2
        runs[os.path.basename(os.path.normpath(run))] = records
    print(curves(runs, args.out, metric=args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/plot.py"))
