"""`experiment = "central"`: centralized training of config.model on config.data (`spryjax.central.train`), the
sanity baseline every federated result is read against.

Config fields: seed; data (a DATASETS entry of spryjax.build); model (a MODELS entry); optimizer (a client
optimizer: name and options); train (the options of `central.train`: epochs, batch_size, bucket_by_length,
eval_every_steps, sequence_bucket). Prints the final held-out metrics. A rerun resumes after the newest epoch
checkpoint (see `spryjax.central`).
"""
from __future__ import annotations

import jax

from spryjax import build, central

# Parameters of central.train that come from elsewhere than config.train.
_GIVEN = ("task", "trainable", "frozen", "train_arrays", "test_arrays", "optimizer", "key", "gradient_fn",
          "workdir", "lengths", "sequence_keys", "desc")


TOP_FIELDS = ("experiment", "seed", "data", "model", "optimizer", "train")


def check_central(config, where: str = "config") -> None:
    """Every field of a central config checked, nothing built but small objects (see `spryjax.build`)."""
    build.check_fields(config, where, TOP_FIELDS, required=TOP_FIELDS[1:])
    build.check_dataset(config.data, f"{where}.data")
    build.check_model(config.model, f"{where}.model")
    build.client_optimizer(config.optimizer, f"{where}.optimizer")
    build.options(config.train, f"{where}.train", central.train, given=_GIVEN)


def run_central(config, workdir: str) -> list[dict[str, float]]:
    """Trains and evaluates as `spryjax.central.train` does; returns one metrics record per evaluation."""
    key = jax.random.key(config.seed)
    data = build.dataset(config.data, config.seed)
    task, trainable, frozen = build.model(config.model, data, jax.random.fold_in(key, 1))
    lengths = (data.train["length"], data.test["length"]) if data.sequence_keys else None
    _, history = central.train(task, trainable, frozen, data.inputs("train"), data.inputs("test"),
                               optimizer=build.client_optimizer(config.optimizer, "config.optimizer"),
                               key=jax.random.fold_in(key, 2), workdir=workdir, lengths=lengths,
                               sequence_keys=data.sequence_keys, desc=f"{data.name} ({config.model.name})",
                               **build.options(config.train, "config.train", central.train, given=_GIVEN))
    final = history[-1]
    print(f"{data.name} / {config.model.name}: held-out accuracy {final.get('test_accuracy', float('nan')):.4f} "
          f"after {final['epoch']} epochs ({final['wall_time']:.0f} s); metrics: {workdir}/metrics.jsonl")
    return history
