"""Sweeps: a config file's `get_sweep()` expanded into named members, each with its own resolved config and workdir.

A config file may define, next to `get_config()` (the big_vision convention):

    from spryjax.launch.sweep import product, zip_

    def get_sweep():                       # or get_sweep(arg) to receive the --config=FILE:ARG argument
        return product(config_arg=["spry", "fedavg"], seed=range(3), **{"fl.alpha": [0.1, 1.0]})

A sweep is a list of override dicts with dotted keys into the config. The key `config_arg` is the config file's
argument (the ARG of `--config=FILE:ARG`, here the method of configs/spry_rt_minilm.py). Member names come from the
overrides in their order, the config argument first and bare: `spry,seed=0,fl.alpha=0.1`; each member runs in
SWEEP_DIR/NAME and saves its resolved config there (config.json) next to its metrics. Command-line overrides
(`--config.num_rounds=5`) apply to every member; overriding a swept field there is an error.

A member is finished when its workdir holds DONE (written after its last round) for at least its `num_rounds`;
an unfinished member with checkpoints resumes from them, one without starts over.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import os
import re
import shutil
from typing import Any, Iterable, NamedTuple

from absl import flags
from ml_collections import ConfigDict, config_flags

from spryjax.errors import InputError, one_line
from spryjax.metrics import METRICS_FILE, read_metrics

CONFIG_ARG = "config_arg"
DONE_FILE = "DONE"
Overrides = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Building sweeps


def _axes(sweeps: tuple[Iterable[Overrides], ...], axes: dict[str, Iterable]) -> list[list[Overrides]]:
    """Positional sweeps (lists of override dicts) and keyword axes (values), each as a list of override dicts."""
    return [list(s) for s in sweeps] + [[{key: v} for v in values] for key, values in axes.items()]


def product(*sweeps: Iterable[Overrides], **axes: Iterable) -> list[Overrides]:
    """The Cartesian product of axes, the last one varying fastest.

    Example:
      >>> product(seed=range(2), **{"fl.alpha": [0.1, 1.0]})
      [{'seed': 0, 'fl.alpha': 0.1}, {'seed': 0, 'fl.alpha': 1.0}, {'seed': 1, 'fl.alpha': 0.1}, ...]
      >>> product(zip_(**{"algorithm.client_optimizer.learning_rate": [0.1, 0.01], "num_rounds": [50, 100]}),
      ...         seed=range(3))        # positional arguments are sweeps (lists of override dicts)
    """
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*_axes(sweeps, axes))]


def zip_(*sweeps: Iterable[Overrides], **axes: Iterable) -> list[Overrides]:
    """Axes advanced together (all of the same length).

    Example:
      >>> zip_(config_arg=["fedavg", "fedmezo"], **{"algorithm.client_optimizer.learning_rate": [0.1, 1e-3]})
      [{'config_arg': 'fedavg', 'algorithm.client_optimizer.learning_rate': 0.1}, {...: 'fedmezo', ...: 0.001}]
    """
    columns = _axes(sweeps, axes)
    if len({len(c) for c in columns}) > 1:
        raise InputError(f"zip_: axes of different lengths {[len(c) for c in columns]}")
    return [{k: v for part in row for k, v in part.items()} for row in zip(*columns)]


# ----------------------------------------------------------------------------------------------------------------
# Members


class Member(NamedTuple):
    name: str               # stable and readable, from the overrides: "fedmezo,seed=1,fl.alpha=0.1"
    overrides: Overrides    # dotted keys (and config_arg) applied to get_config(...)
    workdir: str            # SWEEP_DIR/name


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def member_name(overrides: Overrides) -> str:
    """"default" for no overrides, else the overrides in order, `key=value` joined by commas (the config argument
    bare); characters other than letters, digits and `._=,+-` become `_` so the name is a safe path component."""
    if not overrides:
        return "default"
    parts = [_format_value(v) if k == CONFIG_ARG else f"{k}={_format_value(v)}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def split_spec(spec: str) -> tuple[str, str | None]:
    """"configs/x.py:arg" -> ("configs/x.py", "arg"); no colon -> (path, None)."""
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def load_module(path: str):
    """The config file as a module (for get_sweep)."""
    if not os.path.isfile(path):
        raise InputError(f"--config: no config file at {path}")
    spec = importlib.util.spec_from_file_location(f"spryjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's config file: any failure is its message, on one line
        raise InputError(f"--config: {path} fails to load: {one_line(error)}") from None
    return module


def expand(config_spec: str, sweep_dir: str) -> list[Member]:
    """The members of the config file's sweep (one member "default" when it defines no get_sweep)."""
    path, arg = split_spec(config_spec)
    module = load_module(path)
    get_sweep = getattr(module, "get_sweep", None)
    try:
        sweep = [{}] if get_sweep is None else (get_sweep(arg) if arg is not None else get_sweep())
    except Exception as error:  # the user's get_sweep: any failure is its message, on one line
        raise InputError(f"{path}: get_sweep({'' if arg is None else repr(arg)}) failed: {one_line(error)}"
                         ) from None
    if not isinstance(sweep, (list, tuple)) or not all(isinstance(o, dict) for o in sweep):
        raise InputError(f"{path}: get_sweep() must return a list of dicts (field -> value), got "
                         f"{type(sweep).__name__}")
    sweep = list(sweep)
    if not sweep:
        raise InputError(f"{path}: get_sweep() returned no members")
    members = [Member(member_name(o), dict(o), os.path.join(sweep_dir, member_name(o))) for o in sweep]
    seen: dict[str, Overrides] = {}
    for m in members:
        if m.name in seen:
            raise InputError(f"{path}: get_sweep() has two members named {m.name!r} ({seen[m.name]} and "
                             f"{m.overrides})")
        seen[m.name] = m.overrides
    return members


