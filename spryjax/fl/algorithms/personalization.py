"""What the algorithms of the Flow table share (Flow, arXiv 2211.15281, and its baselines): the routed model's
global path as the global model, and the instance-by-instance comparison of a personalized model with its own
global model on a client's held-out split.

Every algorithm of the table takes a `RoutedModel` and, as the engine's initial trainable, its three groups
(θ_g, θ_l, φ); the baselines train the global path only, so their `init` keeps θ_g (see `on_global_path`).

Stateless evaluation. The engine keeps nothing per client, and neither does Flow, so every baseline is evaluated in
a stateless form: an evaluated client personalizes from the current server state on its own training split at
evaluation time (fine-tuning, a proximal personal model, a local head, ...), then both models are scored on its
held-out split. Each module's docstring says what that changes from the paper.

`compare` returns, for one client, sums by group (the engine logs `<group>_<metric>`, a sum s as s / count):
    generalized, personalized   the task's sums (count, loss, correct, confusion) of the global / personalized model
    versus_global               per instance (per token for next-word prediction) with c_g, c_p ∈ {0, 1} whether
                                the global / personalized prediction is right: both_correct = Σ c_g c_p,
                                helped = Σ (1 − c_g) c_p, harmed = Σ c_g (1 − c_p), both_wrong = Σ (1 − c_g)(1 − c_p)
    clients                     count = 1 for a client with held-out examples; helped = 1 if its personalized model
                                gets more right than its global model, harmed = 1 if fewer
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.fl.algorithm import FederatedAlgorithm, sum_over_batches
from spryjax.nn.routing import RoutedModel, global_logits
from spryjax.task import Task

PyTree = Any
# predict(batch) -> (global logits, personalized logits, extra groups {group: {name: sum over the batch}}).
# Logits may be log-probabilities (kNN-Per, HypCluster's ensemble): only argmax and cross-entropy are read.
Predict = Callable[[dict], tuple[jax.Array, jax.Array, dict[str, dict[str, jax.Array]]]]


def global_path_task(model: RoutedModel) -> Task:
    """The routed model's global path as a `Task` over θ_g (frozen = {})."""
    return model.make_task(global_logits(model))


def logits_task(model: RoutedModel) -> Task:
    """The model's `Task` over precomputed logits: loss(logits, _, batch) and evaluate(logits, _, batch) score
    them as the model's own task would (so several models are scored from one forward pass each)."""
    return model.make_task(lambda logits, frozen, batch, key=None: logits)


def on_global_path(algorithm: FederatedAlgorithm, *,
                   server_params: Callable[[PyTree, jax.Array], PyTree] | None = None) -> FederatedAlgorithm:
    """`algorithm` (built over θ_g) started from the routed model's groups (θ_g, θ_l, φ): its server state holds
    `server_params(θ_g, key)` (default θ_g itself) and it communicates what it holds, not the unused groups."""
    make = server_params or (lambda theta_g, key: theta_g)

    def init(states, key):
        return algorithm.init(make(states[0], key), key)

    def bytes_per_round(states_like, cohort_size):
        return algorithm.bytes_per_round(jax.eval_shape(make, states_like[0], jax.random.key(0)), cohort_size)

    return algorithm._replace(init=init, bytes_per_round=bytes_per_round)


def head_mask(theta_g: PyTree, head: Sequence[str]) -> PyTree:
    """Booleans with θ_g's structure: True on the leaves under the top-level keys `head` (the classifier, e.g.
    ("dense2",) for the EMNIST CNN and the LSTM, ("fc",) for the ResNet), False on the representation."""
    unknown = sorted(set(head) - set(theta_g))
    if unknown or not head:
        raise InputError(f"head: {unknown or 'nothing'} is not a set of top-level keys of the global parameters "
                         f"({', '.join(map(str, theta_g))})")
    return {name: jax.tree.map(lambda _: name in head, tree) for name, tree in theta_g.items()}


def compare(model: RoutedModel, predict: Predict, test: dict, test_count: jax.Array, *,
            batch_size: int) -> dict[str, dict[str, jax.Array]]:
    """A client's evaluation groups (see the module docstring) from `predict` over its held-out examples."""
    scored = logits_task(model)

    def sums(batch):
        global_out, personal_out, extra = predict(batch)
        _, right_g, weight = model.objective(global_out, batch)
        _, right_p, _ = model.objective(personal_out, batch)
        s = lambda v: jnp.sum(v * weight)
        return {"generalized": scored.evaluate(global_out, None, batch),
                "personalized": scored.evaluate(personal_out, None, batch),
                "versus_global": {"count": s(1.0), "both_correct": s(right_g * right_p),
                                  "helped": s((1 - right_g) * right_p), "harmed": s(right_g * (1 - right_p)),
                                  "both_wrong": s((1 - right_g) * (1 - right_p))},
                **extra}

    groups = sum_over_batches(sums, test, test_count, batch_size=batch_size)
    gained = groups["personalized"]["correct"] - groups["generalized"]["correct"]
    groups["clients"] = {"count": (test_count > 0).astype(jnp.float32),
                         "helped": (gained > 0).astype(jnp.float32), "harmed": (gained < 0).astype(jnp.float32)}
    return groups


def compare_models(model: RoutedModel, global_params: PyTree, personal_params: PyTree, test: dict,
                   test_count: jax.Array, *, batch_size: int) -> dict[str, dict[str, jax.Array]]:
    """`compare` for two parameter sets of the global path (θ_g and a personalized copy of it)."""
    logits = global_logits(model)
    return compare(model, lambda batch: (logits(global_params, {}, batch), logits(personal_params, {}, batch), {}),
                   test, test_count, batch_size=batch_size)
