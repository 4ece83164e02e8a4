"""FedAvg with LoRA on MiniLM-L6, Rotten Tomatoes split by movie (natural clients), each client's snippets 80/20.

Run:  python -m spryjax.main --config=configs/fedavg_rt_minilm.py --config.num_rounds=5
Variants:
      --config.algorithm.server_optimizer.name=fedadam --config.algorithm.server_optimizer.learning_rate=1e-3
      --config.fl.partition=dirichlet --config.fl.alpha=0.1 --config.fl.num_clients=100
Expect: a few minutes for 5 rounds on a 2-core CPU; generalized accuracy climbing from chance (~0.58, the
share of "fresh") towards ~0.75 within 20 rounds; a checkpoint in runs/fedavg_rt_minilm/checkpoints; killing
the run and re-running the command resumes it.
"""
import ml_collections

from configs import fl_section, rt_minilm_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "federated"
    config.seed = 0
    config.num_rounds = 50
    config.data, config.model = rt_minilm_sections()
    config.algorithm = ml_collections.ConfigDict({
        "name": "fedavg", "batch_size": 8, "local_epochs": 1, "eval_batch_size": 64,
        "client_optimizer": {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}})
    config.fl = fl_section(partition="natural", min_examples=5, max_examples_per_client=32, eval_every=5,
                           checkpoint_every=5)
    return config
