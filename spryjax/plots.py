"""Plots from run logs (matplotlib, Agg backend: no display needed): accuracy against rounds, wall time or
memory for several runs, written as PNG."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def curves(runs: dict[str, list[dict]], path: str, *, metric: str = "generalized_accuracy",
           xs: Sequence[str] = ("round", "wall_time"), title: str = "",
           reference: dict[str, float] | None = None) -> str:
    """One panel per x in `xs` ("round", "wall_time"), one line per run: `metric` where a record has it.
    `reference` draws horizontal lines (e.g. {"majority class": 0.58}). Returns `path`."""
    fig, axes = plt.subplots(1, len(xs), figsize=(5.5 * len(xs), 4), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for name, records in runs.items():
            points = [(r[x], r[metric]) for r in records if metric in r and x in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        for label, value in (reference or {}).items():
            ax.axhline(value, linestyle="--", linewidth=1, color="gray")
            ax.annotate(label, (ax.get_xlim()[0], value), fontsize=8, color="gray", va="bottom")
        ax.set_xlabel({"round": "round", "wall_time": "wall time (s)"}.get(x, x))
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: never hides a curve
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def bars(values: dict[str, float], path: str, *, ylabel: str, title: str = "") -> str:
    """A bar per name (e.g. per-client step memory in MiB per method). Returns `path`."""
    fig, ax = plt.subplots(figsize=(1.2 * len(values) + 2, 3.5))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    for i, v in enumerate(values.values()):
        ax.annotate(f"{v:.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def scatter(points: dict[str, tuple[float, float]], path: str, *, xlabel: str, ylabel: str, title: str = "") -> str:
    """One labelled point per name (e.g. final accuracy against per-client step memory per method). Returns
    `path`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=30)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def stacked_bars(rows: list[dict], path: str, *, parts: Sequence[str], group: str = "shape",
                 label: str = "method", ylabel: str = "MiB") -> str:
    """One panel per `group` value (e.g. model shape), one stacked bar per `label` (e.g. method) whose segments
    are `parts` (e.g. parameters / activations / gradients + optimizer state). Returns `path`."""
    groups = list(dict.fromkeys(r[group] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        members = [r for r in rows if r[group] == g]
        bottom = [0.0] * len(members)
        for part in parts:
            heights = [r[part] for r in members]
            ax.bar([r[label] for r in members], heights, bottom=bottom, label=part.replace("_MiB", ""))
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_title(g)
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=45)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
