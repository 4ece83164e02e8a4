"""The Flow table: Flow (arXiv 2211.15281) against every baseline of its paper on an offline personalization task,
several seeds, one command. Markdown + CSV tables and a PNG of generalized vs personalized accuracy.

    python experiments/flow_table.py [--task digits_personalized] [--seeds 0,1,2] [--rounds 150]
                                     [--results results/flow]

Per seed: the task (spryjax.data.vision: Dirichlet(0.5) label skew plus a per-client rotation and stroke
thickness), one initialization of the routed EMNIST CNN shared by every algorithm (the same θ_g everywhere), the
same client optimizer (SGD, momentum 0.9), batch, local epochs and round budget, and five training runs:
    fedavg       FedAvg rounds. FedAvg, FedAvg+FT, Ditto, LG-FedAvg and kNN-Per train exactly these rounds in their
                 stateless forms (they differ only in how an evaluated client personalizes), so this one run is
                 evaluated five ways on the same final model.
    apfl, fedrep, hypcluster, flow   their own rounds.
Every algorithm is evaluated once, after the last round, on every client's held-out split: generalized accuracy
(its global model), personalized accuracy, instances helped / harmed (personalized right where the global model
is wrong / the reverse), clients helped / harmed (more / fewer held-out examples right than the global model), and
for Flow the fraction of instances routed to the local copy at each routing point.

Outputs in --results: table.md (mean ± std over seeds), table.csv (one row per algorithm and seed, plus the
means), accuracy.png. The table is also printed, with whether Flow met the goal of the issue.
"""
from __future__ import annotations

import csv
import os
import sys
import time

import jax
import numpy as np
import optax

from spryjax.data import vision
from spryjax.data.federated import FederatedData
from spryjax.fl import simulate
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.fl.algorithms.apfl import apfl
from spryjax.fl.algorithms.ditto import ditto
from spryjax.fl.algorithms.fedavg_ft import fedavg_ft
from spryjax.fl.algorithms.fedrep import fedrep
from spryjax.fl.algorithms.flow import flow
from spryjax.fl.algorithms.hypcluster import hypcluster
from spryjax.fl.algorithms.knn_per import knn_per
from spryjax.fl.algorithms.lg_fedavg import lg_fedavg
from spryjax.metrics import format_table
from spryjax.nn import routed_models
from spryjax.nn.routing import RoutedModel
from spryjax.errors import ArgumentParser, run_command

TASKS = {"digits_personalized": vision.digits_personalized, "mnist_personalized": vision.mnist_personalized}
# The routed EMNIST CNN's layout (4 routing points, a policy MLP with 4 exits) at a CPU size.
MODEL_SIZE = dict(channels=(8, 16), dense=64, router_hidden=(64, 32, 16))
ORDER = ("fedavg", "fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per", "flow")
LABELS = {"fedavg": "FedAvg", "fedavg_ft": "FedAvg+FT", "apfl": "APFL", "ditto": "Ditto", "fedrep": "FedRep",
          "lg_fedavg": "LG-FedAvg", "hypcluster": "HypCluster", "knn_per": "kNN-Per", "flow": "Flow"}
PER_CLIENT = ("fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per")


def evaluated_together(algorithms: dict[str, FederatedAlgorithm]) -> FederatedAlgorithm:
    """The first algorithm's rounds, evaluated by every algorithm in `algorithms` (whose rounds must be the same):
    groups are renamed "<name>.<group>", so the engine logs e.g. "ditto.personalized_accuracy"."""
    def evaluate_client(*args):
        return {f"{name}.{group}": sums for name, algorithm in algorithms.items()
                for group, sums in algorithm.evaluate_client(*args).items()}
    return next(iter(algorithms.values()))._replace(evaluate_client=evaluate_client)


