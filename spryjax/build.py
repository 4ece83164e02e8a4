"""Config → objects: the explicit name tables of datasets, models, algorithms and optimizers, and the one rule by
which a config section becomes a library builder's keyword arguments.

Only the config layer (`spryjax.runners`, `spryjax.main`, the experiment scripts) calls this module; the library
never reads a config.

The rule (`options`): a section's `name` picks a builder from a table below; its other fields are that builder's
keyword options, checked against the builder's signature. A field the builder does not take is an error naming
the field's config path and the builder's options; a field the section leaves out takes the default in the
builder's signature, the one place each default lives; a required option left out is an error. Sub-sections that
describe objects (client_optimizer, server_optimizer, model.peft) are built the same way from their own table.
What a builder needs from outside its section (the run's seed, the dataset, the cohort size, the trainable tree's
layout) is passed by this module and is not a config field.

    DATASETS[config.data.name](config.data, seed) -> Dataset
    MODELS[config.model.name](config.model, dataset, key) -> (Task, trainable, frozen) or a routing.RoutedModel
    ALGORITHMS[config.algorithm.name](task or routed model, **options) -> FederatedAlgorithm
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import optax

from spryjax import lm_tasks
from spryjax.data import multimodal, nextword, text, vision
from spryjax.data.dataset import Dataset
from spryjax.errors import InputError
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.fl.algorithms import (apfl, baffle, ditto, fedavg, fedavg_ft, fedavg_split, fedfgd, fedmezo, fedprox,
                                   fedrep, fedsgd, flow, fwdllm, hypcluster, knn_per, lg_fedavg, spry)
from spryjax.fl.server_opt import SERVER_OPTIMIZERS
from spryjax.models import small
from spryjax.nn import delta_attention, routed_models, routing
from spryjax.peft import PeftConfig, ordered_leaves
from spryjax.pytrees import leaf_paths
from spryjax.signatures import parameters_of
from spryjax.task import Task

Section = Mapping[str, Any]   # a ConfigDict section, or a plain dict


def lookup(table: Mapping[str, Any], name: str, field: str) -> Any:
    """table[name], or an InputError naming `field` and the known names."""
    if name not in table:
        raise InputError(f"{field}: unknown name {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def options(section: Section, where: str, builder: Callable, *, given: tuple[str, ...] = (),
            objects: Mapping[str, Callable[[Section, str], Any]] | None = None) -> dict[str, Any]:
    """The fields of `section` but `name` as keyword options of `builder` (see the module docstring).

    Args:
      where: the section's config path, e.g. "config.algorithm", for the messages.
      builder: the function (or class) whose signature lists the options.
      given: parameters the caller passes itself (positionally or from outside the config): never options.
      objects: fields holding a sub-section that is built into an object first: {field: make(sub, path)}.
    """
    label = section.get("name") or getattr(builder, "__name__", "this builder")
    parameters = {n: p for n, p in parameters_of(builder).items()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) and n not in given}
    fields = {k: _plain(v) for k, v in section.items() if k != "name"}
    unknown = sorted(set(fields) - set(parameters))
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: not an option of {label}; its options: "
                         f"{', '.join(parameters) or '(none)'}")
    missing = [n for n, p in parameters.items() if p.default is p.empty and n not in fields]
    if missing:
        raise InputError(f"{where}.{missing[0]}: required by {label}")
    for field, make in (objects or {}).items():
        if field in fields:
            fields[field] = make(fields[field], f"{where}.{field}")
    return fields


def _call(builder: Callable, section: Section, where: str, *args, accepts: Callable | None = None,
          skip: tuple[str, ...] = (), objects: Mapping[str, Callable] | None = None, **given) -> Any:
    """builder(*args, **given, **options(section)). The options are checked against the builder's parameters
    after its `len(args)` positional ones and the `given` ones, or against those of `accepts` (a class the builder
    instantiates) but the `skip` ones."""
    if accepts is None:
        accepts, skip = builder, tuple(parameters_of(builder))[:len(args)]
    return builder(*args, **given, **options(section, where, accepts, given=(*skip, *given), objects=objects))


# ----------------------------------------------------------------------------------------------------------------
# Optimizers


CLIENT_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,          # learning_rate, momentum (None: plain SGD), nesterov
    "adam": optax.adam,
    "adamw": optax.adamw,      # optax's default weight_decay is 1e-4 (PyTorch's AdamW: 0.01)
}


def client_optimizer(section: Section, where: str = "config.algorithm.client_optimizer"
                     ) -> optax.GradientTransformation:
    """An optax optimizer: `section.name` in CLIENT_OPTIMIZERS, its other fields that function's options."""
    return _call(lookup(CLIENT_OPTIMIZERS, section.get("name"), f"{where}.name"), section, where)


