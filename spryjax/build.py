"""Config → objects: the explicit name tables of datasets, models, algorithms and optimizers, and the one rule by
which a config section becomes a library builder's keyword arguments.

Only the config layer (`spryjax.runners`, `spryjax.main`, the experiment scripts) calls this module; the library
never reads a config.

The rule (`options`): a section's `name` picks a builder from a table below; its other fields are that builder's
keyword options, checked against the builder's signature. A field the builder does not take is an error naming
the field's config path and the builder's options; a field the section leaves out takes the default in the
builder's signature, the one place each default lives; a required option left out is an error. Each value is
checked too: its type against the default's (an int where the default is an int, a bool where it is a bool, ...),
one of the choices where the annotation is a Literal, and the range `RULES` gives for the field's name wherever it
appears (None only where the default is None: "not set"). Sub-sections that describe objects (client_optimizer,
server_optimizer, model.peft) are built the same way from their own table. What a builder needs from outside its
section (the run's seed, the dataset, the cohort size, the trainable tree's layout) is passed by this module and is
not a config field.

    dataset(config.data, seed) -> Dataset                    DATASETS[config.data.name]: an Entry
    model(config.model, dataset, key) -> (Task, trainable, frozen) (or a Flow RoutedModel)      MODELS
    algorithm(config.algorithm, task, trainable, cohort) -> FederatedAlgorithm                 ALGORITHMS
    client_optimizer / server_optimizer(section) -> optax.GradientTransformation    (CLIENT|SERVER)_OPTIMIZERS
    check_dataset / check_model / check_algorithm(section): the same checks, nothing built but small objects
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import math
import re
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import optax

from spryjax import lm_tasks
from spryjax.data import arrays, multimodal, nextword, text, text_classification, vision
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
from spryjax.signatures import forwards_options_to, parameters_of
from spryjax.task import Task

Section = Mapping[str, Any]   # a ConfigDict section, or a plain dict


def lookup(table: Mapping[str, Any], name: str, field: str) -> Any:
    """table[name], or an InputError naming `field` and the known names."""
    if name not in table:
        raise InputError(f"{field}: unknown name {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------------------------
# Values


class Rule(NamedTuple):
    """What a field's value must be: `holds(value)`, described as `says` in the error."""
    holds: Callable[[Any], bool]
    says: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer ≥ {low}")


