"""Compiled memory of one finetuning step: forward only, backprop, forward gradients (K = 1, 10, 100) and SPSA.

Reference: Panchal et al. "Thinking Forward" (Spry, NeurIPS 2024) report 1.4-7.1x lower peak training memory for
forward-mode AD than backprop, the saving being activations (their bases were 4-bit; these are fp32 or bf16).

Everything is compile-only: parameters and batch are `jax.ShapeDtypeStruct`s, so a Llama2-7B step is measured on a
laptop without allocating it. Memory is XLA's buffer assignment (`spryjax.memory.compiled_memory`):
total = argument + output + temp - alias; the frozen weights are arguments, temp is activations and scratch.

    python scripts/bench_memory.py --shape roberta-large --batch 8 --seq 64 --lora-rank 1 [--json]

The step is a sequence classifier (the preset's default head, 2 labels) with LoRA on query and value (α = r) and a
trainable head, cross-entropy loss, no dropout. forward_grad runs its K tangents in sequential chunks of
--chunk-size (default 1), so its memory should not grow with K.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

from spryjax import fwdgrad, lm_tasks, peft
from spryjax.memory import MIB, compiled_memory
from spryjax.models import PRESETS, preset
from spryjax.errors import ArgumentParser, run_command

SHAPES = ("tiny", "minilm-l6", "roberta-large", "llama2-7b", "opt-6.7b", "opt-13b")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def steps(logits_fn, chunk_size: int) -> dict:
    """The measured steps, each `step(trainable, frozen, batch, key)`."""
    def loss(trainable, frozen, batch):
        logp = jax.nn.log_softmax(logits_fn(trainable, frozen, batch))
        return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=1))

    def forward_grad(k):
        return lambda t, f, b, key: fwdgrad.forward_grad(loss, t, key, f, b, num_tangents=k,
                                                         chunk_size=min(chunk_size, k))
    return {"forward": lambda t, f, b, key: loss(t, f, b),
            "backprop": lambda t, f, b, key: jax.value_and_grad(loss)(t, f, b),
            "forward_grad K=1": forward_grad(1),
            "forward_grad K=10": forward_grad(10),
            "forward_grad K=100": forward_grad(100),
            "spsa": lambda t, f, b, key: fwdgrad.spsa_grad(loss, t, key, f, b)}


def measure(shape: str, *, batch: int, seq: int, rank: int, dtype: str, chunk_size: int) -> list[dict]:
    config = preset(shape)
    peft_config = peft.PeftConfig(method="lora", rank=rank, alpha=float(rank), dropout=0.0)
    frozen, trainable, logits_fn = lm_tasks.build_classifier(config, 2, peft_config, jax.random.key(0), DTYPES[dtype],
                                                         shapes_only=True)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"input_ids": ids, "attention_mask": ids, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rows = []
    for name, step in steps(logits_fn, chunk_size).items():
        start = time.perf_counter()
        report = compiled_memory(step, trainable, frozen, data, key)
        rows.append({"step": name, **{k: v / MIB for k, v in report.as_dict().items()},
                     "compile_s": time.perf_counter() - start})
        print(f"  compiled {name} in {rows[-1]['compile_s']:.1f}s", file=sys.stderr, flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    by = {r["step"]: r for r in rows}
    bp, k1, k10, k100 = by["backprop"], by["forward_grad K=1"], by["forward_grad K=10"], by["forward_grad K=100"]
    return {"backprop/fwdgrad(K=10) temp": bp["temp"] / k10["temp"],
            "backprop/fwdgrad(K=10) total": bp["total"] / k10["total"],
            "fwdgrad K=10/K=1 temp": k10["temp"] / k1["temp"],
            "fwdgrad K=100/K=1 temp": k100["temp"] / k1["temp"]}


def table(title: str, rows: list[dict], summary: dict[str, float]) -> str:
    cols = ("argument", "output", "temp", "alias", "total")
    lines = [title, f"{'step':20s}" + "".join(f"{c + ' MiB':>15s}" for c in cols) + f"{'compile s':>11s}"]
    for r in rows:
        lines.append(f"{r['step']:20s}" + "".join(f"{r[c]:>15,.1f}" for c in cols) + f"{r['compile_s']:>11.1f}")
    lines += [f"{k}: {v:.2f}x" for k, v in summary.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s in PRESETS], default="roberta-large")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=1)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the frozen base")
    parser.add_argument("--chunk-size", type=int, default=1, help="tangents per forward_grad chunk")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    rows = measure(args.shape, batch=args.batch, seq=args.seq, rank=args.lora_rank, dtype=args.dtype,
                   chunk_size=args.chunk_size)
    summary = ratios(rows)
    if args.json:
        print(json.dumps({"shape": args.shape, "batch": args.batch, "seq": args.seq, "lora_rank": args.lora_rank,
                          "dtype": args.dtype, "chunk_size": args.chunk_size, "backend": jax.default_backend(),
                          "rows": rows, "ratios": summary}, indent=1))
    else:
        title = (f"{args.shape}, batch {args.batch}, seq {args.seq}, LoRA r={args.lora_rank} on query/value, "
                 f"{args.dtype} base, forward_grad chunk {args.chunk_size}, {jax.default_backend()} compiled memory")
        print(table(title, rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/bench_memory.py"))
