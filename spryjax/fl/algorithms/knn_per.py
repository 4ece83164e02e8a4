"""kNN-Per: Marfoq, Neglia, Vidal & Kameni 2022, "Personalized Federated Learning through Local Memorization"
(ICML 2022, arXiv 2111.09360), as Flow (arXiv 2211.15281) compares with it.

The global model θ_g is trained by FedAvg on the routed model's global path. A client personalizes it with a
datastore of its training examples: keys φ(x_j) = the input of the global model's linear head (its last hidden
features), values y_j. For a held-out x with features q = φ(x) and its k nearest keys N_k(q) in squared Euclidean
distance d,
    p_kNN(y | x) = Σ_{j ∈ N_k(q)} exp(−d(q, φ(x_j)) / T) [y_j = y] / Σ_{j ∈ N_k(q)} exp(−d(q, φ(x_j)) / T)
    p(y | x)     = λ p_kNN(y | x) + (1 − λ) softmax(f(x; θ_g))_y
(λ = `interpolation`, k = `neighbors`, T = `temperature`; a client with fewer than k training examples uses all of
them). The datastore is built at evaluation time from the current θ_g, as in the paper; nothing is kept between
rounds, so kNN-Per is stateless as published. Deviation: λ is one value for every client (0.4, the released Flow
code's EMNIST setting) rather than tuned per client on local validation data.

Classification only (logits [B, C]); the features are read by evaluating the model with its head's kernel replaced
by the identity and its bias by zero (`head_input`), so any model whose `head` is one linear layer works.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from spryjax.data.federated import take_batch
from spryjax.errors import InputError
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.personalization import compare, global_path_task, on_global_path
from spryjax.nn.routing import RoutedModel, global_logits

PyTree = Any


def head_input(logits_fn: Callable[..., jax.Array], params: PyTree, head: str) -> Callable[..., jax.Array]:
    """features(params, frozen, batch) -> [B, d]: the input of the linear layer params[head] (kernel [d, C], bias
    [C]), computed as `logits_fn` with that kernel replaced by I_d and its bias by 0_d."""
    leaves = jax.tree_util.tree_flatten_with_path(params.get(head, {}))[0]
    kernels = [leaf for path, leaf in leaves if getattr(path[-1], "key", None) == "kernel"]
    if len(kernels) != 1 or kernels[0].ndim != 2:
        raise InputError(f"head: params[{head!r}] must be one linear layer (a 2-D kernel and a bias)")
    width = kernels[0].shape[0]

    def identity(path, leaf):
        name = getattr(path[-1], "key", None)
        return jnp.eye(width, dtype=leaf.dtype) if name == "kernel" else jnp.zeros(width, leaf.dtype)

    def features(params, frozen, batch):
        return logits_fn({**params, head: jax.tree_util.tree_map_with_path(identity, params[head])}, frozen, batch)

    return features


def knn_distribution(queries: jax.Array, keys: jax.Array, labels: jax.Array, valid: jax.Array, *, neighbors: int,
                     temperature: float, num_classes: int) -> jax.Array:
    """p_kNN [B, C] of the module docstring: queries [B, d], datastore keys [N, d], labels [N], valid [N] (rows
    beyond a client's count are not in its datastore). A row with no valid neighbour gets all zeros."""
    distances = (jnp.sum(queries ** 2, -1, keepdims=True) - 2 * queries @ keys.T + jnp.sum(keys ** 2, -1))
    distances = jnp.where(valid, jnp.maximum(distances, 0.0), jnp.inf)
    nearest, index = jax.lax.top_k(-distances, min(neighbors, keys.shape[0]))          # [B, k]: −d
    present = jnp.isfinite(nearest)
    weights = jax.nn.softmax(jnp.where(present, nearest / temperature, -jnp.inf), axis=-1)
    weights = jnp.where(present, weights, 0.0)                 # no valid neighbour: softmax of all −inf is NaN
    return jnp.einsum("bk,bkc->bc", weights, jax.nn.one_hot(labels[index], num_classes))


def knn_per(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
            head: str = "dense2", neighbors: int = 10, interpolation: float = 0.4, temperature: float = 1.0,
            eval_batch_size: int = 64, unroll: int | bool = 1, name: str = "knn_per") -> FederatedAlgorithm:
    """kNN-Per over `model`'s global path; the engine's trainable is `model.states` (θ_g is kept)."""
    task = global_path_task(model)
    logits = global_logits(model)
    features = head_input(logits, model.states[0], head)

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        del client, key
        capacity = next(iter(train.values())).shape[0]
        size = min(eval_batch_size, capacity)
        rows = jnp.arange(-(-capacity // size) * size).reshape(-1, size)
        store = jax.lax.map(lambda r: features(params, frozen, take_batch(train, jnp.minimum(r, capacity - 1),
                                                                          r < train_count)), rows)
        store = store.reshape(-1, store.shape[-1])[:capacity]
        valid = jnp.arange(capacity) < train_count

        def predict(batch):
            global_out = logits(params, frozen, batch).astype(jnp.float32)
            p_knn = knn_distribution(features(params, frozen, batch), store, train["label"], valid,
                                     neighbors=neighbors, temperature=temperature,
                                     num_classes=global_out.shape[-1])
            p = interpolation * p_knn + (1 - interpolation) * jax.nn.softmax(global_out)
            return global_out, jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny)), {}

        return compare(model, predict, test, test_count, batch_size=eval_batch_size)

    algorithm = fedavg(task, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                       batch_size=batch_size, local_epochs=local_epochs, eval_batch_size=eval_batch_size,
                       unroll=unroll, name=name)
    return on_global_path(algorithm._replace(evaluate_client=evaluate_client))
