"""Run metrics: a JSONL log in the workdir (one JSON object per line: a round, an epoch, or a summary), a progress
bar showing the live metrics, and reading logs back for reports and plots."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

from spryjax.errors import InputError, one_line, warn

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy/jax scalars to float/int, NaN and inf to strings JSON can carry."""
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends records to WORKDIR/metrics.jsonl, flushing each line so an interrupted run loses nothing."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self._drop_cut_short_line()

    def _drop_cut_short_line(self) -> None:
        """A run killed while writing leaves a last line without its newline: cut it off (with a warning) before
        anything is appended to it."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                number = data.count(b"\n") + 1
                warn(f"{self.path}: line {number} was cut short (an interrupted write); it is left out")
                f.truncate(keep)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step_key: str, last: float) -> None:
        """Drops records with record[step_key] > last (resuming from a checkpoint at `last`, or 0: from the start),
        and a final line cut short by a killed run. Records without `step_key` (summaries) stay."""
        kept = [r for r in read_metrics(os.path.dirname(self.path)) if r.get(step_key, -1) <= last]
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(temporary, self.path)   # a kill while trimming leaves the old file or the new one, whole


def save_config(config, workdir: str) -> None:
    """Every field of a run's ml_collections config, as WORKDIR/config.json."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (config.to_dict(), config.json) as dotted keys: {"fl": {"alpha": 1}} -> {"fl.alpha": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of WORKDIR/metrics.jsonl (empty if there is none).

    A final line without its newline that is not a whole record (a run killed while writing it) is left out with a
    warning; any other line that is not a JSON object is an `InputError` naming the file and the line."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read: {one_line(error)}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number == len(lines) and not line.endswith("\n"):
            warn(f"{path}: line {number} was cut short (an interrupted write); it is left out")
        else:
            raise InputError(f"{path}: line {number} is not a metrics record (a JSON object): {line.strip()[:60]!r}")
    return records


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             initial: int = 0) -> tqdm:
    """A progress bar on stderr; `bar.set_postfix(metric=value)` shows live metrics. Disabled when
    SPRYJAX_PROGRESS=0."""
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, file=sys.stderr,
                disable=os.environ.get("SPRYJAX_PROGRESS", "1") == "0", leave=True)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".4g") -> str:
    """A Markdown table of `rows` (dicts), columns in the given order (default: keys of the first row)."""
    columns = columns or list(rows[0])
    fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