def real(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> Rule:
    above = (lambda v: v > low) if open_low else (lambda v: v >= low)
    below = (lambda v: v < high) if open_high else (lambda v: v <= high)
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
    return Rule(lambda v: _is_real(v) and above(v) and below(v), f"a finite number in {interval}")


POSITIVE = real(0.0, open_low=True)
NON_NEGATIVE = real(0.0)
FRACTION = real(0.0, 1.0, open_low=True, open_high=True)
PROBABILITY = real(0.0, 1.0, open_high=True)
SIZES = Rule(lambda v: isinstance(v, tuple) and all(_is_int(x) and x >= 1 for x in v),
             "a tuple of integers ≥ 1, e.g. (64,) or (32, 16)")

# The range of a field by its name, wherever it appears (data, model, algorithm, optimizers, fl, train, top level).
# 0 is valid only where it means something: eval_every 0 never evaluates, checkpoint_every 0 never checkpoints (and
# so never resumes), eval_every_steps 0 evaluates at epoch ends only, finetune_epochs 0 skips finetuning; elsewhere
# "not set" is None (the config's placeholder).
RULES: dict[str, Rule] = {
    **{name: at_least(0) for name in ("seed", "eval_every", "checkpoint_every", "eval_every_steps",
                                      "finetune_epochs", "stride")},
    **{name: at_least(1) for name in (
        "num_rounds", "batch_size", "eval_batch_size", "local_epochs", "epochs", "steps", "num_tangents",
        "tangent_chunk_size", "initial_tangents", "candidates", "tensors_per_chunk", "clients_per_round",
        "num_clients", "client_chunk_size", "eval_clients", "interim_eval_clients", "full_eval_every",
        "eval_chunk_size",
        "examples_per_client", "max_examples_per_client", "min_examples", "max_length", "num_models", "neighbors",
        "rank", "chunk_size", "sequence_multiple", "personal_epochs", "personalize_epochs", "head_epochs",
        "vocab_size", "seq_len",
        "max_clients", "num_train", "num_test", "features", "num_heads", "per_client", "sequence_bucket",
        "max_answer_length")},
    **{name: POSITIVE for name in ("learning_rate", "eps", "sigma", "tau", "temperature")},
    **{name: NON_NEGATIVE for name in ("weight_decay", "regularization", "proximal_mu", "proximal_lambda",
                                       "variance_threshold", "local_discount", "max_rotation")},
    **{name: PROBABILITY for name in ("momentum", "b1", "b2", "dropout", "router_dropout", "base_dropout")},
    "alpha": POSITIVE, "test_fraction": FRACTION, "styled_fraction": real(0.0, 1.0),
    "interpolation": real(0.0, 1.0), "hidden": SIZES, "channels": SIZES, "router_hidden": SIZES,
}


def _literal_choices(annotation: Any) -> tuple | None:
    """The choices of a `Literal[...]` annotation (a string under `from __future__ import annotations`)."""
    match = re.search(r"Literal\[(.*?)\]", str(annotation))
    if not match:
        return None
    try:
        choices = ast.literal_eval(f"({match.group(1)},)")
    except (ValueError, SyntaxError):
        return None
    return choices


def check_value(path: str, value: Any, parameter: inspect.Parameter | None = None) -> None:
    """An InputError naming `path` if `value` breaks its field's rule, its Literal choices or its default's type."""
    default = parameter.default if parameter is not None else inspect.Parameter.empty
    if value is None:
        if default is None:
            return
        raise InputError(f"{path}: must be set (None is allowed only where the default is None)")
    choices = _literal_choices(parameter.annotation) if parameter is not None else None
    name = path.rsplit(".", 1)[-1]
    if choices is not None and value not in choices:
        raise InputError(f"{path}={value!r}: must be one of {', '.join(map(repr, choices))}")
    rule = RULES.get(name)
    if rule is not None and not rule.holds(value):
        raise InputError(f"{path}={value!r}: must be {rule.says}")
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple,)}.get(type(default))
    annotation = str(parameter.annotation) if parameter is not None else ""
    bool_ok = type(default) is bool or "bool" in annotation
    if expected and not (bool_ok if isinstance(value, bool) else isinstance(value, expected)):
        raise InputError(f"{path}={value!r}: must be of type {type(default).__name__}, like its default {default!r}")


def is_section(value: Any) -> bool:
    """A config section: a ConfigDict or a dict."""
    return hasattr(value, "items") and hasattr(value, "get")


def check_fields(section: Section, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = (),
                 rules: Mapping[str, Rule] | None = None) -> None:
    """The fields of a section that no builder owns (the top level): only `allowed` ones, the `required` ones
    present, each within its rule (`rules` for this section's own meaning of a name, else `RULES`)."""
    missing = [field for field in required if field not in section]
    if missing:
        raise InputError(f"{where}.{missing[0]}: required; the config has no such field")
    for field, value in section.items():
        if field not in allowed:
            raise InputError(f"{where}.{field}: not a field of this experiment; its fields: {', '.join(allowed)}")
        rule = (rules or {}).get(field)
        if rule is not None and not rule.holds(_plain(value)):
            raise InputError(f"{where}.{field}={value!r}: must be {rule.says}")
        if rule is None and not is_section(value):
            check_value(f"{where}.{field}", _plain(value))


