"""Your own text-classification data from one file: CSV, JSON lines or Parquet (optionally compressed: .gz, .bz2,
.xz, .zst, .zip), with a text column (or two, for pairs), a label column holding strings or integers, and
optionally a client column for natural clients.

    reviews.csv:   text,stars,user            text_classification_dataset(path="reviews.csv", text_column="text",
                   "Loved it",5,u1                label_column="stars", client_column="user", tokenizer=...,
                   "Meh",2,u2                      max_length=64)

Labels become class ids 0..C−1 in sorted order (numbers by value, strings alphabetically); `Dataset.label_names`
keeps the mapping (the federated runner prints it and writes WORKDIR/labels.json). Client ids become the "client"
array that `federate(partition="natural")` groups by. The file is read with Hugging Face `datasets` (through
`spryjax.data.download.load_table`), so its column types are the file's own.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.data.download import load_table
from spryjax.data.tokenize import tokenized_dataset
from spryjax.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _class_ids(values: np.ndarray, what: str, column: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(class id per row, the label of each class id): the distinct values in sorted order."""
    missing = np.flatnonzero(np.equal(values, None) | np.array([v != v for v in values], bool))   # None or NaN
    if missing.size:
        raise InputError(f"{what}: label column {column!r} is empty in {missing.size} rows (the first is row "
                         f"{missing[0]})")
    try:
        classes, ids = np.unique(values, return_inverse=True)
    except TypeError:   # e.g. JSON lines mixing numbers and strings
        raise InputError(f"{what}: label column {column!r} mixes types "
                         f"({', '.join(sorted({type(v).__name__ for v in values}))})") from None
    if len(classes) < 2:
        raise InputError(f"{what}: label column {column!r} holds one class ({classes[0]!r}); classification needs "
                         "at least two")
    return ids.astype(np.int32), tuple(str(c) for c in classes.tolist())


def text_classification_dataset(*, path: str, text_column: str, label_column: str,
                                tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int = 0,
                                text_pair_column: str | None = None, client_column: str | None = None,
                                test_fraction: float = 0.2) -> Dataset:
    """The file at `path` as a tokenized classification `Dataset` (see the module docstring).

    Args:
      text_column, text_pair_column: the text (and the second text of a pair, e.g. a hypothesis), tokenized
        together to `max_length` tokens.
      label_column: the label of each row, strings or integers.
      client_column: who each row belongs to (becomes "client", for natural partitions); None: no clients.
      test_fraction: the share of rows, drawn with `seed`, in the test split (what centralized training evaluates
        on; a federated run pools both splits and holds out part of each client's rows itself).
    """
    what = os.path.basename(path)
    columns = tuple(c for c in (text_column, text_pair_column, label_column, client_column) if c)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"{what}: the file is empty")
    try:   # a local file: load_table reads data_files and never the Hub (whose name and split it is not given)
        table = load_table(what, (path, None), "train", ("train",), columns, data_files=path, cache_dir=None)
    except StopIteration:   # datasets' JSON reader on a file without rows
        raise InputError(f"{what}: the file holds no rows") from None
    except InputError as error:
        if "corresponds to no data" in str(error):   # datasets' CSV reader on a header without rows
            raise InputError(f"{what}: the file holds no rows") from None
        raise
    if table.num_rows < 2:
        raise InputError(f"{what}: the file holds {table.num_rows} rows; a data set needs at least two")
    # Empty cells arrive as None: empty texts. Numbers in a text column are texts too.
    texts = {field: np.array(["" if v is None else str(v) for v in _column(table, column)], dtype=object)
             for field, column in (("text", text_column), ("text_pair", text_pair_column)) if column}
    label, label_names = _class_ids(_column(table, label_column), what, label_column)
    arrays = {**texts, "label": label}
    if client_column:
        _, client_ids = np.unique(_column(table, client_column).astype(str), return_inverse=True)
        arrays["client"] = client_ids.astype(np.int32)
    held_out = min(max(round(test_fraction * len(label)), 1), len(label) - 1)   # both splits have a row
    test = np.zeros(len(label), bool)
    test[np.random.default_rng(seed).permutation(len(label))[:held_out]] = True
    name = what.split(".")[0]
    data = tokenized_dataset(name, {k: v[~test] for k, v in arrays.items()}, {k: v[test] for k, v in arrays.items()},
                             tokenizer, max_length=max_length, num_classes=len(label_names),
                             text_fields=tuple(texts))
    return data._replace(label_names=label_names)
