"""Flow: "Per-Instance Personalized Federated Learning Through Dynamic Routing" (Panchal et al., arXiv 2211.15281);
released code github.com/Astuary/Flow (trainers/client_flow.py).

The model is a `RoutedModel` (spryjax.nn.routing) with parameter groups (θ_g, θ_l, φ): every routed layer has a
global and a local copy, and the policy φ gives, per instance x and routing point k, p_k(x) = (p^g_k, p^l_k). The
pure paths f_global(x; θ_g) and f_local(x; θ_g, θ_l) use one copy everywhere; the personalized path
f_routed(x; θ_g, θ_l, p) mixes them (soft p while training, hard argmax decisions at evaluation).

Client round. Stateless: a client starts from the server's (θ_g, θ_l, φ) every time and keeps nothing. Its n
training examples, shuffled by its key, are split into ζ_l (the first ⌈n/2⌉) and ζ_g (the other ⌊n/2⌋). With
`client_optimizer` (SGD with momentum 0.9 in the paper; a fresh optimizer state per phase):
  1. local phase, `local_epochs` epochs over ζ_l, per batch:
         θ_l ← θ_l − opt(∇_θl CE(f_local(x; θ_g, θ_l), y))
  2. global phase, `local_epochs` epochs over ζ_g, per batch, first
         router step:  φ ← φ − opt(∇_φ [CE(f_routed(x; θ_g, θ_l, p_φ(x)), y) + λ R(p_φ(x))])      (soft p)
     then
         global step:  θ_g ← θ_g − opt(∇_θg CE(f_global(x; θ_g), y))
The client uploads u = (θ_g, θ_l, φ)_server − (θ_g, θ_l, φ)_client with weight n. Server: FedAvg over all three
groups, u = Σ n_i u_i / Σ n_i, then `server_optimizer` on u (optax.sgd(1.0) is plain FedAvg).

Because the global path reads no router parameter and the router step reads θ_g without changing it, the two steps
of a batch equal one step on (θ_g, φ) with the gradient of
    L(θ_g, φ) = CE(f_global(x; θ_g), y) + L_router(φ; sg(θ_g), θ_l)       (sg: stop_gradient)
so phase 2 is one `local_training` loop; tests check it against the two sequential steps.

The routing regularizer. Over the batch's instances b (weights w_b: the example mask, or token weights for
next-word prediction) and the P routing points,
    R(p) = Σ_b w_b Σ_k −log((p^g_{b,k})² + β (p^l_{b,k})² + ε) / (P Σ_b w_b),    β = `local_discount` = ½, ε = 1e-6.
Why this form: with β = 1 each term is the collision (Rényi-2) entropy −log Σ_j p_j² of a decision: zero at a
one-hot decision and largest (log 2) at 50/50, so it pushes every soft decision towards one path, which is what
the hard decisions of evaluation use. β < 1 makes the global end the only zero and widens its basin (the push
points towards global while p^l < 1/(1 + β) = 2/3): an undecided router falls back to the global copy, trained on
every client's data, rather than to a local copy fitted to half of one client's data. β = 0 is the paper's
one-column form −log(p² + ε) on the global column (ε only matters there; for β > 0 the argument is ≥ β/(1 + β)).
The released code applies that form to an inconsistent column (local in the Stackoverflow model, routing point 1's
pair in the EMNIST model), which pushes towards the local path; spryjax defines it once, as above.

Evaluation (stateless, like the released code's `*_generalized_test`): the evaluated client personalizes from the
server state on its own training split, with the same split and `personalize_epochs` epochs of each phase: the
local phase, then router steps only (θ_g stays the server's). Then on its held-out split:
    generalized:  f_global(x; θ_g)
    personalized: f_routed(x; θ_g, θ_l', hard decisions of p_φ'(x))
and, besides `personalization.compare`'s groups, "routing": local_<k> = the fraction of instances (tokens) whose
decision at routing point k is the local copy. Deviation: the released evaluation also trains θ_g along the routed
path and compares with a copy taken after one epoch of it; here the generalized model is exactly the server's θ_g.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, apply_server_optimizer,
                                  full_model_bytes, init_with_optimizer, local_training, pseudo_gradient)
from spryjax.fl.algorithms.personalization import compare, logits_task
from spryjax.nn.routing import RoutedModel, States

EPSILON = 1e-6


def routing_regularizer(probs: jax.Array, weights: jax.Array, *, local_discount: float = 0.5,
                        eps: float = EPSILON) -> jax.Array:
    """R(p) of the module docstring: probs [*lead, P, 2] (columns global, local), weights [*lead].

    Example: one instance, one routing point: R((1, 0)) = −log(1 + ε) ≈ 0; R((0, 1)) = −log(β + ε) ≈ log 2;
    R((½, ½)) = −log((1 + β)/4 + ε) ≈ 0.98.
    """
    terms = -jnp.log(probs[..., 0] ** 2 + local_discount * probs[..., 1] ** 2 + eps)      # [*lead, P]
    return jnp.sum(weights[..., None] * terms) / (probs.shape[-2] * jnp.maximum(jnp.sum(weights), 1.0))


def split_halves(data: dict, count: jax.Array, key: jax.Array) -> tuple[tuple[dict, jax.Array], tuple[dict, jax.Array]]:
    """((ζ_l, n_l), (ζ_g, n_g)): a client's `count` real rows of `data` [P, ...], shuffled by `key`, cut into the
    first n_l = ⌈count/2⌉ and the other n_g = ⌊count/2⌋. Each half is padded to ⌈P/2⌉ rows with its real rows
    first (the rest is masked by its count), so the split has static shapes."""
    capacity = next(iter(data.values())).shape[0]
    half = -(-capacity // 2)
    order = jnp.argsort(jnp.where(jnp.arange(capacity) < count, jax.random.uniform(key, (capacity,)), 2.0))
    n_local = count - count // 2
    # ζ_g starts at row n_local of the shuffled order; the wrapped copy keeps a ⌈P/2⌉-row slice in range.
    wrapped = jnp.concatenate([order, order[:half]])
    take = lambda rows: {k: jnp.take(v, rows, axis=0) for k, v in data.items()}
    return ((take(order[:half]), n_local),
            (take(jax.lax.dynamic_slice(wrapped, (n_local,), (half,))), count // 2))


def router_loss(model: RoutedModel, states: States, batch: dict, key: jax.Array | None, *, regularization: float,
                local_discount: float) -> jax.Array:
    """CE(f_routed(x; θ_g, θ_l, p_φ(x)), y) + λ R(p_φ(x)) with soft p (λ = `regularization`)."""
    logits, probs = model.apply(states, batch, mode="routed", key=key)
    weights = model.objective(logits, batch)[2]
    return (logits_task(model).loss(logits, None, batch)
            + regularization * routing_regularizer(probs, weights, local_discount=local_discount))


def client_training(model: RoutedModel, states: States, data: dict, count: jax.Array, key: jax.Array, *,
                    optimizer: optax.GradientTransformation, batch_size: int, epochs: int, regularization: float,
                    local_discount: float, train_global: bool = True, unroll: int | bool = 1,
                    skip_padding: bool = True) -> tuple[States, dict[str, jax.Array]]:
    """A Flow client's two phases (module docstring) from `states` on its `count` rows of `data`.

    `train_global=False` (evaluation) runs the router steps of phase 2 without the global steps. `unroll` and
    `skip_padding` go to `local_training` (unroll=True with skip_padding=False keeps every step out of nested XLA
    computations: 3–4× faster for a 28×28 CNN on CPU, slower to compile). Returns the
    trained (θ_g, θ_l, φ) and {"loss": mean global-path loss over phase 2's steps (router loss when
    train_global=False), "local_loss": phase 1's mean loss, "steps": phase 1 + phase 2 steps}.
    """
    theta_g, theta_l, phi = states
    scored = logits_task(model)
    split_key, local_key, global_key = jax.random.split(key, 3)
    (local_data, n_local), (global_data, n_global) = split_halves(data, count, split_key)

    def local_loss(theta_l, frozen, batch, key):
        return scored.loss(model.apply((theta_g, theta_l, phi), batch, mode="local", key=key)[0], None, batch)

    loops = dict(optimizer=optimizer, batch_size=batch_size, epochs=epochs, unroll=unroll, skip_padding=skip_padding)
    theta_l, local_metrics = local_training(scored, theta_l, {}, local_data, n_local, local_key, loss_fn=local_loss,
                                            **loops)
    regularized = lambda states, batch, key: router_loss(model, states, batch, key, regularization=regularization,
                                                         local_discount=local_discount)
    if train_global:
        def phase_loss(params, frozen, batch, key):
            g, p = params
            router_key, dropout_key = jax.random.split(key)
            global_loss = scored.loss(model.apply((g, theta_l, p), batch, mode="global", key=dropout_key)[0],
                                      None, batch)
            routed = regularized((jax.lax.stop_gradient(g), theta_l, p), batch, router_key)
            # Value: the global-path loss (what FedAvg reports); gradient: ∇_θg of the global loss, ∇_φ of the
            # router loss, as the two sequential steps of the paper (see the module docstring).
            return global_loss + routed - jax.lax.stop_gradient(routed)

        (theta_g, phi), metrics = local_training(scored, (theta_g, phi), {}, global_data, n_global, global_key,
                                                 loss_fn=phase_loss, **loops)
    else:
        phi, metrics = local_training(scored, phi, {}, global_data, n_global, global_key, **loops,
                                      loss_fn=lambda p, frozen, batch, key: regularized((theta_g, theta_l, p), batch,
                                                                                        key))
    return (theta_g, theta_l, phi), {"loss": metrics["loss"], "local_loss": local_metrics["loss"],
                                     "steps": metrics["steps"] + local_metrics["steps"]}


def flow(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
         server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
         regularization: float = 0.01, local_discount: float = 0.5, personalize_epochs: int | None = None,
         eval_batch_size: int = 64, unroll: int | bool = 1, skip_padding: bool = True,
         name: str = "flow") -> FederatedAlgorithm:
    """Flow over `model`'s groups: the engine's trainable is `model.states` = (θ_g, θ_l, φ), frozen = {}.

    Args:
      regularization: λ, the weight of R (the paper: 0.01 for EMNIST, 0.001 otherwise).
      local_discount: β in R (module docstring); 0 gives the paper's −log(p_g² + ε).
      personalize_epochs: epochs of each phase when a client personalizes for evaluation (default local_epochs).
      unroll, skip_padding: the local loops' (see `client_training`).

    Example:
      >>> model = routed_models.emnist_cnn(dataset, key)
      >>> algorithm = flow(model, client_optimizer=optax.sgd(0.01, momentum=0.9),
      ...                  server_optimizer=optax.sgd(1.0), batch_size=20, local_epochs=3)
      >>> simulate.run_simulation(algorithm, model.states, {}, train, test, ...)
    """
    options = dict(optimizer=client_optimizer, batch_size=batch_size, regularization=regularization,
                   local_discount=local_discount, unroll=unroll, skip_padding=skip_padding)

    def client_update(frozen, states, data, count, slot, key):
        del frozen, slot
        trained, metrics = client_training(model, states, data, count, key, epochs=local_epochs, **options)
        return ClientOutput(pseudo_gradient(states, trained), count.astype(jnp.float32), metrics)

    def evaluate_client(frozen, states, train, train_count, test, test_count, client, key):
        del frozen
        personal, _ = client_training(model, states, train, train_count, key, train_global=False,
                                      epochs=local_epochs if personalize_epochs is None else personalize_epochs,
                                      **options)

        def predict(batch):
            global_out = model.apply(states, batch, mode="global")[0]
            personal_out, decisions = model.apply(personal, batch, mode="routed", hard=True)
            weights = model.objective(personal_out, batch)[2]
            local = jnp.sum(weights[..., None] * decisions[..., 1], axis=tuple(range(weights.ndim)))   # [P]
            routing = {"count": jnp.sum(weights), **{f"local_{k}": local[k] for k in range(model.num_points)}}
            return global_out, personal_out, {"routing": routing}

        return compare(model, predict, test, test_count, batch_size=eval_batch_size)

    return FederatedAlgorithm(
        name=name, init=init_with_optimizer(server_optimizer), broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_client, bytes_per_round=full_model_bytes)
