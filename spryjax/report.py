"""Run and sweep directories -> a results table (Markdown and CSV) and plots (PNG).

    python -m spryjax.report SWEEP_DIR [--metric generalized_accuracy] [--out DIR]

Every directory under SWEEP_DIR holding a metrics.jsonl is a run (SWEEP_DIR itself for a single run); its
config.json says what it ran. Runs are grouped by the config fields that differ between them, seed excepted, so
each row is one setting (e.g. one method at one α) with mean ± std over its seeds (sample std; blank for one
seed). Fields implied by an earlier one (the method fixes algorithm.name) are not shown again. The metric's
value of a run is its last evaluated round.

Written to --out (default SWEEP_DIR): report.md, report.csv, accuracy.png (mean curve per row against round and
wall time) and, where runs recorded their client step's compiled memory, accuracy_memory.png (final metric
against the per-client step memory).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, NamedTuple

import numpy as np

from spryjax.errors import ArgumentParser, InputError, one_line, run_command
from spryjax.memory import MIB
from spryjax.metrics import METRICS_FILE, flatten, format_table, read_metrics
from spryjax.plots import curves, scatter

FIRST_FIELDS = ("method", "config_arg")  # shown first when they differ: they name the method


class Run(NamedTuple):
    path: str
    config: dict[str, Any]          # flattened config.json ({} if absent)
    records: list[dict]             # per-round records
    summary: dict                   # the client_step record ({} if absent)


def find_runs(directory: str) -> list[Run]:
    """Every run under `directory` (itself included), sorted by path."""
    if not os.path.exists(directory):
        raise InputError(f"report: no directory {directory}")
    if not os.path.isdir(directory):
        raise InputError(f"report: {directory} is a file; give a run's workdir or a sweep directory")
    runs = []
    for path, dirs, files in sorted(os.walk(directory)):
        dirs[:] = sorted(d for d in dirs if d != "checkpoints")
        if METRICS_FILE not in files:
            continue
        config_path = os.path.join(path, "config.json")
        config = {}
        if os.path.exists(config_path):
            try:
                with open(config_path) as f:
                    config = flatten(json.load(f))
            except (OSError, ValueError, AttributeError) as error:
                raise InputError(f"report: {config_path} is not a readable config ({one_line(error)})") from None
        records = read_metrics(path)
        runs.append(Run(path, config, [r for r in records if "round" in r],
                        next((r for r in records if r.get("summary") == "client_step"), {})))
    if not runs:
        raise InputError(f"report: no run (a directory with {METRICS_FILE}) under {directory}")
    return runs


def swept_fields(runs: list[Run]) -> list[str]:
    """Config fields that differ between runs, seed excluded, without those an earlier field already determines."""
    keys = sorted(set().union(*(r.config for r in runs)), key=lambda k: (k not in FIRST_FIELDS, k))
    differing = [k for k in keys if k != "seed" and len({repr(r.config.get(k)) for r in runs}) > 1]
    kept: list[str] = []
    for key in differing:
        by_kept: dict[str, set] = {}
        for r in runs:
            by_kept.setdefault(repr([r.config.get(k) for k in kept]), set()).add(repr(r.config.get(key)))
        if not kept or any(len(values) > 1 for values in by_kept.values()):
            kept.append(key)
    return kept


def final_value(run: Run, metric: str) -> float:
    values = [r[metric] for r in run.records if isinstance(r.get(metric), (int, float))]
    return float(values[-1]) if values else float("nan")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def group(runs: list[Run], fields: list[str]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(r.config.get(k) for k in fields), []).append(r)
    return groups


def table_rows(groups: dict[tuple, list[Run]], fields: list[str], metric: str) -> list[dict]:
    """One row per group: its field values, the number of seeds, mean and std of the final metric, train loss,
    wall time, client step memory and bytes sent per round."""
    rows = []
    for values, members in groups.items():
        row: dict[str, Any] = dict(zip(fields, values))
        row["seeds"] = len(members)
        row["rounds"] = max((r.records[-1]["round"] for r in members if r.records), default=0)
        for name, per_run in ((metric, lambda r: final_value(r, metric)),
                              ("train_loss", lambda r: final_value(r, "train_loss")),
                              ("wall_time_s", lambda r: final_value(r, "wall_time"))):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([per_run(r) for r in members])
        memory = [r.summary["total_bytes"] / MIB for r in members if "total_bytes" in r.summary]
        row["client_step_MiB"] = float(np.mean(memory)) if memory else float("nan")
        up = [r.records[-1]["comm_up_bytes"] for r in members if r.records and "comm_up_bytes" in r.records[-1]]
        row["up_KiB_per_round"] = float(np.mean(up)) / 1024 if up else float("nan")
        rows.append(row)
    return rows


def markdown(rows: list[dict], fields: list[str], metric: str) -> str:
    """The rows as a Markdown table, means ± stds in one column each."""
    pm = lambda m, s: "" if not np.isfinite(m) else (f"{m:.4f}" if not np.isfinite(s) else f"{m:.4f} ± {s:.4f}")
    shown = [{**{k: row[k] for k in fields}, "seeds": row["seeds"], "rounds": row["rounds"],
              metric: pm(row[f"{metric}_mean"], row[f"{metric}_std"]),
              "train_loss": pm(row["train_loss_mean"], row["train_loss_std"]),
              "wall_time_s": f"{row['wall_time_s_mean']:.1f}",
              "client_step_MiB": "" if not np.isfinite(row["client_step_MiB"]) else f"{row['client_step_MiB']:.2f}",
              "up_KiB_per_round": "" if not np.isfinite(row["up_KiB_per_round"]) else
              f"{row['up_KiB_per_round']:.1f}"} for row in rows]
    return format_table(shown)


def label(values: tuple, fields: list[str]) -> str:
    return ", ".join(f"{k}={v}" if k not in FIRST_FIELDS else str(v) for k, v in zip(fields, values)) or "run"


def mean_curve(members: list[Run], metric: str) -> list[dict]:
    """Per round, the mean over members of the metric and of the wall time (rounds where any member has it)."""
    by_round: dict[int, list[dict]] = {}
    for run in members:
        for r in run.records:
            if isinstance(r.get(metric), (int, float)):
                by_round.setdefault(r["round"], []).append(r)
    return [{"round": k, metric: float(np.mean([r[metric] for r in v])),
             "wall_time": float(np.mean([r["wall_time"] for r in v]))} for k, v in sorted(by_round.items())]


def report(directory: str, *, metric: str = "generalized_accuracy", out: str | None = None) -> dict[str, str]:
    """Writes the table and plots of the runs under `directory`; returns {what: path} and prints the table."""
    out = out or directory
    runs = find_runs(directory)
    recorded = sorted({k for run in runs for r in run.records for k, v in r.items() if isinstance(v, (int, float))})
    if metric not in recorded:
        raise InputError(f"report: --metric={metric} is in no run's records; recorded: {', '.join(recorded)}")
    fields = swept_fields(runs)
    os.makedirs(out, exist_ok=True)
    groups = group(runs, fields)
    rows = table_rows(groups, fields, metric)
    paths = {"markdown": os.path.join(out, "report.md"), "csv": os.path.join(out, "report.csv"),
             "curves": os.path.join(out, "accuracy.png")}
    text = markdown(rows, fields, metric)
    with open(paths["markdown"], "w") as f:
        f.write(text + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves({label(values, fields): mean_curve(members, metric) for values, members in groups.items()},
           paths["curves"], metric=metric, title=f"{os.path.basename(os.path.normpath(directory))}: mean over seeds")
    points = {label(values, fields): (row["client_step_MiB"], row[f"{metric}_mean"])
              for (values, _), row in zip(groups.items(), rows)
              if np.isfinite(row["client_step_MiB"]) and np.isfinite(row[f"{metric}_mean"])}
    if points:
        paths["memory"] = scatter(points, os.path.join(out, "accuracy_memory.png"),
                                  xlabel="client step memory (MiB, compiled)", ylabel=metric.replace("_", " "))
    print(text)
    print("\n" + "; ".join(f"{k}: {v}" for k, v in paths.items()))
    return paths


def run_cli(argv: list[str]) -> int:
    """`python -m spryjax.report`, in-process: argv in (argv[0] the program), exit code out."""
    parser = ArgumentParser(prog="python -m spryjax.report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="a sweep directory (members in subdirectories) or a single run's workdir")
    parser.add_argument("--metric", default="generalized_accuracy")
    parser.add_argument("--out", default=None, help="where to write (default: the directory)")

    def main() -> None:
        args = parser.parse_args(argv[1:])
        report(args.directory, metric=args.metric, out=args.out)
    return run_command(main, "spryjax.report")


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv))
