"""Step time and compiled memory of `fwdgrad.value_and_grad` (K = 1, 10) against `jax.value_and_grad`.

The step is one gradient of the packaged all-MiniLM-L6-v2 (spryjax.models.hf.packaged_model) as a 2-label
sequence classifier with LoRA r = 1 on query and value and a trainable head (9,986 parameters), cross-entropy on
a batch of --batch sequences of --seq tokens (random ids, no padding), fp32, no optimizer, no dropout. Each step
is jitted and compiled once; its memory is XLA's buffer assignment of that executable (`spryjax.memory`:
total = argument + output + temp − alias; temp holds activations and scratch), and its time the median of
--steps timed runs after one warm-up run.

    python scripts/bench_fwdgrad.py [--batch 8] [--seq 64] [--steps 5] [--json]

Rows: backprop; forward gradients with K = 1 and K = 10 tangents, the 10 either vmapped in one chunk
(chunk_size 10: fast, memory grows with the chunk) or in ten sequential chunks (chunk_size 1: memory flat in K).
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from spryjax import fwdgrad, lm_tasks, peft
from spryjax.errors import ArgumentParser, run_command
from spryjax.memory import memory_of
from spryjax.models import hf

ROWS = {"jax.value_and_grad": None,            # name -> (num_tangents, chunk_size); None: backprop
        "fwdgrad K=1": (1, 1),
        "fwdgrad K=10, chunk 10": (10, 10),
        "fwdgrad K=10, chunk 1": (10, 1)}


def problem(batch: int, seq: int):
    """(loss, trainable, frozen, data): MiniLM + LoRA classifier and a random batch."""
    lora = peft.PeftConfig(method="lora", rank=1, alpha=1.0, dropout=0.0, target_modules=("query", "value"))
    pretrained = hf.load_pretrained(hf.packaged_model())
    frozen, trainable, logits_fn = lm_tasks.build_classifier(pretrained, 2, lora, jax.random.key(0))
    ids_key, label_key = jax.random.split(jax.random.key(1))
    data = {"input_ids": jax.random.randint(ids_key, (batch, seq), 1000, pretrained.config.vocab_size),
            "attention_mask": jnp.ones((batch, seq), jnp.int32),
            "label": jax.random.randint(label_key, (batch,), 0, 2)}

    def loss(trainable, frozen, data):
        logp = jax.nn.log_softmax(logits_fn(trainable, frozen, data))
        return -jnp.take_along_axis(logp, data["label"][:, None], axis=1).mean()
    return loss, trainable, frozen, data


def step_fn(loss, tangents):
    """`step(key, trainable, frozen, data) -> (loss, gradient)` for one row of ROWS."""
    if tangents is None:
        return lambda key, *args: jax.value_and_grad(loss)(*args)
    num_tangents, chunk_size = tangents
    return fwdgrad.value_and_grad(loss, num_tangents=num_tangents, chunk_size=chunk_size)


def measure(batch: int, seq: int, steps: int) -> list[dict]:
    loss, trainable, frozen, data = problem(batch, seq)
    rows = []
    for name, tangents in ROWS.items():
        start = time.perf_counter()
        compiled = jax.jit(step_fn(loss, tangents)).lower(jax.random.key(2), trainable, frozen, data).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(jax.random.key(2), trainable, frozen, data))   # warm-up
        times = []
        for i in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(jax.random.key(3 + i), trainable, frozen, data))
            times.append(time.perf_counter() - start)
        report = memory_of(compiled).mib()
        rows.append({"step": name, "median_s": statistics.median(times), "times_s": times,
                     "temp_mib": report["temp"], "total_mib": report["total"], "compile_s": compile_s})
        print(f"  {name}: {rows[-1]['median_s']:.3f} s/step", file=sys.stderr, flush=True)
    return rows


def table(title: str, rows: list[dict]) -> str:
    base = rows[0]
    lines = [title, "| step | median s/step | × backprop | temp MiB | total MiB | compile s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['median_s']:.3f} | {r['median_s'] / base['median_s']:.2f} | "
                     f"{r['temp_mib']:.1f} | {r['total_mib']:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    rows = measure(args.batch, args.seq, args.steps)
    if args.json:
        print(json.dumps({"batch": args.batch, "seq": args.seq, "steps": args.steps,
                          "backend": jax.default_backend(), "rows": rows}, indent=1))
    else:
        print(table(f"MiniLM-L6 + LoRA r=1, batch {args.batch} x {args.seq} tokens, fp32, "
                    f"{jax.default_backend()}, median of {args.steps} steps", rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/bench_fwdgrad.py"))