def select(members: list[Member], names: Iterable[str]) -> list[Member]:
    """The members named in `names`, in sweep order; an unknown name is an error."""
    names = list(names)
    known = {m.name for m in members}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--members: unknown member(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [m for m in members if m.name in set(names)]


# ----------------------------------------------------------------------------------------------------------------
# Resolved configs


def load_config(config_spec: str, cli_overrides: list[str] = ()) -> ConfigDict:
    """get_config(arg) of `config_spec` with `--config.key=value` strings applied, exactly as spryjax.main parses
    them (same types, same one-line errors)."""
    from spryjax.main import explain_flag_error, forget_loaded_config, make_configs_importable  # the CLI's ways
    values = flags.FlagValues()
    argv = ["spryjax", f"--config={config_spec}", *cli_overrides]
    make_configs_importable(argv)
    forget_loaded_config()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
        values.config.to_dict()
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError, SyntaxError) as exc:
        raise InputError(explain_flag_error(exc, argv)) from None
    return values.config


def config_overrides(argv: list[str]) -> list[str]:
    """The `--config.field=value` arguments of a command line, passed on unchanged to every member."""
    return [a for a in argv[1:] if a.startswith("--config.")]


def overridden_keys(cli_overrides: list[str]) -> list[str]:
    """["--config.fl.alpha=0.1"] -> ["fl.alpha"]."""
    return [o.split("=", 1)[0][len("--config."):] for o in cli_overrides]


def resolve(config_spec: str, member: Member, cli_overrides: list[str] = ()) -> ConfigDict:
    """A member's full config: get_config(its config argument, else the spec's), the command-line overrides, then
    the member's overrides (type-checked by ConfigDict)."""
    path, arg = split_spec(config_spec)
    overrides = dict(member.overrides)
    if CONFIG_ARG in overrides:
        arg = str(overrides.pop(CONFIG_ARG))
    clash = sorted(set(overridden_keys(list(cli_overrides))) & set(overrides))
    if clash:
        raise InputError(f"--config.{clash[0]}: the sweep already sets {clash[0]!r}; drop the override or the axis")
    config = copy.deepcopy(load_config(path if arg is None else f"{path}:{arg}", list(cli_overrides)))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        try:
            for part in parents:
                node = node[part]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, AttributeError, TypeError) as exc:
            reason = "the config has no such field" if isinstance(exc, (KeyError, AttributeError)) else str(exc)
            raise InputError(f"sweep member {member.name!r}: {key}={value!r}: {reason}") from None
    return config


# ----------------------------------------------------------------------------------------------------------------
# Status on disk


def length(config: ConfigDict) -> int:
    """How far a member runs, what DONE records: its num_rounds (federated runs), or its train.epochs (central)."""
    return config.num_rounds if "num_rounds" in config else config.train.epochs


class Status(NamedTuple):
    state: str          # "done", "partial" (has metrics or checkpoints) or "new"
    last_round: int     # the last round recorded in metrics.jsonl (0 if none)


def status(workdir: str, num_rounds: int) -> Status:
    """Whether a member finished (DONE for at least `num_rounds`), started, or never ran."""
    rounds = [r["round"] for r in read_metrics(workdir) if "round" in r]
    last = max(rounds, default=0)
    done_path = os.path.join(workdir, DONE_FILE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            if json.load(f).get("num_rounds", 0) >= num_rounds:
                return Status("done", last)
    started = last > 0 or os.path.isdir(os.path.join(workdir, "checkpoints"))
    return Status("partial" if started else "new", last)


def mark_done(workdir: str, num_rounds: int) -> None:
    with open(os.path.join(workdir, DONE_FILE), "w") as f:
        json.dump({"num_rounds": num_rounds}, f)


def prepare(workdir: str) -> None:
    """Before (re)running a member: without checkpoints to resume from it starts over, so stale metrics go."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        shutil.rmtree(checkpoints, ignore_errors=True)
        if os.path.exists(os.path.join(workdir, METRICS_FILE)):
            os.remove(os.path.join(workdir, METRICS_FILE))
