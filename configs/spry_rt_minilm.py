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

# method -> overrides of the algorithm section (the Spry paper's settings where it gives them)
METHODS = {
    "spry": {"name": "spry", "num_tangents": 1, "server_optimizer": {"name": "flower_yogi"}},
    "spry_shared_head": {"name": "spry", "num_tangents": 1, "share_head": True,
                         "server_optimizer": {"name": "flower_yogi"}},
    "spry_k10": {"name": "spry", "num_tangents": 10, "server_optimizer": {"name": "flower_yogi"}},
    "spry_per_iteration": {"name": "spry", "num_tangents": 1, "communication": "per_iteration",
                           "server_optimizer": {"name": "flower_yogi"}},
    "fedavg": {"name": "fedavg", "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}},
    "fedyogi": {"name": "fedavg", "server_optimizer": {"name": "flower_yogi"}},
    "fedsgd": {"name": "fedsgd", "server_optimizer": {"name": "flower_yogi"}},
    "fedavg_split": {"name": "fedavg_split", "server_optimizer": {"name": "flower_yogi"}},
    "fedfgd": {"name": "fedfgd", "num_tangents": 1, "server_optimizer": {"name": "flower_yogi"}},
    "fedmezo": {"name": "fedmezo", "eps": 1e-3, "num_tangents": 1,
                "client_optimizer": {"name": "sgd", "learning_rate": 1e-3},
                "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}},
    "baffle": {"name": "baffle", "sigma": 1e-4, "num_tangents": 10, "server_optimizer": {"name": "flower_yogi"}},
    "fwdllm": {"name": "fwdllm", "eps": 1e-2, "num_tangents": 20, "server_optimizer": {"name": "flower_yogi"}},
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
    algorithm = {
        "name": "spry", "batch_size": 8, "local_epochs": 1, "eval_batch_size": 64,
        "num_tangents": 1, "tangent_chunk_size": 0, "tensors_per_chunk": 2, "share_head": False,
        "communication": "per_epoch", "dilute_aggregation": False, "finetune_epochs": 0,
        "eps": 1e-3, "sigma": 1e-4,
        "client_optimizer": {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0},
        "server_optimizer": {"name": "flower_yogi", "learning_rate": 1e-2},
    }
    for key, value in METHODS[method].items():
        algorithm[key] = {**algorithm[key], **value} if isinstance(value, dict) else value
    config.algorithm = ml_collections.ConfigDict(algorithm)
    config.fl = fl_section(examples_per_client=100)
    return config


def get_sweep(method: str | None = None) -> list[dict]:
    return product(config_arg=[method] if method else list(METHODS), **{"fl.alpha": [0.1, 1.0]}, seed=range(3))
