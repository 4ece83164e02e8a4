"""Ditto: Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"
(ICML 2021, arXiv 2012.04221), as Flow (arXiv 2211.15281) compares with it.

Global model: FedAvg on the routed model's global path, w = θ_g (Ditto's w-update is FedAvg's local SGD).
Personal model of client k: v_k ≈ argmin_v F_k(v) + (λ/2) ‖v − w‖², by `personal_epochs` epochs of the client
optimizer on its training split, starting from v = w.

Stateless deviation: Ditto keeps v_k on the client across rounds and updates it whenever k is selected. The engine
keeps no per-client state (and Flow needs none), so here v_k is solved at evaluation time from the current w and
discarded; training rounds are exactly FedAvg's.
"""
from __future__ import annotations

import optax

from spryjax.fl.algorithm import FederatedAlgorithm, local_training, proximal_loss
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.personalization import compare_models, global_path_task, on_global_path
from spryjax.nn.routing import RoutedModel


def ditto(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
          proximal_lambda: float = 0.1, personal_epochs: int | None = None, eval_batch_size: int = 64,
          unroll: int | bool = 1, name: str = "ditto") -> FederatedAlgorithm:
    """Ditto over `model`'s global path; the engine's trainable is `model.states` (θ_g is kept).
    `proximal_lambda` is λ (0.1 in Flow's EMNIST and Stackoverflow settings); `personal_epochs` defaults to
    `local_epochs`."""
    task = global_path_task(model)
    epochs = local_epochs if personal_epochs is None else personal_epochs

    def evaluate_client(frozen, w, train, train_count, test, test_count, client, key):
        v, _ = local_training(task, w, frozen, train, train_count, key, optimizer=client_optimizer,
                              batch_size=batch_size, epochs=epochs, unroll=unroll,
                              loss_fn=proximal_loss(task.loss, w, proximal_lambda))
        return compare_models(model, w, v, test, test_count, batch_size=eval_batch_size)

    algorithm = fedavg(task, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                       batch_size=batch_size, local_epochs=local_epochs, eval_batch_size=eval_batch_size,
                       unroll=unroll, name=name)
    return on_global_path(algorithm._replace(evaluate_client=evaluate_client))
