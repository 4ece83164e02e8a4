"""The Spry convergence study on the offline real task (configs/spry_rt_minilm.py): every method at one round
budget, in priority tiers, resumable; then the table (Markdown + CSV) and the plots (accuracy against rounds; the
memory–accuracy frontier).

    python experiments/spry_table.py run --tiers 1 [--out results/spry]       # runs (and resumes) tier 1
    python experiments/spry_table.py table [--out results/spry]              # the table of every run so far

`run` is also its own resume command: every run writes to OUT/runs/<method>_a<alpha>_s<seed> (config.json,
metrics.jsonl, checkpoints/ every 5 rounds), skips runs that reached their budget and continues the others from
their newest checkpoint. Evaluation: every 10 rounds on a fixed subset of 50 clients, and on all 100 clients at
rounds 100, 200 and 300 (the `all` columns). `table` reads whatever runs exist, so tiers and seeds run at different
times merge into one table.

Tiers (the study's priorities; budgets in rounds):
  1  α = 1.0, seed 0: Spry (released settings), FedFGD, FedMeZO, BAFFLE (K = 10) and FwdLLM (K = 20) FedSGD-shaped,
     BAFFLE+ and FwdLLM+ FedAvg-shaped at K = 1, 300 rounds each; FedAvg 100 rounds.
  2  α = 1.0, seeds 1 and 2: Spry and the zero-order method best at round 300 in tier 1 (FedAvg 100 rounds);
     α = 0.1, seed 0: the same three.
  3  ablations, α = 1.0, seed 0, 150 rounds: Spry lr 1e-3, Spry with the head shared by every client, Spry
     per-iteration, Spry K = 10, FedAvgSplit.

Columns: generalized accuracy (the global model on the evaluated clients' held-out splits) at the end of the
budget, mean ± std over seeds, and on all clients at rounds 100/200/300; rounds to reach the best zero-order
method's final accuracy (to the nearest 10); the client step's compiled peak memory and GFLOPs per step and per
round (from results/memory/spry_memory.csv, `experiments/spry_memory.py`); bytes up and down per round. Two
reference rows need no training: the majority class and a logistic probe on frozen mean-pooled MiniLM features.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build  # noqa: E402
from spryjax.data.federated import federate  # noqa: E402
from spryjax.errors import ArgumentParser, InputError, run_command  # noqa: E402
from spryjax.metrics import format_table, read_metrics  # noqa: E402
from spryjax.plots import curves, scatter  # noqa: E402
from spryjax.runners import federated, workdir as workdir_lib  # noqa: E402
from spryjax.runners.compare import summary_row  # noqa: E402

ZERO_ORDER = ("fedmezo", "fedmezo_per_iteration", "baffle", "baffle_plus", "fwdllm", "fwdllm_plus")
CHECKPOINT_EVERY, EVAL_EVERY, INTERIM_CLIENTS, FULL_EVAL_EVERY = 5, 10, 50, 100
# The memory table's row of each method (experiments/spry_memory.py, the MiniLM-L6 fp32 shape).
MEMORY_ROWS = {"spry": "Spry K=1", "spry_lr1e-3": "Spry K=1", "spry_shared_head": "Spry K=1",
               "spry_per_iteration": "Spry K=1", "spry_k10": "Spry K=10", "fedavg": "backprop (FedAvg)",
               "fedavg_lr1e-3": "backprop (FedAvg)", "fedyogi": "backprop (FedAvg)",
               "fedavg_remat": "backprop + remat dots", "fedavg_split": "backprop (FedAvg)",
               "fedfgd": "FedFGD K=1", "fedmezo": "FedMeZO", "baffle": "BAFFLE K=10", "fwdllm": "FwdLLM K=20"}
TIER_1 = [("spry", 300), ("fedfgd", 300), ("fedmezo", 300), ("baffle", 300), ("fwdllm", 300),
          ("baffle_plus", 300), ("fwdllm_plus", 300), ("fedavg", 100)]
ABLATIONS = [("spry_lr1e-3", 150), ("spry_shared_head", 150), ("spry_per_iteration", 150), ("spry_k10", 150),
             ("fedavg_split", 150)]


def tiers(out: str) -> dict[int, list[tuple[str, float, int, int]]]:
    """{tier: [(method, alpha, seed, rounds)]}; tier 2 uses the zero-order method best at round 300 in tier 1."""
    best = best_zero_order(out)
    second = [("spry", 300), ("fedavg", 100)] + ([(best, 300)] if best else [])
    return {1: [(m, 1.0, 0, r) for m, r in TIER_1],
            2: [(m, 1.0, s, r) for s in (1, 2) for m, r in second] + [(m, 0.1, 0, r) for m, r in second],
            3: [(m, 1.0, 0, r) for m, r in ABLATIONS]}


def run_dir(out: str, method: str, alpha: float, seed: int) -> str:
    return os.path.join(out, "runs", f"{method}_a{alpha}_s{seed}")


def member_config(method: str, alpha: float, seed: int, rounds: int):
    config = spry_rt_minilm.get_config(method)
    config.seed, config.num_rounds, config.fl.alpha = seed, rounds, alpha
    config.fl.eval_every, config.fl.checkpoint_every = EVAL_EVERY, CHECKPOINT_EVERY
    config.fl.interim_eval_clients, config.fl.full_eval_every = INTERIM_CLIENTS, FULL_EVAL_EVERY
    return config


def rounds_done(workdir: str) -> int:
    return max((r["round"] for r in read_metrics(workdir) if "round" in r), default=0)


def run(out: str, tier_numbers: list[int]) -> None:
    for tier in tier_numbers:
        if tier == 2 and not best_zero_order(out):
            raise InputError("tier 2 needs tier 1's zero-order runs at round 300: run tier 1 first")
        for method, alpha, seed, rounds in tiers(out)[tier]:
            workdir = run_dir(out, method, alpha, seed)
            if rounds_done(workdir) >= rounds:
                continue
            config = member_config(method, alpha, seed, rounds)
            federated.check_federated(config)
            print(f"\n== tier {tier}: {method}, alpha {alpha}, seed {seed}, {rounds} rounds ==", flush=True)
            with workdir_lib.prepared(config, workdir):
                federated.run_federated(config, workdir)


def runs_on_disk(out: str) -> dict[tuple[str, float, int], list[dict]]:
    """{(method, alpha, seed): metrics records} of every run under OUT/runs."""
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "runs", "*", "config.json"))):
        config = json.load(open(path))
        found[(config["method"], float(config["fl"]["alpha"]), int(config["seed"]))] = read_metrics(
            os.path.dirname(path))
    return found


def best_zero_order(out: str) -> str | None:
    """The zero-order method of tier 1 with the highest accuracy at round 300, once they all reached it."""
    runs = runs_on_disk(out)
    finals = {}
    for method, budget in TIER_1:
        records = runs.get((method, 1.0, 0), [])
        if method in ZERO_ORDER:
            at = [r["generalized_accuracy"] for r in records if r.get("round") == budget and
                  "generalized_accuracy" in r]
            if not at:
                return None
            finals[method] = at[0]
    return max(finals, key=finals.get) if finals else None


def reference_rows(alpha: float, seed: int, cache: str) -> list[dict]:
    """Majority class and frozen-feature probe on the clients of (alpha, seed)."""
    from sklearn.linear_model import LogisticRegression

    from spryjax import models
    from spryjax.models import heads, hf

    config = member_config("spry", alpha, seed, 1)
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


def rounds_to(records: list[dict], target: float) -> float:
    """The first evaluated round (evaluations every 10 rounds) whose accuracy reaches `target`."""
    hit = [r["round"] for r in records if r.get("generalized_accuracy", -1) >= target]
    return hit[0] if hit else float("nan")


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "—"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def at_round(records: list[dict], round_: int) -> float:
    """The all-clients accuracy at `round_` (nan where the run has not reached it)."""
    hit = [r["generalized_accuracy"] for r in records if r.get("round") == round_ and
           r.get("evaluated_clients", 0) > INTERIM_CLIENTS]
    return hit[0] if hit else float("nan")


def memory_rows(path: str = "results/memory/spry_memory.csv") -> dict[str, dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {r["method"]: r for r in csv.DictReader(f) if r["shape"] == "minilm-l6" and
                r["base_dtype"] == "float32"}


def table(out: str) -> None:
    runs = runs_on_disk(out)
    memory = memory_rows()
    rows, frontier = [], {}
    for alpha in sorted({a for _, a, _ in runs}, reverse=True):
        seeds = sorted({s for _, a, s in runs if a == alpha})
        references = [reference_rows(alpha, seed, os.path.join(out, f"features_a{alpha}_s{seed}.npz"))
                      for seed in seeds[:1]]
        for ref in references[0]:
            rows.append({"method": ref["method"], "alpha": alpha,
                         "generalized_accuracy": f"{ref['generalized_accuracy']:.3f}"})
        methods = list(dict.fromkeys(m for m, a, _ in runs if a == alpha))
        finals = {m: np.mean([summary_row(m, runs[(m, alpha, s)])["generalized_accuracy"]
                              for s in seeds if (m, alpha, s) in runs]) for m in methods}
        zero_order = [m for m in methods if m in ZERO_ORDER]
        target = max(finals[m] for m in zero_order) if zero_order else float("nan")
        for method in methods:
            member = [(s, runs[(method, alpha, s)]) for s in seeds if (method, alpha, s) in runs]
            records = [[r for r in rec if "round" in r] for _, rec in member]
            summaries = [summary_row(method, rec) for _, rec in member]
            source = spry_rt_minilm.METHODS[method][0]
            mem = memory.get(MEMORY_ROWS.get(method, ""), {})
            steps_ok = bool(mem)
            row = {"method": method, "settings": source, "alpha": alpha, "seeds": len(member),
                   "rounds": min(s["rounds"] for s in summaries),
                   "generalized_accuracy": mean_std([s["generalized_accuracy"] for s in summaries]),
                   **{f"all_at_{r}": mean_std([at_round(rec, r) for rec in records]) for r in (100, 200, 300)},
                   # the best zero-order method's final accuracy; empty until a zero-order run is on disk
                   "rounds_to_best_zero_order": (mean_std([rounds_to(rec, target) for rec in records])
                                                 if zero_order else ""),
                   "client_step_MiB": f"{float(mem['peak_MiB']):.0f}" if steps_ok else "",
                   "gflops_per_step": f"{float(mem['gflops_per_step']):.1f}" if steps_ok else "",
                   "gflops_per_round": f"{float(mem['gflops_per_round']):.0f}" if steps_ok else "",
                   "up_KiB/round": f"{summaries[0]['up_KiB_per_round']:.1f}",
                   "down_KiB/round": f"{summaries[0]['down_KiB_per_round']:.1f}"}
            rows.append(row)
            if steps_ok and alpha == 1.0:
                frontier[method] = (float(mem["peak_MiB"]), finals[method])
        plotted = {m: runs[(m, alpha, seeds[0])] for m in methods if (m, alpha, seeds[0]) in runs}
        curves(plotted, os.path.join(out, f"accuracy_a{alpha}.png"),
               title=f"LoRA on MiniLM-L6, Rotten Tomatoes, Dirichlet α={alpha}, seed {seeds[0]}",
               reference={r["method"]: r["generalized_accuracy"] for r in references[0]})
    if frontier:
        scatter(frontier, os.path.join(out, "memory_accuracy.png"), xlabel="client step peak memory (MiB, compiled)",
                ylabel="generalized accuracy at the end of the budget")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = format_table(rows, columns)
    with open(os.path.join(out, "spry_table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "spry_table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(text)


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["run", "table"])
    parser.add_argument("--tiers", default="1", help="comma-separated tiers to run (run)")
    parser.add_argument("--out", default="results/spry")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.what == "run":
        run(args.out, [int(t) for t in args.tiers.split(",")])
    table(args.out)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_table.py"))
