"""Config runners: a config in, a run (or a table of runs) out. One `Experiment` per `config.experiment`, in the
explicit table `EXPERIMENTS` that the CLI reads: `check(config)` checks every field before anything is written,
`run(config, workdir)` runs. Each imports its module when called, so that `--help` and the CLI's one-line errors
do not wait for JAX to import.

    federated      runners/federated.py     one federated run (and vectorized sweeps of several)
    central        runners/central.py       centralized training, the sanity baseline
    compare        runners/compare.py       several federated runs side by side, one table and plots
    fwdgrad_demo   runners/fwdgrad_demo.py  forward gradients against backprop on digits
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple


class Experiment(NamedTuple):
    check: Callable[[Any], None]         # config -> None, or an InputError naming the field
    run: Callable[[Any, str], Any]       # (config, workdir) -> the runner's results


def _imported(module: str, name: str) -> Callable:
    """spryjax.runners.<module>.<name>, imported at its first call."""
    def call(*args):
        return getattr(importlib.import_module(f"spryjax.runners.{module}"), name)(*args)
    call.__name__ = call.__qualname__ = name
    return call


EXPERIMENTS: dict[str, Experiment] = {
    "federated": Experiment(_imported("federated", "check_federated"), _imported("federated", "run_federated")),
    "central": Experiment(_imported("central", "check_central"), _imported("central", "run_central")),
    "compare": Experiment(_imported("compare", "check_comparison"), _imported("compare", "run_comparison")),
    "fwdgrad_demo": Experiment(_imported("fwdgrad_demo", "check_fwdgrad_demo"),
                               _imported("fwdgrad_demo", "run_fwdgrad_demo")),
}
