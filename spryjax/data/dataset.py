"""`Dataset`: what every data loader returns and every trainer consumes.

train / test are dicts of numpy arrays with a leading example axis. Reserved names:
  "label"   the target (int class ids, or floats for regression);
  "client"  a natural client key per example (a movie id, a writer id), used by natural partitions;
  "length"  the number of real tokens per example, used to trim padded sequence arrays (`sequence_keys`).
Everything else is a model input.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Dataset(NamedTuple):
    name: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int              # 0 for regression
    sequence_keys: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()   # what each class id stands for, where the source names its labels
    # Evaluation sums -> metrics where they need the data's host-side text (SQuAD's answer spans, MultiRC's
    # questions: spryjax.data.reading_comprehension); None: spryjax.task.summarize.
    summarize: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None

    def inputs(self, split: str = "train") -> dict[str, np.ndarray]:
        """The arrays a model reads (all but "client" and "length")."""
        return {k: v for k, v in getattr(self, split).items() if k not in ("client", "length")}
