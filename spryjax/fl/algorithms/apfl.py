"""APFL: Deng, Kamani & Mahdavi 2020, "Adaptive Personalized Federated Learning" (arXiv 2003.13461), as Flow
(arXiv 2211.15281) compares with it.

Each client holds a copy w of the global model, a local model v and a mixing weight α ∈ [0, 1]; its personalized
model is the parameter mixture v̄ = α v + (1 − α) w. Per local step on a batch (all three from the same point):
    w ← w − opt(∇f(w))
    v ← v − opt(∇_v f(v̄)) = v − opt(α ∇f(v̄))
    α ← clip(α − opt(∇_α f(v̄)), 0, 1),  ∇_α f(v̄) = ⟨v − w, ∇f(v̄)⟩   (with `adapt_alpha`; projected every step)
This is one step on (w, v, α) with the gradient of f(w) + f(α v + (1 − α) sg(w)) (sg: stop_gradient), which is how
it is computed. The server averages w (FedAvg) and, here, v.

Stateless deviation: APFL keeps v and α on the client across rounds. Here v starts every round from the server's
average of the clients' v (as Flow's local parameters start from their server average) and α from `alpha`; at
evaluation the client runs `personal_epochs` epochs of the same local steps from the server state on its training
split, and its personalized model α v + (1 − α) w (its own w and v after those steps) is compared with the
server's w. The pure-JAX parameter mixture needs v and w of one architecture: both are the routed model's global
path.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, apply_server_optimizer,
                                  full_model_bytes, init_with_optimizer, local_training, pseudo_gradient)
from spryjax.fl.algorithms.personalization import compare_models, global_path_task, on_global_path
from spryjax.errors import InputError
from spryjax.nn.routing import RoutedModel
from spryjax.task import Task

PyTree = Any


def mixture(alpha: jax.Array, v: PyTree, w: PyTree) -> PyTree:
    """v̄ = α v + (1 − α) w, leaf by leaf (α ∈ [0, 1]: `apfl` checks the initial one, each step projects)."""
    return jax.tree.map(lambda x, y: alpha * x + (1 - alpha) * y, v, w)


def apfl_steps(task: Task, w: PyTree, v: PyTree, data: dict, count: jax.Array, key: jax.Array, *, alpha: float,
               adapt_alpha: bool, optimizer: optax.GradientTransformation, batch_size: int, epochs: int,
               unroll: int | bool = 1) -> tuple[tuple[PyTree, PyTree, jax.Array], dict[str, jax.Array]]:
    """APFL's local steps (module docstring) from (w, v, α = `alpha`): returns ((w, v, α), metrics); the loss
    reported is the personalized model's."""
    def loss(params, frozen, batch, key):
        w, v, a = params
        global_key, mixed_key = jax.random.split(key)
        own = task.loss(w, frozen, batch, global_key)
        mixed = mixture(a if adapt_alpha else jax.lax.stop_gradient(a), v, jax.lax.stop_gradient(w))
        personal = task.loss(mixed, frozen, batch, mixed_key)
        # Value: the personalized loss; gradient: w's from its own loss, v's and α's from the personalized one.
        return personal + own - jax.lax.stop_gradient(own)

    return local_training(task, (w, v, jnp.float32(alpha)), {}, data, count, key,
                          optimizer=optax.chain(optimizer, _alpha_projected()), batch_size=batch_size,
                          epochs=epochs, loss_fn=loss, unroll=unroll)


def _alpha_projected() -> optax.GradientTransformation:
    """After the optimizer: α's update replaced by the one that lands α on clip(α + update, 0, 1), APFL's
    projection after every step."""
    def update(updates, state, params):
        w_update, v_update, a_update = updates
        alpha = params[2]
        return (w_update, v_update, jnp.clip(alpha + a_update, 0.0, 1.0) - alpha), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apfl(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
         server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1, alpha: float = 0.25,
         adapt_alpha: bool = True, personal_epochs: int | None = None, eval_batch_size: int = 64,
         unroll: int | bool = 1, name: str = "apfl") -> FederatedAlgorithm:
    """APFL over `model`'s global path: server state (w, v), both started from θ_g of `model.states`; `alpha` is
    α's starting value (0.25 in Flow's settings), in [0, 1]."""
    if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:   # (a traced α is a vectorized sweep's)
        raise InputError(f"alpha={alpha}: APFL's mixing weight must be in [0, 1]")
    task = global_path_task(model)
    options = dict(alpha=alpha, adapt_alpha=adapt_alpha, optimizer=client_optimizer, batch_size=batch_size,
                   unroll=unroll)

    def client_update(frozen, params, data, count, slot, key):
        del slot
        (w, v, _), metrics = apfl_steps(task, *params, data, count, key, epochs=local_epochs, **options)
        return ClientOutput(pseudo_gradient(params, (w, v)), count.astype(jnp.float32), metrics)

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        (w, v, a), _ = apfl_steps(task, *params, train, train_count, key,
                                  epochs=local_epochs if personal_epochs is None else personal_epochs, **options)
        return compare_models(model, params[0], mixture(a, v, w), test, test_count, batch_size=eval_batch_size)

    algorithm = FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_client, bytes_per_round=full_model_bytes)
    return on_global_path(algorithm, server_params=lambda theta_g, key: (theta_g, theta_g))
