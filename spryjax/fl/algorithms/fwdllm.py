"""FwdLLM (Xu et al. 2024, "FwdLLM: Efficient FedLLM using Forward Gradient"), the Spry paper's strongest
zero-order baseline. FedSGD-shaped rounds; its "forward gradient" is a finite difference.

Client i in round r, on one minibatch:
  1. Draw M = candidates × K_max perturbations v_m ~ N(0, I) from its seed and keep the K_max with the largest
     cosine similarity to the previous round's global update u_{r−1} (round 1: the first K_max). This steers the
     perturbations towards the gradient's likely direction (and biases the estimate, by FwdLLM's design).
  2. Forward differences d_k = (L(θ + ε v_k) − L(θ)) / ε, ε = 1e-2, for the first K_r of them:
         ĝ_i = (1/K_r) Σ_{k<K_r} d_k v_k.
  3. Upload the K_max scalars and the chosen indices (the server regenerates v_k from the seed).
Server: u_r = Σ n_i ĝ_i / Σ n_i, θ ← θ + server_optimizer(u_r). Variance control: the relative spread of the
clients' estimates, (mean‖ĝ_i‖² − ‖u_r‖²) / ‖u_r‖², above `variance_threshold` doubles K (up to K_max).

K adapts, so two options name it: `num_tangents` = K_max (the perturbations a client evaluates and uploads every
round, its cost) and `initial_tangents` = K_1 (how many of them the first round's estimate averages).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spryjax import fwdgrad
from spryjax.fl.algorithm import (ClientOutput, Communication, FederatedAlgorithm, ServerState, evaluate_global,
                                  first_batch)
from spryjax.pytrees import tree_bytes
from spryjax.task import Task


class FwdLLMState(NamedTuple):
    previous_update: optax.Updates   # u_{r−1}, θ's structure
    num_tangents: jax.Array          # K_r, int32 scalar


class FwdLLMUpload(NamedTuple):
    """What a client contributes (the engine averages it over clients, weighted by examples)."""
    grad: optax.Updates    # ĝ_i, θ's structure
    sq_norm: jax.Array     # ‖ĝ_i‖², so that the average is mean‖ĝ_i‖² for the variance check


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def fwdllm(task: Task, *, server_optimizer: optax.GradientTransformation, batch_size: int,
           num_tangents: int = 20, initial_tangents: int = 5, candidates: int = 4, eps: float = 1e-2,
           variance_threshold: float = 1.0, eval_batch_size: int = 64) -> FederatedAlgorithm:
    """FwdLLM (see the module docstring); defaults from the Spry paper's setup (ε = 1e-2, K up to 20)."""
    pool = candidates * num_tangents

    def init(params, key):
        return ServerState(params, server_optimizer.init(params),
                           FwdLLMState(jax.tree.map(jnp.zeros_like, params), jnp.int32(initial_tangents)))

    def broadcast(state):
        return state.params, state.extra

    def client_update(frozen, received, data, count, slot, key):
        del slot
        params, extra = received
        batch, tangent_key, dropout_key = first_batch(data, count, key, batch_size)
        tangent = lambda m: fwdgrad.sample_tangent(jax.random.fold_in(tangent_key, m), params)
        previous_norm = jnp.sqrt(_dot(extra.previous_update, extra.previous_update))

        def cosine(m):
            v = tangent(m)
            return _dot(v, extra.previous_update) / (jnp.sqrt(_dot(v, v)) * previous_norm + 1e-30)
        similarity = jax.lax.map(cosine, jnp.arange(pool))
        chosen = jax.lax.top_k(similarity, num_tangents)[1]  # ties (round 1: all zero) keep index order
        loss = task.loss(params, frozen, batch, dropout_key)

        def scalar(m):
            shifted = jax.tree.map(lambda p, v: p + eps * v, params, tangent(m))
            return (task.loss(shifted, frozen, batch, dropout_key) - loss) / eps
        scalars = jax.lax.map(scalar, chosen)
        active = (jnp.arange(num_tangents) < extra.num_tangents).astype(jnp.float32)

        def accumulate(total, inputs):
            m, d, a = inputs
            return jax.tree.map(lambda g, v: g + a * d * v, total, tangent(m)), None
        total, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), (chosen, scalars, active))
        estimate = jax.tree.map(lambda g: g / extra.num_tangents.astype(g.dtype), total)
        update = FwdLLMUpload(estimate, _dot(estimate, estimate))
        return ClientOutput(update, jnp.sum(batch["mask"]), {"loss": loss, "steps": jnp.float32(1)})

    def server_update(state, update):
        grad = update.grad
        mean_sq = _dot(grad, grad)
        relative_variance = (update.sq_norm - mean_sq) / jnp.maximum(mean_sq, 1e-30)
        k = jnp.where(relative_variance > variance_threshold,
                      jnp.minimum(2 * state.extra.num_tangents, num_tangents), state.extra.num_tangents)
        updates, opt_state = server_optimizer.update(grad, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state, FwdLLMState(grad, k))

    evaluate_params = evaluate_global(task, batch_size=eval_batch_size)

    def evaluate_client(frozen, received, *rest):
        return evaluate_params(frozen, received[0], *rest)

    def bytes_per_round(params_like, cohort_size):   # up: K_max scalars and K_max indices into the pool
        return Communication(down=tree_bytes(params_like) * cohort_size, up=8 * num_tangents * cohort_size)

    return FederatedAlgorithm(name="fwdllm", init=init, broadcast=broadcast, client_update=client_update,
                              server_update=server_update, evaluate_client=evaluate_client,
                              bytes_per_round=bytes_per_round)
