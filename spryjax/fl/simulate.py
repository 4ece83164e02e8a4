"""The round engine: any `FederatedAlgorithm`, any model, clients vmapped and sharded over a device mesh.

Round r, with root key K = key(seed):
    cohort   = C clients drawn uniformly without replacement by numpy's Generator([seed, r])
    data     = their padded examples [C, P, ...] (FederatedData.gather), sharded over the mesh's "clients" axis
    key_r    = fold_in(K, r);   client in slot s gets fold_in(key_r, s)
    outputs  = client_update for every client, by one of the execution strategies below
    u        = Σ_s w_s ⊙ update_s / Σ_s w_s  (per leaf), accumulated chunk by chunk
    state    = server_update(state, u)
Nothing depends on device count, chunking or host count except the order of floating-point sums.

Execution strategies (`strategy=`):
    "vmap"     all C clients vmapped at once, one jit per round (fastest where dispatch dominates; memory ∝ C).
    "chunked"  sequential chunks of `client_chunk_size` vmapped clients inside one jit (`lax.scan`), the aggregate
               accumulated across chunks: memory ∝ chunk size, so 4096 clients per round fit. Chunk size 1 is a
               sequential scan over clients.
    "loop"     a Python loop over clients (fedjax's `for_each_client` style): one jitted client_update per client,
               or, where the algorithm gives an `eager_client_update`, one jitted step per local minibatch
               (faster on CPU); `client_chunk_size` clients in flight on host threads; no per-client weight
               copies, no grouped convolutions.
    "auto"     on CPU: "loop" when one client's step is large (≥ `AUTO_LOOP_FLOPS`), with one client in flight per
               core (at most 8; 2 clients on 2 cores ran the CNN at 1.3× one), else "chunked" with a chunk of
               16 × devices clients (scripts/bench_throughput.py has the measurements behind this rule).
               On GPU/TPU: "chunked", as many clients per chunk as fit in `AUTO_MEMORY_SHARE` of the device's
               free memory (`chunk_from_memory`), the whole cohort at most; the run's log says what it picked
               and why (RoundPlan.reason).

The host loop around the rounds (metrics.jsonl records, evaluation every `eval_every` rounds, checkpoints,
resuming, divergence) is `spryjax.fl.host_loop`, shared with vectorized sweeps.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spryjax.data.federated import FederatedData
from spryjax.errors import InputError
from spryjax.fl import mesh as mesh_lib
from spryjax.fl.algorithm import ClientOutput, FederatedAlgorithm, MinibatchTrim, ServerState
from spryjax.fl.host_loop import LoopOptions, MemberStates, run_rounds
from spryjax.memory import MemoryReport, device_free_bytes, flops_of, memory_of
from spryjax.pytrees import all_finite, tree_bytes
from spryjax.task import summarize

PyTree = Any
STRATEGIES = ("auto", "vmap", "chunked", "loop")
# Key streams besides the rounds' fold_in(root, r), r ≥ 1.
INIT_STREAM, EVAL_STREAM = 2**31 - 1, 2**31 - 2
AUTO_LOOP_FLOPS = 5e7  # per client step; above it the CPU loop beat vmapped chunks (scripts/bench_throughput.py)
AUTO_MEMORY_SHARE = 0.7  # of a device's free memory that vmapped clients may use (XLA's own scratch, fragmentation)


class RoundPlan(NamedTuple):
    strategy: str        # "vmap", "chunked" or "loop"
    chunk_size: int      # clients vmapped together (a multiple of the device count); 1 for the loop
    num_chunks: int      # sequential chunks per round; chunk_size × num_chunks ≥ cohort size (the rest is padding)
    in_flight: int = 1   # loop: clients trained at once on host threads
    reason: str = ""     # why "auto" chose this plan (empty for an explicit strategy)


def chunk_from_memory(step: "StepCost", free_bytes: int, num_devices: int, cohort_size: int) -> tuple[int, str]:
    """(clients per vmapped chunk, why) on a device with `free_bytes` free per device.

    One client's compiled step (`client_step_cost`) holds the shared inputs (the frozen base and the broadcast
    parameters: argument bytes less the client's data) once, and per client its data, temporaries and outputs.
    Vmapping C clients per device needs about shared + C × per_client, so
        C = ⌊(AUTO_MEMORY_SHARE × free − shared) / per_client⌋,
    at least 1 and at most the cohort (per device), times the device count."""
    shared = max(step.memory.argument - step.data_bytes - step.memory.alias, 0)
    per_client = max(step.memory.temp + step.memory.output + step.data_bytes, 1)
    fits = int((AUTO_MEMORY_SHARE * free_bytes - shared) // per_client)
    per_device = max(1, min(fits, -(-cohort_size // num_devices)))
    why = (f"{per_device} clients per device fit in {AUTO_MEMORY_SHARE:.0%} of {free_bytes / 2**30:.1f} GiB free: "
           f"{shared / 2**20:.0f} MiB shared + {per_client / 2**20:.1f} MiB per client")
    return per_device * num_devices, why


def plan_round(strategy: str, cohort_size: int, num_devices: int, *, client_chunk_size: int | None = None,
               step: "StepCost | None" = None, backend: str | None = None, free_bytes: int | None = None
               ) -> RoundPlan:
    """How a cohort of `cohort_size` clients is executed (see the module docstring). `step` is one client's
    compiled cost; `free_bytes` a device's free memory (default: what its allocator reports, None on CPU)."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy: unknown {strategy!r}; known: {', '.join(STRATEGIES)}")
    backend = backend or jax.default_backend()
    reason = ""
    if strategy == "auto":
        if backend != "cpu":
            free_bytes = free_bytes if free_bytes is not None else device_free_bytes()
        if backend == "cpu" and num_devices == 1 and step is not None and step.flops >= AUTO_LOOP_FLOPS:
            strategy = "loop"
            client_chunk_size = client_chunk_size or min(os.cpu_count() or 1, 8)  # clients in flight
            reason = f"CPU, a large client step ({step.flops:.2g} FLOPs): one jitted step per minibatch"
        elif backend != "cpu" and step is not None and free_bytes and not client_chunk_size:
            strategy = "chunked"
            client_chunk_size, reason = chunk_from_memory(step, free_bytes, num_devices, cohort_size)
        else:
            strategy = "chunked"
            client_chunk_size = client_chunk_size or 16 * num_devices
            reason = f"chunks of {client_chunk_size} clients (16 per device)"
    if strategy == "loop":
        return RoundPlan("loop", 1, cohort_size, in_flight=min(client_chunk_size or 1, cohort_size), reason=reason)
    chunk = cohort_size if strategy == "vmap" else min(client_chunk_size or cohort_size, cohort_size)
    chunk = -(-chunk // num_devices) * num_devices
    return RoundPlan(strategy, chunk, -(-cohort_size // chunk), reason=reason)


# ----------------------------------------------------------------------------------------------------------------
# Aggregation: ratio of sums, so it accumulates over chunks and devices


class Accumulator(NamedTuple):
    numerator: PyTree       # Σ w ⊙ update, update's structure
    denominator: PyTree     # Σ w, one scalar per leaf
    metric_sums: dict       # Σ n · metric  (for example-weighted means)
    steps: jax.Array        # Σ local steps over clients (client-steps)
    examples: jax.Array     # Σ n


def _per_leaf(weight, update):
    return weight if jax.tree.structure(weight) == jax.tree.structure(update) else \
        jax.tree.map(lambda _: weight, update)


def accumulate(acc: Accumulator | None, outputs: ClientOutput, counts: jax.Array) -> Accumulator:
    """Adds a batch of client outputs (leading clients axis) to the running sums; clients with count 0 are padding."""
    real = (counts > 0).astype(jnp.float32)
    n = counts.astype(jnp.float32)
    weights = jax.tree.map(lambda w: w.astype(jnp.float32) * real, _per_leaf(outputs.weight, outputs.update))
    part = Accumulator(
        numerator=jax.tree.map(lambda w, u: jnp.tensordot(w, u.astype(jnp.float32), axes=1), weights,
                               outputs.update),
        denominator=jax.tree.map(jnp.sum, weights),
        metric_sums={k: jnp.sum(v * n * real) for k, v in outputs.metrics.items()},
        steps=jnp.sum(outputs.metrics.get("steps", jnp.zeros_like(n)) * real),
        examples=jnp.sum(n * real))
    return part if acc is None else jax.tree.map(jnp.add, acc, part)


def finish(algorithm: FederatedAlgorithm, state: ServerState, acc: Accumulator) -> tuple[ServerState, dict]:
    """u = numerator / denominator per leaf (0 where nobody contributed), then the server update."""
    update = jax.tree.map(lambda num, den: jnp.where(den > 0, num / jnp.maximum(den, 1e-30), 0.0),
                          acc.numerator, acc.denominator)
    new_state = algorithm.server_update(state, update)
    metrics = {f"train_{k}": v / jnp.maximum(acc.examples, 1.0) for k, v in acc.metric_sums.items()}
    metrics.update(client_steps=acc.steps, examples=acc.examples)
    return new_state, metrics


# ----------------------------------------------------------------------------------------------------------------
# Round functions


def _client_keys(round_key, slots):
    return jax.vmap(lambda s: jax.random.fold_in(round_key, s))(slots)


def round_function(algorithm: FederatedAlgorithm, plan: RoundPlan, *, unroll: int | bool = 1) -> Callable:
    """The pure round(state, frozen, data, counts, round_key) -> (state, metrics) of the vmap and chunked
    strategies, data {name: [num_chunks, chunk, P, ...]}, counts [num_chunks, chunk]. `build_round` jits it;
    `spryjax.fl.vectorized` vmaps it over sweep members."""
    def round_fn(state, frozen, data, counts, round_key):
        broadcast = algorithm.broadcast(state)
        slots = jnp.arange(plan.num_chunks * plan.chunk_size, dtype=jnp.int32).reshape(plan.num_chunks,
                                                                                        plan.chunk_size)

        def chunk_step(acc, inputs):
            chunk_data, chunk_counts, chunk_slots = inputs
            outputs = jax.vmap(algorithm.client_update, in_axes=(None, None, 0, 0, 0, 0))(
                frozen, broadcast, chunk_data, chunk_counts, chunk_slots, _client_keys(round_key, chunk_slots))
            return accumulate(acc, outputs, chunk_counts), None

        first = jax.tree.map(lambda x: x[0], (data, counts, slots))
        acc0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: chunk_step(None, first)[0]))
        acc, _ = jax.lax.scan(chunk_step, acc0, (data, counts, slots), unroll=unroll)
        return finish(algorithm, state, acc)
    return round_fn


def build_round(algorithm: FederatedAlgorithm, plan: RoundPlan, mesh: Mesh | None, *, unroll: int | bool = 1,
                sequence_keys: tuple[str, ...] = (), sequence_multiple: int | None = None) -> Callable:
    """round(state, frozen, data, counts, round_key) -> (state, metrics).

    vmap/chunked: `round_function` jitted, the state donated.
    loop: data {name: [C, P, ...]} host arrays, counts [C]; a host loop over the clients, and an optional
    `lengths` [C, P] of each row's tokens: with `sequence_multiple`, an algorithm's eager client update cuts each
    minibatch's `sequence_keys` arrays to its longest row (`algorithm.MinibatchTrim`).
    """
    if plan.strategy == "loop":
        return _build_loop_round(algorithm, plan.in_flight, sequence_keys, sequence_multiple)
    round_fn = round_function(algorithm, plan, unroll=unroll)
    if mesh is None:
        return jax.jit(round_fn, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(round_fn, out_shardings=(replicated, replicated), donate_argnums=0)


def _build_loop_round(algorithm: FederatedAlgorithm, in_flight: int = 1, sequence_keys: tuple[str, ...] = (),
                      sequence_multiple: int | None = None) -> Callable:
    """The loop strategy. `in_flight` > 1 runs that many clients at once on host threads (JAX releases the GIL
    while XLA computes); outputs are accumulated in slot order either way, so the sums are the same."""
    client = algorithm.eager_client_update or jax.jit(algorithm.client_update)
    trims = bool(algorithm.eager_client_update and sequence_keys and sequence_multiple)
    add = jax.jit(lambda acc, out, n: accumulate(acc, jax.tree.map(lambda x: x[None], out), n[None]))
    first = jax.jit(lambda out, n: accumulate(None, jax.tree.map(lambda x: x[None], out), n[None]))
    broadcast = jax.jit(algorithm.broadcast)
    server = jax.jit(lambda state, acc: finish(algorithm, state, acc), donate_argnums=0)

    def round_fn(state, frozen, data, counts, round_key, lengths=None):
        b = broadcast(state)
        trim = lambda slot: ({"trim": MinibatchTrim(lengths[slot], sequence_keys, sequence_multiple)}
                             if trims and lengths is not None else {})
        run = lambda slot: client(frozen, b, {k: v[slot] for k, v in data.items()}, counts[slot], np.int32(slot),
                                  jax.random.fold_in(round_key, slot), **trim(slot))
        outputs = map(run, range(len(counts))) if in_flight == 1 else _in_order(run, len(counts), in_flight)
        acc = None
        for slot, out in enumerate(outputs):
            acc = first(out, counts[slot]) if acc is None else add(acc, out, counts[slot])
        return server(state, acc)
    return round_fn


def _in_order(fn: Callable, n: int, window: int):
    """fn(0), ..., fn(n − 1) computed on `window` host threads, at most `window` running ahead, yielded in order.
    The threads live until the last result is taken (starting them costs microseconds; a round takes far more)."""
    with ThreadPoolExecutor(window) as pool:
        pending = [pool.submit(fn, i) for i in range(min(window, n))]
        for i in range(n):
            result = pending[i].result()
            if i + window < n:
                pending.append(pool.submit(fn, i + window))
            pending[i] = None
            yield result


class EvaluationSchedule(NamedTuple):
    """Which clients an evaluation at round r covers, and whether it is the costlier final one.

    Evaluations run every `eval_every` rounds and at the last round (`host_loop`). Each covers the first
    `eval_clients` clients (None: all), except that with `interim_eval_clients` set, evaluations that are neither
    at the last round nor at a multiple of `full_eval_every` cover only the first `interim_eval_clients` (a cheap
    fixed subset for the curve). The last round uses the algorithm's `evaluate_client_final` where it has one."""
    num_rounds: int
    eval_clients: int | None = None
    interim_eval_clients: int | None = None
    full_eval_every: int | None = None

    def clients(self, round_: int) -> int | None:
        full = round_ == self.num_rounds or (self.full_eval_every and round_ % self.full_eval_every == 0)
        return self.eval_clients if (full or not self.interim_eval_clients) else self.interim_eval_clients

    def final(self, round_: int) -> bool:
        return round_ == self.num_rounds


def evaluation_function(algorithm: FederatedAlgorithm, chunk: int, num_chunks: int, *, final: bool = False
                        ) -> Callable:
    """The pure evaluate(frozen, broadcast, train, train_counts, test, test_counts, key) -> {group: sums} over all
    clients, arrays shaped [num_chunks, chunk, ...]; clients with no test examples contribute nothing. `final`
    uses the algorithm's `evaluate_client_final` where it has one."""
    evaluate_client = (algorithm.evaluate_client_final if final else None) or algorithm.evaluate_client

    def evaluate(frozen, broadcast, train, train_counts, test, test_counts, key):
        slots = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)

        def chunk_step(total, inputs):
            tr, trn, te, ten, s = inputs
            sums = jax.vmap(evaluate_client, in_axes=(None, None, 0, 0, 0, 0, 0, 0))(
                frozen, broadcast, tr, trn, te, ten, s, _client_keys(key, s))   # evaluated clients are 0..E-1
            sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
            return (sums if total is None else jax.tree.map(jnp.add, total, sums)), None

        inputs = (train, train_counts, test, test_counts, slots)
        first = jax.tree.map(lambda x: x[0], inputs)
        zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: chunk_step(None, first)[0]))
        return jax.lax.scan(chunk_step, zero, inputs)[0]
    return evaluate


