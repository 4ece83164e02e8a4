"""One GPU lease (at most 8 minutes on one H100): four measurements in priority order, each part's results written
to OUTDIR as soon as they exist, so that a run cut short still returns what it finished.

    scripts/device/run.sh BUNDLE OUTDIR [--smoke] [--budget 480] [--part1-seconds S] [--parts 1,2,3,4,1b]
                                        [--warm-seconds 150]

BUNDLE is scripts/device/prepare.sh's folder (the tokenized task, the bf16-rounded MiniLM, wheels); nothing else
is read: no network, no asset packages, no tokenizer.

Parts, in priority order (`--parts` picks and orders them):
  1   The Spry table at the paper's budget: Spry (released settings), FedFGD, the best zero-order method (FwdLLM,
      K = 20) and FedAvg on configs/spry_rt_minilm.py (LoRA MiniLM-L6, Rotten Tomatoes, 100 Dirichlet(α = 1.0)
      clients, 10 per round), 1500 rounds, 3 seeds vmapped together (`run_federated_vectorized`), clients vmapped
      in chunks sized from device memory (strategy auto), evaluation every 50 rounds. The part's time is shared
      in proportion to a round's expected cost (ROUND_COST); Spry runs first, and if it is cut the others run to
      its last evaluated round, so that the table compares all four at equal rounds.
      -> spry_runs.json, spry_accuracy.png, the table in summary.md
  2   Engine throughput: `auto` against the sequential per-client per-step jit loop (scripts/bench_throughput.py),
      MLP and CNN at 4096 and 100 clients (goal: auto ≥ 5× the loop at 4096). -> throughput.json
  3   Vectorized sweep: 8 Spry seeds as one program against 8 sequential runs, 3 rounds each
      (scripts/bench_vectorized.py; goal ≥ 3×). -> vectorized.json
  4   The MiniLM client step (one minibatch of 8 × 64 tokens): backprop, backprop with remat="dots", Spry K = 1
      and K = 10, FedMeZO, fp32 and bf16 bases: milliseconds, XLA's FLOPs and compiled memory, the allocator's peak.
      -> client_step.json
  1b  Part 1 at α = 0.1, at part 1's rounds, if time remains.
summary.md holds every table and each part's status; log.txt (run.sh) the whole output.

First a warm-up compiles every program of parts 1, 3 and 4 at once, one process per program on the machine's
16 cores, into JAX's persistent compilation cache (the scratch folder); the parts then load their programs from
it (same configs and shapes, so the same HLO): α = 0.1 reuses α = 1.0's. Then each part runs in its own process
(a crash or an out-of-memory in one leaves the others; part 4's allocator peak is its own) with a deadline: a part
is not started with less than its minimum left and is interrupted (SIGINT, then killed) at its deadline, its
finished rows already written.

Estimates for one H100 (80 GB), made before any lease. FLOPs are XLA's (`simulate.client_step_cost`,
`spryjax.memory.flops_of`; results/memory/spry_memory.csv: 23.4 GFLOP per fp32 MiniLM client step of 8 × 64
tokens), compile times XLA:CPU's here (CPU seconds: one client step 9–11 s, one round 12–14 s) taken as the GPU's,
throughput an assumed ~150 TFLOP/s (TF32 at width 384) plus the activations' memory traffic:
  startup   wheel install, imports, backend                                                              ~10 s
  warm-up   16 programs: part 1's 4 × (client-step cost, round, 2 evaluations: every cohort of the 1500 rounds
            × 3 seeds has a snippet of 49–64 tokens, so one round shape), part 3's single-run and 8-member rounds,
            part 4's 10 steps; ≈ 4 × 35 + 2 × 30 + 10 × 7 = 270 s of compiling alone, in parallel bounded by the
            slowest (the 8-member round, ≈ 45 s alone) under contention                                 ~80 s
  1         per method: process start, 3 members' setup, tracing, cache loads ≈ 15 s; a round (3 seeds × 10
            clients × 10 local steps ≈ 7 TFLOP) ≈ 50 ms for Spry, FedFGD and FwdLLM, 90 ms for FedAvg (2.6× Spry's
            activation traffic); 30 evaluations of 100 clients × 20 snippets ≈ 3 s; 1500 rounds → 75 + 75 + 75
            + 135 s, plus 4 × 18 s                                                                       ~430 s
  2         CNN at 4096 clients: 4 GB of padded images gathered 3 times (~12 s), the reference loop's 20,480
            jitted steps (~5 s a round, 2 rounds), auto with its compiles ~10 s; MLP ~15 s; 100 clients ~10 s ~70 s
  3         8 sequential runs × (setup ~3 s, cache loads ~2 s, 3 rounds) and one 8-member run (setup ~10 s)  ~60 s
  4         10 × (setup ~2 s, a cache load, 21 calls of 5–50 ms)                                         ~35 s
  1b        as part 1                                                                                    ~430 s
About 1100 s in all, and 8 minutes hold 480. What fits, by default (strict priority): the warm-up and part 1 at
α = 1.0, to ≈ 1300–1500 rounds per method. Dropped first: α = 0.1, then part 4, part 3 and part 2, each run only
if part 1 ends early (a GPU faster than estimated). `--part1-seconds 200` keeps ~170 s for parts 2–4 (part 1 then
reaches ≈ 600 rounds); `--parts 2,3,4` runs the benchmarks alone (~3 minutes with their warm-up).

    --smoke   the same code on a CPU (run.sh BUNDLE OUT --smoke, with prepare.sh's --smoke bundle): a 1-layer
              model of width 32, 4 rounds with evaluation every 2, 2 seeds of 8 clients with 2 per round; 4
              clients in part 2; 2 seeds × 2 rounds in part 3; 3 of part 4's rows, 2 timed calls; no part minimums.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

import bundle_config  # noqa: E402  (scripts/device/; puts the repo root on sys.path)
from spryjax.errors import ArgumentParser, InputError, run_command  # noqa: E402

RUNS_FILE, PLOT_FILE, SUMMARY_FILE = "spry_runs.json", "spry_accuracy.png", "summary.md"
THROUGHPUT_FILE, VECTORIZED_FILE, STEP_FILE = "throughput.json", "vectorized.json", "client_step.json"
STATUS_FILE = "status.json"          # in the scratch folder: OUTDIR keeps to 8 files
TABLE_METHODS = ("spry", "fedfgd", "fwdllm", "fedavg")   # Spry, FedFGD, the best zero-order method, FedAvg
# Part 1's time is shared in proportion to a round's expected cost: equal FLOPs, but backprop moves 2.6× Spry's
# activations (results/memory/spry_memory.csv: 148 vs 57 MiB of temporaries per client step).
ROUND_COST = {"spry": 1.0, "fedfgd": 1.0, "fwdllm": 1.0, "fedavg": 1.6}
# Part 4's rows: (label, configs/spry_rt_minilm.py method, model remat, base dtype), in the order of the compiled
# peaks measured on the CPU (results/memory/spry_memory.csv), so that the allocator's high-water mark rises with
# each row and is that row's own; the last rows are the first dropped.
STEP_ROWS = [("FedMeZO", "fedmezo", None, "bfloat16"), ("Spry K=1", "spry", None, "bfloat16"),
             ("FedMeZO", "fedmezo", None, "float32"), ("Spry K=10", "spry_k10", None, "bfloat16"),
             ("Spry K=1", "spry", None, "float32"), ("Spry K=10", "spry_k10", None, "float32"),
             ("backprop + remat dots", "fedavg", "dots", "bfloat16"), ("backprop", "fedavg", None, "bfloat16"),
             ("backprop + remat dots", "fedavg", "dots", "float32"), ("backprop", "fedavg", None, "float32")]
FINISH_SECONDS = 5        # writing tables and plots after the last part
GRACE_SECONDS = 5         # a part past its deadline gets SIGINT this long after it, then KILL_SECONDS more
KILL_SECONDS = 10
METHOD_MINIMUM = 30       # seconds: a part-1 method is not started with less (compiles alone take about that)


class Sizes(NamedTuple):
    rounds: int = 1500                     # part 1: rounds per method
    eval_every: int = 50
    seeds: int = 3                         # part 1: seeds vmapped together
    cohorts: tuple[int, ...] = (4096, 100)  # part 2: clients per round, most important first
    models: tuple[str, ...] = ("mlp", "cnn")
    sweep_seeds: int = 8                   # part 3
    sweep_rounds: int = 3
    step_repeats: int = 20                 # part 4: timed calls per row (median)
    step_rows: slice = slice(None)         # part 4: which of STEP_ROWS


FULL = Sizes()
SMOKE = Sizes(rounds=4, eval_every=2, seeds=2, cohorts=(4,), sweep_seeds=2, sweep_rounds=2, step_repeats=2,
              step_rows=slice(None, None, 4))


class Context(NamedTuple):
    """What a part's process knows."""
    bundle: Path
    out: Path
    scratch: Path
    smoke: bool
    deadline: float         # time.time() by which the part must have finished

    @property
    def sizes(self) -> Sizes:
        return SMOKE if self.smoke else FULL

    def left(self) -> float:
        return self.deadline - time.time()


