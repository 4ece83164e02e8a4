"""Config runners: a config in, a run (or a table of runs) out. One function per `config.experiment`, in the
explicit table `EXPERIMENTS` that the CLI reads. Each imports its module when called, so that `--help` and the
CLI's one-line errors do not wait for JAX to import.

    federated      runners/federated.py     one federated run (and vectorized sweeps of several)
    central        runners/central.py       centralized training, the sanity baseline
    compare        runners/compare.py       several federated runs side by side, one table and plots
    fwdgrad_demo   runners/fwdgrad_demo.py  forward gradients against backprop on digits
"""
from __future__ import annotations

from typing import Any, Callable


def federated_experiment(config, workdir: str) -> Any:
    from spryjax.runners.federated import run_federated
    return run_federated(config, workdir)


def central_experiment(config, workdir: str) -> Any:
    from spryjax.runners.central import run_central
    return run_central(config, workdir)


def compare_experiment(config, workdir: str) -> Any:
    from spryjax.runners.compare import run_comparison
    return run_comparison(config, workdir)


def fwdgrad_demo_experiment(config, workdir: str) -> Any:
    from spryjax.runners.fwdgrad_demo import run_fwdgrad_demo
    return run_fwdgrad_demo(config, workdir)


EXPERIMENTS: dict[str, Callable[[Any, str], Any]] = {
    "federated": federated_experiment, "central": central_experiment, "compare": compare_experiment,
    "fwdgrad_demo": fwdgrad_demo_experiment}