def build_evaluation(algorithm: FederatedAlgorithm, chunk: int, num_chunks: int, mesh: Mesh | None, *,
                     final: bool = False) -> Callable:
    """`evaluation_function` jitted, its sums replicated."""
    evaluate = evaluation_function(algorithm, chunk, num_chunks, final=final)
    if mesh is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, out_shardings=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------------------------
# Host side


def sample_cohort(seed: int, round_: int, num_clients: int, cohort_size: int) -> np.ndarray:
    """Client ids of round `round_`: uniform without replacement, a pure function of (seed, round)."""
    return np.random.default_rng([seed, round_]).choice(num_clients, cohort_size, replace=False)


def chunked(arrays: dict[str, np.ndarray], counts: np.ndarray, plan: RoundPlan) -> tuple[dict, np.ndarray]:
    """[C, ...] → [num_chunks, chunk, ...], padding with empty clients (count 0)."""
    total = plan.num_chunks * plan.chunk_size
    pad = lambda x: np.concatenate([x, np.zeros((total - len(x),) + x.shape[1:], x.dtype)])
    reshape = lambda x: pad(x).reshape((plan.num_chunks, plan.chunk_size) + x.shape[1:])
    return {k: reshape(v) for k, v in arrays.items()}, reshape(counts)


def place(tree, mesh: Mesh | None, *, clients_axis: int | None):
    """Fresh device copies of `tree` (rounds donate the state's buffers): sharded along `clients_axis`, or
    replicated when it is None."""
    if mesh is None:
        return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    if clients_axis is None:
        return mesh_lib.replicate(tree, mesh)
    return mesh_lib.shard_clients(tree, mesh, axis=clients_axis)


