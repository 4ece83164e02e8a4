"""`experiment = "federated"`: config → dataset → clients → model → algorithm → `simulate.run_simulation`.

Config fields read here (see configs/fedavg_digits.py for a complete example):
    seed; num_rounds; data (a DATASETS entry of spryjax.build and its options); model (a MODELS entry);
    algorithm (an ALGORITHMS entry, its optimizers, batch_size and options);
    fl: how examples become clients (the options of `spryjax.data.federated.federate`: partition, num_clients,
    alpha, ...) and how rounds run (the options of `simulate.run_simulation`: clients_per_round, strategy,
    client_chunk_size, eval_every, eval_clients, checkpoint_every).
The federated population is all labelled examples (the dataset's train and test splits together); each client
keeps `fl.test_fraction` of its own examples as its held-out split.

`run_federated_vectorized(configs, workdirs)` runs several configs that differ only in values (seeds, partitions,
numeric hyperparameters) as one vmapped simulation (`spryjax.fl.vectorized`), each member logging as if run alone.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from spryjax import build
from spryjax.data.dataset import Dataset
from spryjax.data.federated import Clients, federate
from spryjax.errors import InputError
from spryjax.fl import simulate, vectorized
from spryjax.metrics import flatten
from spryjax.signatures import parameters_of

# Parameters of run_simulation that come from elsewhere than config.fl.
_ENGINE_GIVEN = ("algorithm", "params", "frozen", "train", "test", "num_rounds", "seed", "batch_size", "workdir",
                 "mesh", "summarize")


def fl_options(fl, where: str = "config.fl") -> tuple[dict[str, Any], dict[str, Any]]:
    """config.fl as (`federate`'s options, `run_simulation`'s options), each field checked against the two."""
    federate_fields = set(parameters_of(federate))
    partition = {k: v for k, v in fl.items() if k in federate_fields}
    engine = {k: v for k, v in fl.items() if k not in federate_fields}
    return (build.options(partition, where, federate, given=("data", "seed")),
            build.options(engine, where, simulate.run_simulation, given=_ENGINE_GIVEN))


# method and settings_from are labels (a config's name for its method, where its settings come from).
TOP_FIELDS = ("experiment", "method", "settings_from", "seed", "num_rounds", "data", "model", "algorithm", "fl")


def check_federated(config, where: str = "config") -> None:
    """Every field of a federated config checked, nothing built but small objects (see `spryjax.build`)."""
    build.check_fields(config, where, TOP_FIELDS, required=TOP_FIELDS[3:])
    for name in ("data", "model", "algorithm", "fl"):
        if not build.is_section(config[name]):
            raise InputError(f"{where}.{name}: must be a section (a ConfigDict)")
    build.check_dataset(config.data, f"{where}.data")
    build.check_model(config.model, f"{where}.model", routed=config.algorithm.get("name") in build.ROUTED_ALGORITHMS)
    build.check_algorithm(config.algorithm, f"{where}.algorithm")
    partition, engine = fl_options(config.fl, f"{where}.fl")
    population = partition.get("num_clients", parameters_of(federate)["num_clients"].default)
    if partition.get("partition", "dirichlet") != "natural" and engine["clients_per_round"] > population:
        raise InputError(f"{where}.fl.clients_per_round={engine['clients_per_round']}: more than the "
                         f"{where}.fl.num_clients={population} clients")


class Setup(NamedTuple):
    """What a federated config builds before the engine runs."""
    data: Dataset
    clients: Clients
    task: Any           # a Task, or a routing.RoutedModel for the algorithms of Flow's table
    params: Any         # initial trainable parameters
    frozen: Any


def setup(config) -> Setup:
    """config.data -> dataset -> clients (config.fl) -> model (config.model), all seeded by config.seed."""
    key = jax.random.key(config.seed)
    partition, engine = fl_options(config.fl)
    data = build.dataset(config.data, config.seed)
    with build.at("config.fl"):
        clients = federate(data, seed=config.seed, **partition)
    if clients.train.num_clients < engine["clients_per_round"]:   # natural partitions: known only now
        raise InputError(f"config.fl.clients_per_round={engine['clients_per_round']}: more than the "
                         f"{clients.train.num_clients} clients of {data.name!r}")
    task, params, frozen = build.model(config.model, data, jax.random.fold_in(key, 1),
                                       routed=config.algorithm.name in build.ROUTED_ALGORITHMS)
    return Setup(data, clients, task, params, frozen)


def engine_options(config) -> dict:
    """The keyword options of `run_simulation` (and `run_vectorized`) a config sets."""
    return dict(fl_options(config.fl)[1], num_rounds=config.num_rounds, batch_size=config.algorithm.batch_size)


def _print_summary(name: str, dataset: str, history: list[dict], workdir: str) -> None:
    last = history[-1]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.endswith("accuracy"))
    print(f"{name} on {dataset}: round {last['round']}: {shown or 'no evaluation'}; "
          f"{last['wall_time']:.0f} s; metrics: {workdir}/metrics.jsonl")


def save_label_names(data: Dataset, workdir: str) -> None:
    """Prints a dataset's label → class id mapping and writes it to WORKDIR/labels.json (where it names labels)."""
    if data.label_names and jax.process_index() == 0:
        mapping = {name: i for i, name in enumerate(data.label_names)}
        print(f"{data.name}: labels {mapping}", flush=True)
        with open(os.path.join(workdir, "labels.json"), "w") as f:
            json.dump(mapping, f, indent=1)


