"""The Flow paper's table ("Per-Instance Personalized Federated Learning Through Dynamic Routing", arXiv
2211.15281): Flow and every baseline of its table on EMNIST, Stackoverflow, CIFAR-10, CIFAR-100 and Reddit, with
the paper's models at their sizes and the released hyperparameters (github.com/Astuary/Flow,
configs/hyperparameters.py); docs/paper_configs.md says which setting is the paper's, the release's or ours.

Run one cell:   python -m spryjax.main --config=configs/paper/flow.py:TASK[,METHOD]
The table:      python -m spryjax.launch --config=configs/paper/flow.py --workdir=runs/paper_flow [--dry-run]
                (get_sweep: TASKS × METHODS, CIFAR at Dirichlet α ∈ {0.6, 0.1}; `:TASK` or `:TASK,METHOD` narrows it)
TASK:   emnist (TFF's 3,400 writers), stackoverflow (TFF's users, their first 1,000 sentences), cifar10, cifar100
        (500 Dirichlet clients), reddit (LEAF's files: --config.data.path=FOLDER; no public archive)
METHOD: flow (the default), fedavg, fedavg_ft, apfl, ditto, fedrep, lg_fedavg, hypcluster, knn_per

Settings: 10 clients per round; 3 local epochs of SGD with momentum 0.9; FedAvg on the server. EMNIST: routed CNN
(conv 32 → 64, dense 128, policy 784 → 350 → 150 → 50), 1,500 rounds, batch 20, lr 0.01, λ 0.01. Stackoverflow
and Reddit: routed LSTM (embedding 96, hidden 670, vocabulary 10,000 / LEAF's), 2,000 rounds, batch 16, lr 0.1,
λ 0.001 (Reddit: Stackoverflow's, ours). CIFAR: routed ResNet-18 with GroupNorm, 4,000 rounds, batch 20, lr 0.05,
λ 0.001. Flow's routing regularizer is the paper's −log(p_g² + ε) (local_discount 0). Baselines: APFL α = 0.25,
Ditto λ = 0.1 (CIFAR 0.01), kNN-Per 10 neighbours and λ = 0.4 (EMNIST; 5 and 0.5, CIFAR-100 0.4, elsewhere),
as released. Evaluation (ours): every 100 rounds on 100 clients, the last round on 1,000.
Expect: not run here (no network, no accelerator). The paper reports Flow's personalized accuracy above every
baseline on each task.
"""
from typing import NamedTuple

import ml_collections

from configs import fl_section
from configs.paper import parse_cell, table_cells

from spryjax.launch.sweep import product


class Task(NamedTuple):
    data: dict
    model: dict
    num_rounds: int
    batch_size: int
    learning_rate: float
    regularization: float           # Flow's λ
    ditto_lambda: float
    knn: tuple[int, float]          # kNN-Per's neighbours and interpolation λ
    head: str                       # the personal head of FedRep, LG-FedAvg and kNN-Per


_LSTM = {"name": "so_lstm"}      # RoutedLSTM's defaults are the paper's sizes
_RESNET = {"name": "resnet_gn", "stem": "cifar"}
TASKS = {
    "emnist": Task({"name": "emnist", "only_digits": False}, {"name": "emnist_cnn"}, 1500, 20, 0.01, 0.01, 0.1,
                   (10, 0.4), "dense2"),
    "stackoverflow": Task({"name": "stackoverflow", "vocab_size": 10_000, "seq_len": 20,
                           "max_sentences_per_client": 1000}, _LSTM, 2000, 16, 0.1, 0.001, 0.1, (5, 0.5), "dense2"),
    "cifar10": Task({"name": "cifar10", "num_clients": 500, "alpha": 0.6}, _RESNET, 4000, 20, 0.05, 0.001, 0.01,
                    (5, 0.5), "fc"),
    "cifar100": Task({"name": "cifar100", "num_clients": 500, "alpha": 0.6}, _RESNET, 4000, 20, 0.05, 0.001, 0.01,
                     (5, 0.4), "fc"),
    "reddit": Task({"name": "reddit", "path": "data/reddit"}, _LSTM, 2000, 16, 0.1, 0.001, 0.1, (5, 0.5), "dense2"),
}
TABLE_METHODS = ("flow", "fedavg", "fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per")


def algorithm_section(task: Task, method: str) -> ml_collections.ConfigDict:
    section = {"name": method, "batch_size": task.batch_size, "local_epochs": 3,
               "client_optimizer": {"name": "sgd", "learning_rate": task.learning_rate, "momentum": 0.9},
               "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}}
    section.update({
        "flow": {"regularization": task.regularization, "local_discount": 0.0},
        "apfl": {"alpha": 0.25},
        "ditto": {"proximal_lambda": task.ditto_lambda},
        "fedrep": {"head": (task.head,)},
        "lg_fedavg": {"head": (task.head,)},
        "knn_per": {"head": task.head, "neighbors": task.knn[0], "interpolation": task.knn[1]},
    }.get(method, {}))
    return ml_collections.ConfigDict(section)


def _parse(arg: str) -> tuple[str, str]:
    """"TASK,METHOD" (or "TASK": Flow) -> (task, method)."""
    return parse_cell(arg, TASKS, TABLE_METHODS, "flow")


def get_config(arg: str = "emnist,flow") -> ml_collections.ConfigDict:
    task_name, method = _parse(arg)
    task = TASKS[task_name]
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.method = method
    config.settings_from = "paper (tasks, models, λ) and released code (hyperparameters); Reddit's training: ours"
    config.seed = 0
    config.num_rounds = task.num_rounds
    config.data = ml_collections.ConfigDict(task.data)
    config.model = ml_collections.ConfigDict(task.model)
    config.algorithm = algorithm_section(task, method)
    # The data sets bring their clients (writers, users, or the loader's Dirichlet clients), each with 20% of its
    # examples held out.
    config.fl = fl_section(partition="natural", eval_every=100, interim_eval_clients=100, eval_clients=1000,
                           checkpoint_every=100)
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """The table: TASKS × TABLE_METHODS, CIFAR-10 and -100 at α ∈ {0.6, 0.1}; `arg` "TASK" or "TASK,METHOD"
    narrows it."""
    sweep = []
    for task, method in table_cells(arg, TASKS, TABLE_METHODS):
        alphas = {"data.alpha": [0.6, 0.1]} if task.startswith("cifar") else {}
        sweep += product(config_arg=[f"{task},{method}"], **alphas)
    return sweep
