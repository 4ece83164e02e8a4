"""Flow: "Per-Instance Personalized Federated Learning Through Dynamic Routing" (Panchal et al., arXiv 2211.15281);
released code github.com/Astuary/Flow (trainers/client_flow.py).

The model is a `RoutedModel` (spryjax.nn.routing) with parameter groups (θ_g, θ_l, φ): every routed layer has a
global and a local copy, and the policy φ gives, per instance x and routing point k, p_k(x) = (p^g_k, p^l_k). The
pure paths f_global(x; θ_g) and f_local(x; θ_g, θ_l) use one copy everywhere; the personalized path
f_routed(x; θ_g, θ_l, p) mixes them (soft p while training, hard argmax decisions at evaluation).

Client round. Stateless: a client starts from the server's (θ_g, θ_l, φ) every time and keeps nothing. Its n
training examples are split into halves ζ_l and ζ_g (`split`, below). With `client_optimizer` (SGD with momentum
0.9 in the paper; a fresh optimizer state per phase):
  0. with local_init="every_round" only: θ_l ← θ_g (each routed layer's local copy := its global copy);
  1. local phase, `local_epochs` epochs over ζ_l, per batch:
         θ_l ← θ_l − opt(∇_θl CE(f_local(x; θ_g, θ_l), y))
  2. global phase, `local_epochs` epochs over ζ_g, per batch, first
         router step:  φ ← φ − opt(∇_φ [CE(f_routed(x; θ_g, θ_l, p_φ(x)), y) + λ R(p_φ(x))])      (soft p)
     then
         global step:  θ_g ← θ_g − opt(∇_θg CE(f_global(x; θ_g), y))
The two halves together make one pass over the client's data per epoch. The client uploads
u = (θ_g, θ_l, φ)_server − (θ_g, θ_l, φ)_client with weight n. Server: FedAvg over all three groups,
u = Σ n_i u_i / Σ n_i, then `server_optimizer` on u (optax.sgd(1.0) is plain FedAvg).

Because the global path reads no router parameter and the router step reads θ_g without changing it, the two steps
of a batch equal one step on (θ_g, φ) with the gradient of
    L(θ_g, φ) = CE(f_global(x; θ_g), y) + L_router(φ; sg(θ_g), θ_l)       (sg: stop_gradient)
so phase 2 is one `local_training` loop; tests check it against the two sequential steps.

The halves (`split`):
    "shuffled"  the client's real rows in a random order drawn from its round key, ζ_l the first ⌈n/2⌉, ζ_g the
                other ⌊n/2⌋: new halves every round (spryjax's default).
    "fixed"     as released: the stored rows cut into minibatches of `batch_size`, ζ_l the even-numbered ones and
                ζ_g the odd-numbered ones (the released EMNIST loader is not shuffled and takes `shard(2, 0/1)` of
                batches of 20), so θ_g only ever trains on ζ_g, and evaluation personalizes on the same halves.
                A client's rows must be stored in no particular order (a task sorted by label would give the
                halves different classes); with n ≤ batch_size ζ_g is empty and the client trains θ_l only.

The local copy's initialization (`local_init`):
    "independent"  the model's θ_l as built: every routed layer's two copies are drawn independently (as released,
                   whose "local := global" line is commented out).
    "at_creation"  the server's initial θ_l := θ_g (`routing.local_from_global`, in `init`); after that θ_l
                   evolves on its own as with "independent".
    "every_round"  θ_l := θ_g at the start of every client call, training and evaluation alike: the local copy is
                   θ_g fine-tuned on ζ_l that round, and the server's average of θ_l is never read.
Deviation from the released code (both non-default values): with independent copies every path that mixes global
and local layers is near chance, so a router trained on soft mixtures is pushed into one corner; a local copy
started from the global one keeps the mixed paths meaningful.

The routing regularizer, defined once for every model. Over the batch's instances b (weights w_b: the example mask,
or token weights for next-word prediction) and all P routing points, with columns (global, local):
    R(p) = Σ_b w_b Σ_k r(p^l_{b,k}) / (P Σ_b w_b),   r(p^l) = −log((1 − p^l)² + β (p^l)² + ε),
β = `local_discount` (default ½), ε = 1e-6. Gradient descent on λR moves each decision towards a confident one,
on either side of the threshold t = 1/(1 + β): dr/dp^l = 2(1 − (1 + β) p^l) / ((1 − p^l)² + β (p^l)² + ε), positive
for p^l < t (descent lowers p^l: towards global) and negative for p^l > t (descent raises p^l: towards local).
    β = 1   the collision (Rényi-2) entropy of the decision: t = ½, r = 0 at both ends, log 2 at 50/50;
    β = ½   t = 2/3, r = 0 at the global end and log 2 at the local end: both ends are basins, the global one is
            wider and lower, so an undecided router drifts to the global copy, trained on every client's data;
    β = 0   the paper's −log(p_g² + ε) on the global column: t = 1, the push is towards global everywhere; it
            vanishes only at the local end (weak within ~√ε of it).
The released code applies −log(p² + ε) to a different column in each model: for EMNIST `probs[:, 1]` is routing
point 2's whole (global, local) pair, which pushes point 2 towards 50/50 (the sum −log p_g² − log p_l² is smallest
at ½, ½) and leaves points 1, 3 and 4 unregularized; for Stackoverflow it is global at the LSTM steps and local at
the output points; for CIFAR local at all six points. spryjax uses R above everywhere.

Evaluation (stateless, like the released code's `*_generalized_test`): the evaluated client personalizes from the
server state on its own training split with the same split, local_init and `personalize_epochs` epochs of each
phase, then is scored on its held-out split. Two protocols (`evaluation`):
    "server_model"    the local phase, then router steps only. generalized: f_global(x; θ_g) with the server's θ_g;
                      personalized: f_routed(x; θ_g, θ_l', hard decisions of p_φ'(x)).
    "client_adapted"  the released EMNIST protocol: the local phase, then epochs over ζ_g training φ and θ_g
                      together along the routed path (soft p, CE + λR). generalized: the global path of a copy
                      taken after the first of those epochs (already adapted to the client, hence the label);
                      personalized: the routed path with hard decisions after the last one. Report it as
                      "client-adapted": its generalized number is not the server's model.
Besides `personalization.compare`'s groups (versus_global compares with the generalized model of the protocol), the
evaluation logs "routing": local_<k> = the fraction of instances (tokens) whose decision at routing point k is the
local copy, and for each name t in `instance_groups` (0/1 per-instance tags in the data, e.g. a task's "changed",
"plain", "rare") "routing_<t>": the same fractions over the instances tagged t.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax.errors import InputError
from spryjax.fl.algorithm import (ClientOutput, FederatedAlgorithm, apply_server_optimizer,
                                  full_model_bytes, init_with_optimizer, local_training, pseudo_gradient)
from spryjax.fl.algorithms.personalization import compare, logits_task
from spryjax.nn.routing import RoutedModel, States, local_from_global

EPSILON = 1e-6
SPLITS = ("shuffled", "fixed")
LOCAL_INITS = ("independent", "at_creation", "every_round")
EVALUATIONS = ("server_model", "client_adapted")


def routing_regularizer(probs: jax.Array, weights: jax.Array, *, local_discount: float = 0.5,
                        eps: float = EPSILON) -> jax.Array:
    """R(p) of the module docstring: probs [*lead, P, 2] (columns global, local; every routing point counts),
    weights [*lead]. Its gradient pushes p^l below 1/(1 + β) towards 0 (global), above it towards 1 (local).

    Example: one instance, one routing point, β = ½: R((1, 0)) = −log(1 + ε) ≈ 0; R((0, 1)) = −log(β + ε) ≈ log 2;
    R((½, ½)) = −log((1 + β)/4 + ε) ≈ 0.98; the maximum is at p^l = 2/3, R = log 3.
    """
    terms = -jnp.log(probs[..., 0] ** 2 + local_discount * probs[..., 1] ** 2 + eps)      # [*lead, P]
    return jnp.sum(weights[..., None] * terms) / (probs.shape[-2] * jnp.maximum(jnp.sum(weights), 1.0))


def split_halves(data: dict, count: jax.Array, key: jax.Array, *, split: Literal["shuffled", "fixed"] = "shuffled",
                 batch_size: int | None = None) -> tuple[tuple[dict, jax.Array], tuple[dict, jax.Array]]:
    """((ζ_l, n_l), (ζ_g, n_g)): a client's `count` real rows of `data` [P, ...] cut into two halves, each padded to
    a static number of rows with its real rows first (the rest is masked by its count).

    "shuffled": the real rows in an order drawn from `key`, ζ_l the first n_l = ⌈count/2⌉ and ζ_g the other
    ⌊count/2⌋, each padded to ⌈P/2⌉ rows. "fixed": `key` is unused; the rows in stored order cut into minibatches of
    `batch_size`, ζ_l the even-numbered minibatches and ζ_g the odd-numbered ones (the released code's halves),
    each padded to the larger half's rows.

    Example: count 7 of P = 8, batch_size 2, "fixed": ζ_l = rows 0, 1, 4, 5 (n_l = 4), ζ_g = rows 2, 3, 6 (n_g = 3).
    """
    capacity = next(iter(data.values())).shape[0]
    take = lambda rows: {k: jnp.take(v, rows, axis=0) for k, v in data.items()}
    if split == "fixed":
        if batch_size is None:
            raise ValueError("the fixed split needs the batch size")
        even = (np.arange(capacity) // batch_size) % 2 == 0
        rows_l, rows_g = np.flatnonzero(even), np.flatnonzero(~even)
        half = max(len(rows_l), len(rows_g), 1)
        # Each half's rows ascend, so its real rows (those below count) come first; pad with row 0 (masked).
        pad = lambda rows: jnp.asarray(np.concatenate([rows, np.zeros(half - len(rows), np.int64)]))
        n_local = jnp.sum(jnp.asarray(rows_l) < count).astype(count.dtype)
        return (take(pad(rows_l)), n_local), (take(pad(rows_g)), count - n_local)
    if split != "shuffled":
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    half = -(-capacity // 2)
    order = jnp.argsort(jnp.where(jnp.arange(capacity) < count, jax.random.uniform(key, (capacity,)), 2.0))
    n_local = count - count // 2
    # ζ_g starts at row n_local of the shuffled order; the wrapped copy keeps a ⌈P/2⌉-row slice in range.
    wrapped = jnp.concatenate([order, order[:half]])
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
                    local_discount: float, phase2: Literal["train", "router", "adapt"] = "train",
                    split: Literal["shuffled", "fixed"] = "shuffled",
                    local_init: Literal["independent", "at_creation", "every_round"] = "independent",
                    unroll: int | bool = 1, skip_padding: bool = True
                    ) -> tuple[States, dict[str, jax.Array]]:
    """A Flow client's phases (module docstring) from `states` on its `count` rows of `data`.

    phase2: "train" (a training round: router and global steps), "router" (the server-model evaluation: router
    steps only, θ_g stays the server's) or "adapt" (the client-adapted evaluation: φ and θ_g trained together along
    the routed path; metrics then carry "adapted_global", θ_g after the first of those epochs). `unroll` and
    `skip_padding` go to `local_training` (unroll=True with skip_padding=False keeps every step out of nested XLA
    computations: 3–4× faster for a 28×28 CNN on CPU, slower to compile). Returns the trained (θ_g, θ_l, φ) and
    {"loss": mean phase-2 loss over its steps (global path for "train", routed otherwise), "local_loss": phase 1's
    mean loss, "steps": phase 1 + phase 2 steps}.
    """
    theta_g, theta_l, phi = states
    if local_init == "every_round":
        theta_l = local_from_global(theta_g, theta_l)
    scored = logits_task(model)
    split_key, local_key, global_key = jax.random.split(key, 3)
    (local_data, n_local), (global_data, n_global) = split_halves(data, count, split_key, split=split,
                                                                  batch_size=batch_size)

    def local_loss(theta_l, frozen, batch, key):
        return scored.loss(model.apply((theta_g, theta_l, phi), batch, mode="local", key=key)[0], None, batch)

    loops = dict(optimizer=optimizer, batch_size=batch_size, unroll=unroll, skip_padding=skip_padding)
    theta_l, local_metrics = local_training(scored, theta_l, {}, local_data, n_local, local_key, loss_fn=local_loss,
                                            epochs=epochs, **loops)
    regularized = lambda states, batch, key: router_loss(model, states, batch, key, regularization=regularization,
                                                         local_discount=local_discount)
    extra = {}
    if phase2 == "train":
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
                                                 loss_fn=phase_loss, epochs=epochs, **loops)
    elif phase2 == "router":
        phi, metrics = local_training(scored, phi, {}, global_data, n_global, global_key, epochs=epochs, **loops,
                                      loss_fn=lambda p, frozen, batch, key: regularized((theta_g, theta_l, p), batch,
                                                                                        key))
    elif phase2 == "adapt":
        adapt_loss = lambda params, frozen, batch, key: regularized((params[0], theta_l, params[1]), batch, key)
        first_key, rest_key = jax.random.split(global_key)
        (theta_g, phi), first = local_training(scored, (theta_g, phi), {}, global_data, n_global, first_key,
                                               loss_fn=adapt_loss, epochs=min(epochs, 1), **loops)
        extra["adapted_global"] = theta_g
        (theta_g, phi), rest = local_training(scored, (theta_g, phi), {}, global_data, n_global, rest_key,
                                              loss_fn=adapt_loss, epochs=max(epochs - 1, 0), **loops)
        steps = first["steps"] + rest["steps"]
        metrics = {"loss": (first["loss"] * first["steps"] + rest["loss"] * rest["steps"]) / jnp.maximum(steps, 1),
                   "steps": steps}
    else:
        raise ValueError(f"phase2 must be 'train', 'router' or 'adapt', got {phase2!r}")
    return (theta_g, theta_l, phi), {"loss": metrics["loss"], "local_loss": local_metrics["loss"],
                                     "steps": metrics["steps"] + local_metrics["steps"], **extra}


def routing_groups(decisions: jax.Array, weights: jax.Array, batch: dict,
                   instance_groups: tuple[str, ...]) -> dict[str, dict[str, jax.Array]]:
    """Sums over a batch of the local decisions: {"routing": {"count": Σ w, "local_<k>": Σ w d_k}} and the same as
    "routing_<t>" over the instances tagged t (batch[t] ∈ {0, 1} per instance, [B]). decisions [*lead, P, 2] are
    one-hot (global, local); weights [*lead] (examples, or examples × tokens)."""
    def sums(w):
        local = jnp.sum(w[..., None] * decisions[..., 1], axis=tuple(range(w.ndim)))          # [P]
        return {"count": jnp.sum(w), **{f"local_{k}": local[k] for k in range(decisions.shape[-2])}}

    groups = {"routing": sums(weights)}
    for tag in instance_groups:
        if tag not in batch:
            raise InputError(f"instance_groups: the data has no per-instance key {tag!r} (keys: "
                             f"{', '.join(sorted(batch))})")
        t = batch[tag].astype(weights.dtype).reshape(batch[tag].shape + (1,) * (weights.ndim - batch[tag].ndim))
        groups[f"routing_{tag}"] = sums(weights * t)
    return groups


def flow(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
         server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
         regularization: float = 0.01, local_discount: float = 0.5, personalize_epochs: int | None = None,
         split: Literal["shuffled", "fixed"] = "shuffled",
         local_init: Literal["independent", "at_creation", "every_round"] = "independent",
         evaluation: Literal["server_model", "client_adapted"] = "server_model",
         instance_groups: tuple[str, ...] = (), eval_batch_size: int = 64, unroll: int | bool = 1,
         skip_padding: bool = True, name: str = "flow") -> FederatedAlgorithm:
    """Flow over `model`'s groups: the engine's trainable is `model.states` = (θ_g, θ_l, φ), frozen = {}.

    Args:
      regularization: λ, the weight of R (the paper: 0.01 for EMNIST, 0.001 otherwise).
      local_discount: β in R (module docstring); 0 gives the paper's −log(p_g² + ε).
      personalize_epochs: epochs of each phase when a client personalizes for evaluation (default local_epochs).
      split: "shuffled" (new halves every round) or "fixed" (the released even/odd minibatches).
      local_init: "independent" (as released), "at_creation" or "every_round" (θ_l := θ_g; module docstring).
      evaluation: "server_model" or "client_adapted" (the released EMNIST protocol; module docstring).
      instance_groups: per-instance 0/1 keys of the held-out data whose routing shares are logged separately.
      unroll, skip_padding: the local loops' (see `client_training`).

    Example:
      >>> model = routed_models.emnist_cnn(dataset, key)
      >>> algorithm = flow(model, client_optimizer=optax.sgd(0.01, momentum=0.9),
      ...                  server_optimizer=optax.sgd(1.0), batch_size=20, local_epochs=3, split="fixed")
      >>> simulate.run_simulation(algorithm, model.states, {}, train, test, ...)
    """
    for option, value, choices in (("split", split, SPLITS), ("local_init", local_init, LOCAL_INITS),
                                   ("evaluation", evaluation, EVALUATIONS)):
        if value not in choices:
            raise InputError(f"{option}={value!r}: must be one of {', '.join(map(repr, choices))}")
    instance_groups = tuple(instance_groups)
    options = dict(optimizer=client_optimizer, batch_size=batch_size, regularization=regularization,
                   local_discount=local_discount, split=split, local_init=local_init, unroll=unroll,
                   skip_padding=skip_padding)

    def init(states, key):
        if local_init == "at_creation":
            states = (states[0], local_from_global(states[0], states[1]), states[2])
        return init_with_optimizer(server_optimizer)(states, key)

    def client_update(frozen, states, data, count, slot, key):
        del frozen, slot
        trained, metrics = client_training(model, states, data, count, key, epochs=local_epochs, **options)
        return ClientOutput(pseudo_gradient(states, trained), count.astype(jnp.float32), metrics)

    def evaluate_client(frozen, states, train, train_count, test, test_count, client, key):
        del frozen
        personal, metrics = client_training(
            model, states, train, train_count, key, epochs=local_epochs if personalize_epochs is None
            else personalize_epochs, phase2="adapt" if evaluation == "client_adapted" else "router", **options)
        global_states = (metrics["adapted_global"], *states[1:]) if evaluation == "client_adapted" else states

        def predict(batch):
            global_out = model.apply(global_states, batch, mode="global")[0]
            personal_out, decisions = model.apply(personal, batch, mode="routed", hard=True)
            weights = model.objective(personal_out, batch)[2]
            return global_out, personal_out, routing_groups(decisions, weights, batch, instance_groups)

        return compare(model, predict, test, test_count, batch_size=eval_batch_size)

    return FederatedAlgorithm(
        name=name, init=init, broadcast=lambda state: state.params,
        client_update=client_update, server_update=apply_server_optimizer(server_optimizer),
        evaluate_client=evaluate_client, bytes_per_round=full_model_bytes)
