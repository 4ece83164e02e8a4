"""FedAvgSplit, the Spry paper's ablation: backprop clients with Spry's split (each client trains and uploads only
its chunk of the trainable tensors; per-tensor averaging over assignees). The paper finds it much worse than Spry.
The implementation is Spry's with a reverse-mode gradient (see spry.py)."""
from __future__ import annotations

from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.signatures import forwards_options_to
from spryjax.fl.algorithms.spry import spry
from spryjax.task import Task


@forwards_options_to(spry, sets=("gradient", "name", "num_tangents", "tangent_chunk_size", "distribution",
                                 "communication", "finetune_epochs", "finetune_scope", "finetune_every_evaluation"))
def fedavg_split(task: Task, **spry_options) -> FederatedAlgorithm:
    """Spry's options but those of the forward-gradient estimator (backprop has no tangents), per-iteration
    communication (jvp scalars) and forward-gradient finetuning."""
    return spry(task, gradient="backprop", name="fedavg_split", **spry_options)
