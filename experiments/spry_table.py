"""Spry and every baseline on the offline real task (configs/spry_rt_minilm.py), with the same round budget:
the results table of the README (Markdown + CSV) and accuracy-vs-round / vs-wall-time plots (PNG).

    python experiments/spry_table.py [--methods spry,fedavg,...] [--alphas 1.0,0.1] [--seeds 0,1,2]
                                     [--rounds 300] [--eval-every 10] [--out results/spry]

Every run writes to OUT/runs/<method>_a<alpha>_s<seed> and is resumable: re-running the command skips finished
runs and continues interrupted ones from their checkpoints. The table has, per method and α (mean ± std over
seeds): generalized accuracy at the end of the budget (and personalized where the method finetunes), rounds and
wall time to reach the target accuracy (the best zero-order baseline's final accuracy), per-client peak memory
of the client step, and bytes up/down per round; plus two reference rows that need no training: the majority
class, and a logistic-regression probe on frozen mean-pooled MiniLM features (trained on all clients' training
splits, tested on all held-out splits).
"""
from __future__ import annotations

import csv
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build  # noqa: E402
from spryjax.runners.compare import summary_row  # noqa: E402
from spryjax.data.federated import federate  # noqa: E402
from spryjax.runners import federated  # noqa: E402
from spryjax.metrics import format_table, read_metrics, save_config  # noqa: E402
from spryjax.plots import curves  # noqa: E402
from spryjax.errors import ArgumentParser, run_command  # noqa: E402

ZERO_ORDER = ("fedmezo", "baffle", "fwdllm")


def member_config(method: str, alpha: float, seed: int, rounds: int, eval_every: int):
    config = spry_rt_minilm.get_config(method)
    config.seed, config.num_rounds = seed, rounds
    config.fl.alpha, config.fl.eval_every, config.fl.checkpoint_every = alpha, eval_every, eval_every
    return config


def is_finished(workdir: str, rounds: int) -> bool:
    return any(r.get("round") == rounds for r in read_metrics(workdir))


def reference_rows(alpha: float, seed: int, cache: str) -> list[dict]:
    """Majority class and frozen-feature probe on the clients of (alpha, seed)."""
    from sklearn.linear_model import LogisticRegression

    from spryjax import models
    from spryjax.models import heads, hf

    config = member_config("spry", alpha, seed, 1, 1)
    data = build.dataset(config.data, seed)
    clients = federate(data, seed=seed, **federated.fl_options(config.fl)[0])
    if not os.path.exists(cache):
        pretrained = hf.load_pretrained(hf.packaged_model())
        embed = jax.jit(lambda batch: heads.mean_pool(
            models.apply(pretrained.params, batch, config=pretrained.config), batch["attention_mask"]))
        features = {}
        for split, store in (("train", clients.train), ("test", clients.test)):
            order = np.argsort(store.lengths)  # similar lengths together: each batch is trimmed to its longest
            chunks = []
            for i in range(0, len(order), 128):
                rows = order[i:i + 128]
                width = -(-int(store.lengths[rows].max()) // 16) * 16
                chunks.append(np.asarray(embed({k: store.arrays[k][rows, :width] for k in store.sequence_keys})))
            features[split] = np.concatenate(chunks)[np.argsort(order)]
        np.savez(cache, **features)
    features = np.load(cache)
    y_train, y_test = clients.train.arrays["label"], clients.test.arrays["label"]
    probe = LogisticRegression(max_iter=2000).fit(features["train"], y_train)
    majority = np.bincount(y_train).argmax()
    return [{"method": "majority class (no training)", "generalized_accuracy": float(np.mean(y_test == majority))},
            {"method": "frozen-feature probe (no federation)",
             "generalized_accuracy": float(probe.score(features["test"], y_test))}]


def rounds_to(records: list[dict], target: float, key: str = "round") -> float:
    hit = [r[key] for r in records if r.get("generalized_accuracy", -1) >= target]
    return hit[0] if hit else float("nan")


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(spry_rt_minilm.METHODS))
    parser.add_argument("--alphas", default="1.0,0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default="results/spry")
    args = parser.parse_args()
    methods, alphas = args.methods.split(","), [float(a) for a in args.alphas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    runs: dict[tuple, list[dict]] = {}
    for alpha in alphas:
        for seed in seeds:
            for method in methods:
                workdir = os.path.join(args.out, "runs", f"{method}_a{alpha}_s{seed}")
                if not is_finished(workdir, args.rounds):
                    config = member_config(method, alpha, seed, args.rounds, args.eval_every)
                    save_config(config, workdir)
                    print(f"\n== {method}, alpha {alpha}, seed {seed} ==", flush=True)
                    federated.run_federated(config, workdir)
                runs[(method, alpha, seed)] = read_metrics(workdir)
    rows = []
    for alpha in alphas:
        references = [reference_rows(alpha, seed, os.path.join(args.out, f"features_a{alpha}_s{seed}.npz"))
                      for seed in seeds]
        for i, ref in enumerate(references[0]):
            rows.append({"alpha": alpha, "method": ref["method"],
                         "generalized_accuracy": mean_std([r[i]["generalized_accuracy"] for r in references])})
        finals = {m: np.mean([summary_row(m, runs[(m, alpha, s)])["generalized_accuracy"] for s in seeds])
                  for m in methods}
        zero_order = [m for m in methods if m in ZERO_ORDER]
        target = max(finals[m] for m in zero_order) if zero_order else float("nan")
        for method in methods:
            summaries = [summary_row(method, runs[(method, alpha, s)]) for s in seeds]
            records = [[r for r in runs[(method, alpha, s)] if "round" in r] for s in seeds]
            rows.append({
                "alpha": alpha, "method": method,
                "generalized_accuracy": mean_std([s["generalized_accuracy"] for s in summaries]),
                "personalized_accuracy": mean_std([s.get("personalized_accuracy", float("nan")) for s in summaries]),
                f"rounds_to_{target:.3f}": mean_std([rounds_to(r, target) for r in records]),
                "seconds_to_target": mean_std([rounds_to(r, target, "wall_time") for r in records]),
                "client_step_MiB": f"{summaries[0]['client_step_memory_MiB']:.0f}",
                "up_KiB/round": f"{summaries[0]['up_KiB_per_round']:.1f}",
                "down_KiB/round": f"{summaries[0]['down_KiB_per_round']:.1f}"})
        plotted = {m: runs[(m, alpha, seeds[0])] for m in methods}
        curves(plotted, os.path.join(args.out, f"accuracy_a{alpha}.png"),
               title=f"LoRA on MiniLM-L6, Rotten Tomatoes, Dirichlet α={alpha}, seed {seeds[0]}",
               reference={r["method"]: references[0][i]["generalized_accuracy"]
                          for i, r in enumerate(references[0])})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = format_table(rows, columns)
    with open(os.path.join(args.out, "spry_table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "spry_table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(table)
    print(f"\n{time.perf_counter() - start:.0f} s; plots: {args.out}/accuracy_a*.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_table.py"))