# ----------------------------------------------------------------------------------------------------------------
# Files


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1))


def load_script(name: str):
    """scripts/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"spryjax_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def time_limit(seconds: float):
    """KeyboardInterrupt in the main thread after `seconds`: the engine's host loop turns it into `Interrupted`
    with every finished round's record already in metrics.jsonl. (A compile in progress finishes first.)"""
    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_within(seconds: float, fn: Callable[[], Any]) -> str:
    """fn() under `time_limit(seconds)`: "done", "cut" (at the limit or by the part's SIGINT), or the error."""
    from spryjax.errors import Diverged, Interrupted
    try:
        with time_limit(seconds):
            fn()
        return "done"
    except (KeyboardInterrupt, Interrupted):
        return "cut"
    except Diverged as error:
        return f"diverged: {error}"
    except Exception as error:   # one method's failure must not cost the others
        traceback.print_exc()
        return f"error: {type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the Spry table


def member_config(ctx: Context, method: str, alpha: float, seed: int, rounds: int):
    from spryjax.runners import federated
    config = bundle_config.config(method, str(ctx.bundle), smoke=ctx.smoke)
    config.seed, config.num_rounds, config.fl.alpha = seed, rounds, alpha
    config.fl.eval_every, config.fl.checkpoint_every = ctx.sizes.eval_every, 0
    federated.check_federated(config)
    return config


