"""The Flow table: Flow (arXiv 2211.15281) as released and with `local_init`, against every baseline of its paper,
on two offline personalization tasks, 3 seeds. Resumable per (task, seed, run): the command is its own resume
command, and it can be stopped at any time (checkpoints every 25 rounds).

    python experiments/flow_table.py [--tasks mnist_instance_shift,digits_personalized] [--seeds 0,1,2]
                                     [--results results/flow] [--stop-after-minutes M]
    python experiments/flow_table.py --timing        # one round and one evaluation of each run, CPU-hour estimate
    python experiments/flow_table.py --table-only    # rewrite table.md / table.csv from what has finished

Per task, in this order (each step is skipped when its results exist):
  1. seed 0, FedAvg to `curve_rounds` rounds, evaluated every 25 rounds (FedAvg, FedAvg+FT, Ditto, LG-FedAvg and
     kNN-Per on the same model); then the task's diagnostic on the reference pair (FedAvg's global model and each
     client's fine-tuned copy, FedAvg+FT) at its last round, overall and per kind of instance: <task>/diagnostic.json.
     A task with a `min_diagnostic` whose global-right-local-wrong share is below it stops here, before any Flow run.
  2. seed 0, both Flow runs to `curve_rounds`, evaluated every 25 rounds; the round budget is the smallest
     multiple of 25 by which FedAvg's generalized accuracy and each Flow run's personalized accuracy are within
     `BUDGET_TOLERANCE` of their best over the curve: <task>/budget.json (fixed once written).
  3. every (seed, run) at the budget; seed 0's FedAvg and Flow rows are read from their curve runs at the budget.
Runs, all from one initialization of the routed CNN per seed, the same client optimizer (SGD, momentum 0.9), batch,
3 local epochs over the client's training data (Flow's two halves together make one pass per epoch):
    fedavg           FedAvg rounds, evaluated as FedAvg, FedAvg+FT, Ditto, LG-FedAvg and kNN-Per (stateless forms;
                     their training rounds are identical).
    apfl, fedrep, hypcluster   their own rounds.
    flow_released    Flow as released: independent copies, fixed split (even/odd minibatches); evaluated with the
                     server's model and, as its own row, client-adapted (the released EMNIST protocol).
    flow_local_init  the same with local_init="every_round" (θ_l := θ_g at every client call); both evaluations.
Every run is evaluated at the budget on every client's held-out split: generalized and personalized accuracy,
instances helped / harmed (personalized right where the global model is wrong / the reverse), clients helped /
harmed, the task's reference-pair diagnostic (global_right_local_wrong, global_wrong_local_right: the same on every
row of a task), and for Flow the share of instances routed to the local copy at each routing point, overall and per
kind of instance (changed / plain / rare-class: local_share_<kind> is the mean over the routing points).

Outputs in --results: table.md (mean ± std over seeds), table.csv (one row per task, algorithm and seed, plus the
means), accuracy.png, <task>/{diagnostic.json, budget.json, curves.csv}, progress/<task>/seed<k>/<run>/ (metrics.jsonl;
checkpoints/ only while a run is unfinished).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax.data import vision
from spryjax.data.federated import FederatedData
from spryjax.errors import ArgumentParser, InputError, run_command
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
from spryjax.metrics import format_table, read_metrics
from spryjax.nn import routed_models
from spryjax.nn.routing import RoutedModel


class TaskSpec(NamedTuple):
    build: Callable[..., object]        # vision.<task>(seed=...) -> Dataset
    curve_rounds: int                   # seed 0's FedAvg and Flow curves run this far
    instance_groups: tuple[str, ...]    # per-instance 0/1 tags of the held-out data (kinds of instance)
    min_diagnostic: float | None        # the global-right-local-wrong share the task must reach before Flow runs


TASKS = {
    "mnist_instance_shift": TaskSpec(vision.mnist_instance_shift, 300, ("changed", "plain", "rare"), 0.10),
    "digits_personalized": TaskSpec(vision.digits_personalized, 200, (), None),
}
# The routed EMNIST CNN's layout (4 routing points, a policy MLP with 4 exits) at a CPU size: conv 8 → 16, dense 64
# (28×28: 2,304 → 64) and a policy 784 → 64 → 32 → 16 instead of the paper's 32 → 64, 128 and 784 → 350 → 150 → 50.
MODEL_SIZE = dict(channels=(8, 16), dense=64, router_hidden=(64, 32, 16))
CURVE_EVERY, CHECKPOINT_EVERY, BUDGET_TOLERANCE = 25, 25, 0.01
RUNS = ("fedavg", "apfl", "fedrep", "hypcluster", "flow_released", "flow_local_init")
CURVE_RUNS = ("fedavg", "flow_released", "flow_local_init")
FLOW_RUNS = {"flow_released": dict(split="fixed", local_init="independent"),
             "flow_local_init": dict(split="fixed", local_init="every_round")}
# Table rows: (row name, run, prefix of its evaluation groups in the run's records).
ROWS = (("fedavg", "fedavg", "fedavg_ft."), ("fedavg_ft", "fedavg", "fedavg_ft."), ("apfl", "apfl", ""),
        ("ditto", "fedavg", "ditto."), ("fedrep", "fedrep", ""), ("lg_fedavg", "fedavg", "lg_fedavg."),
        ("hypcluster", "hypcluster", ""), ("knn_per", "fedavg", "knn_per."),
        ("flow_released", "flow_released", "server_model."),
        ("flow_released_ca", "flow_released", "client_adapted."),
        ("flow_local_init", "flow_local_init", "server_model."),
        ("flow_local_init_ca", "flow_local_init", "client_adapted."))
LABELS = {"fedavg": "FedAvg", "fedavg_ft": "FedAvg+FT", "apfl": "APFL", "ditto": "Ditto", "fedrep": "FedRep",
          "lg_fedavg": "LG-FedAvg", "hypcluster": "HypCluster", "knn_per": "kNN-Per",
          "flow_released": "Flow as released (independent copies, fixed split)",
          "flow_released_ca": "Flow as released, client-adapted evaluation",
          "flow_local_init": "Flow, local_init=every_round (fixed split)",
          "flow_local_init_ca": "Flow, local_init=every_round, client-adapted evaluation"}
PLOT_LABELS = {"flow_released": "Flow\nas released", "flow_released_ca": "Flow as released\nclient-adapted",
               "flow_local_init": "Flow\nlocal_init", "flow_local_init_ca": "Flow local_init\nclient-adapted"}
# table.csv has these columns on every row, empty where they do not apply (a task without kinds of instance).
CSV_COLUMNS = ("local_share_changed", "local_share_plain", "local_share_rare", "global_right_local_wrong",
               "global_wrong_local_right")
BASELINES = ("fedavg_ft", "apfl", "ditto", "fedrep", "lg_fedavg", "hypcluster", "knn_per")
FLOW_ROWS = ("flow_released", "flow_released_ca", "flow_local_init", "flow_local_init_ca")


class Settings(NamedTuple):
    lr: float = 0.05
    batch_size: int = 20
    epochs: int = 3
    clients_per_round: int = 10
    regularization: float = 0.01


def evaluated_together(algorithms: dict[str, FederatedAlgorithm]) -> FederatedAlgorithm:
    """The first algorithm's rounds, evaluated by every algorithm in `algorithms` (whose rounds must be the same):
    groups are renamed "<name>.<group>", so the engine logs e.g. "ditto.personalized_accuracy"."""
    def evaluate_client(*args):
        return {f"{name}.{group}": sums for name, algorithm in algorithms.items()
                for group, sums in algorithm.evaluate_client(*args).items()}
    return next(iter(algorithms.values()))._replace(evaluate_client=evaluate_client)


def by_kind(algorithm: FederatedAlgorithm, kinds: tuple[str, ...]) -> FederatedAlgorithm:
    """`algorithm` evaluated on all of a client's held-out instances ("all.<group>") and on those of each kind t
    alone ("<t>.<group>"): the rows tagged t are moved to the front and the count cut to them. The personalization
    is recomputed per kind with the same key, so it is the same model."""
    def evaluate_client(frozen, params, train, train_count, test, test_count, client, key):
        out = {f"all.{g}": s for g, s in algorithm.evaluate_client(frozen, params, train, train_count, test,
                                                                   test_count, client, key).items()}
        rows = jnp.arange(next(iter(test.values())).shape[0])
        for kind in kinds:
            keep = (rows < test_count) & (test[kind] > 0)
            order = jnp.argsort(~keep, stable=True)
            restricted = {k: v[order] for k, v in test.items()}
            groups = algorithm.evaluate_client(frozen, params, train, train_count, restricted,
                                               jnp.sum(keep).astype(test_count.dtype), client, key)
            out.update({f"{kind}.{g}": s for g, s in groups.items()})
        return out
    return algorithm._replace(evaluate_client=evaluate_client)


def build_run(run: str, model: RoutedModel, settings: Settings, instance_groups: tuple[str, ...]
              ) -> FederatedAlgorithm:
    """The algorithm of one run of the table (module docstring)."""
    options = dict(client_optimizer=optax.sgd(settings.lr, momentum=0.9), server_optimizer=optax.sgd(1.0),
                   batch_size=settings.batch_size, local_epochs=settings.epochs, unroll=True)
    if run == "fedavg":
        return evaluated_together({"fedavg_ft": fedavg_ft(model, **options), "ditto": ditto(model, **options),
                                   "lg_fedavg": lg_fedavg(model, **options), "knn_per": knn_per(model, **options)})
    if run in FLOW_RUNS:
        # Straight-line local loops: XLA:CPU runs convolutions inside loop bodies and conds several times slower.
        flows = {evaluation: flow(model, regularization=settings.regularization, evaluation=evaluation,
                                  instance_groups=instance_groups, skip_padding=False, **FLOW_RUNS[run], **options)
                 for evaluation in ("server_model", "client_adapted")}
        return evaluated_together(flows)
    return {"apfl": apfl, "fedrep": fedrep, "hypcluster": hypcluster}[run](model, **options)


class Task(NamedTuple):
    name: str
    spec: TaskSpec
    seed: int
    model: RoutedModel
    train: FederatedData
    test: FederatedData


def load_task(name: str, seed: int) -> Task:
    spec = TASKS[name]
    data = spec.build(seed=seed)
    train_parts, test_parts = vision.client_parts(data)
    train = FederatedData.from_partition(data.inputs("train"), train_parts)
    test = FederatedData.from_partition(data.inputs("test"), test_parts)
    model = routed_models.emnist_cnn(data, jax.random.key(seed), **MODEL_SIZE)
    return Task(name, spec, seed, model, train, test)


def workdir(results: str, task: str, seed: int, run: str) -> str:
    return os.path.join(results, "progress", task, f"seed{seed}", run)


def train(task: Task, run: str, *, rounds: int, eval_every: int, results: str, settings: Settings,
          algorithm: FederatedAlgorithm | None = None) -> simulate.RunResult:
    """Runs (or resumes, or finds finished) `run` on `task` to `rounds`; a finished run's checkpoints are removed."""
    where = workdir(results, task.name, task.seed, run)
    os.makedirs(where, exist_ok=True)
    algorithm = algorithm or build_run(run, task.model, settings, task.spec.instance_groups)
    tick = time.perf_counter()
    result = simulate.run_simulation(algorithm, task.model.states, {}, task.train, task.test, num_rounds=rounds,
                                     clients_per_round=settings.clients_per_round, seed=task.seed,
                                     batch_size=settings.batch_size, strategy="loop", eval_every=eval_every,
                                     checkpoint_every=CHECKPOINT_EVERY, workdir=where, show_progress=False)
    print(f"  {task.name} seed {task.seed} {run}: {rounds} rounds, {time.perf_counter() - tick:.0f} s this time",
          flush=True)
    return result


