"""The Spry paper's memory figure, with compute: per-client step peak memory of each method, split into
parameters / activations / gradients + optimizer state, and the FLOPs of a step and of a round, at MiniLM-L6,
RoBERTa-large, Llama2-7B and OPT-13B shapes, for fp32 and bf16 frozen bases.

Every step is the method's real client update (`FederatedAlgorithm.client_update`, one local step on a batch of 8
sequences of 64 tokens, LoRA r=1 on query/value plus a 2-way head), compiled without allocating anything
(parameters and batch are ShapeDtypeStructs), so the 7B and 13B shapes run on a laptop. Memory is XLA's buffer
assignment: peak = arguments + outputs + temporaries − aliases. The split is an accounting of that peak:

    parameters        frozen base + trainable adapters (what every method holds)
    grads + opt       the trainable tree once per gradient buffer and optimizer slot (AdamW: 3×, SGD: 1×,
                      FedSGD-shaped estimators that upload scalars: 1×)
    activations       the rest: activations, tangents, perturbation buffers, scratch

Methods: backprop (FedAvg's client step) plain and rematerialized (`model.remat`: "full" recomputes each layer,
"dots" keeps its matrix products), Spry with K = 1 and K = 10 tangents (memory measured with one tangent at a time,
`tangent_chunk_size=1`, as a memory-bound client would run it), FedFGD, FedMeZO, BAFFLE and FwdLLM.

Compute: `gflops_per_step` is XLA's FLOP count of the same step compiled with its loops of one iteration (Spry's
K tangents in one vmapped chunk). XLA counts a loop body once, and the finite-difference estimators evaluate their
losses one after another in a loop, so those steps are counted as forward passes × one forward pass: 2K for the
central differences of FedMeZO and BAFFLE, K + 1 for FwdLLM's forward differences (the tangent regeneration and
FwdLLM's candidate cosines are vector operations, left out).
`steps_per_round` is a client's local steps on the task's 80 training snippets (FedAvg-shaped: 10 at batch 8;
FedSGD-shaped: 1), and `gflops_per_round` = steps × GFLOPs per step × the 10 clients of a round.

The paper's bases were 4-bit GPTQ; ours are fp32 and bf16, so parameters weigh 4–8× more here and ratios on the
total are smaller than the paper's for the same activation savings.

    python experiments/spry_memory.py [--shapes minilm-l6,roberta-large,llama2-7b,opt-13b] [--dtypes float32,bfloat16]
                                      [--out results/memory]
Rows are merged into OUT/spry_memory.{csv,json,md} by (shape, method, base_dtype), so shapes can be run separately
(the 7B and 13B compiles take tens of minutes each).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build, lm_tasks, peft  # noqa: E402
from spryjax.errors import ArgumentParser, run_command  # noqa: E402
from spryjax.memory import MIB, flops_of, memory_of  # noqa: E402
from spryjax.metrics import format_table  # noqa: E402
from spryjax.models import preset  # noqa: E402
from spryjax.plots import stacked_bars  # noqa: E402
from spryjax.pytrees import tree_bytes  # noqa: E402
from spryjax.task import classification_task  # noqa: E402


class Method:
    """A row: the spry_rt_minilm method it runs, option overrides, the model's remat, buffer copies of the
    trainable tree for gradients and optimizer state, its tangents, and for finite-difference estimators the loss
    evaluations (forward passes) of one step."""

    def __init__(self, method: str, overrides: dict | None = None, *, remat: str | None = None, copies: int = 3,
                 tangents: int = 1, forward_passes: int | None = None):
        self.method, self.overrides, self.remat, self.copies = method, overrides or {}, remat, copies
        self.tangents, self.forward_passes = tangents, forward_passes


METHODS = {
    "backprop (FedAvg)": Method("fedavg"),
    "backprop + remat full": Method("fedavg", remat="full"),
    "backprop + remat dots": Method("fedavg", remat="dots"),
    "Spry K=1": Method("spry", {"num_tangents": 1}),
    "Spry K=10": Method("spry", {"num_tangents": 10}, tangents=10),
    "FedFGD K=1": Method("fedfgd"),
    "FedMeZO": Method("fedmezo", copies=1, forward_passes=2),
    "BAFFLE K=10": Method("baffle", copies=1, tangents=10, forward_passes=20),
    "FwdLLM K=20": Method("fwdllm", copies=1, tangents=20, forward_passes=21),
}
BATCH, SEQ, TRAIN_SNIPPETS, COHORT = 8, 64, 80, 10
FIELDS = ["shape", "method", "base_dtype", "peak_MiB", "temp_MiB", "parameters_MiB", "activations_MiB",
          "grads_opt_MiB", "backprop_over_this", "gflops_per_step", "steps_per_round", "gflops_per_round",
          "compile_s"]


def client_step(shape: str, dtype, spec: Method, chunk: int | None):
    """(the jitted client step, its ShapeDtypeStruct arguments, the frozen and trainable shapes)."""
    peft_config = peft.PeftConfig(method="lora", rank=1, alpha=1.0, dropout=0.0)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(preset(shape), 2, peft_config, jax.random.key(0),
                                                             dtype=dtype, shapes_only=True, remat=spec.remat)
    task = classification_task(logits_fn, 2)
    section = spry_rt_minilm.get_config(spec.method).algorithm
    section.update(spec.overrides)
    if section.name == "spry":   # the other estimators evaluate all K perturbations in one chunk
        section.tangent_chunk_size = chunk
    algorithm = build.algorithm(section, task, trainable, clients_per_round=COHORT)
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    data = {"input_ids": ids, "attention_mask": ids, "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    count = jax.ShapeDtypeStruct((), jnp.int32)
    step = jax.jit(lambda f, p, d, n: algorithm.client_update(f, algorithm.broadcast(algorithm.init(p, None)), d, n,
                                                              jnp.int32(0), jax.random.key(0)))
    return step, (frozen, trainable, data, count), frozen, trainable, task, data


def forward_gflops(task, frozen, trainable, data) -> float:
    """One forward pass (the loss) of a batch."""
    loss = jax.jit(lambda f, t, d: task.loss(t, f, {**d, "mask": jnp.ones(BATCH)}, None))
    return flops_of(loss.lower(frozen, trainable, data).compile()) / 1e9


def measure(shape: str, dtype_name: str) -> list[dict]:
    dtype = jnp.dtype(dtype_name)
    rows = []
    for label, spec in METHODS.items():
        tick = time.perf_counter()
        step, args, frozen, trainable, task, data = client_step(shape, dtype, spec, chunk=1)
        report = memory_of(step.lower(*args).compile())
        if spec.forward_passes:
            gflops = spec.forward_passes * forward_gflops(task, frozen, trainable, data)
        else:   # every tangent / perturbation in one vmapped chunk: no loop for XLA to count once
            counted, counted_args, *_ = client_step(shape, dtype, spec, chunk=spec.tangents)
            gflops = flops_of(counted.lower(*counted_args).compile()) / 1e9
        params_bytes = tree_bytes(frozen) + tree_bytes(trainable)
        grads_opt = spec.copies * tree_bytes(trainable)
        steps = TRAIN_SNIPPETS // BATCH if spry_rt_minilm.get_config(spec.method).algorithm.get(
            "communication", "per_epoch") == "per_epoch" else 1
        rows.append({"shape": shape, "method": label, "base_dtype": dtype_name, "peak_MiB": report.total / MIB,
                     "temp_MiB": report.temp / MIB, "parameters_MiB": params_bytes / MIB,
                     "grads_opt_MiB": grads_opt / MIB,
                     "activations_MiB": max(report.total - params_bytes - grads_opt, 0) / MIB,
                     "gflops_per_step": gflops, "steps_per_round": steps,
                     "gflops_per_round": gflops * steps * COHORT, "compile_s": time.perf_counter() - tick})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    backprop = rows[0]["peak_MiB"]
    for row in rows:
        row["backprop_over_this"] = backprop / row["peak_MiB"]
    return rows


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm-l6,roberta-large,llama2-7b,opt-13b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "spry_memory.json")
    rows = json.load(open(json_path)) if os.path.exists(json_path) else []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            new = measure(shape, dtype)
            keys = {(r["shape"], r["method"], r["base_dtype"]) for r in new}
            rows = [r for r in rows if (r["shape"], r["method"], r.get("base_dtype")) not in keys] + new
            write(rows, args.out)
    print(format_table(rows, FIELDS[:-1], floatfmt=".1f"))
    return 0


def write(rows: list[dict], out: str) -> None:
    """The merged rows as JSON, CSV, a Markdown table and the stacked-bar plot of the fp32 rows."""
    with open(os.path.join(out, "spry_memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out, "spry_memory.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "spry_memory.md"), "w") as f:
        f.write(format_table(rows, FIELDS[:-1], floatfmt=".1f") + "\n")
    stacked_bars([r for r in rows if r["base_dtype"] == "float32"], os.path.join(out, "spry_memory.png"),
                 parts=("parameters_MiB", "activations_MiB", "grads_opt_MiB"))


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_memory.py"))
