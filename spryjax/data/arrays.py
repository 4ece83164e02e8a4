"""A built `Dataset` saved as numpy arrays, and loaded back without its loader, tokenizer or source files.

What a seeded loader builds (`spryjax.build.dataset(config.data, seed)`, e.g. Rotten Tomatoes tokenized for
MiniLM, whose held-out movies depend on the seed) is saved once for several seeds in one `.npz`; a config then
names it as `data.name = "arrays"`, `data.path = FILE` and gets, for its `seed`, exactly the `Dataset` the loader
made. Nothing else is read: a device without network, tokenizers or the offline asset packages runs from the file
alone (scripts/device/prepare.sh writes one for configs/spry_rt_minilm.py).

Layout (np.savez_compressed, no pickles): the seeds' examples share one pool of distinct rows,
    pool/<array>            [rows, ...]   every distinct example once (the seeds hold the same examples, split
                                          differently)
    seed<s>/train, /test    [n] int64     row indices into the pool of seed s's train and test splits, in order
    meta                    JSON          name, num_classes, sequence_keys, seeds, and `source` (what made it)

Example:
  >>> save("rt_minilm.npz", {s: build.dataset(config.data, s) for s in range(3)}, source=config.data.to_dict())
  >>> data = load_arrays(path="rt_minilm.npz", seed=1)      # == build.dataset(config.data, 1)
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.errors import InputError

SPLITS = ("train", "test")


def _row_keys(columns: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """One opaque key per example: the bytes of all its arrays side by side, as a numpy void scalar."""
    parts = [np.ascontiguousarray(columns[k]).reshape(len(columns[k]), -1).view(np.uint8) for k in names]
    rows = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return rows.view(np.dtype((np.void, rows.shape[1]))).ravel()


def save(path: str | os.PathLike, datasets: Mapping[int, Dataset], *, source: Any = None) -> None:
    """Writes `datasets` ({seed: Dataset of that seed}, same arrays and dtypes in every split) to `path`.

    `source` (JSON-able: e.g. the config section that built them) is stored as a record of what made the file."""
    if not datasets:
        raise InputError("arrays.save: no datasets")
    first = next(iter(datasets.values()))
    names = sorted(first.train)
    splits = [(seed, split, getattr(data, split)) for seed, data in datasets.items() for split in SPLITS]
    for seed, split, columns in splits:
        if sorted(columns) != names or any(columns[k].dtype != first.train[k].dtype for k in names):
            raise InputError(f"arrays.save: seed {seed}'s {split} split has other arrays or dtypes than the first")
    keys = np.concatenate([_row_keys(columns, names) for _, _, columns in splits])
    _, first_row, inverse = np.unique(keys, return_index=True, return_inverse=True)
    everything = {k: np.concatenate([columns[k] for _, _, columns in splits]) for k in names}
    out = {f"pool/{k}": v[first_row] for k, v in everything.items()}
    start = 0
    for seed, split, columns in splits:
        size = len(columns[names[0]])
        out[f"seed{seed}/{split}"] = inverse[start:start + size].astype(np.int64)
        start += size
    meta = {"name": first.name, "num_classes": first.num_classes, "sequence_keys": list(first.sequence_keys),
            "seeds": sorted(int(s) for s in datasets), "source": source}
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:   # np.savez_compressed would append ".npz" to a name without it
        np.savez_compressed(f, **out)


def load_arrays(*, path: str, seed: int = 0) -> Dataset:
    """The `Dataset` of `seed` saved in `path` by `save` (the config layer's `data.name = "arrays"`).

    Args:
      path: the .npz file.
      seed: the run's seed; the file must hold it (its `meta` lists the seeds saved).
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes())
            if f"seed{seed}/train" not in stored:
                raise InputError(f"{path}: holds the data of seeds {meta['seeds']}, not of seed {seed}")
            pool = {k.split("/", 1)[1]: stored[k] for k in stored.files if k.startswith("pool/")}
            index = {split: stored[f"seed{seed}/{split}"] for split in SPLITS}
    except (OSError, KeyError, ValueError) as error:
        raise InputError(f"{path}: not a dataset saved by spryjax.data.arrays ({type(error).__name__}: {error})"
                         ) from None
    split = lambda rows: {k: v[rows] for k, v in pool.items()}
    return Dataset(meta["name"], split(index["train"]), split(index["test"]), int(meta["num_classes"]),
                   tuple(meta["sequence_keys"]))
