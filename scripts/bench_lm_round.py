"""Federated rounds of the offline language-model task with each minibatch cut to its own longest row (trimmed)
against minibatches padded to the cohort's longest row (padded), side by side in one process.

The task is configs/spry_rt_minilm.py (LoRA on MiniLM-L6, Rotten Tomatoes snippets, 100 Dirichlet clients, 10
per round, batch 8) with dropout off (LoRA's and the base's), so that both forms compute the same update. Each
method runs the engine's loop strategy (one client at a time, its local steps dispatched one by one), padded
(`sequence_multiple=None`) and trimmed (`sequence_multiple=8`) on the same cohorts from the same state, alternating
cohort by cohort; the `--rounds` cohorts run once untimed (every shape compiled) and once timed; the median is
reported, compilation excluded. `max_rel_update_diff` = ‖Δ_trimmed − Δ_padded‖ / ‖Δ_padded‖ over the whole
aggregated update tree of the first round.

    python scripts/bench_lm_round.py --rounds 3 --json results/engine/lm_round.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build  # noqa: E402
from spryjax.errors import ArgumentParser, run_command  # noqa: E402
from spryjax.fl import simulate  # noqa: E402
from spryjax.metrics import format_table  # noqa: E402
from spryjax.runners import federated  # noqa: E402

METHODS = ("spry", "fedavg", "fedmezo")


def round_times(algorithm, setup, config, rounds: int) -> dict:
    """Median seconds per round, padded and trimmed, and both first rounds' aggregated updates.

    The same `rounds` cohorts run twice: an untimed pass that compiles every shape they use (each trimmed length
    and each cohort's padded size), then the timed pass. Within a pass each cohort runs padded, then trimmed, from
    the same state, so a change in the machine's load falls on both forms alike."""
    plan = simulate.plan_round("loop", config.fl.clients_per_round, 1)
    forms = {name: simulate.build_round(algorithm, plan, None, sequence_keys=setup.clients.train.sequence_keys,
                                        sequence_multiple=multiple)
             for name, multiple in (("padded", None), ("trimmed", 8))}
    root = jax.random.key(config.seed)
    start = algorithm.init(setup.params, jax.random.fold_in(root, simulate.INIT_STREAM))
    batch = config.algorithm.batch_size
    times = {name: [] for name in forms}
    updates = {}
    for timed in (False, True):
        for round_ in range(1, rounds + 1):
            cohort = simulate.sample_cohort(config.seed, round_, setup.clients.train.num_clients,
                                            config.fl.clients_per_round)
            arrays, counts = setup.clients.train.gather(cohort, batch_size=batch)
            lengths = setup.clients.train.gather_lengths(cohort, batch_size=batch)
            for name, round_fn in forms.items():
                state = jax.tree.map(lambda x: jnp.array(x, copy=True), start)
                tick = time.perf_counter()
                state, _ = round_fn(state, setup.frozen, arrays, counts, jax.random.fold_in(root, round_),
                                    lengths=lengths)
                jax.block_until_ready(state)
                if timed:
                    times[name].append(time.perf_counter() - tick)
                if round_ == 1 and not timed:
                    updates[name] = jax.tree.map(jnp.subtract, state.params, start.params)
    return {name: statistics.median(t) for name, t in times.items()}, updates


def relative_difference(a, b) -> float:
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])
    return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method and form (median)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", default=None, help="write the rows here (a JSON list)")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        config = spry_rt_minilm.get_config(method)
        config.model.peft.dropout = 0.0
        config.model.base_dropout = 0.0
        federated.check_federated(config)
        setup = federated.setup(config)
        algorithm = build.algorithm(config.algorithm, setup.task, setup.params, config.fl.clients_per_round)
        seconds, updates = round_times(algorithm, setup, config, args.rounds)
        rows.append({"method": method, "padded_round_s": seconds["padded"], "trimmed_round_s": seconds["trimmed"],
                     "speedup": seconds["padded"] / seconds["trimmed"],
                     "max_rel_update_diff": relative_difference(updates["trimmed"], updates["padded"])})
        print(format_table(rows[-1:], floatfmt=".4g"), flush=True)
    print("\n" + format_table(rows, floatfmt=".4g"))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/bench_lm_round.py"))
