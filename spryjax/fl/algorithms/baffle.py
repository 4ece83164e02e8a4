"""BAFFLE (Feng et al. 2023, "Does Federated Learning Really Need Backpropagation?"): FedSGD-shaped rounds in which
each client measures K central differences of its loss on a minibatch and uploads the K scalars; the server
regenerates the perturbations from the seed and forms

    ĝ_i = (1/K) Σ_k (L_i(θ + σ v_k) − L_i(θ − σ v_k)) / (2σ) · v_k,      K = 10, σ = 1e-4 (BAFFLE's defaults),

averages by examples and applies its optimizer. The released code's difference quotient divides by 2 and multiplies
by σ (an operator-precedence bug); the textbook formula above is used (`fwdgrad.central_diff_grad`).
"""
from __future__ import annotations

import functools

from spryjax import fwdgrad
from spryjax.fl.algorithm import Communication, FederatedAlgorithm
from spryjax.signatures import forwards_options_to
from spryjax.fl.algorithms.fedsgd import fedsgd
from spryjax.pytrees import tree_bytes
from spryjax.task import Task


@forwards_options_to(fedsgd, sets=("gradient_fn", "bytes_per_round", "name"))
def baffle(task: Task, *, sigma: float = 1e-4, num_tangents: int = 10, **fedsgd_options) -> FederatedAlgorithm:
    """σ = `sigma`, K = `num_tangents` perturbations per round; a client uploads K fp32 scalars."""
    estimator = functools.partial(fwdgrad.central_diff_grad, sigma=sigma, num_tangents=num_tangents)
    bytes_per_round = lambda params_like, cohort: Communication(down=tree_bytes(params_like) * cohort,
                                                                up=4 * num_tangents * cohort)
    return fedsgd(task, gradient_fn=estimator, bytes_per_round=bytes_per_round, name="baffle", **fedsgd_options)