def run_summary(method: str, alpha: float, config, histories: list[list[dict]], status: str, seconds: float) -> dict:
    """One table row's facts from the members' metrics.jsonl records."""
    rounds = [[r for r in h if "round" in r] for h in histories]
    evaluated = [{r["round"]: r["generalized_accuracy"] for r in rs if "generalized_accuracy" in r} for rs in rounds]
    eval_rounds = sorted(set.intersection(*map(set, evaluated))) if evaluated else []
    seconds_per_round = [r["round_seconds"] for r in rounds[0]] if rounds else []
    head = next((r for r in histories[0] if r.get("summary") == "client_step"), {}) if histories else {}
    first = rounds[0][0] if rounds and rounds[0] else {}
    return {"method": method, "alpha": alpha, "settings_from": config.settings_from,
            "seeds": len(histories), "num_rounds": config.num_rounds, "status": status,
            "rounds_reached": [max((r["round"] for r in rs), default=0) for rs in rounds],
            "eval_rounds": eval_rounds, "accuracy": [[e[r] for e in evaluated] for r in eval_rounds],
            "first_round_s": seconds_per_round[0] if seconds_per_round else None,
            "round_s_median": statistics.median(seconds_per_round[1:]) if len(seconds_per_round) > 1 else None,
            "method_wall_s": seconds, "plan": head.get("plan"),
            "client_step_gflops": head.get("flops", 0.0) / 1e9, "client_step_MiB": head.get("total_bytes", 0) / 2**20,
            "up_KiB": first.get("comm_up_bytes", 0) / 1024, "down_KiB": first.get("comm_down_bytes", 0) / 1024}