def finished(results: str, task: str, seed: int, run: str, rounds: int) -> bool:
    return any(r.get("round") == rounds and any(k.endswith("personalized_accuracy") for k in r)
               for r in read_metrics(workdir(results, task, seed, run)))


def drop_checkpoints(results: str, task: str, seed: int, run: str) -> None:
    shutil.rmtree(os.path.join(workdir(results, task, seed, run), "checkpoints"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- diagnostic


def diagnostic(task: Task, params, rounds: int, settings: Settings) -> dict:
    """The reference pair on the held-out splits: FedAvg's global model θ_g (after `rounds`) and each client's
    fine-tuned copy (FedAvg+FT, the same key as the run's last evaluation). Shares of held-out instances where the
    global model is right and the fine-tuned copy wrong (global_right_local_wrong), the reverse, and both
    accuracies, overall and per kind."""
    options = dict(client_optimizer=optax.sgd(settings.lr, momentum=0.9), server_optimizer=optax.sgd(1.0),
                   batch_size=settings.batch_size, local_epochs=settings.epochs, unroll=True)
    algorithm = by_kind(fedavg_ft(task.model, **options), task.spec.instance_groups)
    plan, arrays = simulate.evaluation_arrays(task.train, task.test, None, 20, settings.batch_size, 1)
    evaluate = simulate.build_evaluation(algorithm, plan.chunk_size, plan.num_chunks, None)
    root = jax.random.key(task.seed)
    key = jax.random.fold_in(jax.random.fold_in(root, simulate.EVAL_STREAM), rounds)
    groups = jax.device_get(evaluate({}, params, *arrays, key))
    out = {}
    for kind in ("all", *task.spec.instance_groups):
        v = groups[f"{kind}.versus_global"]
        n = float(v["count"])
        out[kind] = {"instances": n, "global_right_local_wrong": float(v["harmed"]) / n,
                     "global_wrong_local_right": float(v["helped"]) / n,
                     "global_accuracy": float(groups[f"{kind}.generalized"]["correct"]) / n,
                     "finetuned_accuracy": float(groups[f"{kind}.personalized"]["correct"]) / n}
    return out


def curve_budget(curves: dict[str, list[tuple[int, float]]]) -> tuple[int, dict[str, int]]:
    """The smallest evaluated round by which every curve is within BUDGET_TOLERANCE of its best; per curve too."""
    reached = {name: min(r for r, v in points if v >= max(p[1] for p in points) - BUDGET_TOLERANCE)
               for name, points in curves.items()}
    return max(reached.values()), reached


def curve_points(results: str, task: str, run: str, key: str) -> list[tuple[int, float]]:
    return [(r["round"], r[key]) for r in read_metrics(workdir(results, task, 0, run)) if key in r]


# -------------------------------------------------------------------------------------------------- the table


def rows_of(task: str, seed: int, run: str, record: dict, clients: int, instances: int,
            groups: tuple[str, ...], reference: dict) -> list[dict]:
    """Table rows from a run's record at the budget; counts from the logged fractions. `reference` is the task's
    diagnostic on the reference pair (diagnostic.json's "all"), copied onto every row of the task."""
    rows = []
    for name, source, prefix in ROWS:
        if source != run:
            continue
        get = lambda key: record[prefix + key]
        row = {"task": task, "seed": seed, "algorithm": name,
               "generalized_accuracy": get("generalized_accuracy"),
               "personalized_accuracy": get("personalized_accuracy"),
               "instances_helped": round(get("versus_global_helped") * instances),
               "instances_harmed": round(get("versus_global_harmed") * instances),
               "clients_helped": round(get("clients_helped") * clients),
               "clients_harmed": round(get("clients_harmed") * clients),
               "global_right_local_wrong": reference["global_right_local_wrong"],
               "global_wrong_local_right": reference["global_wrong_local_right"],
               "train_run_seconds": record.get("wall_time", float("nan"))}
        if name == "fedavg":   # no personalization: the global model itself
            row.update(personalized_accuracy=row["generalized_accuracy"], instances_helped=0, instances_harmed=0,
                       clients_helped=0, clients_harmed=0)
        if name in FLOW_ROWS:
            for k in range(4):
                row[f"routed_local_{k}"] = get(f"routing_local_{k}")
            for kind in groups:
                shares = [get(f"routing_{kind}_local_{k}") for k in range(4)]
                row[f"local_share_{kind}"] = float(np.mean(shares))
                for k, share in enumerate(shares):
                    row[f"routed_local_{kind}_{k}"] = share
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean (and std for accuracies) over seeds, per task and row, in table order."""
    out = []
    for task in TASKS:
        for name, _, _ in ROWS:
            mine = [r for r in rows if r["task"] == task and r["algorithm"] == name]
            if not mine:
                continue
            row = {"task": task, "algorithm": name, "seeds": len(mine)}
            for key in mine[0]:
                if key in ("task", "seed", "algorithm"):
                    continue
                values = np.array([r.get(key, np.nan) for r in mine], dtype=float)
                row[key] = float(values.mean())
                if key.endswith("accuracy"):
                    row[key + "_std"] = float(values.std())
            out.append(row)
    return out


def markdown(summary: list[dict], task: str, clients: int, instances: int) -> str:
    pm = lambda r, k: f"{r[k]:.4f} ± {r[k + '_std']:.4f}"
    share = lambda r, k: f"{r[k]:.2f}" if k in r and np.isfinite(r[k]) else ""
    rows = [{"algorithm": LABELS[r["algorithm"]], "seeds": r["seeds"],
             "generalized acc.": pm(r, "generalized_accuracy"),
             "personalized acc.": pm(r, "personalized_accuracy"),
             "instances helped / harmed": f"{r['instances_helped']:.1f} / {r['instances_harmed']:.1f}",
             "clients helped / harmed": f"{r['clients_helped']:.1f} / {r['clients_harmed']:.1f}",
             "routed to local (points 1-4)": " ".join(f"{r[f'routed_local_{k}']:.2f}" for k in range(4))
             if "routed_local_0" in r else "",
             "local share changed / plain / rare": " / ".join(share(r, f"local_share_{k}")
                                                             for k in ("changed", "plain", "rare"))
             if "local_share_changed" in r else ""}
            for r in summary if r["task"] == task]
    empty = [k for k in rows[0] if all(row[k] == "" for row in rows)]       # e.g. no kinds of instance
    rows = [{k: v for k, v in row.items() if k not in empty} for row in rows]
    return (format_table(rows) + f"\n\nMeans over the seeds shown (± std of the accuracies over seeds); counts are "
            f"per seed, out of {instances} held-out instances and {clients} clients.")


def verdict(summary: list[dict], task: str) -> list[str]:
    by = {r["algorithm"]: r for r in summary if r["task"] == task}
    lines = []
    for name in FLOW_ROWS:
        if name not in by:
            continue
        acc = by[name]["personalized_accuracy"]
        beaten = [f"{LABELS[b]} {by[b]['personalized_accuracy']:.4f}" for b in ("fedavg", *BASELINES)
                  if b in by and by[b]["personalized_accuracy"] >= acc]
        line = (f"{LABELS[name]}: personalized {acc:.4f} ± {by[name]['personalized_accuracy_std']:.4f}; "
                + (f"not above {', '.join(beaten)}" if beaten else "above every baseline"))
        if "local_share_changed" in by[name]:
            gap = by[name]["local_share_changed"] - by[name]["local_share_plain"]
            line += (f"; routed to local: changed {by[name]['local_share_changed']:.2f}, plain "
                     f"{by[name]['local_share_plain']:.2f} ({round(100 * gap) + 0:+d} points; goal ≥ 20)")
        lines.append(line)
    return lines


def plot(summary: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in TASKS if any(r["task"] == t for r in summary)]
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 4 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        mine = [r for r in summary if r["task"] == task]
        x = np.arange(len(mine))
        for offset, key, label in ((-0.2, "generalized_accuracy", "generalized (global path)"),
                                   (0.2, "personalized_accuracy", "personalized")):
            ax.bar(x + offset, [r[key] for r in mine], 0.4, yerr=[r[key + "_std"] for r in mine], capsize=3,
                   label=label)
        low = min(min(r["generalized_accuracy"], r["personalized_accuracy"]) for r in mine)
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        ax.set_xticks(x, [PLOT_LABELS.get(r["algorithm"], LABELS[r["algorithm"]]) for r in mine], fontsize=7)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(task)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def diagnostic_lines(name: str, measured: dict) -> list[str]:
    """The reference pair's diagnostic (diagnostic.json) as markdown lines, overall and per kind of instance."""
    spec = TASKS[name]
    share = measured["diagnostic"]["all"]["global_right_local_wrong"]
    verdict = "" if spec.min_diagnostic is None else (
        f" (the task needs ≥ {spec.min_diagnostic:.2f}: " + ("met)" if share >= spec.min_diagnostic else "not met)"))
    lines = [f"Reference pair ({measured['reference']}), held-out instances where the global model is right and "
             f"the fine-tuned copy wrong / the reverse{verdict}:", ""]
    lines += [f"- {kind} ({v['instances']:.0f} instances): {v['global_right_local_wrong']:.3f} / "
              f"{v['global_wrong_local_right']:.3f}; accuracy global {v['global_accuracy']:.3f}, fine-tuned "
              f"{v['finetuned_accuracy']:.3f}" for kind, v in measured["diagnostic"].items()]
    return lines


def curve_progress(results: str, task: str, measured: dict, clients: int, instances: int) -> list[str]:
    """Markdown lines for a task whose diagnostic is met but whose seed 0 curves are unfinished (no budget yet):
    each curve run's rows at the last round it has evaluated, seed 0 only."""
    rows, reached = [], []
    for run in CURVE_RUNS:
        record = next((r for r in reversed(read_metrics(workdir(results, task, 0, run)))
                       if any(k.endswith("personalized_accuracy") for k in r)), None)
        if record is not None:
            rows += rows_of(task, 0, run, record, clients, instances, TASKS[task].instance_groups,
                            measured["diagnostic"]["all"])
            reached.append(f"{run} {record['round']}")
    lines = ["", f"## {task}: diagnostic met, seed 0's curves unfinished (no round budget yet)", ""]
    if rows:
        lines += [f"Seed 0 only, each run at the last round it has evaluated ({', '.join(reached)}), not at a "
                  f"budget; the other runs and seeds follow the budget.", "",
                  markdown(summarize(rows), task, clients, instances), "",
                  *(f"- {line}" for line in verdict(summarize(rows), task)), ""]
    return lines + diagnostic_lines(task, measured)


def write_table(results: str, settings: Settings, seeds: list[int]) -> list[str]:
    """table.md, table.csv and accuracy.png from every finished (task, seed, run) at its task's budget; a task
    stopped at its diagnostic is listed with the diagnostic only, and a task without a budget yet with seed 0's
    curve runs at their last evaluated round (table.md only)."""
    rows, sizes, sections = [], {}, []
    for task in TASKS:
        measured = read_json(os.path.join(results, task, "diagnostic.json"))
        budget = (read_json(os.path.join(results, task, "budget.json")) or {}).get("budget")
        if measured is None:
            continue
        minimum = TASKS[task].min_diagnostic
        if minimum is not None and measured["diagnostic"]["all"]["global_right_local_wrong"] < minimum:
            sections += ["", f"## {task}: stopped at the diagnostic, no Flow run", "",
                         *diagnostic_lines(task, measured)]
            continue
        data = TASKS[task].build(seed=0)
        sizes[task] = (int(data.test["client"].max()) + 1, len(data.test["label"]))
        if budget is None:
            sections += curve_progress(results, task, measured, *sizes[task])
            continue
        done = []
        for seed in seeds:
            for run in RUNS:
                record = next((r for r in read_metrics(workdir(results, task, seed, run))
                               if r.get("round") == budget and any(k.endswith("personalized_accuracy") for k in r)),
                              None)
                if record is not None:
                    done += rows_of(task, seed, run, record, *sizes[task], TASKS[task].instance_groups,
                                    measured["diagnostic"]["all"])
        rows += done
        if done:
            sections += ["", f"## {task}: {budget} rounds", "", markdown(summarize(done), task, *sizes[task]), "",
                         *(f"- {line}" for line in verdict(summarize(done), task)), "",
                         *diagnostic_lines(task, measured)]
    if not sections:
        return []
    lines = [f"Flow table: {settings.clients_per_round} clients per round, {settings.epochs} local epochs, batch "
             f"{settings.batch_size}, SGD lr {settings.lr} momentum 0.9, Flow λ = {settings.regularization}, "
             f"β = ½; routed CNN conv 8 → 16, dense 64, policy 784 → 64 → 32 → 16 (28×28) / 64 → 64 → 32 → 16 "
             f"(8×8). Rounds per task: the budget chosen from seed 0's curves (<task>/budget.json).", *sections]
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if rows:
        summary = summarize(rows)
        fields = list(dict.fromkeys([*(k for r in rows + summary for k in r), *CSV_COLUMNS]))
        with open(os.path.join(results, "table.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows + [{**r, "seed": "mean"} for r in summary])
        plot(summary, os.path.join(results, "accuracy.png"))
    return lines


# --------------------------------------------------------------------------------------------------- phases


def task_budget(name: str, results: str, settings: Settings) -> int | None:
    """Steps 1 and 2 of the module docstring for task `name` (seed 0): its budget, or None if it stopped at the
    diagnostic."""
    spec = TASKS[name]
    folder = os.path.join(results, name)
    os.makedirs(folder, exist_ok=True)
    budget_file, diagnostic_file = os.path.join(folder, "budget.json"), os.path.join(folder, "diagnostic.json")
    if os.path.exists(budget_file):
        with open(budget_file) as f:
            return json.load(f)["budget"]
    task = load_task(name, 0)
    if not os.path.exists(diagnostic_file):
        result = train(task, "fedavg", rounds=spec.curve_rounds, eval_every=CURVE_EVERY, results=results,
                       settings=settings)
        measured = diagnostic(task, result.state.params, spec.curve_rounds, settings)
        record = {"task": name, "reference": f"FedAvg seed 0 after {spec.curve_rounds} rounds and FedAvg+FT",
                  "command": "python experiments/flow_table.py", "diagnostic": measured,
                  "curve": [{"round": r["round"], "global_right_local_wrong": r["fedavg_ft.versus_global_harmed"],
                             "global_wrong_local_right": r["fedavg_ft.versus_global_helped"]}
                            for r in read_metrics(workdir(results, name, 0, "fedavg"))
                            if "fedavg_ft.versus_global_harmed" in r]}
        with open(diagnostic_file, "w") as f:
            json.dump(record, f, indent=1)
        print(f"  {name} diagnostic: {json.dumps(measured)}", flush=True)
    with open(diagnostic_file) as f:
        share = json.load(f)["diagnostic"]["all"]["global_right_local_wrong"]
    if spec.min_diagnostic is not None and share < spec.min_diagnostic:
        print(f"  {name}: global right / fine-tuned wrong on {share:.3f} of held-out instances, below "
              f"{spec.min_diagnostic}: change the task before any Flow run", flush=True)
        return None
    for run in CURVE_RUNS:
        if not finished(results, name, 0, run, spec.curve_rounds):
            train(task, run, rounds=spec.curve_rounds, eval_every=CURVE_EVERY, results=results, settings=settings)
        drop_checkpoints(results, name, 0, run)
    curves = {"fedavg generalized": curve_points(results, name, "fedavg", "fedavg_ft.generalized_accuracy"),
              **{f"{run} personalized": curve_points(results, name, run, "server_model.personalized_accuracy")
                 for run in FLOW_RUNS}}
    budget, reached = curve_budget(curves)
    rounds = sorted({r for points in curves.values() for r, _ in points})
    with open(os.path.join(folder, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", *curves])
        for r in rounds:
            writer.writerow([r, *(dict(points).get(r, "") for points in curves.values())])
    with open(budget_file, "w") as f:
        json.dump({"budget": budget, "rule": f"smallest evaluated round by which each curve is within "
                   f"{BUDGET_TOLERANCE} of its best", "reached": reached}, f, indent=1)
    print(f"  {name}: budget {budget} rounds ({reached})", flush=True)
    return budget


def run_table(tasks: list[str], seeds: list[int], results: str, settings: Settings, deadline: float) -> None:
    budgets = {}
    for seed in seeds:
        for name in tasks:
            if time.time() > deadline:
                print("stopped at the time limit; the same command continues", flush=True)
                return
            if name not in budgets:
                budgets[name] = task_budget(name, results, settings)
            budget = budgets[name]
            if budget is None:
                continue
            task = None
            for run in RUNS:
                if time.time() > deadline:
                    print("stopped at the time limit; the same command continues", flush=True)
                    return
                curve = seed == 0 and run in CURVE_RUNS
                rounds = TASKS[name].curve_rounds if curve else budget
                if not finished(results, name, seed, run, rounds):
                    task = task or load_task(name, seed)
                    train(task, run, rounds=rounds, eval_every=CURVE_EVERY if curve else rounds, results=results,
                          settings=settings)
                drop_checkpoints(results, name, seed, run)
                write_table(results, settings, seeds)


def timing(tasks: list[str], runs: list[str], settings: Settings, results: str) -> None:
    """One round of each run after its compile, and one full evaluation, on seed 0: seconds of wall and CPU time,
    and the table's estimate (3 seeds, curves to curve_rounds on seed 0)."""
    report = {}
    for name in tasks:
        task = load_task(name, 0)
        spec = TASKS[name]
        for run in runs:
            algorithm = build_run(run, task.model, settings, spec.instance_groups)
            plan = simulate.plan_round("loop", settings.clients_per_round, 1)
            round_fn = simulate.build_round(algorithm, plan, None, unroll=True)
            # the round donates the state: copies, so that no buffer is the model's or appears twice (APFL's w, v)
            state = jax.tree.map(jnp.array, algorithm.init(task.model.states, jax.random.key(0)))
            times = []
            for r in range(3):
                cohort = simulate.sample_cohort(0, r + 1, task.train.num_clients, settings.clients_per_round)
                arrays, counts = task.train.gather(cohort, batch_size=settings.batch_size)
                lengths = task.train.gather_lengths(cohort, batch_size=settings.batch_size)
                wall, cpu = time.perf_counter(), time.process_time()
                state, metrics = round_fn(state, {}, arrays, counts, jax.random.key(r), lengths=lengths)
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - wall, time.process_time() - cpu))
            plan_e, arrays_e = simulate.evaluation_arrays(task.train, task.test, None, 20, settings.batch_size, 1)
            evaluate = simulate.build_evaluation(algorithm, plan_e.chunk_size, plan_e.num_chunks, None)
            broadcast = algorithm.broadcast(state)
            evals = []
            for _ in range(2):
                wall, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(evaluate({}, broadcast, *arrays_e, jax.random.key(1)))
                evals.append((time.perf_counter() - wall, time.process_time() - cpu))
            report[f"{name}/{run}"] = {"first_round_wall_s": times[0][0], "round_wall_s": min(t[0] for t in times[1:]),
                                       "round_cpu_s": min(t[1] for t in times[1:]),
                                       "first_evaluation_wall_s": evals[0][0], "evaluation_wall_s": evals[1][0],
                                       "evaluation_cpu_s": evals[1][1]}
            print(f"  {name} {run}: {json.dumps({k: round(v, 2) for k, v in report[f'{name}/{run}'].items()})}",
                  flush=True)
    path = os.path.join(results, "timing.json")
    if os.path.exists(path):
        with open(path) as f:
            report = {**json.load(f), **report}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", default="results/flow")
    parser.add_argument("--stop-after-minutes", type=float, default=None,
                        help="start no new run after this long (a run in progress finishes; rerun to continue)")
    parser.add_argument("--timing", action="store_true", help="time one round and one evaluation of each run")
    parser.add_argument("--runs", default=",".join(RUNS), help="with --timing: the runs to time")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from finished runs")
    parser.add_argument("--compile-cache", default=os.path.expanduser("~/.cache/spryjax/jax"),
                        help="JAX's persistent compilation cache: later seeds and reruns skip XLA compiles")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise InputError(f"--tasks: unknown {', '.join(unknown)}; known: {', '.join(TASKS)}")
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    os.makedirs(args.results, exist_ok=True)
    settings, seeds = Settings(), [int(s) for s in args.seeds.split(",")]
    if args.timing:
        timing(tasks, args.runs.split(","), settings, args.results)
        return 0
    if not args.table_only:
        deadline = time.time() + 60 * args.stop_after_minutes if args.stop_after_minutes else float("inf")
        run_table(tasks, seeds, args.results, settings, deadline)
    lines = write_table(args.results, settings, seeds)
    print(*lines, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/flow_table.py"))
