"""Flow with the paper's EMNIST settings (arXiv 2211.15281): TFF's federated EMNIST (3,400 writers, 62 classes),
the paper's routed CNN (conv 32 → 64, dense 128, policy 784 → 350 → 150 → 50 with 4 exits), 10 clients per round,
1,500 rounds, 3 local epochs, batch 20, SGD lr 0.01 with momentum 0.9, λ = 0.01, FedAvg on the server.

Run:  python -m spryjax.main --config=configs/flow_emnist.py --workdir=runs/flow_emnist
      (reads fed_emnist_{train,test}.h5 from the cache, downloading TFF's archive when online)
Expect: not run here (no network, no accelerator). The paper reports Flow's personalized accuracy above FedAvg,
FedAvg+FT, APFL, Ditto, FedRep, LG-FedAvg, HypCluster and kNN-Per on this task; experiments/flow_table.py
runs Flow and every baseline on one routed model, data and optimizer (on the offline tasks). A GPU or TPU is advised: the evaluation
personalizes every evaluated client.
"""
import ml_collections

from configs import fl_section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.seed = 0
    config.num_rounds = 1500
    config.data = ml_collections.ConfigDict({"name": "emnist", "only_digits": False})
    config.model = ml_collections.ConfigDict({"name": "emnist_cnn"})
    config.algorithm = ml_collections.ConfigDict({
        "name": "flow", "batch_size": 20, "local_epochs": 3, "regularization": 0.01, "local_discount": 0.5,
        "client_optimizer": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0},
    })
    # Writers are the clients; federate() pools each writer's TFF train and test examples and holds out 20%.
    config.fl = fl_section(partition="natural", num_clients=3400, eval_every=100, eval_clients=500,
                           checkpoint_every=100)
    return config
