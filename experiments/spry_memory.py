"""The Spry paper's memory figure, with compute: per-client step peak memory of each method, split into
parameters / activations / gradients + optimizer state, and the FLOPs of a step and of a round, at MiniLM-L6,
RoBERTa-large, Llama2-7B and OPT-13B shapes, for fp32, bf16, int8 and 4-bit (NF4, int4) frozen bases.

Every step is the method's real client update (`FederatedAlgorithm.client_update`, one local step on a batch of 8
sequences of 64 tokens by default (--batch, --seq), LoRA r=1 on query/value plus a 2-way head), compiled without
allocating anything (parameters and batch are ShapeDtypeStructs, quantized bases the ShapeDtypeStructs of their
codes and scales), so the 7B and 13B shapes run on a laptop. Memory is XLA's buffer
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

Base precision (`base_dtype`): float32 and bfloat16 bases hold their weights in that dtype; int8, int4 and nf4 are
round-to-nearest weight-only quantizations (`spryjax.models.quant`: int8 per output channel, int4 in groups of 128
and NF4 in groups of 64 along the input) of every transformer-layer kernel, dequantizing to bf16 (the activations
are bf16, as with the bfloat16 base); a "+emb" suffix (e.g. nf4+emb) also quantizes the word embedding. The paper's
bases were 4-bit GPTQ (the same storage as int4 here; GPTQ's rounding does not change memory).

    python experiments/spry_memory.py [--shapes minilm-l6,roberta-large,llama2-7b,opt-13b]
        [--dtypes float32,bfloat16,int8,nf4,int4,nf4+emb] [--methods backprop,remat_dots,spry_k1,spry_k10,fedmezo]
        [--batch 8] [--seq 64] [--base-dropout RATE] [--out results/memory]
The base keeps its own hidden and attention dropout (OPT's presets: 0.1, Llama's and the encoders' as their
checkpoints) unless --base-dropout sets both (column `base_dropout`, empty when the preset's); Spry's client step
draws the dropout masks like backprop's. Rows are merged into OUT/spry_memory.{csv,json,md} by (shape, method,
base_dtype, batch, seq, base_dropout), so shapes can be run separately (the 7B and 13B compiles take minutes
each); `backprop_over_this` divides the backprop row of the same shape, precision, batch, sequence length and
dropout by the row's peak.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for configs/

from configs import spry_rt_minilm  # noqa: E402
from spryjax import build, lm_tasks, peft  # noqa: E402
from spryjax.errors import ArgumentParser, InputError, run_command  # noqa: E402
from spryjax.memory import MIB, flops_of, memory_of  # noqa: E402
from spryjax.metrics import format_table  # noqa: E402
from spryjax.models import preset, quant  # noqa: E402
from spryjax.plots import stacked_bars  # noqa: E402
from spryjax.pytrees import tree_bytes  # noqa: E402
from spryjax.task import classification_task  # noqa: E402


class Method:
    """A row: the spry_rt_minilm method it runs, option overrides, the model's remat, buffer copies of the
    trainable tree for gradients and optimizer state, its tangents, and for finite-difference estimators the loss
    evaluations (forward passes) of one step; `key` names it for --methods."""

    def __init__(self, key: str, method: str, overrides: dict | None = None, *, remat: str | None = None,
                 copies: int = 3, tangents: int = 1, forward_passes: int | None = None):
        self.key, self.method, self.overrides, self.remat, self.copies = key, method, overrides or {}, remat, copies
        self.tangents, self.forward_passes = tangents, forward_passes


METHODS = {
    "backprop (FedAvg)": Method("backprop", "fedavg"),
    "backprop + remat full": Method("remat_full", "fedavg", remat="full"),
    "backprop + remat dots": Method("remat_dots", "fedavg", remat="dots"),
    "Spry K=1": Method("spry_k1", "spry", {"num_tangents": 1}),
    "Spry K=10": Method("spry_k10", "spry", {"num_tangents": 10}, tangents=10),
    "FedFGD K=1": Method("fedfgd", "fedfgd"),
    "FedMeZO": Method("fedmezo", "fedmezo", copies=1, forward_passes=2),
    "BAFFLE K=10": Method("baffle", "baffle", copies=1, tangents=10, forward_passes=20),
    "FwdLLM K=20": Method("fwdllm", "fwdllm", copies=1, tangents=20, forward_passes=21),
}
BATCH, SEQ, TRAIN_SNIPPETS, COHORT = 8, 64, 80, 10
QUANTIZED_COMPUTE = jnp.bfloat16   # what int8 / int4 / nf4 bases dequantize to
FIELDS = ["shape", "method", "base_dtype", "peak_MiB", "temp_MiB", "parameters_MiB", "activations_MiB",
          "grads_opt_MiB", "backprop_over_this", "gflops_per_step", "steps_per_round", "gflops_per_round",
          "batch", "seq", "base_dropout", "compile_s"]


class Base(NamedTuple):
    """A base precision as the table names it: "float32", "bfloat16", or a quantization scheme with an optional
    "+emb" (the word embedding quantized too)."""
    name: str
    dtype: Any
    quantize: str | None
    embeddings: bool

    @classmethod
    def parse(cls, name: str) -> "Base":
        scheme, plus, extra = name.partition("+")
        if scheme in quant.SCHEMES and plus + extra in ("", "+emb"):
            return cls(name, QUANTIZED_COMPUTE, scheme, bool(extra))
        if scheme in ("float32", "bfloat16") and not plus:
            return cls(name, jnp.dtype(scheme), None, False)
        raise InputError(f"--dtypes: {name!r} is not a base precision (float32, bfloat16, "
                         f"{', '.join(quant.SCHEMES)}, optionally with +emb)")


def client_step(shape: str, base: Base, spec: Method, chunk: int | None, batch: int = BATCH, seq: int = SEQ,
                base_dropout: float | None = None):
    """(the jitted client step, its ShapeDtypeStruct arguments, the frozen and trainable shapes)."""
    peft_config = peft.PeftConfig(method="lora", rank=1, alpha=1.0, dropout=0.0)
    model = preset(shape) if base_dropout is None else lm_tasks.with_base_dropout(preset(shape), base_dropout)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(
        model, 2, peft_config, jax.random.key(0), dtype=base.dtype, shapes_only=True, remat=spec.remat,
        quantize=base.quantize, quantize_embeddings=base.embeddings)
    task = classification_task(logits_fn, 2)
    section = spry_rt_minilm.get_config(spec.method).algorithm
    section.update(spec.overrides)
    if section.name == "spry":   # the other estimators evaluate all K perturbations in one chunk
        section.tangent_chunk_size = chunk
    algorithm = build.algorithm(section, task, trainable, clients_per_round=COHORT)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"input_ids": ids, "attention_mask": ids, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    count = jax.ShapeDtypeStruct((), jnp.int32)
    step = jax.jit(lambda f, p, d, n: algorithm.client_update(f, algorithm.broadcast(algorithm.init(p, None)), d, n,
                                                              jnp.int32(0), jax.random.key(0)))
    return step, (frozen, trainable, data, count), frozen, trainable, task, data


def forward_gflops(task, frozen, trainable, data) -> float:
    """One forward pass (the loss) of a batch."""
    batch = data["label"].shape[0]
    loss = jax.jit(lambda f, t, d: task.loss(t, f, {**d, "mask": jnp.ones(batch)}, None))
    return flops_of(loss.lower(frozen, trainable, data).compile()) / 1e9


def measure(shape: str, base: Base, methods: dict[str, Method], *, batch: int = BATCH, seq: int = SEQ,
            base_dropout: float | None = None) -> list[dict]:
    rows = []
    for label, spec in methods.items():
        tick = time.perf_counter()
        step, args, frozen, trainable, task, data = client_step(shape, base, spec, 1, batch, seq, base_dropout)
        compiled = step.lower(*args).compile()
        report = memory_of(compiled)
        if spec.forward_passes:
            gflops = spec.forward_passes * forward_gflops(task, frozen, trainable, data)
        elif spec.tangents == 1:   # the step just compiled has no loop of more than one iteration
            gflops = flops_of(compiled) / 1e9
        else:   # every tangent / perturbation in one vmapped chunk: no loop for XLA to count once
            counted, counted_args, *_ = client_step(shape, base, spec, spec.tangents, batch, seq, base_dropout)
            gflops = flops_of(counted.lower(*counted_args).compile()) / 1e9
        params_bytes = tree_bytes(frozen) + tree_bytes(trainable)
        grads_opt = spec.copies * tree_bytes(trainable)
        steps = TRAIN_SNIPPETS // batch if spry_rt_minilm.get_config(spec.method).algorithm.get(
            "communication", "per_epoch") == "per_epoch" else 1
        rows.append({"shape": shape, "method": label, "base_dtype": base.name, "peak_MiB": report.total / MIB,
                     "temp_MiB": report.temp / MIB, "parameters_MiB": params_bytes / MIB,
                     "grads_opt_MiB": grads_opt / MIB,
                     "activations_MiB": max(report.total - params_bytes - grads_opt, 0) / MIB,
                     "gflops_per_step": gflops, "steps_per_round": steps,
                     "gflops_per_round": gflops * steps * COHORT, "batch": batch, "seq": seq,
                     "base_dropout": base_dropout, "compile_s": time.perf_counter() - tick})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def row_key(row: dict) -> tuple:
    """Rows written before --batch / --seq / --base-dropout existed were all 8 × 64 with the preset's dropout."""
    return (row["shape"], row["method"], row.get("base_dtype"), row.get("batch", BATCH), row.get("seq", SEQ),
            row.get("base_dropout"))


