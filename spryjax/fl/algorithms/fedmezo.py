"""FedMeZO: FedAvg whose clients train with MeZO's zero-order SPSA steps (Malladi et al. 2023, "Fine-Tuning
Language Models with Just Forward Passes"), the Spry paper's zero-order baseline.

Client step: ĝ = (1/K) Σ_k (L(θ+εz_k) − L(θ−εz_k)) / (2ε) · z_k with z_k regenerated from the step's seed (never
stored beside θ), then the client optimizer (MeZO: SGD); after the local epochs the client uploads
Δ = θ − θ_local; the server averages by examples and applies its optimizer. Only forward passes: inference-level
memory.
"""
from __future__ import annotations

import functools

from spryjax import fwdgrad
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.signatures import forwards_options_to
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.task import Task


@forwards_options_to(fedavg, sets=("gradient_fn", "name"))
def fedmezo(task: Task, *, eps: float = 1e-3, num_tangents: int = 1, **fedavg_options) -> FederatedAlgorithm:
    """ε = `eps` (MeZO's default 1e-3), K = `num_tangents` perturbations per step (MeZO: 1)."""
    estimator = functools.partial(fwdgrad.spsa_grad, eps=eps, num_tangents=num_tangents)
    return fedavg(task, gradient_fn=estimator, name="fedmezo", **fedavg_options)