def spry_table_part(ctx: Context, alpha: float) -> None:
    from spryjax.metrics import read_metrics
    from spryjax.runners import federated
    stored = read_json(ctx.out / RUNS_FILE, {"runs": {}, "rounds": {}})
    # α = 0.1 compares at α = 1.0's rounds; the first method, if cut, sets the rounds of the others
    target = stored["rounds"].get("1.0", ctx.sizes.rounds) if alpha != 1.0 else ctx.sizes.rounds
    minimum = 0 if ctx.smoke else METHOD_MINIMUM
    for i, method in enumerate(TABLE_METHODS):
        share = (ctx.left() - FINISH_SECONDS) * ROUND_COST[method] / sum(ROUND_COST[m] for m in TABLE_METHODS[i:])
        key = f"{method}_a{alpha}"
        if share < minimum:
            stored["runs"][key] = {"method": method, "alpha": alpha, "status": f"not started: {share:.0f} s share"}
            write_json(ctx.out / RUNS_FILE, stored)
            continue
        print(f"\n== part 1, α = {alpha}: {method}, {ctx.sizes.seeds} seeds vectorized, {target} rounds, "
              f"{share:.0f} s ==", flush=True)
        configs = [member_config(ctx, method, alpha, seed, target) for seed in range(ctx.sizes.seeds)]
        workdirs = [ctx.scratch / "runs" / f"{key}_s{seed}" for seed in range(ctx.sizes.seeds)]
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        tick = time.time()
        status = run_within(share, lambda: federated.run_federated_vectorized(configs, [str(w) for w in workdirs]))
        row = run_summary(method, alpha, configs[0], [read_metrics(str(w)) for w in workdirs], status,
                          time.time() - tick)
        stored["runs"][key] = row
        if i == 0 and status == "cut" and row["eval_rounds"]:
            target = row["eval_rounds"][-1]
        stored["rounds"][str(alpha)] = target
        write_json(ctx.out / RUNS_FILE, stored)
        write_accuracy_plot(ctx.out, stored["runs"])
        write_summary(ctx.out, ctx.scratch)


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return ""
    return f"{statistics.mean(finite):.3f} ± {statistics.pstdev(finite):.3f}" if len(finite) > 1 else \
        f"{finite[0]:.3f}"


def spry_table_rows(runs: dict) -> list[dict]:
    """The table: per α, each method at the largest round every method of that α evaluated, at its last
    evaluation, and at rounds 500 / 1000 / 1500."""
    rows = []
    for alpha in sorted({r["alpha"] for r in runs.values()}, reverse=True):
        members = [r for r in runs.values() if r["alpha"] == alpha]
        evaluated = [set(r["eval_rounds"]) for r in members if r.get("eval_rounds")]
        common = max(set.intersection(*evaluated), default=None) if evaluated else None
        for r in sorted(members, key=lambda r: TABLE_METHODS.index(r["method"])):
            at = lambda rnd: mean_std(r["accuracy"][r["eval_rounds"].index(rnd)]) if rnd in r.get(
                "eval_rounds", []) else ""
            last = r["eval_rounds"][-1] if r.get("eval_rounds") else None
            plan = r.get("plan") or {}
            rows.append({
                "method": r["method"], "settings": r.get("settings_from", ""), "alpha": alpha,
                "seeds": r.get("seeds", ""), "rounds": min(r.get("rounds_reached") or [0]),
                f"acc@common ({common})": at(common) if common else "",
                "acc@last": f"{at(last)} (r{last})" if last else "",
                **{f"acc@{k}": at(k) for k in (500, 1000, 1500)},
                "s/round": r.get("round_s_median"), "round 1 s": r.get("first_round_s"),
                "wall s": r.get("method_wall_s"),
                "chunk": f"{plan.get('strategy', '')} {plan.get('chunk_size', '')}".strip(),
                "status": r["status"]})
    return rows


def write_accuracy_plot(out: Path, runs: dict) -> None:
    from spryjax.plots import curves
    lines = {f"{r['method']} α={r['alpha']}": [{"round": rnd, "generalized_accuracy": statistics.mean(accs)}
                                               for rnd, accs in zip(r["eval_rounds"], r["accuracy"])]
             for r in runs.values() if r.get("eval_rounds")}
    if lines:
        curves(lines, str(out / PLOT_FILE), xs=("round",),
               title="LoRA MiniLM-L6, Rotten Tomatoes, 100 clients: accuracy, mean over seeds")


# ----------------------------------------------------------------------------------------------------------------
# Part 2: throughput


