"""FedFGD, the Spry paper's ablation: FedAvg whose clients use forward gradients on all trainable weights (no
split). Client step: ĝ = (1/K) Σ_k (∇L·v_k) v_k over the whole trainable tree (`fwdgrad.forward_grad`), then the
client optimizer. The paper finds it slower and less accurate than Spry, whose split gives each client fewer
dimensions to estimate."""
from __future__ import annotations

import functools

from spryjax import fwdgrad
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.signatures import forwards_options_to
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.task import Task


@forwards_options_to(fedavg, sets=("gradient_fn", "name"))
def fedfgd(task: Task, *, num_tangents: int = 1, **fedavg_options) -> FederatedAlgorithm:
    """K = `num_tangents` tangents per step."""
    estimator = functools.partial(fwdgrad.forward_grad, num_tangents=num_tangents)
    return fedavg(task, gradient_fn=estimator, name="fedfgd", **fedavg_options)
