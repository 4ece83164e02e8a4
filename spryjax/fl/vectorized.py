"""Vectorized sweeps: S federated runs that differ only in values, as ONE vmapped simulation, one jit per round.

Member m (seed s_m, hyperparameters h_m, its own clients and initial parameters) runs exactly the rounds
`spryjax.fl.simulate.run_simulation` would run for it alone:

    root_m   = key(s_m);  round key fold_in(root_m, r);  evaluation key fold_in(fold_in(root_m, EVAL), r)
               (derived inside the compiled round from the stacked roots and r: no per-member dispatch per round)
    cohort_m = sample_cohort(s_m, r, N, C) of member m's own clients, gathered into data [S, chunks, chunk, P, ...]
    (state_m, metrics_m) = round_function(make_algorithm(h_m), plan)(state_m, frozen, data_m, counts_m, key_m)

and the S rounds are `jax.vmap`ped into one compiled program: a leading member axis on the server state, the
data and the keys. Metrics are split per member and written to each member's workdir (metrics.jsonl,
checkpoints/ with that member's own state, so a member can later be resumed alone), as if run alone; only
timings (round_seconds, wall_time) are those of the joint program.

What may differ between members:
  - anything built on the host per member: the seed (data split, partition, initial parameters, cohorts, keys),
    the partition (e.g. Dirichlet α), data options, as long as the arrays keep their shapes. Each member's cohort
    is zero-padded to the largest member's shape, which is what padding examples and tokens already are.
  - algorithm hyperparameters used by arithmetic, passed as `hyperparams` and traced: the algorithm is rebuilt
    inside the vmapped function by `make_algorithm(h)` with h a tracer, so learning rates, weight decay, ε, σ, μ
    become per-member arrays (optax accepts array learning rates; no `inject_hyperparams`, so the optimizer state
    and the checkpoints keep the layout of a single run). A hyperparameter that decides a shape or Python control
    flow (number of tangents K, local epochs, batch size, algorithm name) cannot be traced: that fails at the
    first compile with an InputError naming it.
  - `frozen` is shared when all members hold the same values, else stacked.

The "loop" strategy (a Python loop over clients) cannot be vmapped; where "auto" picks it, members run chunks of
one client per device: the member axis then gives the vmap its width.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spryjax.data.federated import FederatedData, bucket_size
from spryjax.errors import InputError
from spryjax.fl import mesh as mesh_lib
from spryjax.fl import host_loop, simulate
from spryjax.fl.algorithm import FederatedAlgorithm
from spryjax.pytrees import all_finite

PyTree = Any
# Tracing a hyperparameter that decides a shape or a Python branch raises one of these.
_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError)


class Member(NamedTuple):
    """One run of a vectorized sweep."""
    params: PyTree                  # its initial trainable parameters
    frozen: PyTree                  # its frozen tree (shared when equal across members)
    train: FederatedData            # its clients' training examples
    test: FederatedData             # their held-out examples
    seed: int                       # root key and cohort sampling
    hyperparams: dict[str, float]   # values traced into make_algorithm (same keys for every member)
    workdir: str | None = None      # metrics.jsonl and checkpoints/ of this member


def _stack(trees: Sequence[PyTree]) -> PyTree:
    """Host arrays stacked on a new leading member axis, each zero-padded to the members' largest shape."""
    def stack(*leaves):
        leaves = [np.asarray(x) for x in leaves]
        shape = tuple(int(d) for d in np.max([x.shape for x in leaves], axis=0))
        out = np.zeros((len(leaves),) + shape, leaves[0].dtype)
        for m, x in enumerate(leaves):
            out[(m,) + tuple(slice(0, d) for d in x.shape)] = x
        return out
    return jax.tree.map(stack, *trees)


def _same_structure(trees: Sequence[PyTree], what: str) -> None:
    shapes = [jax.tree.map(lambda x: (np.shape(x), np.result_type(x)), t) for t in trees]
    for m, s in enumerate(shapes[1:], start=1):
        if s != shapes[0]:
            raise InputError(f"vectorized sweep: member {m}'s {what} differ in structure or shapes from member 0's; "
                             "only members whose arrays keep their shapes can be vectorized")


