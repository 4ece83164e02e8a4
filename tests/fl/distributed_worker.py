"""One process of a federated run on loopback (tests/fl/test_distributed.py starts one or two of these).

    python tests/fl/distributed_worker.py OUT.npz NUM_PROCESSES PROCESS_ID PORT
XLA_FLAGS must give the process its CPU devices. Process 0 writes the final parameters to OUT.npz.
"""
import sys

import jax
import numpy as np
import optax

from spryjax.models import small
from spryjax.data import partition, vision
from spryjax.data.federated import FederatedData
from spryjax.fl import mesh, simulate, server_opt
from spryjax.fl.algorithms.fedavg import fedavg


def main(out: str, num_processes: int, process_id: int, port: int) -> None:
    mesh.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    data = vision.digits(seed=0)
    task, params, frozen = small.mlp_model(data, jax.random.key(0), hidden=(16,))
    train_parts, test_parts = partition.train_test_split(
        partition.dirichlet_label_skew(data.train["label"], 32, 0.5, seed=0), 0.2, seed=0)
    train = FederatedData.from_partition(data.inputs(), train_parts)
    test = FederatedData.from_partition(data.inputs(), test_parts)
    algorithm = fedavg(task, client_optimizer=optax.sgd(0.1), server_optimizer=server_opt.fedadam(),
                       batch_size=8)
    result = simulate.run_simulation(algorithm, params, frozen, train, test, num_rounds=3, clients_per_round=16, seed=0,
                          batch_size=8, strategy="chunked", client_chunk_size=8, eval_every=3, show_progress=False)
    leaves = mesh.to_host(jax.tree.leaves(result.state.params))
    if mesh.is_main_process():
        np.savez(out, *leaves, accuracy=result.history[-1]["generalized_accuracy"],
                 devices=jax.device_count(), processes=jax.process_count())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
