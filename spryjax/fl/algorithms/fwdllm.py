"""FwdLLM (Xu et al. 2024, "FwdLLM: Efficient FedLLM using Forward Gradient"), the Spry paper's strongest
zero-order baseline, in both of the shapes Spry has (`communication`, as in spry.py). Its "forward gradient" is a
finite difference.

One minibatch's estimate (`steered_estimate`, the one code both shapes call), from a tangent key, a steering
direction s and a count K ≤ K_max:
  1. Draw M = candidates × K_max perturbations v_m ~ N(0, I) (v_m from fold_in(tangent key, m)) and keep the K_max
     with the largest cosine similarity to s, most similar first (s = 0: all ties, the first K_max in index
     order). This steers the perturbations towards the gradient's likely direction (and biases the estimate, by
     FwdLLM's design).
  2. Forward differences d_k = (L(θ + ε v_k) − L(θ)) / ε, ε = 1e-2, for the K_max chosen (each minibatch costs
     K_max + 1 forward passes whatever K is):
         ĝ = (1/K) Σ_{k<K} d_k v_k,
     and the spread of its K per-perturbation estimates, (1/K) Σ_{k<K} ‖d_k v_k‖².
Variance control compares a mean of squared norms with the squared norm of the mean,
    ρ = (mean ‖g‖² − ‖mean g‖²) / ‖mean g‖²,
and ρ > `variance_threshold` doubles K (up to K_max) for the next estimate. K adapts, so two options name it:
`num_tangents` = K_max (the perturbations evaluated per estimate, its cost) and `initial_tangents` = K_1.

"per_iteration" (default; FwdLLM's own, FedSGD-shaped). Client i in round r, on one minibatch: the estimate with
s = u_{r−1} (the previous round's aggregated update, which the broadcast carries) and K = K_r; it uploads the K_max
scalars and the chosen indices (the server regenerates v_k from the seed). Server: u_r = Σ n_i ĝ_i / Σ n_i,
θ ← θ + server_optimizer(u_r); ρ over the clients' estimates (mean_i ‖ĝ_i‖² against ‖u_r‖²) sets K_{r+1}. No
client optimizer, no local epochs: setting them is an error.

"per_epoch" (the Spry paper's FwdLLM+, FedAvg-shaped): `local_epochs` of the client optimizer (AdamW lr 1e-4 in the
released code), the estimate at every minibatch; the client uploads Δ = θ − θ_local (the whole trainable tree), the
server averages by examples, applies its optimizer (FedYogi in the released code) and keeps u_r = the mean Δ.
Candidate selection and K adaptation happen per minibatch, inside the client's local loop:
  - minibatch t steers towards ĝ_{t−1}, the estimate of the client's previous minibatch; its first minibatch of
    the round towards u_{r−1};
  - K starts every round at K_1 (the server does not adapt it: clients keep no state between rounds) and, after
    minibatch t, doubles (up to K_max) when the spread of minibatch t's own K per-perturbation estimates d_k v_k is
    above the threshold, ρ_t = ((1/K) Σ_k ‖d_k v_k‖² − ‖ĝ_t‖²) / ‖ĝ_t‖²; the doubled K applies from minibatch t+1 on.
    With K = 1 the spread is 0, so K_1 = 1 never grows. `train_tangents` reports the mean K of the clients' steps.
Padding minibatches change nothing (no step, no steering, no adaptation), as in `local_training`.

Released-code behaviour (FwdLLM+ in the Spry code), not copied: it selects the candidates once per round, per
tensor, against the previous round's update, and then gives all `perturbation_count` (20) perturbations of a
minibatch the same selected tangent, so after the first round (which draws fresh tangents) every minibatch's
estimate is one tangent's, K times over: K = 1 here (num_tangents = initial_tangents = 1) reproduces what it
effectively ran, one steered tangent per minibatch. Its variance check is disabled for classification
(`var = 0.0`), so its K never adapts; its differences are central, FwdLLM's (and these) forward.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spryjax import fwdgrad
from spryjax.data.federated import take_batch
from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, ServerState, evaluate_global, first_batch,
                                  full_model_bytes, local_steps, pseudo_gradient)
from spryjax.fl.algorithms.spry import check_communication, scalars_up_bytes
from spryjax.task import Task


class FwdLLMState(NamedTuple):
    previous_update: optax.Updates   # u_{r−1}, θ's structure
    num_tangents: jax.Array          # K_r, int32 scalar (per_epoch: K_1, where every client starts)


class FwdLLMUpload(NamedTuple):
    """What a per-iteration client contributes (the engine averages it over clients, weighted by examples)."""
    grad: optax.Updates    # ĝ_i, θ's structure
    sq_norm: jax.Array     # ‖ĝ_i‖², so that the average is mean‖ĝ_i‖² for the variance check


class SteeredEstimate(NamedTuple):
    loss: jax.Array           # L(θ) on the minibatch
    grad: optax.Updates       # ĝ = (1/K) Σ_{k<K} d_k v_k, θ's structure
    second_moment: jax.Array  # (1/K) Σ_{k<K} ‖d_k v_k‖²


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def relative_spread(mean_sq_norm: jax.Array, mean: optax.Updates) -> jax.Array:
    """ρ = (mean ‖g‖² − ‖mean g‖²) / ‖mean g‖²: the relative variance of estimates g, from the mean of their squared
    norms and their mean."""
    sq_norm_of_mean = _dot(mean, mean)
    return (mean_sq_norm - sq_norm_of_mean) / jnp.maximum(sq_norm_of_mean, 1e-30)


def steered_estimate(task: Task, params, frozen, batch: dict, tangent_key: jax.Array, dropout_key: jax.Array,
                     towards: optax.Updates, num_active: jax.Array, *, num_tangents: int, candidates: int,
                     eps: float) -> SteeredEstimate:
    """One minibatch's FwdLLM estimate (steps 1-2 of the module docstring): the K_max = `num_tangents` of
    `candidates`·K_max tangents most cosine-similar to `towards`, forward differences of step `eps` along them,
    and ĝ over the first K = `num_active` (traced int32, 1 ≤ K ≤ K_max)."""
    tangent = lambda m: fwdgrad.sample_tangent(jax.random.fold_in(tangent_key, m), params)
    towards_norm = jnp.sqrt(_dot(towards, towards))

    def cosine(m):
        v = tangent(m)
        return _dot(v, towards) / (jnp.sqrt(_dot(v, v)) * towards_norm + 1e-30)
    similarity = jax.lax.map(cosine, jnp.arange(candidates * num_tangents))
    chosen = jax.lax.top_k(similarity, num_tangents)[1]  # ties (towards = 0) keep index order
    loss = task.loss(params, frozen, batch, dropout_key)

    def scalar(m):
        shifted = jax.tree.map(lambda p, v: p + eps * v, params, tangent(m))
        return (task.loss(shifted, frozen, batch, dropout_key) - loss) / eps
    scalars = jax.lax.map(scalar, chosen)
    active = (jnp.arange(num_tangents) < num_active).astype(jnp.float32)

    def accumulate(total, inputs):
        m, d, a = inputs
        grad, second_moment = total
        v = tangent(m)
        return (jax.tree.map(lambda g, x: g + a * d * x, grad, v), second_moment + a * d ** 2 * _dot(v, v)), None
    (total, second_moment), _ = jax.lax.scan(
        accumulate, (jax.tree.map(jnp.zeros_like, params), jnp.float32(0)), (chosen, scalars, active))
    k = num_active.astype(jnp.float32)
    return SteeredEstimate(loss, jax.tree.map(lambda g: g / k.astype(g.dtype), total), second_moment / k)


def fwdllm(task: Task, *, server_optimizer: optax.GradientTransformation, batch_size: int,
           num_tangents: int = 20, initial_tangents: int = 5, candidates: int = 4, eps: float = 1e-2,
           variance_threshold: float = 1.0, communication: Literal["per_epoch", "per_iteration"] = "per_iteration",
           client_optimizer: optax.GradientTransformation | None = None, local_epochs: int = 1,
           eval_batch_size: int = 64) -> FederatedAlgorithm:
    """FwdLLM (see the module docstring); defaults from the Spry paper's setup (ε = 1e-2, K up to 20).
    `client_optimizer` and `local_epochs` are per-epoch options (FwdLLM+: AdamW lr 1e-4, 1 epoch).

    Example (FwdLLM+):
      >>> fwdllm(task, communication="per_epoch", client_optimizer=optax.adamw(1e-4), server_optimizer=yogi,
      ...        batch_size=8)
    """
    check_communication(communication, client_optimizer=client_optimizer, local_epochs=local_epochs)
    estimate = lambda *args: steered_estimate(task, *args, num_tangents=num_tangents, candidates=candidates,
                                              eps=eps)
    adapted = lambda k, spread: jnp.where(spread > variance_threshold, jnp.minimum(2 * k, num_tangents), k)

    def init(params, key):
        return ServerState(params, server_optimizer.init(params),
                           FwdLLMState(jax.tree.map(jnp.zeros_like, params), jnp.int32(initial_tangents)))

    def broadcast(state):
        return state.params, state.extra

    def per_iteration_client(frozen, received, data, count, slot, key):
        del slot
        params, extra = received
        batch, tangent_key, dropout_key = first_batch(data, count, key, batch_size)
        step = estimate(params, frozen, batch, tangent_key, dropout_key, extra.previous_update, extra.num_tangents)
        return ClientOutput(FwdLLMUpload(step.grad, _dot(step.grad, step.grad)), jnp.sum(batch["mask"]),
                            {"loss": step.loss, "steps": jnp.float32(1),
                             "tangents": extra.num_tangents.astype(jnp.float32)})

    def per_iteration_server(state, update):
        k = adapted(state.extra.num_tangents, relative_spread(update.sq_norm, update.grad))
        updates, opt_state = server_optimizer.update(update.grad, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state, FwdLLMState(update.grad, k))

    def per_epoch_client(frozen, received, data, count, slot, key):
        """`local_training`'s loop (same minibatches and keys) with the steering direction and K in the carry."""
        del slot
        params, extra = received
        capacity = next(iter(data.values())).shape[0]
        index, mask, step_keys = local_steps(key, count, capacity, batch_size, local_epochs)

        def train_step(carry, batch, step_key):
            theta, opt_state, towards, k = carry
            estimator_key, dropout_key = jax.random.split(step_key)   # as local_training's step
            step = estimate(theta, frozen, batch, estimator_key, dropout_key, towards, k)
            updates, opt_state = client_optimizer.update(step.grad, opt_state, theta)
            k_next = adapted(k, relative_spread(step.second_moment, step.grad))
            return (optax.apply_updates(theta, updates), opt_state, step.grad, k_next), (step.loss, k)

        def step(carry, inputs):
            idx, m, step_key = inputs
            real = jnp.any(m)
            skip = lambda carry, batch, step_key: (carry, (jnp.float32(0), jnp.int32(0)))
            carry, (loss, k) = jax.lax.cond(real, train_step, skip, carry, take_batch(data, idx, m), step_key)
            return carry, (loss, k, real)

        start = (params, client_optimizer.init(params), extra.previous_update, extra.num_tangents)
        (local, *_), (losses, ks, real) = jax.lax.scan(step, start, (index, mask, step_keys))
        steps = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
        metrics = {"loss": jnp.sum(losses) / steps, "steps": jnp.sum(real).astype(jnp.float32),
                   "tangents": jnp.sum(ks).astype(jnp.float32) / steps}
        return ClientOutput(pseudo_gradient(params, local), count.astype(jnp.float32), metrics)

    def per_epoch_server(state, update):
        updates, opt_state = server_optimizer.update(update, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state,
                           state.extra._replace(previous_update=update))

    evaluate_params = evaluate_global(task, batch_size=eval_batch_size)

    def evaluate_client(frozen, received, *rest):
        return evaluate_params(frozen, received[0], *rest)

    per_epoch = communication == "per_epoch"
    return FederatedAlgorithm(
        name="fwdllm", init=init, broadcast=broadcast,
        client_update=per_epoch_client if per_epoch else per_iteration_client,
        server_update=per_epoch_server if per_epoch else per_iteration_server, evaluate_client=evaluate_client,
        # per iteration, up: K_max scalars and K_max indices into the pool
        bytes_per_round=full_model_bytes if per_epoch else scalars_up_bytes(8 * num_tangents))