def equal_trees(a: PyTree, b: PyTree) -> bool:
    """Same structure and values (identical leaves are not compared)."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x is y or np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _member(tree: PyTree, m: int) -> PyTree:
    return jax.tree.map(lambda x: x[m], tree)


_members_finite = jax.jit(jax.vmap(all_finite))   # [S] booleans over a stacked tree


def run_vectorized(make_algorithm: Callable[[dict], FederatedAlgorithm], members: Sequence[Member], *,
                   num_rounds: int, clients_per_round: int, batch_size: int, strategy: str = "auto",
                   client_chunk_size: int | None = None, eval_every: int = 10, eval_clients: int | None = None,
                   interim_eval_clients: int | None = None, full_eval_every: int | None = None,
                   eval_chunk_size: int | None = None, checkpoint_every: int | None = None,
                   mesh: Mesh | None = None, unroll: int | bool = 1, show_progress: bool = True,
                   sequence_multiple: int | None = None) -> list[simulate.RunResult]:
    """Runs `num_rounds` rounds of every member as one vmapped program (see the module docstring); returns each
    member's RunResult as `simulate.run_simulation` would. Options mean what they mean there (`sequence_multiple`
    only acts in the loop strategy, which a vectorized sweep replaces by compiled chunks); a member whose training
    loss turns non-finite leaves the sweep and the others run on (`host_loop`'s "drop_member").

    Example:
      >>> make = lambda h: fedavg(task, client_optimizer=optax.sgd(h["lr"]), server_optimizer=optax.sgd(1.0),
      ...                         batch_size=8)
      >>> members = [Member(params_s, {}, train_s, test_s, seed=s, hyperparams={"lr": 0.1}) for s ...]
      >>> results = run_vectorized(make, members, num_rounds=30, clients_per_round=10, batch_size=8)
    """
    del sequence_multiple
    size = len(members)
    first = members[0]
    keys = sorted(first.hyperparams)
    if any(sorted(m.hyperparams) != keys for m in members):
        raise InputError("vectorized sweep: every member must give the same hyperparameter names")
    num_clients = first.train.num_clients
    if any(m.train.num_clients != num_clients for m in members):
        raise InputError("vectorized sweep: members must have the same number of clients")
    if not 1 <= clients_per_round <= num_clients:
        raise InputError(f"clients_per_round={clients_per_round} must be between 1 and the population of "
                         f"{num_clients} clients")
    _same_structure([m.params for m in members], "parameters")
    _same_structure([m.frozen for m in members], "frozen trees")

    algorithm = make_algorithm(first.hyperparams)  # host-side facts: name, bytes per round, one client's cost
    mesh = mesh if mesh is not None else mesh_lib.client_mesh()
    num_devices = mesh.devices.size
    step = simulate.client_step_cost(algorithm, first.frozen, first.params, first.train, batch_size)
    plan = simulate.plan_round(strategy, clients_per_round, num_devices, client_chunk_size=client_chunk_size,
                               step=step)
    if plan.strategy == "loop":
        plan = simulate.plan_round("chunked", clients_per_round, num_devices, client_chunk_size=1)

    # integers stay integers, so that one used as a count fails as such when traced (see _traceable)
    hyper = {k: jnp.asarray([m.hyperparams[k] for m in members]) for k in keys}
    traceable = lambda: _traceable(keys, algorithm.name)
    shared_frozen = all(equal_trees(first.frozen, m.frozen) for m in members[1:])
    frozen_axis = None if shared_frozen else 0
    frozen = mesh_lib.replicate(first.frozen if shared_frozen else _stack([m.frozen for m in members]), mesh)
    roots = jnp.stack([jax.random.key(m.seed) for m in members])   # [S]; round keys are derived inside the jit

    init = jax.vmap(lambda h, params, root: make_algorithm(h).init(params, jax.random.fold_in(
        root, simulate.INIT_STREAM)))
    with traceable():
        host_state = mesh_lib.to_host(init(hyper, _stack([m.params for m in members]), roots))
    hyper = mesh_lib.replicate(hyper, mesh)

    def member_round(h, state, frozen_m, data, counts, root, round_):
        return simulate.round_function(make_algorithm(h), plan, unroll=unroll)(
            state, frozen_m, data, counts, jax.random.fold_in(root, round_))
    replicated = NamedSharding(mesh, P())
    compiled_round = jax.jit(jax.vmap(member_round, in_axes=(0, 0, frozen_axis, 0, 0, 0, None)),
                             out_shardings=(replicated, replicated), donate_argnums=1)
    # Rows per client: the engine's power-of-two bucket of the round's largest client, or, when smaller, the
    # population's largest client rounded up to the batch size (one shape). Under vmap a padding batch's skip is
    # a select, so every padded step costs a real one: equal-size clients of 80 examples in batches of 8 would
    # otherwise compute 16 steps for 10. Padding steps change nothing, so results stay those of a single run.
    tightest = -(-max(int(m.train.counts.max()) for m in members) // batch_size) * batch_size

    def round_fn(state, round_):
        ids = [simulate.sample_cohort(m.seed, round_, num_clients, clients_per_round) for m in members]
        largest = max(int(m.train.counts[i].max()) for m, i in zip(members, ids))
        rows = min(bucket_size(largest, batch_size), tightest)
        cohorts = [m.train.gather(i, batch_size=batch_size, pad_to=rows) for m, i in zip(members, ids)]
        data, counts = _stack([simulate.chunked(arrays, n, plan) for arrays, n in cohorts])
        with traceable():
            state, metrics = compiled_round(hyper, state, frozen, mesh_lib.shard_clients(data, mesh, axis=2),
                                            mesh_lib.shard_clients(counts, mesh, axis=2), roots, np.int32(round_))
        metrics = mesh_lib.to_host(metrics)
        return state, [{k: float(v[m]) for k, v in metrics.items()} for m in range(size)]

    schedule = simulate.evaluation_schedule(num_rounds, eval_every, eval_clients, interim_eval_clients,
                                            full_eval_every)
    chunk = eval_chunk_size or max(plan.chunk_size, 8 * num_devices)

    @functools.cache
    def evaluation_for(clients: int | None, final: bool):
        return _evaluation(make_algorithm, members, hyper, frozen, frozen_axis, roots, clients, chunk, batch_size,
                           mesh, num_devices, final=final)

    def evaluate(state, round_):
        with traceable():
            return evaluation_for(schedule.clients(round_), schedule.final(round_))(state, round_)
    state, histories = host_loop.run_rounds(
        mesh_lib.replicate(host_state, mesh), round_fn, evaluate=evaluate if eval_every else None,
        workdirs=[m.workdir for m in members], write=mesh_lib.is_main_process(),
        options=host_loop.LoopOptions(num_rounds, eval_every, checkpoint_every, show_progress,
                                      on_divergence="drop_member"),
        communication=algorithm.bytes_per_round(jax.eval_shape(lambda: first.params), clients_per_round),
        summary=simulate.client_step_summary(step, vectorized_members=size, plan=plan._asdict()),
        members=host_loop.MemberStates(split=lambda state: [_member(state, m) for m in range(size)],
                                       join=lambda states: mesh_lib.replicate(_stack(states), mesh),
                                       finite=lambda state: np.asarray(_members_finite(state.params)).tolist()),
        desc=f"{algorithm.name} ×{size} vectorized [{plan.chunk_size} clients/chunk]")
    return [simulate.RunResult(_member(state, m), histories[m], plan, step) for m in range(size)]


@contextlib.contextmanager
def _traceable(keys: list[str], name: str):
    """Turns the error of tracing a hyperparameter that decides a shape or a Python branch into one line."""
    try:
        yield
    except _UNTRACEABLE as exc:
        raise InputError(f"vectorized sweep: {name} uses one of the hyperparameters {', '.join(keys) or '(none)'} "
                         f"for a shape or a Python branch ({type(exc).__name__}), so it cannot be vectorized; sweep "
                         "it without vectorizing") from None


def _evaluation(make_algorithm, members, hyper, frozen, frozen_axis, roots, eval_clients, chunk, batch_size, mesh,
                num_devices, *, final: bool = False) -> Callable[[Any, int], list[dict]]:
    """A closure evaluating every member's state on its own fixed set of clients: evaluate(state, round) ->
    one record per member."""
    plans_arrays = [simulate.evaluation_arrays(m.train, m.test, eval_clients, chunk, batch_size, num_devices)
                    for m in members]
    plan = plans_arrays[0][0]
    placed = mesh_lib.shard_clients(_stack([arrays for _, arrays in plans_arrays]), mesh, axis=2)

    def member_evaluation(h, frozen_m, state, train, train_counts, test, test_counts, root, round_):
        algorithm = make_algorithm(h)
        key = jax.random.fold_in(jax.random.fold_in(root, simulate.EVAL_STREAM), round_)
        return simulate.evaluation_function(algorithm, plan.chunk_size, plan.num_chunks, final=final)(
            frozen_m, algorithm.broadcast(state), train, train_counts, test, test_counts, key)
    evaluate = jax.jit(jax.vmap(member_evaluation, in_axes=(0, frozen_axis, 0, 0, 0, 0, 0, 0, None)),
                       out_shardings=NamedSharding(mesh, P()))

    def run_evaluation(state, round_):
        groups = mesh_lib.to_host(evaluate(hyper, frozen, state, *placed, roots, np.int32(round_)))
        evaluated = min(eval_clients or members[0].train.num_clients, members[0].train.num_clients)
        return [{**simulate.evaluation_record(_member(groups, m)), "evaluated_clients": evaluated}
                for m in range(len(members))]
    return run_evaluation
