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

from typing import Any, Callable, NamedTuple


class Experiment(NamedTuple):
    check: Callable[[Any], None]         # config -> None, or an InputError naming the field
    run: Callable[[Any, str], Any]       # (config, workdir) -> the runner's results


def _federated_check(config) -> None:
    from spryjax.runners.federated import check_federated
    check_federated(config)


def _federated_run(config, workdir: str) -> Any:
    from spryjax.runners.federated import run_federated
    return run_federated(config, workdir)


def _central_check(config) -> None:
    from spryjax.runners.central import check_central
    check_central(config)


def _central_run(config, workdir: str) -> Any:
    from spryjax.runners.central import run_central
    return run_central(config, workdir)


def _compare_check(config) -> None:
    from spryjax.runners.compare import check_comparison
    check_comparison(config)


def _compare_run(config, workdir: str) -> Any:
    from spryjax.runners.compare import run_comparison
    return run_comparison(config, workdir)


def _fwdgrad_demo_check(config) -> None:
    from spryjax.runners.fwdgrad_demo import check_fwdgrad_demo
    check_fwdgrad_demo(config)


def _fwdgrad_demo_run(config, workdir: str) -> Any:
    from spryjax.runners.fwdgrad_demo import run_fwdgrad_demo
    return run_fwdgrad_demo(config, workdir)


EXPERIMENTS: dict[str, Experiment] = {
    "federated": Experiment(_federated_check, _federated_run),
    "central": Experiment(_central_check, _central_run),
    "compare": Experiment(_compare_check, _compare_run),
    "fwdgrad_demo": Experiment(_fwdgrad_demo_check, _fwdgrad_demo_run),
}
