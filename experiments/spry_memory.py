"""The Spry paper's memory figure: per-client step peak memory of each method, split into parameters /
activations / gradients + optimizer state, at MiniLM-L6, RoBERTa-large, Llama2-7B and OPT-13B shapes.

Every step is the method's real client update (`FederatedAlgorithm.client_update`, one local step on a batch of 8
sequences of 64 tokens, LoRA r=1 on query/value plus a 2-way head, fp32 base), compiled without allocating anything
(parameters and batch are ShapeDtypeStructs), so the 7B and 13B shapes run on a laptop. Memory is XLA's buffer
assignment: peak = arguments + outputs + temporaries − aliases. The split is an accounting of that peak:

    parameters        frozen base + trainable adapters (what every method holds)
    grads + opt       the trainable tree once per gradient buffer and optimizer slot (AdamW: 3×, SGD: 1×,
                      FedSGD-shaped estimators that upload scalars: 1×)
    activations       the rest: activations, tangents, perturbation buffers, scratch

The paper's bases were 4-bit GPTQ; ours are fp32, so parameters weigh ~8× more here and ratios on the total are
smaller than the paper's for the same activation savings.

    python experiments/spry_memory.py [--shapes minilm-l6,roberta-large,llama2-7b,opt-13b] [--out results/memory]
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from spryjax import build, lm_tasks, peft
from spryjax.pytrees import tree_bytes
from spryjax.memory import MIB, compiled_memory
from spryjax.metrics import format_table
from spryjax.models import preset
from spryjax.plots import stacked_bars
from spryjax.task import classification_task
from spryjax.errors import ArgumentParser, run_command

from configs import spry_rt_minilm

# label -> (configs/spry_rt_minilm method, overrides, gradient/optimizer copies of the trainable tree)
METHODS = {
    "backprop (FedAvg)": ("fedavg", {}, 3),
    "Spry K=1": ("spry", {"num_tangents": 1}, 3),
    "Spry K=10": ("spry", {"num_tangents": 10, "tangent_chunk_size": 1}, 3),
    "FedMeZO": ("fedmezo", {}, 1),
    "BAFFLE": ("baffle", {}, 1),
    "FwdLLM": ("fwdllm", {}, 1),
}
BATCH, SEQ = 8, 64


def measure(shape: str) -> list[dict]:
    peft_config = peft.PeftConfig(method="lora", rank=1, alpha=1.0, dropout=0.0)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(preset(shape), 2, peft_config, jax.random.key(0),
                                                         shapes_only=True)
    task = classification_task(logits_fn, 2)
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    data = {"input_ids": ids, "attention_mask": ids, "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    count = jax.ShapeDtypeStruct((), jnp.int32)
    params_bytes = tree_bytes(frozen) + tree_bytes(trainable)
    rows = []
    for label, (method, overrides, copies) in METHODS.items():
        config = spry_rt_minilm.get_config(method).algorithm
        config.update(overrides)
        algorithm = build.algorithm(config, task, trainable, clients_per_round=10)
        step = lambda f, p, d, n: algorithm.client_update(f, algorithm.broadcast(algorithm.init(p, None)), d, n,
                                                          jnp.int32(0), jax.random.key(0))
        tick = time.perf_counter()
        report = compiled_memory(step, frozen, trainable, data, count)
        grads_opt = copies * tree_bytes(trainable)
        rows.append({"shape": shape, "method": label, "total_MiB": report.total / MIB,
                     "parameters_MiB": params_bytes / MIB, "grads_opt_MiB": grads_opt / MIB,
                     "activations_MiB": max(report.total - params_bytes - grads_opt, 0) / MIB,
                     "temp_MiB": report.temp / MIB, "compile_s": time.perf_counter() - tick})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    backprop = rows[0]["total_MiB"]
    for row in rows:
        row["backprop_over_this"] = backprop / row["total_MiB"]
    return rows


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm-l6,roberta-large,llama2-7b,opt-13b")
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in args.shapes.split(","):
        rows += measure(shape)
    columns = ["shape", "method", "total_MiB", "parameters_MiB", "activations_MiB", "grads_opt_MiB", "temp_MiB",
               "backprop_over_this"]
    table = format_table(rows, columns, floatfmt=".1f")
    with open(os.path.join(args.out, "spry_memory.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "spry_memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot = stacked_bars(rows, os.path.join(args.out, "spry_memory.png"),
                        parts=("parameters_MiB", "activations_MiB", "grads_opt_MiB"))
    print(table)
    print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_memory.py"))