class RunResult(NamedTuple):
    state: ServerState
    history: list[dict]     # the per-round JSONL records of this run (including those of resumed rounds)
    plan: RoundPlan
    step: "StepCost"        # one client step's flops and compiled memory


class StepCost(NamedTuple):
    flops: float                 # XLA's count for one client update on one minibatch (0 if unavailable)
    memory: MemoryReport         # its compiled buffers: the per-client peak memory of the step
    data_bytes: int = 0          # of those arguments, the client's own data (the rest is shared by every client)


def client_step_cost(algorithm: FederatedAlgorithm, frozen, params, data: FederatedData, batch_size: int) -> StepCost:
    """Compiles one client's update on a one-minibatch client (the largest among the first clients, cut to
    `batch_size`) and reads XLA's cost and memory analyses. Local epochs only repeat the step, so this is the
    per-client peak; `strategy="auto"` uses the flops."""
    client = int(np.argmax(data.counts[:64]))
    sample, counts = data.gather([client], batch_size=batch_size)
    one = {k: v[0, :batch_size] for k, v in sample.items()}
    count = np.minimum(counts[0], batch_size)
    fn = lambda f, b, d, n: algorithm.client_update(f, b, d, n, jnp.int32(0), jax.random.key(0))
    # Clients receive the broadcast, whose structure may differ from the initial trainable (HypCluster's K models).
    broadcast = jax.eval_shape(lambda p: algorithm.broadcast(algorithm.init(p, jax.random.key(0))), params)
    compiled = jax.jit(fn).lower(frozen, broadcast, one, count).compile()
    return StepCost(flops_of(compiled), memory_of(compiled), tree_bytes(one))


