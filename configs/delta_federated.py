"""Hierarchical delta-attention trained federatedly through the engine: the synthetic delta task with one client per
speaker (40 speakers, natural partition, 20% of each speaker's examples held out), FedAvg with Adam clients.

Run:  python -m spryjax.main --config=configs/delta_federated.py --workdir=runs/delta_federated
The same module as configs/delta_synthetic.py (centralized); swap model.name for delta_no_delta to see the ablation.
"""
import ml_collections

from configs import fl_section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.seed = 0
    config.num_rounds = 60
    config.data = ml_collections.ConfigDict({"name": "delta_synthetic", "num_train": 3000, "num_test": 1000})
    config.model = ml_collections.ConfigDict({"name": "delta_attention", "features": 32, "scales": (1, 2)})
    config.algorithm = ml_collections.ConfigDict({
        "name": "fedavg", "batch_size": 16, "local_epochs": 1,
        "client_optimizer": {"name": "adam", "learning_rate": 3e-3},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0},
    })
    config.fl = fl_section(partition="natural", equal_size=False)
    return config
