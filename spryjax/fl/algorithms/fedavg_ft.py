"""FedAvg with local fine-tuning (FedAvg+FT), the personalization baseline of Wang et al. 2019, "Federated
Evaluation of On-device Personalization" (arXiv 1910.10252), as Flow (arXiv 2211.15281) compares with it.

Training: FedAvg on the routed model's global path θ_g (fedavg.py). Evaluation: client i's personalized model is
    θ_i = θ_g after `finetune_epochs` epochs of local training on its training split (client optimizer),
compared with θ_g on its held-out split (personalization.compare). The fine-tuned copy is made at evaluation time
from the current server model and discarded: stateless, as the engine and Flow are (the paper fine-tunes once,
after training, which is what the last evaluation of a run measures).
"""
from __future__ import annotations

import optax

from spryjax.fl.algorithm import FederatedAlgorithm, local_training
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.personalization import compare_models, global_path_task, on_global_path
from spryjax.nn.routing import RoutedModel


def fedavg_ft(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
              server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
              finetune_epochs: int | None = None, eval_batch_size: int = 64, unroll: int | bool = 1,
              name: str = "fedavg_ft") -> FederatedAlgorithm:
    """FedAvg+FT over `model`'s global path; the engine's trainable is `model.states` (θ_g is kept).
    `finetune_epochs` defaults to `local_epochs`; 0 evaluates plain FedAvg with the same metrics."""
    task = global_path_task(model)
    epochs = local_epochs if finetune_epochs is None else finetune_epochs

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        tuned, _ = local_training(task, params, frozen, train, train_count, key, optimizer=client_optimizer,
                                  batch_size=batch_size, epochs=epochs, unroll=unroll)
        return compare_models(model, params, tuned, test, test_count, batch_size=eval_batch_size)

    algorithm = fedavg(task, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                       batch_size=batch_size, local_epochs=local_epochs, eval_batch_size=eval_batch_size,
                       unroll=unroll, name=name)
    return on_global_path(algorithm._replace(evaluate_client=evaluate_client))
