"""FedRep: Collins, Hassani, Mokhtari & Shakkottai 2021, "Exploiting Shared Representations for Personalized
Federated Learning" (ICML 2021, arXiv 2102.07078), as Flow (arXiv 2211.15281) compares with it.

The global path θ_g = (φ, h): a shared representation φ (every layer but the `head`) and a head h. Client k, from
the server's (φ, h):
    1. `head_epochs` epochs on the head, representation fixed:   h_k ← h_k − opt(∇_h L_k(φ, h_k))
    2. `local_epochs` epochs on the representation, head fixed:  φ_k ← φ_k − opt(∇_φ L_k(φ_k, h_k))
and uploads u = (φ, h) − (φ_k, h_k); the server averages (FedAvg). Personalized model of client k: (φ, h_k) after
step 1 at evaluation time; global model: (φ, h).

Stateless deviation: FedRep keeps h_k on the client across rounds and never aggregates heads. Here heads start
every round from the server's average of the clients' trained heads (as Flow's local parameters start from their
server average), which is also the head of the global model; the per-client head is refitted at evaluation.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, apply_server_optimizer,
                                  full_model_bytes, init_with_optimizer, local_training, pseudo_gradient)
from spryjax.fl.algorithms.personalization import compare_models, global_path_task, head_mask, on_global_path
from spryjax.nn.routing import RoutedModel


def fedrep(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
           head: Sequence[str] = ("dense2",), head_epochs: int | None = None, eval_batch_size: int = 64,
           unroll: int | bool = 1, name: str = "fedrep") -> FederatedAlgorithm:
    """FedRep over `model`'s global path; the engine's trainable is `model.states` (θ_g is kept). `head`: the
    top-level keys of θ_g that are personal (see `personalization.head_mask`); `head_epochs` defaults to
    `local_epochs` (the paper uses 10 head epochs per body epoch on image tasks)."""
    task = global_path_task(model)
    head_leaves = head_mask(model.states[0], head)
    representation = jax.tree.map(lambda h: not h, head_leaves)
    options = dict(optimizer=client_optimizer, batch_size=batch_size, unroll=unroll)
    fit_head = lambda params, frozen, data, count, key: local_training(
        task, params, frozen, data, count, key, epochs=local_epochs if head_epochs is None else head_epochs,
        update_mask=head_leaves, **options)

    def client_update(frozen, params, data, count, slot, key):
        del slot
        head_key, body_key = jax.random.split(key)
        tuned, head_metrics = fit_head(params, frozen, data, count, head_key)
        local, metrics = local_training(task, tuned, frozen, data, count, body_key, epochs=local_epochs,
                                        update_mask=representation, **options)
        return ClientOutput(pseudo_gradient(params, local), count.astype(jnp.float32),
                            {**metrics, "steps": metrics["steps"] + head_metrics["steps"]})

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        personal, _ = fit_head(params, frozen, train, train_count, key)
        return compare_models(model, params, personal, test, test_count, batch_size=eval_batch_size)

    return on_global_path(FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_client, bytes_per_round=full_model_bytes))