def algorithms(model: RoutedModel, *, lr: float, batch_size: int, epochs: int, regularization: float
               ) -> dict[str, FederatedAlgorithm]:
    """One training run per entry; "fedavg" is evaluated as FedAvg+FT, Ditto, LG-FedAvg and kNN-Per too."""
    options = dict(client_optimizer=optax.sgd(lr, momentum=0.9), server_optimizer=optax.sgd(1.0),
                   batch_size=batch_size, local_epochs=epochs)
    shared = {"fedavg_ft": fedavg_ft(model, **options), "ditto": ditto(model, **options),
              "lg_fedavg": lg_fedavg(model, **options), "knn_per": knn_per(model, **options)}
    return {"fedavg": evaluated_together(shared), "apfl": apfl(model, **options), "fedrep": fedrep(model, **options),
            "hypcluster": hypcluster(model, **options),
            "flow": flow(model, regularization=regularization, **options)}


def rows_of(run: str, record: dict, clients: int, instances: int) -> list[dict]:
    """Table rows (one per algorithm) from a run's final record; counts from the logged fractions."""
    if run == "fedavg":
        names = {"fedavg": "fedavg_ft.", "fedavg_ft": "fedavg_ft.", "ditto": "ditto.", "lg_fedavg": "lg_fedavg.",
                 "knn_per": "knn_per."}
    else:
        names = {run: ""}
    rows = []
    for name, prefix in names.items():
        get = lambda key: record[prefix + key]
        row = {"algorithm": name, "generalized_accuracy": get("generalized_accuracy"),
               "personalized_accuracy": get("personalized_accuracy"),
               "instances_helped": round(get("versus_global_helped") * instances),
               "instances_harmed": round(get("versus_global_harmed") * instances),
               "clients_helped": round(get("clients_helped") * clients),
               "clients_harmed": round(get("clients_harmed") * clients)}
        if name == "fedavg":   # no personalization: the global model itself
            row.update(personalized_accuracy=row["generalized_accuracy"], instances_helped=0, instances_harmed=0,
                       clients_helped=0, clients_harmed=0)
        for k in range(4):
            if f"routing_local_{k}" in record and name == "flow":
                row[f"routed_local_{k}"] = record[f"routing_local_{k}"]
        rows.append(row)
    return rows