def run_simulation(algorithm: FederatedAlgorithm, params: PyTree, frozen: PyTree, train: FederatedData,
                   test: FederatedData, *, num_rounds: int, clients_per_round: int, seed: int, batch_size: int,
                   strategy: Literal["auto", "vmap", "chunked", "loop"] = "auto",
                   client_chunk_size: int | None = None, eval_every: int = 10,
                   eval_clients: int | None = None, interim_eval_clients: int | None = None,
                   full_eval_every: int | None = None, eval_chunk_size: int | None = None,
                   checkpoint_every: int | None = None, workdir: str | None = None, mesh: Mesh | None = None,
                   unroll: int | bool = 1, show_progress: bool = True, sequence_multiple: int | None = 8,
                   summarize: Callable[[dict], dict[str, float]] = summarize) -> RunResult:
    """Runs `num_rounds` rounds of `algorithm` (see the module docstring) and returns the final state.

    Args:
      params, frozen: the trainable tree θ and the frozen tree every client holds (not communicated).
      train, test: the same clients' training and held-out examples.
      batch_size: client minibatch size; client data is padded to a multiple of it.
      strategy, client_chunk_size: how clients execute (see `plan_round`); chunk size None lets the strategy pick.
      eval_every: evaluate every this many rounds and at the last (0: never), on the first `eval_clients`
        clients (None: all), or at interim rounds on the first `interim_eval_clients` while rounds that are
        multiples of `full_eval_every` (a multiple of eval_every) and the last cover `eval_clients`
        (`EvaluationSchedule`).
      checkpoint_every: save the state every this many rounds and at the last (None or 0: never).
      workdir: metrics.jsonl and checkpoints/; an existing checkpoint there is resumed (`spryjax.fl.host_loop`).
      sequence_multiple: with the loop strategy and an algorithm's eager client update, each local minibatch's
        sequences are cut to its longest row rounded up to this many tokens (None: to the cohort's longest row,
        as every strategy does). About 1.4× faster Spry rounds on the offline text task (scripts/bench_lm_round.py).
      summarize: an evaluation group's summed sums -> its metrics (a dataset's own, `Dataset.summarize`, where its
        scores need host-side data such as SQuAD's texts).

    Example:
      >>> result = run_simulation(fedavg(task, client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0),
      ...                                batch_size=8), params, {}, train, test, num_rounds=30,
      ...                         clients_per_round=10, seed=0, batch_size=8)
    """
    num_clients = train.num_clients
    if not 1 <= clients_per_round <= num_clients:
        raise InputError(f"clients_per_round={clients_per_round} must be between 1 and the population of "
                         f"{num_clients} clients")
    mesh = mesh if mesh is not None else mesh_lib.client_mesh()
    num_devices = mesh.devices.size
    step = client_step_cost(algorithm, frozen, params, train, batch_size)
    plan = plan_round(strategy, clients_per_round, num_devices, client_chunk_size=client_chunk_size, step=step)
    if plan.reason and show_progress and mesh_lib.is_main_process():
        print(f"{algorithm.name}: {plan.strategy}, {plan.reason}", flush=True)
    round_mesh = None if plan.strategy == "loop" else mesh
    compiled_round = build_round(algorithm, plan, round_mesh, unroll=unroll, sequence_keys=train.sequence_keys,
                                 sequence_multiple=sequence_multiple)
    root = jax.random.key(seed)
    frozen = place(frozen, round_mesh, clients_axis=None)
    state = place(algorithm.init(params, jax.random.fold_in(root, INIT_STREAM)), round_mesh, clients_axis=None)

    def round_fn(state, round_):
        cohort = sample_cohort(seed, round_, num_clients, clients_per_round)
        arrays, counts = train.gather(cohort, batch_size=batch_size)
        extra = {}
        if plan.strategy == "loop":
            extra["lengths"] = train.gather_lengths(cohort, batch_size=batch_size)
        else:
            arrays, counts = chunked(arrays, counts, plan)
            arrays = place(arrays, round_mesh, clients_axis=1)
            counts = place(counts, round_mesh, clients_axis=1)
        state, metrics = compiled_round(state, frozen, arrays, counts, jax.random.fold_in(root, round_), **extra)
        return state, [{k: float(v) for k, v in mesh_lib.to_host(metrics).items()}]

    schedule = evaluation_schedule(num_rounds, eval_every, eval_clients, interim_eval_clients, full_eval_every)
    chunk = eval_chunk_size or max(plan.chunk_size, 8 * num_devices)

    @functools.cache
    def evaluation_for(clients: int | None, final: bool):
        return _evaluation(algorithm, train, test, clients, chunk, batch_size, mesh, num_devices, final=final,
                           summarize=summarize)

    def evaluate(state, round_):
        key = jax.random.fold_in(jax.random.fold_in(root, EVAL_STREAM), round_)
        return [evaluation_for(schedule.clients(round_), schedule.final(round_))(state, frozen, key)]
    shape = "" if plan.strategy == "loop" else f", {plan.chunk_size} clients/chunk"
    state, (history,) = run_rounds(
        state, round_fn, evaluate=evaluate if eval_every else None, workdirs=[workdir],
        write=mesh_lib.is_main_process(),
        options=LoopOptions(num_rounds, eval_every, checkpoint_every, show_progress, on_divergence="stop"),
        communication=algorithm.bytes_per_round(jax.eval_shape(lambda: params), clients_per_round),
        summary=client_step_summary(step, plan=plan._asdict()), members=MemberStates(
            split=lambda state: [state], join=lambda states: place(states[0], round_mesh, clients_axis=None),
            finite=lambda state: [bool(all_finite(state.params))]),
        desc=f"{algorithm.name} [{plan.strategy}{shape}]")
    return RunResult(state, history, plan, step)


