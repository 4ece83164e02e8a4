"""Engine throughput: rounds/s, client-steps/s and compiled memory of each client-execution strategy, side by side
with a sequential per-client, per-step jit loop (the default backend style of fedjax's `for_each_client`).

Workloads (FedAvg, client SGD lr 0.1, one local epoch, batch 10, clients of 50 examples: 5 steps per client):
  cnn  the 2-layer CNN of pfl-research's CIFAR-10 benchmark on synthetic 32×32×3 images (the peers' workload)
  mlp  a 64-32-10 MLP on scikit-learn's 8×8 digits (clients sample 50 digits each)

    python scripts/bench_throughput.py [--models cnn,mlp] [--cohorts 10,100,1000,4096]
                                       [--strategies reference,loop,chunked:8,chunked:64,vmap,auto] [--json OUT]
    (loop:N keeps N clients in flight on host threads; chunked:N vmaps N clients per chunk)
    python scripts/bench_throughput.py --peer-workload      # the peers' exact setting: 1000 clients, 50 per round

Each configuration runs one untimed round (compilation) and then `--rounds` timed rounds (1 for cohorts ≥ 1000);
the median is reported. Memory is XLA's compiled total (arguments + outputs + temporaries − aliases) of the
jitted round, or of the jitted client step for loops, so it is deterministic. "vmap" is skipped where its compiled
round would exceed --max-vmap-gib.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax.data import vision
from spryjax.data.dataset import Dataset
from spryjax.data.federated import FederatedData
from spryjax.fl import mesh as mesh_lib, simulate
from spryjax.fl.algorithms.fedavg import fedavg
from spryjax.memory import MIB, memory_of
from spryjax.metrics import format_table
from spryjax.models import small
from spryjax.errors import ArgumentParser, run_command

PER_CLIENT, BATCH, LR = 50, 10, 0.1


def workload(model: str, num_clients: int, seed: int = 0):
    """(task, params, FederatedData) with `num_clients` clients of 50 examples."""
    if model == "cnn":
        data = small.synthetic_images(seed=seed, num_clients=num_clients, per_client=PER_CLIENT)
        task, params, _ = small.cnn_model(data, jax.random.key(seed))
    else:
        x, y = vision.load_sklearn_digits()
        pick = np.random.default_rng(seed).integers(0, len(y), num_clients * PER_CLIENT)
        split = {"x": x[pick].reshape(len(pick), -1), "label": y[pick]}
        data = Dataset("digits_clients", split, {k: v[:0] for k, v in split.items()}, 10)
        task, params, _ = small.mlp_model(data, jax.random.key(seed), hidden=(32,))
    parts = np.arange(num_clients * PER_CLIENT).reshape(num_clients, PER_CLIENT)
    return task, params, FederatedData.from_partition(data.inputs(), list(parts))


def reference_round_fn(task, lr):
    """fedjax-style: a Python loop over clients and over their batches, one jitted SGD step per batch."""
    @jax.jit
    def sgd_step(params, batch):
        grads = jax.grad(task.loss)(params, {}, batch, None)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)

    add = jax.jit(lambda acc, params, n: jax.tree.map(lambda a, p: a + n * p, acc, params))

    def round_fn(params, arrays, counts, key):
        total = jax.tree.map(jnp.zeros_like, params)
        for c in range(len(counts)):
            order = np.random.default_rng([int(jax.random.randint(key, (), 0, 2**30)), c]).permutation(counts[c])
            local = params
            for b in range(0, counts[c], BATCH):
                idx = order[b:b + BATCH]
                local = sgd_step(local, {"x": arrays["x"][c, idx], "label": arrays["label"][c, idx],
                                         "mask": np.ones(len(idx), np.float32)})
            total = add(total, local, float(counts[c]))
        return jax.tree.map(lambda t: t / float(np.sum(counts)), total)
    return round_fn, sgd_step


def measure(model: str, cohort: int, strategy: str, data, task, params, rounds: int, max_vmap_gib: float) -> dict:
    row = {"model": model, "clients": cohort, "strategy": strategy}
    steps = cohort * PER_CLIENT // BATCH
    ids = [simulate.sample_cohort(0, r, data.num_clients, cohort) for r in range(rounds + 1)]
    if strategy == "reference":
        round_fn, sgd_step = reference_round_fn(task, LR)
        sample = {"x": data.arrays["x"][:BATCH], "label": data.arrays["label"][:BATCH], "mask": np.ones(BATCH, "f4")}
        row["memory_MiB"] = memory_of(sgd_step.lower(params, sample).compile()).total / MIB
        times = []
        for r in range(rounds + 1):
            arrays, counts = data.gather(ids[r], batch_size=BATCH)
            tick = time.perf_counter()
            jax.block_until_ready(round_fn(params, arrays, counts, jax.random.key(r)))
            times.append(time.perf_counter() - tick)
    else:
        algorithm = fedavg(task, client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0), batch_size=BATCH,
                           unroll=True)
        name, _, chunk = strategy.partition(":")
        mesh = mesh_lib.client_mesh(jax.local_devices()[:1])
        step = simulate.client_step_cost(algorithm, {}, params, data, BATCH)
        plan = simulate.plan_round(name, cohort, 1, client_chunk_size=int(chunk) if chunk else None, step=step)
        width = plan.in_flight if plan.strategy == "loop" else plan.chunk_size
        row["strategy"] = strategy if name != "auto" else f"auto→{plan.strategy}" + (f":{width}" if width > 1 else "")
        round_mesh = None if plan.strategy == "loop" else mesh
        round_fn = simulate.build_round(algorithm, plan, round_mesh)  # local steps unrolled, chunk scan rolled
        state = simulate.place(algorithm.init(params, None), round_mesh, clients_axis=None)
        frozen = simulate.place({}, round_mesh, clients_axis=None)

        def cohort_arrays(r):
            arrays, counts = data.gather(ids[r], batch_size=BATCH)
            if plan.strategy == "loop":
                return arrays, counts
            arrays, counts = simulate.chunked(arrays, counts, plan)
            return (simulate.place(arrays, round_mesh, clients_axis=1),
                    simulate.place(counts, round_mesh, clients_axis=1))

        if plan.strategy == "loop":
            row["memory_MiB"] = step.memory.total / MIB
        else:
            arrays, counts = cohort_arrays(0)
            compiled = round_fn.lower(state, frozen, arrays, counts, jax.random.key(0)).compile()
            row["memory_MiB"] = memory_of(compiled).total / MIB
            if plan.strategy == "vmap" and row["memory_MiB"] > max_vmap_gib * 1024:
                return {**row, "rounds_per_s": float("nan"), "client_steps_per_s": float("nan"),
                        "note": "does not fit"}
        times = []
        for r in range(rounds + 1):
            arrays, counts = cohort_arrays(r)
            tick = time.perf_counter()
            state, metrics = round_fn(state, frozen, arrays, counts, jax.random.key(r))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - tick)
    median = statistics.median(times[1:])
    return {**row, "rounds_per_s": 1 / median, "client_steps_per_s": steps / median, "round_s": median}


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--cohorts", default="10,100,1000,4096")
    parser.add_argument("--strategies", default="reference,loop,chunked:8,chunked:64,vmap,auto")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (cohorts ≥ 1000: 1)")
    parser.add_argument("--max-vmap-gib", type=float, default=16.0)
    parser.add_argument("--peer-workload", action="store_true",
                        help="fedjax/pfl/Flower/PyTorch benchmark setting: cnn, 1000 clients, 50 per round, 10 rounds")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.peer_workload:
        args.models, args.cohorts, args.rounds = "cnn", "50", 10
    rows = []
    for model in args.models.split(","):
        cohorts = [int(c) for c in args.cohorts.split(",")]
        task, params, data = workload(model, max(1000, max(cohorts)))
        for cohort in cohorts:
            for strategy in args.strategies.split(","):
                rounds = 1 if cohort >= 1000 else args.rounds
                row = measure(model, cohort, strategy, data, task, params, rounds, args.max_vmap_gib)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    reference = {(r["model"], r["clients"]): r["client_steps_per_s"] for r in rows if r["strategy"] == "reference"}
    for r in rows:
        if (r["model"], r["clients"]) in reference:
            r["vs_reference"] = r["client_steps_per_s"] / reference[(r["model"], r["clients"])]
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
    print(format_table(rows, ["model", "clients", "strategy", "rounds_per_s", "client_steps_per_s", "vs_reference",
                              "memory_MiB", "note"], floatfmt=".3g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/bench_throughput.py"))
