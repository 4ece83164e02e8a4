"""LG-FedAvg: Liang et al. 2020, "Think Locally, Act Globally: Federated Learning with Local and Global
Representations" (arXiv 2001.01523), as Flow (arXiv 2211.15281) compares with it.

Each client keeps a local representation (every layer but the `head`) and shares the head: client k trains its
representation r_k and the global head h jointly on its data and uploads h; the server averages the heads.
Personalized model of client k: (r_k, h).

Stateless deviation: the paper keeps r_k on the client across rounds. Here a client's representation starts from the
server's average of the representations (as Flow's local parameters start from their server average), so a
training round trains and uploads the whole global path: it is exactly FedAvg's. At evaluation the client fits its
representation from the server's, `personal_epochs` epochs on its training split with the global head fixed:
    r_k = r − opt(∇_r L_k(r, h)) ...,    personalized (r_k, h) vs global (r, h).
"""
from __future__ import annotations

from typing import Sequence

import jax
import optax

from spryjax.fl.algorithm import FederatedAlgorithm, local_training
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.fl.algorithms.personalization import compare_models, global_path_task, head_mask, on_global_path
from spryjax.nn.routing import RoutedModel


def lg_fedavg(model: RoutedModel, *, client_optimizer: optax.GradientTransformation,
              server_optimizer: optax.GradientTransformation, batch_size: int, local_epochs: int = 1,
              head: Sequence[str] = ("dense2",), personal_epochs: int | None = None, eval_batch_size: int = 64,
              unroll: int | bool = 1, name: str = "lg_fedavg") -> FederatedAlgorithm:
    """LG-FedAvg over `model`'s global path; the engine's trainable is `model.states` (θ_g is kept). `head`: the
    top-level keys of θ_g that are shared (see `personalization.head_mask`)."""
    task = global_path_task(model)
    representation = jax.tree.map(lambda h: not h, head_mask(model.states[0], head))
    epochs = local_epochs if personal_epochs is None else personal_epochs

    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        personal, _ = local_training(task, params, frozen, train, train_count, key, optimizer=client_optimizer,
                                     batch_size=batch_size, epochs=epochs, update_mask=representation,
                                     unroll=unroll)
        return compare_models(model, params, personal, test, test_count, batch_size=eval_batch_size)

    algorithm = fedavg(task, client_optimizer=client_optimizer, server_optimizer=server_optimizer,
                       batch_size=batch_size, local_epochs=local_epochs, eval_batch_size=eval_batch_size,
                       unroll=unroll, name=name)
    return on_global_path(algorithm._replace(evaluate_client=evaluate_client))