def throughput_part(ctx: Context) -> None:
    bench = load_script("bench_throughput")
    rows = []
    for model in ctx.sizes.models:
        if model == "mlp" and importlib.util.find_spec("sklearn") is None:
            rows.append({"model": "mlp", "note": "skipped: scikit-learn (the MLP's 8×8 digits) is not installed"})
            continue
        task, params, data = bench.workload(model, max(ctx.sizes.cohorts))
        for cohort in ctx.sizes.cohorts:
            for strategy in ("auto", "reference"):
                print(f"\n== part 2: {model}, {cohort} clients, {strategy} ==", flush=True)
                rows.append(bench.measure(model, cohort, strategy, data, task, params, 1 if cohort >= 1000 else 3,
                                          16.0))
                reference = {(r["model"], r["clients"]): r["client_steps_per_s"] for r in rows
                             if r.get("strategy") == "reference"}
                for r in rows:
                    if (r.get("model"), r.get("clients")) in reference:
                        r["vs_reference"] = r["client_steps_per_s"] / reference[(r["model"], r["clients"])]
                write_json(ctx.out / THROUGHPUT_FILE, rows)
                write_summary(ctx.out, ctx.scratch)


# ----------------------------------------------------------------------------------------------------------------
# Part 3: vectorized sweep


def sweep_method(ctx: Context) -> str:
    """bundle_config's argument for part 3's Spry configs."""
    return ",".join(["spry", str(ctx.bundle)] + (["smoke"] if ctx.smoke else []))


def vectorized_part(ctx: Context) -> None:
    bench = load_script("bench_vectorized")
    bench.CONFIGS["spry_bundle"] = f"{HERE / 'bundle_config.py'}:{{method}}"
    rows = []
    for mode in ("sequential", "vectorized"):
        print(f"\n== part 3: {ctx.sizes.sweep_seeds} Spry seeds × {ctx.sizes.sweep_rounds} rounds, {mode} ==",
              flush=True)
        rows.append(bench.child("spry_bundle", mode, rounds=ctx.sizes.sweep_rounds, seeds=ctx.sizes.sweep_seeds,
                                method=sweep_method(ctx)))
        write_json(ctx.out / VECTORIZED_FILE, rows)
        write_summary(ctx.out, ctx.scratch)


# ----------------------------------------------------------------------------------------------------------------
# Part 4: the MiniLM client step


def one_client_batch(train, batch_size: int) -> tuple[dict, Any]:
    """The client and minibatch `simulate.client_step_cost` measures: the largest of the first 64 clients, its
    first `batch_size` examples (a one-minibatch client: one local step)."""
    import numpy as np
    client = int(np.argmax(train.counts[:64]))
    sample, counts = train.gather([client], batch_size=batch_size)
    return {k: v[0, :batch_size] for k, v in sample.items()}, np.minimum(counts[0], batch_size)


def compile_step(ctx: Context, method: str, remat: str | None, dtype: str) -> tuple[Any, tuple, float]:
    """(the compiled client update of `method` on one minibatch, its arguments, compile seconds)."""
    import jax
    import jax.numpy as jnp
    from spryjax import build
    from spryjax.runners import federated
    config = bundle_config.config(method, str(ctx.bundle), smoke=ctx.smoke)
    config.model.dtype = dtype
    if remat:
        config.model.remat = remat
    built = federated.setup(config)
    algorithm = build.algorithm(config.algorithm, built.task, built.params, config.fl.clients_per_round)
    data, count = one_client_batch(built.clients.train, config.algorithm.batch_size)
    args = (built.frozen, algorithm.broadcast(algorithm.init(built.params, jax.random.key(0))), data, count)
    step = jax.jit(lambda f, b, d, n: algorithm.client_update(f, b, d, n, jnp.int32(0), jax.random.key(0)))
    tick = time.perf_counter()
    compiled = step.lower(*args).compile()
    return compiled, args, time.perf_counter() - tick


def measure_step(ctx: Context, label: str, method: str, remat: str | None, dtype: str) -> dict:
    """One row of part 4: the step compiled (a cache load after the warm-up), then timed."""
    import jax
    from spryjax.memory import MIB, device_peak_bytes, flops_of, memory_of
    compiled, args, compile_s = compile_step(ctx, method, remat, dtype)
    in_use = (jax.local_devices()[0].memory_stats() or {}).get("bytes_in_use")
    peak_before = device_peak_bytes()
    jax.block_until_ready(compiled(*args))   # warm-up
    times = []
    for _ in range(ctx.sizes.step_repeats):
        tick = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - tick)
    memory, flops, peak = memory_of(compiled), flops_of(compiled), device_peak_bytes()
    ms = statistics.median(times) * 1e3
    raised = peak is not None and in_use is not None and peak > (peak_before or 0)
    return {"step": label, "base_dtype": dtype, "ms": ms, "gflops": flops / 1e9, "tflop_per_s": flops / ms / 1e9,
            "compiled_MiB": memory.total / MIB, "temp_MiB": memory.temp / MIB,
            "device_peak_MiB": peak / MIB if peak else None,
            # the step's own peak above what was in use, where it raised the process's high-water mark
            "peak_above_in_use_MiB": (peak - in_use) / MIB if raised else None,
            "compile_s": compile_s, "batch": int(args[2]["input_ids"].shape[0]),
            "sequence": int(args[2]["input_ids"].shape[-1])}