def client_step_summary(step: StepCost, **extra) -> dict:
    """The first record of a run's metrics.jsonl: one client step's flops and compiled memory."""
    return {"summary": "client_step", "flops": step.flops, **extra,
            **{f"{k}_bytes": v for k, v in step.memory.as_dict().items()}}


def evaluation_arrays(train: FederatedData, test: FederatedData, eval_clients: int | None, chunk: int,
                      batch_size: int, num_devices: int) -> tuple[RoundPlan, tuple]:
    """The evaluated clients' (train, train_counts, test, test_counts) host arrays in chunks, and their plan."""
    ids = np.arange(min(eval_clients or train.num_clients, train.num_clients))
    chunk = -(-min(chunk, len(ids)) // num_devices) * num_devices
    plan = RoundPlan("chunked", chunk, -(-len(ids) // chunk))
    train_arrays, train_counts = chunked(*train.gather(ids, batch_size=batch_size), plan)
    test_arrays, test_counts = chunked(*test.gather(ids, batch_size=batch_size), plan)
    return plan, (train_arrays, train_counts, test_arrays, test_counts)


def evaluation_record(groups: dict, summarize: Callable[[dict], dict[str, float]] = summarize
                      ) -> dict[str, float]:
    """{group: sums} (host arrays) -> {"<group>_<metric>": value}, e.g. generalized_accuracy."""
    return {f"{group}_{k}": v for group, sums in groups.items() for k, v in summarize(sums).items() if k != "count"}


def evaluation_schedule(num_rounds: int, eval_every: int, eval_clients: int | None,
                        interim_eval_clients: int | None, full_eval_every: int | None) -> EvaluationSchedule:
    """The checked `EvaluationSchedule` of a run's options."""
    if full_eval_every and eval_every and full_eval_every % eval_every:
        raise InputError(f"full_eval_every={full_eval_every} must be a multiple of eval_every={eval_every}")
    if full_eval_every and not interim_eval_clients:
        raise InputError("full_eval_every needs interim_eval_clients (every evaluation covers eval_clients otherwise)")
    return EvaluationSchedule(num_rounds, eval_clients, interim_eval_clients, full_eval_every)


def _evaluation(algorithm, train: FederatedData, test: FederatedData, eval_clients, chunk, batch_size, mesh,
                num_devices, *, final: bool = False, summarize: Callable[[dict], dict[str, float]] = summarize):
    """A closure evaluating the state on a fixed set of clients (data gathered and placed once); its records
    carry `evaluated_clients`."""
    plan, arrays = evaluation_arrays(train, test, eval_clients, chunk, batch_size, num_devices)
    placed = place(arrays, mesh, clients_axis=1)
    evaluate = build_evaluation(algorithm, plan.chunk_size, plan.num_chunks, mesh, final=final)
    broadcast = jax.jit(algorithm.broadcast)
    evaluated = min(eval_clients or train.num_clients, train.num_clients)

    def run_evaluation(state, frozen, key):
        record = evaluation_record(mesh_lib.to_host(evaluate(frozen, broadcast(state), *placed, key)), summarize)
        return {**record, "evaluated_clients": evaluated}
    return run_evaluation
