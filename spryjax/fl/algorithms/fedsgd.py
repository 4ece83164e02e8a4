"""FedSGD (McMahan et al. 2017): per-iteration communication. Each round every client computes the gradient of
its loss on one minibatch of `batch_size` of its examples and uploads it; the server averages them weighted by
the examples each gradient saw and applies its optimizer: θ ← θ + server_optimizer(Σ n_i g_i / Σ n_i), with
n_i = min(client i's examples, batch_size) (the real rows of its minibatch; BAFFLE and FwdLLM weight alike).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, Communication, FederatedAlgorithm, GradientFn,
                                  apply_server_optimizer, backprop, evaluate_global, first_batch,
                                  full_model_bytes, init_with_optimizer)
from spryjax.task import Task


def fedsgd(task: Task, *, server_optimizer: optax.GradientTransformation, batch_size: int,
           gradient_fn: GradientFn = backprop, eval_batch_size: int = 64, name: str = "fedsgd",
           bytes_per_round: Callable[..., Communication] = full_model_bytes) -> FederatedAlgorithm:
    """`gradient_fn` may be any estimator (BAFFLE: central differences); `bytes_per_round` then says what a
    client really uploads (BAFFLE: K scalars)."""
    def client_update(frozen, params, data, count, slot, key):
        del slot
        batch, estimator_key, dropout_key = first_batch(data, count, key, batch_size)
        loss, grad = gradient_fn(task.loss, params, estimator_key, frozen, batch, dropout_key)
        examples = jnp.sum(batch["mask"])
        return ClientOutput(grad, examples, {"loss": loss, "steps": jnp.float32(1)})

    return FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_global(task, batch_size=eval_batch_size), bytes_per_round=bytes_per_round)