def options(section: Section, where: str, builder: Callable, *, given: tuple[str, ...] = (),
            objects: Mapping[str, Callable[[Section, str], Any]] | None = None,
            check_values: bool = True) -> dict[str, Any]:
    """The fields of `section` but `name` as keyword options of `builder` (see the module docstring).

    Args:
      where: the section's config path, e.g. "config.algorithm", for the messages.
      builder: the function (or class) whose signature lists the options.
      given: parameters the caller passes itself (positionally or from outside the config): never options.
      objects: fields holding a sub-section that is built into an object first: {field: make(sub, path)}.
      check_values: False skips the value checks (a vectorized sweep passes traced hyperparameters, whose
        concrete values were checked before the run).
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
    if check_values:
        for field, value in fields.items():
            if field not in (objects or {}):
                check_value(f"{where}.{field}", value, parameters[field])
    for field, make in (objects or {}).items():
        if field in fields:
            fields[field] = make(fields[field], f"{where}.{field}")
    return fields


class Entry(NamedTuple):
    """A table entry: `function(*args, **given, **fixed, **options)`. The options are checked against the parameters
    of `accepts` (default: `function`, after its positional parameters) but the `skip` ones, the `given` ones and
    the `fixed` ones; `objects` are sub-sections built into objects first (see `options`)."""
    function: Callable
    accepts: Callable | None = None
    skip: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = {}
    objects: Mapping[str, Callable[[Section, str], Any]] = {}


def entry_options(entry: Entry, section: Section, where: str, num_args: int, given: tuple[str, ...] = (),
                  check_values: bool = True) -> dict[str, Any]:
    """The checked options of `section` for `entry` called with `num_args` positional arguments and `given`."""
    accepts, skip = entry.accepts, entry.skip
    if accepts is None:
        accepts, skip = entry.function, (*skip, *tuple(parameters_of(entry.function))[:num_args])
    return options(section, where, accepts, given=(*skip, *given, *entry.fixed), objects=entry.objects,
                   check_values=check_values)


def build_entry(entry: Entry, section: Section, where: str, *args, check_values: bool = True, **given) -> Any:
    """entry.function(*args, **given, **entry.fixed, **options of `section`)."""
    fields = entry_options(entry, section, where, len(args), tuple(given), check_values)
    with at(where):
        return entry.function(*args, **given, **entry.fixed, **fields)


@contextlib.contextmanager
def at(where: str) -> Iterator[None]:
    """A library's InputError about a section's values (e.g. "alpha=2: ... must be in [0, 1]") names the section's
    config path too, when it does not already."""
    try:
        yield
    except InputError as error:
        if str(error).startswith(("config", "--")):
            raise
        raise InputError(f"{where}: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Optimizers


CLIENT_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,          # learning_rate, momentum (None: plain SGD), nesterov
    "adam": optax.adam,
    "adamw": optax.adamw,      # optax's default weight_decay is 1e-4 (PyTorch's AdamW: 0.01)
}


def client_optimizer(section: Section, where: str = "config.algorithm.client_optimizer", *,
                     check_values: bool = True) -> optax.GradientTransformation:
    """An optax optimizer: `section.name` in CLIENT_OPTIMIZERS, its other fields that function's options."""
    return build_entry(Entry(lookup(CLIENT_OPTIMIZERS, section.get("name"), f"{where}.name")), section, where,
                       check_values=check_values)


def server_optimizer(section: Section, where: str = "config.algorithm.server_optimizer", *,
                     check_values: bool = True) -> optax.GradientTransformation:
    """A server optimizer of `spryjax.fl.server_opt.SERVER_OPTIMIZERS` with its options."""
    return build_entry(Entry(lookup(SERVER_OPTIMIZERS, section.get("name"), f"{where}.name")), section, where,
                       check_values=check_values)


# ----------------------------------------------------------------------------------------------------------------
# Datasets: (section, seed) -> Dataset


def _load_tokenizer(name: str, where: str) -> Any:
    """The tokenizer of the model `name` (`lm_tasks.resolve_model`): a local folder, a Hub name or "minilm"."""
    from spryjax.models import hf
    if not isinstance(name, str):
        raise InputError(f"{where}={name!r}: must be a model folder or Hub name")
    try:
        return hf.load_tokenizer(lm_tasks.resolve_model(name))
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