def run_federated(config, workdir: str, *, mesh: Mesh | None = None) -> simulate.RunResult:
    """One federated run on `mesh` (default: every device of every process)."""
    built = setup(config)
    save_label_names(built.data, workdir)
    options = engine_options(config)
    if built.data.summarize is not None:
        options["summarize"] = built.data.summarize
    algorithm = build.algorithm(config.algorithm, built.task, built.params, options["clients_per_round"])
    result = simulate.run_simulation(algorithm, built.params, built.frozen, built.clients.train, built.clients.test,
                                     seed=config.seed, workdir=workdir, mesh=mesh, **options)
    _print_summary(algorithm.name, built.data.name, result.history, workdir)
    return result


# Fields that fix the engine's plan or shapes, or the model's functions: equal in all members of a vectorized run.
# (Everything else under algorithm. is traced per member; seed, data. and fl. are built per member on the host.)
SHARED_FIELDS = ("num_rounds", "fl.num_clients", "fl.clients_per_round", "fl.strategy", "fl.client_chunk_size",
                 "fl.eval_every", "fl.eval_clients", "fl.checkpoint_every", "algorithm.name",
                 "algorithm.batch_size")


def vectorizable_difference(configs: list) -> list[str]:
    """The fields in which `configs` differ, checked to be vectorizable (see `run_federated_vectorized`); the
    algorithm fields among them are the traced hyperparameters."""
    flat = [flatten(c.to_dict()) for c in configs]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if any(f.get(k) != flat[0].get(k) for f in flat[1:])]
    for key in differing:
        values = sorted({repr(f.get(key)) for f in flat})
        host_built = key == "seed" or key.split(".")[0] in ("data", "fl")
        if key in SHARED_FIELDS or not (host_built or key.startswith("algorithm.")):
            raise InputError(f"vectorized sweep: members differ in {key} ({', '.join(values)}), which fixes the "
                             "engine's shapes or the model; vectorize only over seed, data.*, fl.* partition "
                             "fields and numeric algorithm.* hyperparameters")
        if key.startswith("algorithm.") and not all(isinstance(f.get(key), (int, float)) and
                                                    not isinstance(f.get(key), bool) for f in flat):
            raise InputError(f"vectorized sweep: members differ in {key} ({', '.join(values)}); only numeric "
                             "algorithm hyperparameters can be vectorized")
    return differing


def run_federated_vectorized(configs: list, workdirs: list[str], *, mesh: Mesh | None = None
                             ) -> list[simulate.RunResult]:
    """Federated runs of `configs` as one vmapped simulation (`spryjax.fl.vectorized`), each writing to its workdir
    as if run alone. The configs may differ in seed, data.* and fl.* partition fields (built per member; the arrays
    must keep their shapes) and numeric algorithm.* hyperparameters (traced into the algorithm); the SHARED_FIELDS
    and model.* must be equal."""
    hyper_keys = [k for k in vectorizable_difference(configs) if k.startswith("algorithm.")]
    built: list[Setup] = []
    for config in configs:   # members share one frozen tree (a pretrained base) where its values agree
        member = setup(config)
        if built and vectorized.equal_trees(member.frozen, built[0].frozen):
            member = member._replace(frozen=built[0].frozen)
        built.append(member)
    base = configs[0].algorithm.to_dict()
    options = engine_options(configs[0])

    def make_algorithm(hyperparams: dict):
        section = copy.deepcopy(base)
        for key, value in hyperparams.items():
            *parents, leaf = key.split(".")[1:]
            node = section
            for part in parents:
                node = node[part]
            node[leaf] = value
        return build.algorithm(ConfigDict(section), built[0].task, built[0].params, options["clients_per_round"],
                               check_values=False)   # traced values; each member's were checked before the run

    members = [vectorized.Member(b.params, b.frozen, b.clients.train, b.clients.test, c.seed,
                                 {k: v for k, v in flatten(c.to_dict()).items() if k in hyper_keys}, w)
               for b, c, w in zip(built, configs, workdirs)]
    results = vectorized.run_vectorized(make_algorithm, members, mesh=mesh, **options)
    for b, result, workdir in zip(built, results, workdirs):
        _print_summary(f"{configs[0].algorithm.name} (vectorized ×{len(configs)})", b.data.name, result.history,
                       workdir)
    return results
