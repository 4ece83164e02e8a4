"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose clients minimize
L_i(θ) + (μ/2)‖θ − θ_global‖², μ = `proximal_mu`. The implementation is FedAvg's (see fedavg.py)."""
from __future__ import annotations

from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.signatures import forwards_options_to
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.task import Task


@forwards_options_to(fedavg, sets=("name",))
def fedprox(task: Task, *, proximal_mu: float = 0.01, **fedavg_options) -> FederatedAlgorithm:
    """FedAvg with the proximal term; μ = 0.01 is a middle value of the FedProx paper's grid {0.001, 0.01, 0.1, 1}."""
    if not proximal_mu > 0:
        raise ValueError(f"fedprox needs proximal_mu > 0, got {proximal_mu} (0 is FedAvg)")
    return fedavg(task, proximal_mu=proximal_mu, name="fedprox", **fedavg_options)
