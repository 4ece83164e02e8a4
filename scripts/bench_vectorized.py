"""S seeds of a federated task: one vectorized simulation (spryjax.fl.vectorized) against S sequential runs.

    python scripts/bench_vectorized.py [--rounds 3] [--seeds 8] [--tasks spry,digits] [--method spry]

Tasks: "spry", the offline Spry task (configs/spry_rt_minilm.py:METHOD, LoRA on MiniLM-L6, 10 clients per round;
compute-bound on a CPU) and "digits", the 8×8 digits MLP (configs/fedavg_digits.py; dispatch-bound). Evaluation and
checkpoints are off, so rounds are what is timed. Each mode runs in its own process (so its peak resident memory
is its own) and times, from the first config to the last round:

    total      everything a user waits for: data, partition and model setup of every seed, compiles, all rounds
    compute    the rounds alone: Σ round_seconds (sequential: over the S runs; the first round includes its compile)
    steady     seconds per round after the first, for all S seeds (sequential: the S runs' medians summed)
    peak RSS   the process's peak resident memory (on CPU the device memory is host memory)

and the final round's mean training loss over the seeds, which must agree between the modes (same runs).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from spryjax.errors import ArgumentParser, run_command

CONFIGS = {"spry": "configs/spry_rt_minilm.py:{method}", "digits": "configs/fedavg_digits.py"}


def child(task: str, mode: str, *, rounds: int, seeds: int, method: str) -> dict:
    """One mode of one task, in this process; returns its measurements."""
    from spryjax.runners import federated
    from spryjax.launch import sweep
    spec = CONFIGS[task].format(method=method)
    overrides = [f"--config.num_rounds={rounds}", "--config.fl.eval_every=0", "--config.fl.checkpoint_every=0"]
    members = [sweep.Member(f"seed={s}", {"seed": s}, "") for s in range(seeds)]
    with tempfile.TemporaryDirectory() as directory:
        workdirs = [os.path.join(directory, m.name) for m in members]
        start = time.perf_counter()
        configs = [sweep.resolve(spec, m, overrides) for m in members]
        if mode == "sequential":
            results = [federated.run_federated(c, w) for c, w in zip(configs, workdirs)]
        else:
            results = federated.run_federated_vectorized(configs, workdirs)
        total = time.perf_counter() - start
    histories = [r.history for r in results]
    seconds = np.array([[h["round_seconds"] for h in history] for history in histories])  # [S, rounds]
    if mode == "sequential":
        compute, steady = float(seconds.sum()), float(np.sum(np.median(seconds[:, 1:], axis=1))) if rounds > 1 else 0
    else:   # every member logs the joint round's time
        compute, steady = float(seconds[0].sum()), float(np.median(seconds[0, 1:])) if rounds > 1 else 0
    return {"task": task, "mode": mode, "total_s": total, "compute_s": compute, "steady_s_per_round": steady,
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_train_loss": float(np.mean([h[-1]["train_loss"] for h in histories])),
            "strategy": results[0].plan.strategy, "chunk": results[0].plan.chunk_size}


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--tasks", default="spry,digits")
    parser.add_argument("--method", default="spry", help="the Spry config's method (configs/spry_rt_minilm.py)")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, rounds=args.rounds, seeds=args.seeds, method=args.method)))
        return 0
    rows = []
    for task in args.tasks.split(","):
        for mode in ("sequential", "vectorized"):
            command = [sys.executable, __file__, "--child", task, mode, f"--rounds={args.rounds}",
                       f"--seeds={args.seeds}", f"--method={args.method}"]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SPRYJAX_PROGRESS": "0"})
            if done.returncode:
                print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{task} {mode}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n{args.seeds} seeds × {args.rounds} rounds, {os.cpu_count()} CPU cores\n")
    print("| task | mode | plan | total s | rounds s | steady s/round (all seeds) | peak RSS MiB | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['mode']} | {row['strategy']} ×{row['chunk']} | {row['total_s']:.1f} | "
              f"{row['compute_s']:.1f} | {row['steady_s_per_round']:.3f} | {row['peak_rss_MiB']:.0f} | "
              f"{row['final_train_loss']:.4f} |")
    print()
    for task in args.tasks.split(","):
        seq, vec = [r for r in rows if r["task"] == task]
        ratio = lambda key: seq[key] / vec[key] if vec[key] else float("nan")
        print(f"{task}: vectorized is {ratio('total_s'):.2f}× faster in total, {ratio('compute_s'):.2f}× in rounds, "
              f"{ratio('steady_s_per_round'):.2f}× per steady round; peak memory ×{1 / ratio('peak_rss_MiB'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/bench_vectorized.py"))
