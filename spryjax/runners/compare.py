"""`experiment = "compare"`: several federated runs on one task, side by side, ending with one table and a plot.

config.members maps a name to a complete federated config (see spryjax/runners/federated.py); each runs into
WORKDIR/<name> (resumable like any run) and the comparison table (final accuracy, per-client peak memory of the
client step, bytes up and down per round, wall time) is printed and written to WORKDIR/comparison.md, with the
accuracy curves and step memory in WORKDIR/comparison.png.
"""
from __future__ import annotations

import os

from spryjax import build
from spryjax.errors import InputError
from spryjax.memory import MIB
from spryjax.metrics import format_table, read_metrics
from spryjax.plots import bars, curves
from spryjax.runners.federated import check_federated, run_federated
from spryjax.runners.workdir import save_checked_config


def check_comparison(config) -> None:
    """The top-level fields, then every member as a federated config."""
    build.check_fields(config, "config", ("experiment", "title", "members"), required=("members",))
    if not config.members:
        raise InputError("config.members: empty; name at least one federated config")
    for name, member in config.members.items():
        check_federated(member, f"config.members.{name}")


def summary_row(name: str, records: list[dict]) -> dict:
    """One table row from a run's metrics.jsonl records."""
    rounds = [r for r in records if "round" in r]
    step = next((r for r in records if r.get("summary") == "client_step"), {})
    evaluated = [r for r in rounds if "generalized_accuracy" in r]
    last = evaluated[-1] if evaluated else {}
    row = {"method": name, "rounds": rounds[-1]["round"] if rounds else 0,
           "generalized_accuracy": last.get("generalized_accuracy", float("nan"))}
    for group in ("personalized", "finetuned"):   # personalization baselines; Spry's released-code accuracy
        if f"{group}_accuracy" in last:
            row[f"{group}_accuracy"] = last[f"{group}_accuracy"]
    row.update({"client_step_memory_MiB": step.get("total_bytes", 0) / MIB,
                "client_step_temp_MiB": step.get("temp_bytes", 0) / MIB,
                "up_KiB_per_round": rounds[-1]["comm_up_bytes"] / 1024 if rounds else 0.0,
                "down_KiB_per_round": rounds[-1]["comm_down_bytes"] / 1024 if rounds else 0.0,
                "wall_time_s": rounds[-1]["wall_time"] if rounds else 0.0})
    return row


def run_comparison(config, workdir: str) -> list[dict]:
    """Runs every member (resuming where one stopped) and writes the comparison table and plots."""
    runs = {}
    for name, member in config.members.items():
        member_dir = os.path.join(workdir, name)
        save_checked_config(member, member_dir)
        print(f"\n== {name} ==")
        run_federated(member, member_dir)
        runs[name] = read_metrics(member_dir)
    rows = [summary_row(name, records) for name, records in runs.items()]
    table = format_table(rows, floatfmt=".3f")
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    plot = curves(runs, os.path.join(workdir, "comparison.png"), title=config.get("title", ""))
    bars({r["method"]: r["client_step_memory_MiB"] for r in rows}, os.path.join(workdir, "client_memory.png"),
         ylabel="per-client step memory (MiB)", title="compiled memory of one client step")
    print("\n" + table)
    print(f"\nper-client step memory: XLA's compiled buffers (arguments incl. the frozen base, outputs, temporaries) "
          f"of one client update on one batch.\nplots: {plot}, {os.path.join(workdir, 'client_memory.png')}")
    return rows
