"""Spry and its baselines on the offline real task: LoRA (r=1, α=1, query/value) + linear head on MiniLM-L6,
Rotten Tomatoes snippets dealt to 100 equal-size Dirichlet(α) clients (100 snippets each, 80/20 per-client split),
10 clients per round, batch 8, sequence length 64 (padding trimmed per cohort), one local epoch.

Run:  python -m spryjax.main --config=configs/spry_rt_minilm.py:METHOD [--config.fl.alpha=0.1]
METHOD ∈ spry, spry_shared_head, spry_k10, spry_per_iteration, fedavg, fedyogi, fedsgd, fedavg_split, fedfgd, fedmezo, baffle, fwdllm
(default spry). experiments/spry_table.py runs them all; the README has the measured table. Reference points on
this task: always predicting "fresh" scores ~0.58, a logistic probe on frozen mean-pooled features ~0.76.

Sweep: every method × α ∈ {0.1, 1.0} × 3 seeds (get_sweep; with :METHOD, that method's six runs), then its table:
  python -m spryjax.launch --config=configs/spry_rt_minilm.py --workdir=runs/spry_sweep [--vectorize=seed]
  python -m spryjax.report runs/spry_sweep
"""
import ml_collections

from configs import fl_section, rt_minilm_sections

from spryjax.launch.sweep import product

# The algorithm sections. Each method's section holds only the options of its algorithm (spryjax/build.py checks
# them against the algorithm's signature; what a section leaves out takes the signature's default).
CLIENT_ADAMW = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0}
FLOWER_YOGI = {"name": "flower_yogi", "learning_rate": 1e-2}     # the Spry paper's server: Flower's FedYogi
LOCAL = {"batch_size": 8, "local_epochs": 1, "eval_batch_size": 64, "client_optimizer": CLIENT_ADAMW}
ONE_BATCH = {"batch_size": 8, "eval_batch_size": 64}              # FedSGD-shaped: one minibatch per round
SPRY = {**LOCAL, "num_tangents": 1, "tensors_per_chunk": 2, "share_head": False, "communication": "per_epoch",
        "dilute_aggregation": False, "finetune_epochs": 0, "server_optimizer": FLOWER_YOGI}
METHODS = {
    "spry": {"name": "spry", **SPRY},
    "spry_shared_head": {"name": "spry", **SPRY, "share_head": True},
    "spry_k10": {"name": "spry", **SPRY, "num_tangents": 10},
    "spry_per_iteration": {"name": "spry", **SPRY, "communication": "per_iteration"},
    "fedavg": {"name": "fedavg", **LOCAL, "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}},
    "fedyogi": {"name": "fedavg", **LOCAL, "server_optimizer": FLOWER_YOGI},
    "fedsgd": {"name": "fedsgd", **ONE_BATCH, "server_optimizer": FLOWER_YOGI},
    "fedavg_split": {"name": "fedavg_split", **LOCAL, "tensors_per_chunk": 2, "server_optimizer": FLOWER_YOGI},
    "fedfgd": {"name": "fedfgd", **LOCAL, "num_tangents": 1, "server_optimizer": FLOWER_YOGI},
    "fedmezo": {"name": "fedmezo", **LOCAL, "eps": 1e-3, "num_tangents": 1,
                "client_optimizer": {"name": "sgd", "learning_rate": 1e-3},
                "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}},
    "baffle": {"name": "baffle", **ONE_BATCH, "sigma": 1e-4, "num_tangents": 10, "server_optimizer": FLOWER_YOGI},
    "fwdllm": {"name": "fwdllm", **ONE_BATCH, "eps": 1e-2, "num_tangents": 20, "server_optimizer": FLOWER_YOGI},
}


def get_config(method: str = "spry") -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.method = method
    config.seed = 0
    config.num_rounds = 300
    config.data, config.model = rt_minilm_sections()
    config.algorithm = ml_collections.ConfigDict(METHODS[method])
    config.fl = fl_section(examples_per_client=100)
    return config


def get_sweep(method: str | None = None) -> list[dict]:
    return product(config_arg=[method] if method else list(METHODS), **{"fl.alpha": [0.1, 1.0]}, seed=range(3))
