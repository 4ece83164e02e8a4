"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data") with
a server optimizer (Reddi et al. 2021), and its proximal variant FedProx (Li et al. 2020; see fedprox.py).

Client i: θ_i = θ after `local_epochs` of minibatch training on its data, minimizing
    L_i(θ) + (μ/2) ‖θ − θ_global‖²            (μ = proximal_mu; 0: FedAvg; μ > 0: FedProx)
and uploads u_i = θ_global − θ_i. Server: u = Σ n_i u_i / Σ n_i, θ ← θ + server_optimizer(u).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, GradientFn, apply_server_optimizer, backprop,
                                  dispatched_local_training, evaluate_global, full_model_bytes, init_with_optimizer,
                                  local_training, proximal_loss, pseudo_gradient)
from spryjax.task import Task


def fedavg(task: Task, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
           proximal_mu: float = 0.0, gradient_fn: GradientFn = backprop, eval_batch_size: int = 64,
           unroll: int | bool = 1, name: str = "fedavg") -> FederatedAlgorithm:
    """FedAvg / FedProx. `gradient_fn` swaps backprop for a gradient estimator (e.g. forward gradients on all
    weights: Spry's FedFGD ablation).

    Example:
      >>> algorithm = fedavg(task, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), batch_size=8)
    """
    def client_update_with(train):
        def client_update(frozen, params, data, count, slot, key, **train_options):
            del slot
            loss_fn = proximal_loss(task.loss, params, proximal_mu) if proximal_mu else task.loss
            local, metrics = train(task, params, frozen, data, count, key, optimizer=client_optimizer,
                                   batch_size=batch_size, epochs=local_epochs, gradient_fn=gradient_fn,
                                   loss_fn=loss_fn, unroll=unroll, **train_options)
            return ClientOutput(pseudo_gradient(params, local), count.astype(jnp.float32), metrics)
        return client_update

    return FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update_with(local_training), server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_global(task, batch_size=eval_batch_size), bytes_per_round=full_model_bytes,
        # FedProx's loss is a per-client closure: dispatched steps would recompile for every client
        eager_client_update=None if proximal_mu else client_update_with(dispatched_local_training))