def with_ratios(rows: list[dict]) -> list[dict]:
    """backprop_over_this: the backprop row's peak of the same shape, precision, batch, length and dropout ÷ the
    row's."""
    backprop = {row_key(r)[:1] + row_key(r)[2:]: r["peak_MiB"] for r in rows if r["method"] == "backprop (FedAvg)"}
    for row in rows:
        reference = backprop.get(row_key(row)[:1] + row_key(row)[2:])
        row["backprop_over_this"] = reference / row["peak_MiB"] if reference else float("nan")
        row.setdefault("batch", BATCH)
        row.setdefault("seq", SEQ)
        row.setdefault("base_dropout", None)
    return rows


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="minilm-l6,roberta-large,llama2-7b,opt-13b")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="base precisions: float32, bfloat16, int8, int4, nf4 (+emb: the embedding too)")
    parser.add_argument("--methods", default=",".join(m.key for m in METHODS.values()),
                        help=f"rows to measure, of {', '.join(m.key for m in METHODS.values())}")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences per client step")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence")
    parser.add_argument("--base-dropout", type=float, default=None,
                        help="the base's hidden and attention dropout (default: the preset's)")
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args()
    wanted = args.methods.split(",")
    unknown = sorted(set(wanted) - {m.key for m in METHODS.values()})
    if unknown:
        raise InputError(f"--methods: {unknown[0]!r} is not one of {', '.join(m.key for m in METHODS.values())}")
    methods = {label: m for label, m in METHODS.items() if m.key in wanted}
    bases = [Base.parse(name) for name in args.dtypes.split(",")]
    if args.batch < 1 or args.seq < 1:
        raise InputError("--batch and --seq must be at least 1")
    if args.base_dropout is not None and not 0 <= args.base_dropout < 1:
        raise InputError(f"--base-dropout: {args.base_dropout} is not a rate in [0, 1)")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "spry_memory.json")
    rows = json.load(open(json_path)) if os.path.exists(json_path) else []
    for shape in args.shapes.split(","):
        preset(shape)
        for base in bases:
            new = measure(shape, base, methods, batch=args.batch, seq=args.seq, base_dropout=args.base_dropout)
            keys = {row_key(r) for r in new}
            rows = with_ratios([r for r in rows if row_key(r) not in keys] + new)
            write(rows, args.out)
    print(format_table(rows, FIELDS[:-1], floatfmt=".1f"))
    return 0


def write(rows: list[dict], out: str) -> None:
    """The merged rows as JSON, CSV, a Markdown table and the stacked-bar plot of the fp32 rows (8 × 64)."""
    with open(os.path.join(out, "spry_memory.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out, "spry_memory.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [{**r, "base_dropout": "preset" if r["base_dropout"] is None else r["base_dropout"]} for r in rows]
    with open(os.path.join(out, "spry_memory.md"), "w") as f:
        f.write(format_table(shown, FIELDS[:-1], floatfmt=".1f") + "\n")
    plotted = [r for r in rows
               if r["base_dtype"] == "float32" and (r["batch"], r["seq"], r["base_dropout"]) == (BATCH, SEQ, None)]
    if plotted:
        stacked_bars(plotted, os.path.join(out, "spry_memory.png"),
                     parts=("parameters_MiB", "activations_MiB", "grads_opt_MiB"))


if __name__ == "__main__":
    sys.exit(run_command(main, "experiments/spry_memory.py"))