def run_seed(task: str, seed: int, *, rounds: int, clients_per_round: int, lr: float, batch_size: int,
             epochs: int, regularization: float, built: dict) -> list[dict]:
    data = TASKS[task](seed=seed)
    train_parts, test_parts = vision.client_parts(data)
    train = FederatedData.from_partition(data.inputs("train"), train_parts)
    test = FederatedData.from_partition(data.inputs("test"), test_parts)
    model = routed_models.emnist_cnn(data, jax.random.key(seed), **MODEL_SIZE)
    if not built:   # algorithms are built once and reused across seeds (same shapes), so they compile once
        built.update(algorithms(model, lr=lr, batch_size=batch_size, epochs=epochs, regularization=regularization))
    clients, instances = int(np.sum(test.counts > 0)), int(np.sum(test.counts))
    rows = []
    for run, algorithm in built.items():
        tick = time.perf_counter()
        result = simulate.run_simulation(algorithm, model.states, {}, train, test, num_rounds=rounds,
                              clients_per_round=clients_per_round, seed=seed, batch_size=batch_size,
                              strategy="loop", eval_every=rounds, show_progress=False)
        seconds = time.perf_counter() - tick
        for row in rows_of(run, result.history[-1], clients, instances):
            rows.append({"seed": seed, **row, "train_run_seconds": seconds})
        print(f"  seed {seed} {run}: {seconds:.0f} s", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and std for accuracies) over seeds, per algorithm, in ORDER."""
    out = []
    for name in ORDER:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        row = {"algorithm": LABELS[name]}
        for key in mine[0]:
            if key in ("seed", "algorithm"):
                continue
            values = np.array([r[key] for r in mine], dtype=float)
            row[key] = float(values.mean())
            if key.endswith("accuracy"):
                row[key + "_std"] = float(values.std())
        out.append(row)
    return out


def markdown(summary: list[dict], *, seeds: int, clients: int, instances: int) -> str:
    pm = lambda r, k: f"{r[k]:.4f} ± {r[k + '_std']:.4f}"
    rows = [{"algorithm": r["algorithm"], "generalized acc.": pm(r, "generalized_accuracy"),
             "personalized acc.": pm(r, "personalized_accuracy"),
             "instances helped / harmed": f"{r['instances_helped']:.1f} / {r['instances_harmed']:.1f}",
             "clients helped / harmed": f"{r['clients_helped']:.1f} / {r['clients_harmed']:.1f}",
             "routed to local (points 1-4)": " ".join(f"{r[f'routed_local_{k}']:.2f}" for k in range(4))
             if "routed_local_0" in r else ""} for r in summary]
    return (format_table(rows) + f"\n\nMeans over {seeds} seeds (± std of the accuracies); counts are per seed, "
            f"out of {instances} held-out instances and {clients} clients.")


def verdict(summary: list[dict]) -> list[str]:
    by = {r["algorithm"]: r for r in summary}
    if "Flow" not in by:
        return []
    flow_acc = by["Flow"]["personalized_accuracy"]
    best = max((by[LABELS[n]] for n in PER_CLIENT if LABELS[n] in by), key=lambda r: r["personalized_accuracy"])
    checks = [(f"Flow's personalized accuracy {flow_acc:.4f} > FedAvg's {by['FedAvg']['personalized_accuracy']:.4f}",
               flow_acc > by["FedAvg"]["personalized_accuracy"]),
              (f"> FedAvg+FT's {by['FedAvg+FT']['personalized_accuracy']:.4f}",
               flow_acc > by["FedAvg+FT"]["personalized_accuracy"]),
              (f"> the best per-client baseline's ({best['algorithm']}, {best['personalized_accuracy']:.4f})",
               flow_acc > best["personalized_accuracy"]),
              (f"clients harmed {by['Flow']['clients_harmed']:.1f} < FedAvg+FT's "
               f"{by['FedAvg+FT']['clients_harmed']:.1f}",
               by["Flow"]["clients_harmed"] < by["FedAvg+FT"]["clients_harmed"])]
    return [f"{'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["algorithm"] for r in summary]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, key, label in ((-0.2, "generalized_accuracy", "generalized (global model)"),
                               (0.2, "personalized_accuracy", "personalized")):
        ax.bar(x + offset, [r[key] for r in summary], 0.4, yerr=[r[key + "_std"] for r in summary], capsize=3,
               label=label)
    low = min(min(r["generalized_accuracy"], r["personalized_accuracy"]) for r in summary)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits_personalized", choices=sorted(TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--regularization", type=float, default=0.01, help="Flow's λ (EMNIST-like tasks: 0.01)")
    parser.add_argument("--results", default="results/flow")
    parser.add_argument("--compile-cache", default=os.path.expanduser("~/.cache/spryjax/jax"),
                        help="JAX's persistent compilation cache: later seeds and reruns skip XLA compiles")
    args = parser.parse_args()
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    os.makedirs(args.results, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows, built = [], {}
    for seed in seeds:
        rows += run_seed(args.task, seed, rounds=args.rounds, clients_per_round=args.clients_per_round, lr=args.lr,
                         batch_size=args.batch_size, epochs=args.epochs, regularization=args.regularization,
                         built=built)
    summary = summarize(rows)
    data = TASKS[args.task](seed=seeds[0])
    clients, instances = int(data.test["client"].max()) + 1, len(data.test["label"])
    table = markdown(summary, seeds=len(seeds), clients=clients, instances=instances)
    checks = verdict(summary)
    minutes = (time.perf_counter() - start) / 60
    header = (f"Flow table on {args.task}: {args.rounds} rounds × {args.clients_per_round} clients, "
              f"{args.epochs} local epochs, batch {args.batch_size}, SGD lr {args.lr} momentum 0.9, "
              f"Flow λ = {args.regularization}; seeds {args.seeds}; {minutes:.1f} min.")
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n\n" + "\n".join(f"- {c}" for c in checks) + "\n")
    fields = list(dict.fromkeys(k for r in rows + summary for k in r))
    with open(os.path.join(args.results, "table.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + [{**r, "seed": "mean"} for r in summary])
    plot(summary, os.path.join(args.results, "accuracy.png"), f"{args.task}, {len(seeds)} seeds")
    print(header, table, *checks, f"wrote {args.results}/table.md, table.csv, accuracy.png", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/flow_table.py"))