# The text section (configs/__init__.py) serves two builders: `text` (a Hub task, `task`) and `text_classification`
# (your own file: `path` and its columns). Each takes the other's fields too: `text` needs the file's unset, and
# `text_classification` does not read `task`, which the section always holds.
OWN_FILE_FIELDS = ("path", "text_column", "text_pair_column", "label_column", "client_column")


@forwards_options_to(text.classification_dataset)
def hub_text_dataset(*, path: str | None = None, text_column: str | None = None, text_pair_column: str | None = None,
                     label_column: str | None = None, client_column: str | None = None, **options) -> Dataset:
    """`text.classification_dataset(**options)`; the own-file fields must be unset (None)."""
    given = dict(path=path, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                 client_column=client_column)
    field = next((f for f in OWN_FILE_FIELDS if given[f] is not None), None)
    if field is not None:
        raise InputError(f"{field}={given[field]!r}: a field of your own file's data set; set data.name to "
                         "text_classification to read it")
    return text.classification_dataset(**options)


@forwards_options_to(text_classification.text_classification_dataset)
def own_text_dataset(*, task: str = "", **options) -> Dataset:
    """`text_classification.text_classification_dataset(**options)`; `task` (the Hub task of `text`) is not
    read."""
    del task
    return text_classification.text_classification_dataset(**options)


DATASETS: dict[str, Entry] = {
    "digits": Entry(vision.digits),
    "text": Entry(hub_text_dataset, objects={"tokenizer": _load_tokenizer}),
    "text_classification": Entry(own_text_dataset, objects={"tokenizer": _load_tokenizer}),
    "squad_v2": Entry(text.squad_v2_dataset, objects={"tokenizer": _load_tokenizer}),
    "multirc": Entry(text.multirc_dataset, objects={"tokenizer": _load_tokenizer}),
    "arrays": Entry(arrays.load_arrays),   # a built dataset saved by spryjax.data.arrays.save (device bundles)
    "mnist_personalized": Entry(vision.mnist_personalized),
    "digits_personalized": Entry(vision.digits_personalized),
    "mnist_instance_shift": Entry(vision.mnist_instance_shift),
    "rt_nextword": Entry(nextword.rt_nextword),
    "emnist": Entry(vision.load_emnist),
    "stackoverflow": Entry(nextword.load_stackoverflow),
    "reddit": Entry(nextword.load_reddit),
    "cifar10": Entry(functools.partial(vision.load_cifar_dirichlet, 10)),
    "cifar100": Entry(functools.partial(vision.load_cifar_dirichlet, 100)),
    "synthetic_cifar": Entry(small.synthetic_images),
    "delta_synthetic": Entry(multimodal.synthetic_dataset),
    # MulT's pickles come with their splits: no seed
    "mosei": Entry(multimodal.load_aligned_pickle, skip=("seed",), fixed={"name": "mosei"}),
    "mosi": Entry(multimodal.load_aligned_pickle, skip=("seed",), fixed={"name": "mosi"}),
    "iemocap": Entry(multimodal.load_aligned_pickle, skip=("seed",), fixed={"name": "iemocap"}),
}


def _seeded(entry: Entry) -> bool:
    return "seed" in parameters_of(entry.function) and "seed" not in entry.skip


def check_dataset(section: Section, where: str = "config.data") -> None:
    """Every field of config.data checked (the tokenizer of a text task is loaded: it is small)."""
    entry = lookup(DATASETS, section.get("name"), f"{where}.name")
    entry_options(entry, section, where, 0, ("seed",) if _seeded(entry) else ())


def dataset(section: Section, seed: int) -> Dataset:
    entry = lookup(DATASETS, section.get("name"), "config.data.name")
    return build_entry(entry, section, "config.data", **({"seed": seed} if _seeded(entry) else {}))


# ----------------------------------------------------------------------------------------------------------------
# Models: (section, dataset, key) -> (Task, trainable, frozen), or a RoutedModel for Flow's architectures


