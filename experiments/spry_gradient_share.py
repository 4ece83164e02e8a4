"""Where the gradient lives on the offline Spry task (configs/spry_rt_minilm.py: LoRA r=1 on MiniLM-L6's query and
value, a linear head): each of Spry's chunks' share of ‖∇L‖², at initialization and after FedAvg rounds.

Spry deals its chunks (2 consecutive tensors in layer order: one LoRA A/B pair, or the head's kernel and bias) to
the cohort's slots, and each client estimates the gradient of its own chunk only. A chunk's share of the squared
gradient norm says how much of the signal its client can find: with LoRA's B = 0 at initialization, every A's
gradient is exactly zero and the head holds nearly all of ‖∇L‖², so one client in ten carries it.

The gradient is the exact (backprop) gradient of the mean loss over the training examples of round 1's cohort
(`spry.chunk_gradient_shares`, deterministic: no dropout), at the initial parameters and after `--rounds` rounds of
the config's FedAvg method (`spryjax.fl.simulate.run_simulation`); the cohort and the chunks are the Spry
method's (10 clients, chunks of 2 tensors, the head dealt like any chunk).

    python experiments/spry_gradient_share.py [--rounds 30] [--out results/spry]

Writes OUT/gradient_share.md (the table) and OUT/gradient_share.json (per-chunk and per-tensor shares).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build  # noqa: E402
from spryjax.errors import ArgumentParser, run_command  # noqa: E402
from spryjax.fl import simulate  # noqa: E402
from spryjax.fl.algorithms.spry import assign_tensors, chunk_gradient_shares  # noqa: E402
from spryjax.metrics import format_table  # noqa: E402
from spryjax.pytrees import leaf_paths  # noqa: E402
from spryjax.runners import federated  # noqa: E402

GRADIENT_BATCH = 64   # examples per backprop pass (the mean loss does not depend on it)


def cohort_batches(train, ids, batch_size: int) -> list[dict]:
    """The real training examples of clients `ids`, in batches of `batch_size` with a mask (the last one padded)."""
    arrays, counts = train.gather(ids, batch_size=1)
    real = np.arange(next(iter(arrays.values())).shape[1])[None, :] < counts[:, None]
    rows = {k: v[real] for k, v in arrays.items()}
    total = len(next(iter(rows.values())))
    batches = []
    for start in range(0, total, batch_size):
        take = np.arange(start, start + batch_size)
        batch = {k: v[np.minimum(take, total - 1)] for k, v in rows.items()}
        batches.append({**batch, "mask": (take < total).astype(np.float32)})
    return batches


def chunk_name(paths: list[str]) -> str:
    """"layers/3/value" for a LoRA pair, "head/out" for the head."""
    return os.path.commonpath(paths) if len(paths) > 1 else paths[0]


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="FedAvg rounds before the second measurement")
    parser.add_argument("--out", default="results/spry")
    args = parser.parse_args()
    start = time.perf_counter()

    spry_section = spry_rt_minilm.get_config("spry")
    config = spry_rt_minilm.get_config("fedavg")
    config.num_rounds = args.rounds
    config.fl.eval_every, config.fl.checkpoint_every = 0, 0
    federated.check_federated(config)
    built = federated.setup(config)
    order, _ = build.tensor_layout(built.params)
    paths = leaf_paths(built.params)
    num_tensors, cohort_size = len(paths), config.fl.clients_per_round
    per_chunk = spry_section.algorithm.tensors_per_chunk
    num_chunks = -(-num_tensors // per_chunk)
    chunks = assign_tensors(num_tensors, num_chunks, tensors_per_chunk=per_chunk, tensor_order=order)   # [J, T]
    slots = assign_tensors(num_tensors, cohort_size, tensors_per_chunk=per_chunk, tensor_order=order)   # [C, T]
    ids = simulate.sample_cohort(config.seed, 1, built.clients.train.num_clients, cohort_size)
    batches = cohort_batches(built.clients.train, ids, GRADIENT_BATCH)
    examples = int(sum(b["mask"].sum() for b in batches))
    print(f"{num_tensors} tensors in {num_chunks} chunks over {cohort_size} slots; cohort {ids.tolist()}: "
          f"{examples} training examples", flush=True)

    # per-tensor shares (identity chunks) once per point; a chunk's share is the sum of its tensors'
    tensor_shares = {"initialization": chunk_gradient_shares(built.task, built.params, built.frozen, batches,
                                                             np.eye(num_tensors, dtype=bool))}
    print(f"initialization: {time.perf_counter() - start:.0f} s", flush=True)
    algorithm = build.algorithm(config.algorithm, built.task, built.params, cohort_size)
    result = simulate.run_simulation(algorithm, built.params, built.frozen, built.clients.train,
                                     built.clients.test, seed=config.seed, show_progress=True,
                                     **federated.engine_options(config))
    trained = f"after {args.rounds} FedAvg rounds"
    tensor_shares[trained] = chunk_gradient_shares(built.task, result.state.params, built.frozen, batches,
                                                   np.eye(num_tensors, dtype=bool))
    final_loss = result.history[-1].get("train_loss") if result.history else None

    rows = []
    for j, row in enumerate(chunks):
        members = [paths[t] for t in order if row[t]]
        entry = {"chunk": j, "tensors": chunk_name(members), "slot": int(np.flatnonzero(slots[:, row].all(axis=1))[0])}
        entry.update({f"share {when} (%)": 100 * float(shares[row].sum()) for when, shares in tensor_shares.items()})
        rows.append(entry)
    groups = {"head": lambda p: p.startswith("head/"), "LoRA A": lambda p: p.endswith("lora_a"),
              "LoRA B": lambda p: p.endswith("lora_b")}
    totals = [{"chunk": "", "tensors": f"all {name}", "slot": "",
               **{f"share {when} (%)": 100 * float(sum(s for p, s in zip(paths, shares) if test(p)))
                  for when, shares in tensor_shares.items()}} for name, test in groups.items()]
    table = format_table(rows + totals, floatfmt=".6g")
    header = (f"Share of ‖∇L‖² per Spry chunk (exact gradient of the mean loss over round 1's cohort, {examples} "
              f"training examples; configs/spry_rt_minilm.py, seed {config.seed}, α = {config.fl.alpha}). "
              f"FedAvg: the config's `fedavg` method, {args.rounds} rounds"
              + (f", final train loss {final_loss:.4f}" if final_loss is not None else "") + ".\n\n"
              f"Command: python experiments/spry_gradient_share.py --rounds {args.rounds} --out {args.out}\n")
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradient_share.md"), "w") as f:
        f.write(header + "\n" + table + "\n")
    with open(os.path.join(args.out, "gradient_share.json"), "w") as f:
        json.dump({"rounds": args.rounds, "seed": config.seed, "alpha": config.fl.alpha, "cohort": ids.tolist(),
                   "examples": examples, "final_train_loss": final_loss, "chunks": rows, "totals": totals,
                   "tensor_shares": {when: dict(zip(paths, map(float, shares)))
                                     for when, shares in tensor_shares.items()}}, f, indent=1)
    print(f"\n{time.perf_counter() - start:.0f} s; wrote {args.out}/gradient_share.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_gradient_share.py"))