def server_optimizer(section: Section, where: str = "config.algorithm.server_optimizer"
                     ) -> optax.GradientTransformation:
    """A server optimizer of `spryjax.fl.server_opt.SERVER_OPTIMIZERS` with its options."""
    return _call(lookup(SERVER_OPTIMIZERS, section.get("name"), f"{where}.name"), section, where)


# ----------------------------------------------------------------------------------------------------------------
# Datasets: (section, seed) -> Dataset


def _text_dataset(section: Section, seed: int) -> Dataset:
    """`text.classification_dataset`, its `tokenizer` field the name of a model whose tokenizer to load."""
    from spryjax.models import hf
    load_tokenizer = lambda name, where: hf.load_tokenizer(lm_tasks.resolve_model(name))
    return _call(text.classification_dataset, section, "config.data", seed=seed,
                 objects={"tokenizer": load_tokenizer})


def _dataset(builder: Callable[..., Dataset], *, seeded: bool = True) -> Callable[[Section, int], Dataset]:
    """A DATASETS entry calling builder(seed=seed, **options); pickled datasets come with their splits: no seed."""
    if seeded:
        return lambda section, seed: _call(builder, section, "config.data", seed=seed)
    return lambda section, seed: _call(builder, section, "config.data", name=section["name"])


DATASETS: dict[str, Callable[[Section, int], Dataset]] = {
    "digits": _dataset(vision.digits),
    "text": _text_dataset,
    "mnist_personalized": _dataset(vision.mnist_personalized),
    "digits_personalized": _dataset(vision.digits_personalized),
    "rt_nextword": _dataset(nextword.rt_nextword),
    "emnist": _dataset(vision.load_emnist),
    "stackoverflow": _dataset(nextword.load_stackoverflow),
    "reddit": _dataset(nextword.load_reddit),
    "cifar10": _dataset(functools.partial(vision.load_cifar_dirichlet, 10)),
    "cifar100": _dataset(functools.partial(vision.load_cifar_dirichlet, 100)),
    "synthetic_cifar": _dataset(small.synthetic_images),
    "delta_synthetic": _dataset(multimodal.synthetic_dataset),
    "mosei": _dataset(multimodal.load_aligned_pickle, seeded=False),
    "mosi": _dataset(multimodal.load_aligned_pickle, seeded=False),
    "iemocap": _dataset(multimodal.load_aligned_pickle, seeded=False),
}


def dataset(section: Section, seed: int) -> Dataset:
    return lookup(DATASETS, section.get("name"), "config.data.name")(section, seed)


# ----------------------------------------------------------------------------------------------------------------
# Models: (section, dataset, key) -> (Task, trainable, frozen), or a RoutedModel for Flow's architectures


def _fusion(model_class, **fixed) -> Callable:
    """A MODELS entry of a delta-attention-family module: the section's fields are the class's options."""
    return lambda section, data, key: _call(delta_attention.fusion_task, section, "config.model", model_class, data,
                                            key, accepts=model_class, skip=("input_sizes", "num_outputs", "rngs"),
                                            **fixed)


def _peft(section: Section, where: str) -> PeftConfig:
    return _call(PeftConfig, section, where)