def _fusion(model_class, **fixed) -> Entry:
    """A MODELS entry of a delta-attention-family module: the section's fields are the class's options."""
    return Entry(functools.partial(delta_attention.fusion_task, model_class), accepts=model_class,
                 skip=("input_sizes", "num_outputs", "rngs"), fixed=fixed)


def _peft(section: Section, where: str) -> PeftConfig:
    return build_entry(Entry(PeftConfig), section, where)


MODELS: dict[str, Entry] = {
    "mlp": Entry(small.mlp_model),
    "cnn": Entry(small.cnn_model),
    "text_classifier": Entry(lm_tasks.text_classifier, objects={"peft": _peft}),
    "extractive_qa": Entry(lm_tasks.extractive_qa, objects={"peft": _peft}),
    "emnist_cnn": Entry(routed_models.emnist_cnn),
    "resnet_gn": Entry(routed_models.resnet_gn),
    "so_lstm": Entry(routed_models.so_lstm),
    "delta_attention": _fusion(delta_attention.HierarchicalDeltaFusion),
    "delta_no_delta": _fusion(delta_attention.HierarchicalDeltaFusion, scales=(), use_raw=True),
    "late_fusion": _fusion(delta_attention.LateFusion),
    "mult": _fusion(delta_attention.MulT),
}
ROUTED_MODELS = frozenset({"emnist_cnn", "resnet_gn", "so_lstm"})   # they build a routing.RoutedModel


def check_model(section: Section, where: str = "config.model", *, routed: bool = False) -> None:
    """Every field of config.model checked; `routed`: the algorithm needs one of Flow's routed architectures."""
    name = section.get("name")
    entry_options(lookup(MODELS, name, f"{where}.name"), section, where, 2)
    if routed and name not in ROUTED_MODELS:
        raise InputError(f"{where}.name={name!r}: this algorithm needs a routed model "
                         f"({', '.join(sorted(ROUTED_MODELS))})")


def model(section: Section, data: Dataset, key: jax.Array, *, routed: bool = False) -> tuple[Any, Any, Any]:
    """(Task, trainable, frozen) of config.model; with `routed` (Flow and the baselines of its table) a Flow
    architecture's RoutedModel itself, as (model, (θ_g, θ_l, φ), {})."""
    check_model(section, routed=routed)
    built = build_entry(MODELS[section.get("name")], section, "config.model", data, key)
    if isinstance(built, routing.RoutedModel):
        return (built, built.states, {}) if routed else routing.global_task(built)
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


def _algorithm_options(section: Section, where: str = "config.algorithm", check_values: bool = True
                       ) -> dict[str, Any]:
    factory = lookup(ALGORITHMS, section.get("name"), f"{where}.name")
    first = next(iter(parameters_of(factory)))
    optimizers = {"client_optimizer": functools.partial(client_optimizer, check_values=check_values),
                  "server_optimizer": functools.partial(server_optimizer, check_values=check_values)}
    return options(section, where, factory, given=(first, *_FROM_THE_RUN), check_values=check_values,
                   objects=optimizers)


def check_algorithm(section: Section, where: str = "config.algorithm") -> None:
    """Every field of config.algorithm checked (its optimizers are built: they are small)."""
    _algorithm_options(section, where)


def algorithm(section: Section, model_or_task: Task | routing.RoutedModel, trainable, clients_per_round: int, *,
              check_values: bool = True) -> FederatedAlgorithm:
    """config.algorithm → FederatedAlgorithm: the factory `section.name` picks, its options from the section
    (`check_values=False` for traced hyperparameters, see `options`)."""
    name = section.get("name")
    fields = _algorithm_options(section, check_values=check_values)
    factory = ALGORITHMS[name]
    accepted = parameters_of(factory)
    run = dict(clients_per_round=clients_per_round, name=name)
    if "tensor_order" in accepted:
        run["tensor_order"], run["head_tensors"] = tensor_layout(trainable)
    with at("config.algorithm"):
        return factory(model_or_task, **{k: v for k, v in run.items() if k in accepted}, **fields)
