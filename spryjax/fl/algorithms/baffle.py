"""BAFFLE (Feng et al. 2023, "Does Federated Learning Really Need Backpropagation?") in both of the shapes Spry has
(`communication`, as in spry.py). A client's estimate on a minibatch is K central differences of its loss:

    ĝ = (1/K) Σ_k d_k v_k,    d_k = (L(θ + σ v_k) − L(θ − σ v_k)) / (2σ),    K = 10, σ = 1e-4 (BAFFLE's defaults)

(`fwdgrad.spsa_grad` with ε = σ, v_k regenerated from the step's seed).

"per_iteration" (default; BAFFLE's own, FedSGD-shaped): one minibatch per round (fedsgd.py); the client uploads
the K scalars d_k only (4·K bytes); the server regenerates v_k from the seed, forms ĝ, averages by the minibatch's
examples and applies its optimizer. No client optimizer, no local epochs: setting them is an error.

"per_epoch" (the Spry paper's BAFFLE+, FedAvg-shaped): `local_epochs` of the client optimizer (AdamW lr 1e-4 in the
released code) with ĝ at every minibatch, then the client uploads Δ = θ − θ_local (the whole trainable tree); the
server averages by examples and applies its optimizer (FedYogi in the released code).

Released-code defects, not copied (trainers/client_baffle_plus.py, central differences, perturbation δ_k = σ v_k,
Δ_k = L(θ + δ_k) − L(θ − δ_k), PyTorch 2.2, whose `zero_grad` leaves no gradient before each minibatch): the first
perturbation's term is (Δ_1/σ)(δ_1/σ) = 2 d_1 v_1 (divided by σ, not 2σ); every later one is added as
`(difference / 2 * sigma) * (delta / sigma)`, which by operator precedence is (Δ_k σ/2) v_k = σ² d_k v_k; the sum is
divided by K. The released estimate is therefore (2/K) d_1 v_1 + (σ²/K) Σ_{k≥2} d_k v_k: later perturbations weigh
σ²/2 of the first (5e-9 at σ = 1e-4), so it is one perturbation's estimate scaled by 2/K, and K = 1 here reproduces
what the released code effectively ran (up to that scale, which its AdamW client optimizer normalizes away). Plain
BAFFLE's released code also perturbs every state_dict tensor, frozen base included; here only the trainable tree
is.
"""
from __future__ import annotations

import functools
from typing import Literal

import optax

from spryjax import fwdgrad
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.fedsgd import fedsgd
from spryjax.fl.algorithms.spry import check_communication, scalars_up_bytes
from spryjax.signatures import forwards_options_to
from spryjax.task import Task


@forwards_options_to(fedsgd, sets=("gradient_fn", "bytes_per_round", "name"))
def baffle(task: Task, *, sigma: float = 1e-4, num_tangents: int = 10,
           communication: Literal["per_epoch", "per_iteration"] = "per_iteration",
           client_optimizer: optax.GradientTransformation | None = None, local_epochs: int = 1,
           **fedsgd_options) -> FederatedAlgorithm:
    """σ = `sigma`, K = `num_tangents` perturbations per estimate; `client_optimizer` and `local_epochs` are
    per-epoch options (see the module docstring).

    Example (BAFFLE+):
      >>> baffle(task, communication="per_epoch", client_optimizer=optax.adamw(1e-4), server_optimizer=yogi,
      ...        batch_size=8)
    """
    check_communication(communication, client_optimizer=client_optimizer, local_epochs=local_epochs)
    estimator = functools.partial(fwdgrad.spsa_grad, eps=sigma, num_tangents=num_tangents)
    if communication == "per_epoch":
        return fedavg(task, client_optimizer=client_optimizer, local_epochs=local_epochs, gradient_fn=estimator,
                      name="baffle", **fedsgd_options)
    return fedsgd(task, gradient_fn=estimator, bytes_per_round=scalars_up_bytes(4 * num_tangents), name="baffle",
                  **fedsgd_options)