MODELS: dict[str, Callable[[Section, Dataset, jax.Array], Any]] = {
    "mlp": lambda section, data, key: _call(small.mlp_model, section, "config.model", data, key),
    "cnn": lambda section, data, key: _call(small.cnn_model, section, "config.model", data, key),
    "text_classifier": lambda section, data, key: _call(lm_tasks.text_classifier, section, "config.model", data,
                                                        key, objects={"peft": _peft}),
    "emnist_cnn": lambda section, data, key: _call(routed_models.emnist_cnn, section, "config.model", data, key),
    "resnet_gn": lambda section, data, key: _call(routed_models.resnet_gn, section, "config.model", data, key),
    "so_lstm": lambda section, data, key: _call(routed_models.so_lstm, section, "config.model", data, key),
    "delta_attention": _fusion(delta_attention.HierarchicalDeltaFusion),
    "delta_no_delta": _fusion(delta_attention.HierarchicalDeltaFusion, scales=(), use_raw=True),
    "late_fusion": _fusion(delta_attention.LateFusion),
    "mult": _fusion(delta_attention.MulT),
}


def model(section: Section, data: Dataset, key: jax.Array, *, routed: bool = False) -> tuple[Any, Any, Any]:
    """(Task, trainable, frozen) of config.model; with `routed` (Flow and the baselines of its table) a Flow
    architecture's RoutedModel itself, as (model, (θ_g, θ_l, φ), {})."""
    built = lookup(MODELS, section.get("name"), "config.model.name")(section, data, key)
    if isinstance(built, routing.RoutedModel):
        return (built, built.states, {}) if routed else routing.global_task(built)
    if routed:
        raise InputError(f"config.model.name={section.get('name')!r}: this algorithm needs a routed model "
                         "(emnist_cnn, resnet_gn, so_lstm)")
    return built


# ----------------------------------------------------------------------------------------------------------------
# Algorithms


ALGORITHMS: dict[str, Callable[..., FederatedAlgorithm]] = {
    "fedavg": fedavg.fedavg,
    "fedprox": fedprox.fedprox,
    "fedsgd": fedsgd.fedsgd,
    "spry": spry.spry,
    "fedavg_split": fedavg_split.fedavg_split,
    "fedfgd": fedfgd.fedfgd,
    "fedmezo": fedmezo.fedmezo,
    "baffle": baffle.baffle,
    "fwdllm": fwdllm.fwdllm,
    # Flow's table: these take the RoutedModel (see `model(..., routed=True)`)
    "flow": flow.flow,
    "fedavg_ft": fedavg_ft.fedavg_ft,
    "apfl": apfl.apfl,
    "ditto": ditto.ditto,
    "fedrep": fedrep.fedrep,
    "lg_fedavg": lg_fedavg.lg_fedavg,
    "hypcluster": hypcluster.hypcluster,
    "knn_per": knn_per.knn_per,
}
ROUTED_ALGORITHMS = frozenset({"flow", "fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per"})
# Filled here, not by the config: the cohort size (config.fl), the trainable tree's layout, the name.
_FROM_THE_RUN = ("clients_per_round", "tensor_order", "head_tensors", "name")


def tensor_layout(trainable) -> tuple[list[int] | None, list[int]]:
    """(layer order of the trainable leaves as indices into `jax.tree.leaves`, indices of the task head's leaves).
    Trees peft does not know (e.g. a plain MLP, a list of layers) keep their flatten order."""
    paths = leaf_paths(trainable)
    head = [i for i, p in enumerate(paths) if p.split("/")[0] == "head"]
    try:
        ordered = [p for p, _ in ordered_leaves(trainable)]
    except ValueError:
        return None, head
    return [paths.index(p) for p in ordered], head


def algorithm(section: Section, model_or_task: Task | routing.RoutedModel, trainable,
              clients_per_round: int) -> FederatedAlgorithm:
    """config.algorithm → FederatedAlgorithm: the factory `section.name` picks, its options from the section."""
    name = section.get("name")
    factory = lookup(ALGORITHMS, name, "config.algorithm.name")
    accepted = parameters_of(factory)
    run = dict(clients_per_round=clients_per_round, name=name)
    if "tensor_order" in accepted:
        run["tensor_order"], run["head_tensors"] = tensor_layout(trainable)
    return factory(model_or_task, **{k: v for k, v in run.items() if k in accepted},
                   **options(section, "config.algorithm", factory, given=(next(iter(accepted)), *_FROM_THE_RUN),
                             objects={"client_optimizer": client_optimizer, "server_optimizer": server_optimizer}))
