"""HypCluster: Mansour, Mohri, Ro & Suresh 2020, "Three Approaches for Personalization with Applications to
Federated Learning" (arXiv 2002.10619), as Flow (arXiv 2211.15281) compares with it.

The server holds K global models θ_1..θ_K (each the routed model's global path). Client i picks the model that
fits its training data best and trains only that one:
    k_i = argmin_k L_i(θ_k)     (mean loss over its training split),   θ_i = θ_{k_i} after local training,
uploading u_i = θ_{k_i} − θ_i for model k_i and nothing for the others. Server, per model k over the clients that
chose it: u_k = Σ_{i: k_i = k} n_i u_i / Σ_{i: k_i = k} n_i (the engine's per-leaf weights n_i·[k_i = k]); a
model nobody chose is left unchanged.

Evaluation: personalized = θ_{k_i} chosen on the client's training split (stateless: the choice is recomputed
from the current models, which is also how the paper assigns a cluster); global model = the uniform ensemble
p(y|x) = (1/K) Σ_k softmax(f(x; θ_k)), the prediction a client without data would use.

Initialization: θ_1 = the given θ_g; θ_k for k ≥ 2 redraws each leaf with non-zero spread as
N(mean(leaf), std(leaf)²) from fold_in(key, k), i.e. independent models at the scale of the given initializer
(a leaf without spread, such as a zero bias, is copied).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, Communication, FederatedAlgorithm, apply_server_optimizer,
                                  evaluate_examples, init_with_optimizer, local_training)
from spryjax.pytrees import tree_bytes
from spryjax.fl.algorithms.personalization import compare, global_path_task, on_global_path
from spryjax.nn.routing import RoutedModel, global_logits

PyTree = Any


def independent_copies(theta: PyTree, key: jax.Array, num_models: int) -> tuple[PyTree, ...]:
    """(θ, θ_2, ..., θ_K): θ_k's leaves redrawn as N(mean, std²) of θ's leaf (module docstring)."""
    def redraw(leaf, k):
        noise = jax.random.normal(k, leaf.shape, leaf.dtype)
        return jnp.where(jnp.std(leaf) > 0, jnp.mean(leaf) + jnp.std(leaf) * noise, leaf)

    def copy(k):
        leaves, treedef = jax.tree.flatten(theta)
        keys = jax.random.split(jax.random.fold_in(key, k), len(leaves))
        return jax.tree.unflatten(treedef, [redraw(leaf, kk) for leaf, kk in zip(leaves, keys)])

    return (theta, *(copy(k) for k in range(1, num_models)))


def select(models: tuple[PyTree, ...], k: jax.Array) -> PyTree:
    """Model k (traced) of a tuple of models with one structure."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves)[k], *models)


def hypcluster(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
               num_models: int = 2, eval_batch_size: int = 64, unroll: int | bool = 1,
               name: str = "hypcluster") -> FederatedAlgorithm:
    """HypCluster with `num_models` = K global models of `model`'s global path; the engine's trainable is
    `model.states` (θ_g seeds the K models)."""
    task = global_path_task(model)
    logits = global_logits(model)

    def choose(frozen, models, data, count):
        losses = jnp.stack([evaluate_examples(task, m, frozen, data, count, batch_size=eval_batch_size)["loss"]
                            for m in models])
        return jnp.argmin(losses)

    def client_update(frozen, models, data, count, slot, key):
        del slot
        k = choose(frozen, models, data, count)
        start = select(models, k)
        local, metrics = local_training(task, start, frozen, data, count, key, optimizer=client_optimizer,
                                        batch_size=batch_size, epochs=local_epochs, unroll=unroll)
        chosen = [k == j for j in range(num_models)]
        update = tuple(jax.tree.map(lambda a, b: jnp.where(c, a - b, 0.0), start, local) for c in chosen)
        n = count.astype(jnp.float32)
        weight = tuple(jax.tree.map(lambda _: n * c, start) for c in chosen)
        return ClientOutput(update, weight, {**metrics, **{f"chose_{j}": c.astype(jnp.float32)
                                                          for j, c in enumerate(chosen)}})

    def evaluate_client(frozen, models, train, train_count, test, test_count, client, key):
        del client, key
        personal = select(models, choose(frozen, models, train, train_count))

        def predict(batch):
            ensemble = jnp.mean(jnp.stack([jax.nn.softmax(logits(m, frozen, batch).astype(jnp.float32))
                                           for m in models]), axis=0)
            return jnp.log(ensemble), logits(personal, frozen, batch), {}

        return compare(model, predict, test, test_count, batch_size=eval_batch_size)

    def bytes_per_round(models_like, cohort_size):
        size = tree_bytes(models_like[0])
        return Communication(down=num_models * size * cohort_size, up=size * cohort_size)

    algorithm = FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_client, bytes_per_round=bytes_per_round)
    return on_global_path(algorithm, server_params=lambda theta_g, key: independent_copies(theta_g, key,
                                                                                             num_models))
