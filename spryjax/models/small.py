"""Small pure-function models for benchmarks and quick runs: an MLP and the 2-layer CNN of pfl-research's
CIFAR-10 benchmark (conv 3→32 3×3, maxpool 2, conv 32→64 3×3, maxpool 2, dense 2304→512, dense 512→10), which
the engine benchmark and the peer comparison (fedjax, pfl-research, Flower, a PyTorch loop) share.

Each builder returns `(Task, trainable, frozen)` with every weight trainable and `frozen = {}`; inputs are
batch["x"] (NHWC images for the CNN, anything flattenable for the MLP).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spryjax.data.dataset import Dataset
from spryjax.task import Task, classification_task


def _dense_init(key, fan_in, fan_out):
    return {"w": jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in), "b": jnp.zeros(fan_out)}


def mlp_model(dataset: Dataset, key: jax.Array, *, hidden: Sequence[int] = (64,)) -> tuple[Task, Any, Any]:
    """A ReLU MLP on flattened batch["x"]: hidden widths `hidden`, then the classes."""
    in_dim = int(np.prod(dataset.train["x"].shape[1:]))
    widths = [in_dim, *hidden, dataset.num_classes]
    keys = jax.random.split(key, len(widths) - 1)
    params = [_dense_init(k, a, b) for k, a, b in zip(keys, widths[:-1], widths[1:])]

    def logits(trainable, frozen, batch, key=None):
        h = batch["x"].reshape(batch["x"].shape[0], -1)
        for i, layer in enumerate(trainable):
            h = h @ layer["w"] + layer["b"]
            h = jax.nn.relu(h) if i < len(trainable) - 1 else h
        return h

    return classification_task(logits, dataset.num_classes), params, {}


def _conv(x, layer):
    y = jax.lax.conv_general_dilated(x, layer["w"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["b"]


def _maxpool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn_model(dataset: Dataset, key: jax.Array, *, hidden: int = 512) -> tuple[Task, Any, Any]:
    """pfl-research's CIFAR-10 CNN on NHWC images of any square size (32×32: dense 2304 → `hidden` = 512)."""
    height, width, channels = dataset.train["x"].shape[1:]
    k = jax.random.split(key, 4)
    conv_init = lambda key, cin, cout: {"w": jax.random.normal(key, (3, 3, cin, cout)) * jnp.sqrt(2.0 / (9 * cin)),
                                        "b": jnp.zeros(cout)}
    flat = (((height - 2) // 2 - 2) // 2) * (((width - 2) // 2 - 2) // 2) * 64
    params = {"conv1": conv_init(k[0], channels, 32), "conv2": conv_init(k[1], 32, 64),
              "dense1": _dense_init(k[2], flat, hidden), "dense2": _dense_init(k[3], hidden, dataset.num_classes)}

    def logits(trainable, frozen, batch, key=None):
        h = _maxpool(jax.nn.relu(_conv(batch["x"], trainable["conv1"])))
        h = _maxpool(jax.nn.relu(_conv(h, trainable["conv2"])))
        h = jax.nn.relu(h.reshape(h.shape[0], -1) @ trainable["dense1"]["w"] + trainable["dense1"]["b"])
        return h @ trainable["dense2"]["w"] + trainable["dense2"]["b"]

    return classification_task(logits, dataset.num_classes), params, {}


def synthetic_images(*, seed: int, num_clients: int = 100, per_client: int = 50) -> Dataset:
    """pfl-research's benchmark data shape: `num_clients` × `per_client` random 32×32×3 images with random labels,
    one natural client per block (the peers' benchmark uses the same recipe)."""
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    client = np.repeat(np.arange(num_clients), per_client)
    split = {"x": x, "label": y, "client": client}
    empty = {k: v[:0] for k, v in split.items()}
    return Dataset("synthetic_cifar", split, empty, 10)
