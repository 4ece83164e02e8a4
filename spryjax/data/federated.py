"""Federated data as arrays that `jax.vmap` can consume.

Storage is flat, so memory is proportional to the data, not to clients × largest client: each array holds all
examples client after client ([total, ...]) and `offsets[i]:offsets[i+1]` are client i's rows. Clients larger
than `max_examples_per_client` are capped to a seeded random subset (the choice fedjax and pfl-research make too):
one giant client would otherwise set the padded size, and so the compute, of every cohort it joins.

A cohort is gathered into client-major padded arrays, [C, P, ...] plus per-client counts [C], where P is the
cohort's largest client rounded up to a bucket (a power of two times the batch size), so the number of distinct
compiled shapes stays logarithmic in the client sizes. Arrays named in `sequence_keys` (token ids, attention
masks) are also trimmed along their sequence axis to the cohort's longest sequence, rounded up to
`sequence_bucket`: short snippets padded to 64 tokens would otherwise spend most of the compute on padding.

Inside a client, batching is a pure function of (count, key, epoch): `batch_indices`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spryjax.data import partition as partitions
from spryjax.data.dataset import Dataset
from spryjax.errors import InputError, warn


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Examples of N clients, stored flat.

    arrays: name -> [total_examples, ...]; offsets: [N + 1]; lengths: [total_examples] token counts, or None;
    sequence_keys: names of arrays whose axis 1 is a padded sequence axis (trimmed per cohort).
    """
    arrays: dict[str, np.ndarray]
    offsets: np.ndarray
    lengths: np.ndarray | None = None
    sequence_keys: tuple[str, ...] = ()

    @classmethod
    def from_partition(cls, arrays: dict[str, np.ndarray], parts: Sequence[np.ndarray], *,
                       max_examples_per_client: int | None = None, seed: int = 0,
                       lengths: np.ndarray | None = None, sequence_keys: Sequence[str] = ()) -> "FederatedData":
        """Builds the flat store from index arrays (one per client) into `arrays`."""
        rng = np.random.default_rng(seed)
        kept = []
        for p in parts:
            p = np.asarray(p, dtype=np.int64)
            if max_examples_per_client is not None and len(p) > max_examples_per_client:
                p = np.sort(rng.choice(p, max_examples_per_client, replace=False))
            kept.append(p)
        index = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in kept])]).astype(np.int64)
        missing = [k for k in sequence_keys if k not in arrays]
        if missing:
            raise InputError(f"sequence_keys {missing} are not among the arrays {sorted(arrays)}")
        return cls(arrays={k: np.asarray(v)[index] for k, v in arrays.items()}, offsets=offsets,
                   lengths=None if lengths is None else np.asarray(lengths)[index],
                   sequence_keys=tuple(sequence_keys))

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        """[N] examples per client."""
        return np.diff(self.offsets)

    def client(self, i: int) -> dict[str, np.ndarray]:
        """Client i's examples, unpadded."""
        return {k: v[self.offsets[i]:self.offsets[i + 1]] for k, v in self.arrays.items()}

    def _rows(self, client_ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(row index [C, size] into the flat arrays, valid [C, size]) of a cohort padded to `size` rows."""
        counts = self.counts[client_ids]
        if counts.max(initial=0) > size:
            raise ValueError(f"a client has {counts.max()} examples, more than pad_to={size}")
        rows = np.zeros((len(client_ids), size), np.int64)
        valid = np.arange(size)[None, :] < counts[:, None]
        rows[valid] = (self.offsets[client_ids][:, None] + np.arange(size)[None, :])[valid]
        return rows, valid

    def padded_size(self, client_ids: Sequence[int], batch_size: int = 1) -> int:
        """The rows per client `gather` pads a cohort to: the bucket of its largest client (see `bucket_size`)."""
        return bucket_size(int(self.counts[np.asarray(client_ids, dtype=np.int64)].max(initial=1)), batch_size)

    def gather(self, client_ids: Sequence[int], *, batch_size: int = 1, sequence_bucket: int = 16,
               pad_to: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Client-major padded arrays for a cohort: ({name: [C, P, ...]}, counts [C]).

        P = `pad_to` or `padded_size`; padded rows are zeros; sequence arrays are cut to the cohort's longest row
        (rounded up to `sequence_bucket`).
        """
        client_ids = np.asarray(client_ids, dtype=np.int64)
        rows, valid = self._rows(client_ids, pad_to or self.padded_size(client_ids, batch_size))
        seq_len = None
        if self.sequence_keys and self.lengths is not None:
            seq_len = trimmed_length(self.lengths[rows[valid]], self.arrays[self.sequence_keys[0]].shape[1],
                                     sequence_bucket)
        out = {}
        for name, array in self.arrays.items():
            taken = array[rows]
            taken[~valid] = 0
            if seq_len is not None and name in self.sequence_keys:
                taken = taken[:, :, :seq_len]
            out[name] = taken
        return out, self.counts[client_ids].astype(np.int32)

    def gather_lengths(self, client_ids: Sequence[int], *, batch_size: int = 1, pad_to: int | None = None
                       ) -> np.ndarray:
        """The token count of every row `gather` returns, [C, P] (0 for padding rows; None without lengths)."""
        if self.lengths is None:
            return None
        client_ids = np.asarray(client_ids, dtype=np.int64)
        rows, valid = self._rows(client_ids, pad_to or self.padded_size(client_ids, batch_size))
        return np.where(valid, self.lengths[rows], 0)


def trimmed_length(lengths: np.ndarray, full: int, bucket: int) -> int:
    """The sequence length a batch with these per-example `lengths` is cut to: the longest, rounded up to a
    multiple of `bucket` (few distinct compiled shapes), at most the padded length `full`."""
    return min(full, -(-int(lengths.max(initial=1)) // bucket) * bucket)


def bucket_size(n: int, granularity: int = 1) -> int:
    """Smallest size ≥ n of the form granularity · 2^j (so cohorts of similar clients share a compiled shape)."""
    steps = max(1, math.ceil(n / granularity))
    return granularity * (1 << (steps - 1).bit_length())


def batch_indices(key: jax.Array, count: jax.Array, capacity: int, batch_size: int
                  ) -> tuple[jax.Array, jax.Array]:
    """One epoch of shuffled minibatches over a client's `count` valid rows out of `capacity` padded rows.

    Returns `(index [S, B], mask [S, B])` with S = ⌈capacity / B⌉: row indices into the client's arrays and
    whether each slot holds a real example. Valid rows come first in a random order drawn from `key`; a batch
    whose mask is all False is padding and must leave the model unchanged. Pure and jittable: pass
    `fold_in(client_key, epoch)` for a new order per epoch.
    """
    steps = -(-capacity // batch_size)
    order = jnp.argsort(jnp.where(jnp.arange(capacity) < count, jax.random.uniform(key, (capacity,)), 2.0))
    order = jnp.pad(order, (0, steps * batch_size - capacity))
    mask = jnp.arange(steps * batch_size) < count
    return order.reshape(steps, batch_size), mask.reshape(steps, batch_size)


def take_batch(client: dict[str, jax.Array], index: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The minibatch `index` [B] of a client's padded arrays, with its example mask as `batch["mask"]` (float)."""
    batch = {k: jnp.take(v, index, axis=0) for k, v in client.items()}
    batch["mask"] = mask.astype(jnp.float32)
    return batch


class Clients(NamedTuple):
    """The same N clients' training examples and held-out examples."""
    train: FederatedData
    test: FederatedData


def federate(data: Dataset, *, seed: int, partition: Literal["iid", "dirichlet", "natural"] = "dirichlet",
             num_clients: int = 100, alpha: float = 1.0,
             equal_size: bool = True, examples_per_client: int | None = None, min_examples: int = 2,
             test_fraction: float = 0.2, max_examples_per_client: int | None = None) -> Clients:
    """All of `data`'s labelled examples (its train and test splits pooled) as federated clients, each with its own
    held-out split.

    partition: "iid" (`partition.iid` into `num_clients`), "dirichlet" (`partition.dirichlet_label_skew` with
      `alpha`, `equal_size`, `examples_per_client`, into `num_clients`) or "natural" (one client per value of the
      dataset's "client" key with at least `min_examples` examples; `num_clients` unused).
    test_fraction: each client's held-out share (`partition.train_test_split`).
    max_examples_per_client: a seeded random subset of larger clients' training examples (None: all).
    """
    arrays = {k: np.concatenate([data.train[k], data.test[k]]) for k in data.train}
    labels = arrays["label"]
    if partition == "iid":
        parts = partitions.iid(len(labels), num_clients, seed=seed)
    elif partition == "dirichlet":
        parts = partitions.dirichlet_label_skew(labels, num_clients, alpha, seed=seed, equal_size=equal_size,
                                                examples_per_client=examples_per_client)
    elif partition == "natural":
        if "client" not in arrays:
            raise InputError(f"partition=natural: dataset {data.name!r} has no client ids (from a file of your own: "
                             "give its client column)")
        parts, _ = partitions.natural(arrays["client"], min_examples=min_examples)
        dropped = len(np.unique(arrays["client"])) - len(parts)
        if not parts:
            raise InputError(f"partition=natural: all {dropped} clients of {data.name!r} have fewer than "
                             f"min_examples={min_examples} examples")
        if dropped:
            warn(f"partition=natural: {dropped} of {dropped + len(parts)} clients of {data.name!r} have fewer than "
                 f"min_examples={min_examples} examples and are left out; {len(parts)} remain")
    else:
        raise InputError(f"partition: unknown {partition!r}; known: iid, dirichlet, natural")
    train_parts, test_parts = partitions.train_test_split(parts, test_fraction, seed=seed)
    inputs = {k: v for k, v in arrays.items() if k not in ("client", "length")}
    options = dict(lengths=arrays.get("length"), sequence_keys=data.sequence_keys, seed=seed)
    return Clients(FederatedData.from_partition(inputs, train_parts, max_examples_per_client=max_examples_per_client,
                                                **options),
                   FederatedData.from_partition(inputs, test_parts, **options))
