"""FedAvg on scikit-learn's 8×8 digits, 100 Dirichlet(0.5) clients, an MLP: the quickest federated run.

Run:  python -m spryjax.main --config=configs/fedavg_digits.py
Expect: generalized accuracy ~0.78 after 30 rounds, about 20 s on a 2-core CPU (most of it compiling).
"""
import ml_collections

from configs import fl_section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.seed = 0
    config.num_rounds = 30
    config.data = ml_collections.ConfigDict({"name": "digits"})
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (64,)})
    config.algorithm = ml_collections.ConfigDict({
        "name": "fedavg", "batch_size": 8, "local_epochs": 1,
        "client_optimizer": {"name": "sgd", "learning_rate": 0.1},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0},
    })
    config.fl = fl_section(alpha=0.5)
    return config
