"""FedMeZO: federated learning whose clients estimate gradients with MeZO's zero-order SPSA (Malladi et al. 2023,
"Fine-Tuning Language Models with Just Forward Passes"), the Spry paper's zero-order baseline, in both of the
shapes Spry has (`communication`, as in spry.py):

    ĝ = (1/K) Σ_k d_k z_k,    d_k = (L(θ+εz_k) − L(θ−εz_k)) / (2ε),    z_k ~ N(0, I) from the step's seed

(`fwdgrad.spsa_grad`; z_k is regenerated from the seed, never stored beside θ: inference-level memory).

"per_epoch" (default; FedAvg-shaped, as the Spry paper ran it): `local_epochs` of SPSA steps with the client
optimizer (MeZO: SGD), then the client uploads Δ = θ − θ_local (the whole trainable tree); the server averages by
examples and applies its optimizer.

"per_iteration" (FedSGD-shaped, with MeZO's seed trick): one minibatch per round (the batch and keys of FedSGD,
`first_batch`); the client measures the K differences d_k (`fwdgrad.finite_difference_scalars`) and uploads those
K fp32 scalars only, 4·K bytes; the server knows the client's seed, regenerates z_k and forms the same ĝ
(`fwdgrad.grad_from_scalars`), averages by the minibatch's examples (fedsgd.py) and applies its optimizer. FedAvg's
options that only local training uses (client_optimizer, local_epochs, proximal_mu, unroll) are errors there, not
ignored.
"""
from __future__ import annotations

import functools
from typing import Literal

import optax

from spryjax import fwdgrad
from spryjax.errors import InputError
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.fedsgd import fedsgd
from spryjax.fl.algorithms.spry import check_communication, scalars_up_bytes
from spryjax.signatures import forwards_options_to, parameters_of
from spryjax.task import Task


@forwards_options_to(fedavg, sets=("gradient_fn", "name"))
def fedmezo(task: Task, *, eps: float = 1e-3, num_tangents: int = 1,
            communication: Literal["per_epoch", "per_iteration"] = "per_epoch",
            client_optimizer: optax.GradientTransformation | None = None, **fedavg_options) -> FederatedAlgorithm:
    """ε = `eps` (MeZO's default 1e-3), K = `num_tangents` perturbations per step (MeZO: 1); `client_optimizer`
    is required per epoch and an error per iteration (see the module docstring).

    Example:
      >>> fedmezo(task, communication="per_iteration", server_optimizer=optax.sgd(1e-3), batch_size=8)
    """
    check_communication(communication, client_optimizer=client_optimizer,
                        local_epochs=fedavg_options.get("local_epochs", 1))
    # spsa_grad = finite_difference_scalars, then grad_from_scalars from the same key: per iteration, exactly
    # what the server regenerates from the uploaded scalars
    estimator = functools.partial(fwdgrad.spsa_grad, eps=eps, num_tangents=num_tangents)
    if communication == "per_epoch":
        return fedavg(task, client_optimizer=client_optimizer, gradient_fn=estimator, name="fedmezo",
                      **fedavg_options)
    per_iteration = parameters_of(fedsgd)
    defaults = parameters_of(fedavg)
    for option, value in fedavg_options.items():
        if option not in per_iteration and value != defaults[option].default:
            raise InputError(f"{option}: not used by per_iteration communication")
    return fedsgd(task, gradient_fn=estimator, bytes_per_round=scalars_up_bytes(4 * num_tangents), name="fedmezo",
                  **{k: v for k, v in fedavg_options.items() if k in per_iteration})