def client_step_part(ctx: Context) -> None:
    rows = []
    for label, method, remat, dtype in STEP_ROWS[ctx.sizes.step_rows]:
        print(f"\n== part 4: {label}, {dtype} base ==", flush=True)
        rows.append(measure_step(ctx, label, method, remat, dtype))
        write_json(ctx.out / STEP_FILE, rows)
        write_summary(ctx.out, ctx.scratch)
        gc.collect()


# ----------------------------------------------------------------------------------------------------------------
# Warm-up: every program of parts 1, 3 and 4 compiled at once, in parallel processes, into the persistent cache


def warm_targets(parts: list[str], sizes: Sizes) -> list[str]:
    """The warm-up's targets for the selected parts (part 2's chunk sizes depend on free memory: not warmed)."""
    targets = []
    if {"1", "1b"} & set(parts):
        targets += [f"table:{method}" for method in TABLE_METHODS]
    if "3" in parts:
        targets += ["sweep:sequential", "sweep:vectorized"]
    if "4" in parts:
        targets += [f"step:{i}" for i in range(len(STEP_ROWS))[sizes.step_rows]]
    return targets


def warm(ctx: Context, target: str) -> None:
    """Compiles the programs of `target` the way its part will (same configs and shapes, so the same HLO): the
    part's own compiles then load from the cache. Runs a round or two where compiling needs the engine's run."""
    from spryjax.runners import federated
    kind, _, what = target.partition(":")
    workdir = ctx.scratch / "warm" / target.replace(":", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    if kind == "table":   # rounds 1 and 2: the round, the interim and the final evaluation
        configs = [member_config(ctx, what, 1.0, seed, 2) for seed in range(ctx.sizes.seeds)]
        for config in configs:
            config.fl.eval_every = 1
        federated.run_federated_vectorized(configs, [str(workdir / f"s{seed}") for seed in range(len(configs))])
    elif kind == "sweep":  # scripts/bench_vectorized.py's configs, one round
        seeds = range(1 if what == "sequential" else ctx.sizes.sweep_seeds)
        configs = [bundle_config.get_config(sweep_method(ctx)) for _ in seeds]
        for seed, config in zip(seeds, configs):
            config.seed, config.num_rounds, config.fl.eval_every, config.fl.checkpoint_every = seed, 1, 0, 0
        workdirs = [str(workdir / f"s{seed}") for seed in seeds]
        if what == "sequential":
            federated.run_federated(configs[0], workdirs[0])
        else:
            federated.run_federated_vectorized(configs, workdirs)
    else:
        compile_step(ctx, *STEP_ROWS[int(what)][1:])


def warm_up(args, targets: list[str], deadline: float, env: dict) -> dict[str, dict]:
    """The targets' warm processes, as many at once as there are CPU cores, without GPU memory preallocation
    (they hold a few GB each); those unfinished at `deadline` are killed. Output: scratch/warm/<target>.log."""
    env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    logs = Path(args.scratch) / "warm"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(targets), {}, {}
    workers = max(1, min(len(targets), os.cpu_count() or 1))
    while pending or running:
        while pending and len(running) < workers:
            target = pending.pop(0)
            command = [sys.executable, str(Path(__file__).resolve()), args.bundle, args.out, "--warm", target,
                       "--scratch", args.scratch] + (["--smoke"] if args.smoke else [])
            log = open(logs / f"{target.replace(':', '_')}.log", "w")
            running[target] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log,
                                time.time())
        time.sleep(0.2)
        for target, (process, log, tick) in list(running.items()):
            code = process.poll()
            if code is None and time.time() < deadline:
                continue
            if code is None:
                process.kill()
                process.wait()
            log.close()
            del running[target]
            results[target] = {"status": "compiled" if code == 0 else ("killed at the warm-up deadline" if code is
                                                                       None else f"failed ({code})"),
                               "seconds": time.time() - tick}
            if code:
                print(f"warm-up {target} failed:\n{(logs / (target.replace(':', '_') + '.log')).read_text()[-2000:]}",
                      flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# summary.md


def write_summary(out: Path, scratch: Path) -> None:
    """summary.md from whatever the parts have written so far."""
    from spryjax.metrics import format_table
    status = read_json(scratch / STATUS_FILE, {})
    lines = ["# GPU run", ""]
    env = status.get("env", {})
    if env:
        lines += [", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if status.get("parts"):
        lines += [f"budget {status.get('budget_s')} s; parts in the order run:", "",
                  format_table([{"part": k, **v} for k, v in status["parts"].items()],
                               ["part", "title", "status", "seconds", "exit_code"], floatfmt=".0f"), ""]
    if status.get("warm"):
        lines += ["warm-up compiles (parallel processes, contended: not the compile time alone):", "",
                  format_table([{"target": k, **v} for k, v in status["warm"].items()], floatfmt=".0f"), ""]
    runs = read_json(out / RUNS_FILE, {}).get("runs", {})
    finished = {k: v for k, v in runs.items() if "eval_rounds" in v}
    if finished:
        lines += ["## 1. Spry table (accuracy: generalized, mean ± std over seeds)", "",
                  format_table(spry_table_rows(finished), floatfmt=".3g"), ""]
        lines += [f"- {k}: {v['status']}" for k, v in runs.items() if k not in finished] + [""]
    throughput = read_json(out / THROUGHPUT_FILE, [])
    if throughput:
        lines += ["## 2. Engine throughput (FedAvg, 5 local steps per client)", "",
                  format_table(throughput, ["model", "clients", "strategy", "rounds_per_s", "client_steps_per_s",
                                            "vs_reference", "memory_MiB", "note"], floatfmt=".3g"), ""]
    sweep = read_json(out / VECTORIZED_FILE, [])
    if sweep:
        lines += ["## 3. Vectorized sweep (Spry, persistent compilation cache on)", "",
                  format_table(sweep, ["task", "mode", "strategy", "chunk", "total_s", "compute_s",
                                       "steady_s_per_round", "final_train_loss"], floatfmt=".4g"), ""]
        if len(sweep) == 2:
            seq, vec = sweep
            ratio = lambda k: seq[k] / vec[k] if vec[k] else float("nan")
            lines += [f"vectorized ÷ sequential: {ratio('total_s'):.2f}× in total, {ratio('compute_s'):.2f}× in "
                      f"rounds, {ratio('steady_s_per_round'):.2f}× per steady round", ""]
    steps = read_json(out / STEP_FILE, [])
    if steps:
        lines += ["## 4. MiniLM client step (batch 8, one local step)", "", format_table(steps, floatfmt=".4g"), ""]
    (out / SUMMARY_FILE).write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Orchestration


class Part(NamedTuple):
    name: str
    title: str
    run: Callable[[Context], None]
    minimum: float      # seconds: not started with less left (full size)


PARTS = {p.name: p for p in [
    Part("1", "Spry table, α = 1.0", lambda ctx: spry_table_part(ctx, 1.0), 120),
    Part("2", "engine throughput", throughput_part, 40),
    Part("3", "vectorized sweep", vectorized_part, 40),
    Part("4", "MiniLM client step", client_step_part, 20),
    Part("1b", "Spry table, α = 0.1", lambda ctx: spry_table_part(ctx, 0.1), 120),
]}


def update_status(scratch: Path, **fields) -> dict:
    status = read_json(scratch / STATUS_FILE, {})
    for key, value in fields.items():
        if isinstance(value, dict):
            status.setdefault(key, {}).update(value)
        else:
            status[key] = value
    write_json(scratch / STATUS_FILE, status)
    return status


def environment() -> dict:
    import jax
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "python": sys.version.split()[0],
            "memory_limit_GiB": round(stats["bytes_limit"] / 2**30, 1) if "bytes_limit" in stats else None}


def child(args) -> int:
    ctx = Context(Path(args.bundle), Path(args.out), Path(args.scratch), args.smoke, args.deadline)
    if args.warm:
        warm(ctx, args.warm)
        return 0
    if "env" not in read_json(ctx.scratch / STATUS_FILE, {}):
        update_status(ctx.scratch, env=environment())
    try:
        PARTS[args.child].run(ctx)
    except KeyboardInterrupt:
        print(f"part {args.child}: interrupted at its deadline; its finished rows are written", flush=True)
    finally:
        write_summary(ctx.out, ctx.scratch)
    return 0


def run_part(args, part: Part, deadline: float, env: dict) -> tuple[str, int | None]:
    """The part in its own process, interrupted at `deadline` + GRACE_SECONDS, killed KILL_SECONDS later."""
    command = [sys.executable, str(Path(__file__).resolve()), args.bundle, args.out, "--child", part.name,
               "--deadline", repr(deadline), "--scratch", args.scratch] + (["--smoke"] if args.smoke else [])
    process = subprocess.Popen(command, env=env)
    try:
        return "finished", process.wait(timeout=max(deadline - time.time(), 0) + GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    try:
        return "interrupted past its deadline", process.wait(timeout=KILL_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return "killed past its deadline", process.wait()


def orchestrate(args) -> int:
    start = args.start or time.time()
    end = start + args.budget
    out, scratch = Path(args.out), Path(args.scratch)
    if not (Path(args.bundle) / bundle_config.DATA_FILE).is_file():
        raise InputError(f"{args.bundle}: not a device bundle (no {bundle_config.DATA_FILE}; run "
                         "scripts/device/prepare.sh)")
    out.mkdir(parents=True, exist_ok=True)
    for name in (RUNS_FILE, PLOT_FILE, THROUGHPUT_FILE, VECTORIZED_FILE, STEP_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    update_status(scratch, budget_s=args.budget, parts={})
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(scratch / "jax_cache"), "SPRYJAX_PROGRESS": "0"}
    parts = args.parts.split(",")
    targets = warm_targets(parts, SMOKE if args.smoke else FULL) if args.warm_seconds > 0 else []
    if targets:
        print(f"\n== warm-up: {len(targets)} compiles in parallel, at most {args.warm_seconds:.0f} s ==", flush=True)
        tick = time.time()
        warmed = warm_up(args, targets, min(tick + args.warm_seconds, end - FINISH_SECONDS), env)
        update_status(scratch, warm=warmed, parts={"warm-up": {
            "title": f"{sum(r['status'] == 'compiled' for r in warmed.values())}/{len(targets)} compiled",
            "status": "finished", "seconds": time.time() - tick}})
    for name in parts:
        part = PARTS[name]
        left = end - time.time() - FINISH_SECONDS
        minimum = 0 if args.smoke else part.minimum
        if left < max(minimum, 1):
            update_status(scratch, parts={name: {"title": part.title, "status":
                                                 f"dropped: {left:.0f} s left, needs {minimum:.0f}"}})
            print(f"\n== part {name} ({part.title}) dropped: {left:.0f} s left ==", flush=True)
            continue
        allotment = args.part1_seconds if name == "1" and args.part1_seconds else left
        deadline = time.time() + max(min(left, allotment), minimum)
        print(f"\n== part {name} ({part.title}): {deadline - time.time():.0f} s ==", flush=True)
        tick = time.time()
        how, code = run_part(args, part, deadline, env)
        update_status(scratch, parts={name: {"title": part.title, "status": how, "seconds": time.time() - tick,
                                             "exit_code": code}})
        write_summary(out, scratch)
    write_summary(out, scratch)
    print(f"\n{time.time() - start:.0f} s in all; results in {out}", flush=True)
    print((out / SUMMARY_FILE).read_text(), flush=True)
    return 0


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("out")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke sizes (see the module docstring)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds from --start to the end")
    parser.add_argument("--part1-seconds", type=float, default=None,
                        help="part 1's (α = 1.0) time at most (default: all that is left: strict priority)")
    parser.add_argument("--warm-seconds", type=float, default=150.0,
                        help="at most this long compiling every program in parallel first (0: no warm-up)")
    parser.add_argument("--parts", default="1,2,3,4,1b", help="which parts, in this order")
    parser.add_argument("--start", type=float, default=None, help="time.time() at which the budget began")
    parser.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "spryjax_device"))
    parser.add_argument("--child", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        raise InputError(f"--parts: unknown part {unknown[0]!r}; known: {', '.join(PARTS)}")
    return child(args) if (args.child or args.warm) else orchestrate(args)


if __name__ == "__main__":
    sys.exit(run_command(main, "scripts/device/gpu_run.py"))
