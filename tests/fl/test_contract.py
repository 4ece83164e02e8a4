"""Contract tests: every algorithm of `spryjax.build.ALGORITHMS` through the same checks (DESIGN.md, item 10), as
optax runs every optimizer through the same checks. The table itself is iterated, so a new entry is covered
automatically, and an entry without a problem set up in `SETUPS` fails. `SETUPS` also holds variants,
"name:variant", for a factory's other shapes (per-epoch or per-iteration communication, Spry's finetuned
evaluation), which run the same checks.

Per algorithm, on a digits MLP (or, for `build.ROUTED_ALGORITHMS`, a tiny routed MLP on the digits):
    finite           one vmapped round gives finite parameters, train metrics and evaluation sums
    structure        the round keeps the server state's tree structure, shapes and dtypes
    deterministic    the same round from the same state and key twice is bitwise equal
    vmap == loop     the "vmap" plan and the "loop" plan (eager_client_update where given) agree to float tolerance
    compiled once    two rounds of the jitted vmapped round compile it once
    bytes            bytes_per_round equals what the tree implies, computed here from each algorithm's own claim
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spryjax import build
from spryjax.data import vision
from spryjax.data.federated import FederatedData
from spryjax.fl import simulate
from spryjax.models import small
from spryjax.nn import routing
from spryjax.task import classification_objective, classification_task

NAMES = sorted(build.ALGORITHMS)
COHORT, BATCH, PAD = 3, 4, 8              # clients per round, client batch, padded examples per client
SIZES = [6, 8, 5, 7, 8, 4]                 # examples per client; cohorts [0, 1, 2] and [3, 4, 5]
ROUTED_CLASSES = 4
SPRY_CHUNK = 2                             # Spry's tensors_per_chunk in these problems


# ------------------------------------------------------------------------------------------------- problems


class Problem(NamedTuple):
    model: Any                 # what the factory takes: a Task, or a RoutedModel
    params: Any                # the engine's initial trainable
    frozen: Any
    train: FederatedData
    test: FederatedData


def clients(arrays: dict[str, np.ndarray]) -> tuple[FederatedData, FederatedData]:
    starts = np.cumsum([0] + SIZES)
    parts = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    return (FederatedData.from_partition(arrays, parts),
            FederatedData.from_partition(arrays, [p + starts[-1] for p in parts]))


@functools.cache
def mlp_problem() -> Problem:
    data = vision.digits(seed=0)
    task, params, frozen = small.mlp_model(data, jax.random.key(0), hidden=(8,))
    return Problem(task, params, frozen, *clients(data.inputs()))


class RoutedMLP(nnx.Module):
    """A two-layer MLP routed at both layers (2 routing points) by a one-layer policy on the input: the smallest
    model with Flow's three parameter groups, built from `spryjax.nn.routing`'s primitives."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
        self.dense1 = routing.Routed(lambda r: nnx.Linear(in_features, hidden, rngs=r), rngs=rngs)
        self.dense2 = routing.Routed(lambda r: nnx.Linear(hidden, num_classes, rngs=r), rngs=rngs)
        self.router = routing.Router(in_features, (8,), num_points=2, rngs=rngs)

    def __call__(self, x, *, mode, hard=False, key=None):
        x = x.reshape(x.shape[0], -1)
        p = routing.route(lambda: self.router(x, key=key), mode=mode, hard=hard, shape=(x.shape[0], 2))
        h = jax.nn.relu(self.dense1(x, p=p[:, 0], mode=mode))
        return self.dense2(h, p=p[:, 1], mode=mode), p


@functools.cache
def routed_problem() -> Problem:
    """`RoutedMLP` on the digits, its states drawn with numpy (Flax's initializers compile for seconds on a loaded
    CPU), as tests/fl/test_flow.py builds its routed CNN."""
    data = vision.digits(seed=0)
    module = nnx.eval_shape(lambda: RoutedMLP(64, 8, data.num_classes, rngs=nnx.Rngs(0)))
    model = routing.routed_model(module, objective=classification_objective, num_points=2,
                                 make_task=functools.partial(classification_task, num_classes=data.num_classes))
    rng = np.random.default_rng(0)
    draw = lambda s: jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(max(np.prod(s.shape[:-1]), 4)), s.shape), s.dtype)
    model = model._replace(states=jax.tree.map(draw, model.states))
    return Problem(model, model.states, {}, *clients(data.inputs()))


# ------------------------------------------------------------------------------------------ expected bytes


def leaf_bytes(tree) -> np.ndarray:
    """Bytes of each leaf, in `jax.tree.leaves` order."""
    return np.array([int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)], np.int64)


def full_model(tree, cohort: int) -> tuple[int, int]:
    """Every client downloads and uploads all of `tree`."""
    total = int(leaf_bytes(tree).sum())
    return total * cohort, total * cohort


def spry_slot_tensors(order: list[int], shared: list[int], num_slots: int, per_chunk: int) -> list[set[int]]:
    """The Spry paper's split, written from spry.py's docstring: the tensors in layer order (head tensors taken out
    when shared) cut into J chunks of `per_chunk` consecutive ones; J ≥ C: chunk j → slot j mod C; J < C: slot s
    trains chunk s mod J. Shared tensors are trained by every slot."""
    rest = [t for t in order if t not in shared]
    chunks = [rest[i:i + per_chunk] for i in range(0, len(rest), per_chunk)]
    slots = [set(shared) for _ in range(num_slots)]
    if len(chunks) >= num_slots:
        for j, chunk in enumerate(chunks):
            slots[j % num_slots].update(chunk)
    else:
        for s in range(num_slots):
            slots[s].update(chunks[s % len(chunks)])
    return slots


def spry_bytes(tree, cohort: int, *, order=None, shared=(), per_chunk=SPRY_CHUNK) -> tuple[int, int]:
    """Per-epoch Spry: every client downloads everything; slot s uploads the tensors it trains."""
    sizes = leaf_bytes(tree)
    order = list(range(len(sizes))) if order is None else list(order)
    slots = spry_slot_tensors(order, list(shared), cohort, per_chunk)
    return int(sizes.sum()) * cohort, int(sum(sizes[list(s)].sum() for s in slots))


def layered_spry_bytes(tree, cohort: int) -> tuple[int, int]:
    """`spry_bytes` with the layer order the factory was given (`spry_options`)."""
    return spry_bytes(tree, cohort, order=build.tensor_layout(tree)[0])


# ------------------------------------------------------------------------------------------------- setups


class Setup(NamedTuple):
    routed: bool
    options: Callable[[Problem], dict]                # the factory's keyword options
    expected_bytes: Callable[[Any, int], tuple]       # (params_like, C) -> (down, up), from the module's claim


SGD, ADAM, SERVER = optax.sgd(0.1), optax.adam(1e-2), optax.sgd(1.0)
K = 2    # tangents of the zero-order and forward estimators


def backprop_options(problem):
    return dict(client_optimizer=SGD, server_optimizer=SERVER, batch_size=BATCH)


def spry_options(problem, **extra):
    order, head = build.tensor_layout(problem.params)
    return dict(clients_per_round=COHORT, client_optimizer=ADAM, server_optimizer=SERVER, batch_size=BATCH,
                tensors_per_chunk=SPRY_CHUNK, tensor_order=order, head_tensors=head, **extra)


def theta_g(states):
    return states[0]


def scalars_up(num_bytes: int):
    """The model down, `num_bytes` per client up (the seed trick)."""
    return lambda tree, c: (full_model(tree, c)[0], num_bytes * c)


SETUPS: dict[str, Setup] = {
    "fedavg": Setup(False, backprop_options, full_model),
    "fedprox": Setup(False, lambda p: dict(backprop_options(p), proximal_mu=0.1), full_model),
    "fedsgd": Setup(False, lambda p: dict(server_optimizer=SERVER, batch_size=BATCH), full_model),
    "spry": Setup(False, lambda p: spry_options(p, num_tangents=K), layered_spry_bytes),
    # per iteration: K fp32 jvp scalars up, no client optimizer
    "spry:per_iteration": Setup(False, lambda p: dict(spry_options(p, num_tangents=K, communication="per_iteration"),
                                                      client_optimizer=None), scalars_up(4 * K)),
    # evaluation after finetuning each evaluated client's chunk
    "spry:finetuned": Setup(False, lambda p: spry_options(p, num_tangents=K, finetune_epochs=1), layered_spry_bytes),
    "fedavg_split": Setup(False, spry_options, layered_spry_bytes),
    "fedfgd": Setup(False, lambda p: dict(backprop_options(p), client_optimizer=ADAM, num_tangents=K), full_model),
    "fedmezo": Setup(False, lambda p: dict(backprop_options(p), eps=1e-2, num_tangents=K), full_model),
    # FedMeZO per iteration: the model down, K fp32 scalars up
    "fedmezo:per_iteration": Setup(False, lambda p: dict(server_optimizer=SERVER, batch_size=BATCH, eps=1e-2,
                                                         num_tangents=K, communication="per_iteration"),
                                   scalars_up(4 * K)),
    # BAFFLE: the model down, K fp32 scalars up; BAFFLE+ (per epoch): the whole model both ways
    "baffle": Setup(False, lambda p: dict(server_optimizer=SERVER, batch_size=BATCH, sigma=1e-2, num_tangents=K),
                    scalars_up(4 * K)),
    "baffle:per_epoch": Setup(False, lambda p: dict(backprop_options(p), sigma=1e-2, num_tangents=K,
                                                    communication="per_epoch"), full_model),
    # FwdLLM: the model down, K_max scalars and K_max indices (4 bytes each) up; FwdLLM+ (per epoch): the whole
    # model both ways
    "fwdllm": Setup(False, lambda p: dict(server_optimizer=SERVER, batch_size=BATCH, num_tangents=K,
                                          initial_tangents=1, candidates=2), scalars_up(8 * K)),
    "fwdllm:per_epoch": Setup(False, lambda p: dict(backprop_options(p), num_tangents=K, initial_tangents=1,
                                                    candidates=2, communication="per_epoch"), full_model),
    # Flow communicates all three groups (θ_g, θ_l, φ)
    "flow": Setup(True, lambda p: dict(backprop_options(p), client_optimizer=optax.sgd(0.1, momentum=0.9)),
                  full_model),
    # the baselines hold and communicate θ_g only (personalization.on_global_path)
    "fedavg_ft": Setup(True, backprop_options, lambda states, c: full_model(theta_g(states), c)),
    "ditto": Setup(True, backprop_options, lambda states, c: full_model(theta_g(states), c)),
    "fedrep": Setup(True, backprop_options, lambda states, c: full_model(theta_g(states), c)),
    "lg_fedavg": Setup(True, backprop_options, lambda states, c: full_model(theta_g(states), c)),
    "knn_per": Setup(True, lambda p: dict(backprop_options(p), neighbors=3),
                     lambda states, c: full_model(theta_g(states), c)),
    # APFL: the server holds and averages w and v, two copies of θ_g
    "apfl": Setup(True, backprop_options, lambda states, c: full_model((theta_g(states),) * 2, c)),
    # HypCluster: all M models down (a client chooses among them), the chosen one up
    "hypcluster": Setup(True, lambda p: dict(backprop_options(p), num_models=2),
                        lambda states, c: (2 * full_model(theta_g(states), c)[0], full_model(theta_g(states), c)[1])),
}


# -------------------------------------------------------------------------------------------------- cases


def fresh_copy(tree):
    """New buffers (rounds donate their state; APFL's initial state holds θ_g twice)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def algorithm_of(case: str) -> str:
    """The `build.ALGORITHMS` name of a SETUPS key ("fwdllm:per_epoch" -> "fwdllm")."""
    return case.split(":")[0]


CASES = sorted(set(NAMES) | set(SETUPS))   # a table entry missing from SETUPS fails in Case


class Case:
    """One algorithm on its problem; each round is run once and shared by the checks."""

    def __init__(self, name: str):
        if name not in SETUPS:
            pytest.fail(f"ALGORITHMS[{name!r}] has no contract problem: add it to SETUPS in {__file__}")
        self.name, self.setup = name, SETUPS[name]
        if self.setup.routed != (algorithm_of(name) in build.ROUTED_ALGORITHMS):
            pytest.fail(f"SETUPS[{name!r}].routed disagrees with build.ROUTED_ALGORITHMS")
        self.problem = routed_problem() if self.setup.routed else mlp_problem()
        self.algorithm = build.ALGORITHMS[algorithm_of(name)](self.problem.model, **self.setup.options(self.problem))
        self.plan = simulate.RoundPlan("vmap", COHORT, 1)
        self.vmap_round = simulate.build_round(self.algorithm, self.plan, None)
        self.keys = [jax.random.fold_in(jax.random.key(0), r) for r in (1, 2)]
        self.cohorts = [self.problem.train.gather(ids, batch_size=BATCH, pad_to=PAD) for ids in ([0, 1, 2],
                                                                                                  [3, 4, 5])]

    def initial_state(self):
        return fresh_copy(self.algorithm.init(self.problem.params, jax.random.key(1)))

    def run_vmap(self, state, r: int):
        return self.vmap_round(state, self.problem.frozen, *simulate.chunked(*self.cohorts[r], self.plan),
                               self.keys[r])

    @functools.cached_property
    def two_rounds(self):
        """(initial state, (state, metrics) after round 1, after round 2, compilations of the round)."""
        initial = to_numpy(self.initial_state())
        first = self.run_vmap(self.initial_state(), 0)
        first_host = to_numpy(first)
        second = to_numpy(self.run_vmap(first[0], 1))
        return initial, first_host, second, self.vmap_round._cache_size()

    @functools.cached_property
    def repeated_first_round(self):
        return to_numpy(self.run_vmap(self.initial_state(), 0))

    @functools.cached_property
    def looped_first_round(self):
        loop = simulate.build_round(self.algorithm, simulate.RoundPlan("loop", 1, COHORT), None)
        return to_numpy(loop(self.initial_state(), self.problem.frozen, *self.cohorts[0], self.keys[0]))

    @functools.cached_property
    def evaluation(self):
        """The evaluation groups {group: sums} of the state after round 1 on the first three clients."""
        plan, arrays = simulate.evaluation_arrays(self.problem.train, self.problem.test, COHORT, COHORT, BATCH, 1)
        evaluate = simulate.build_evaluation(self.algorithm, plan.chunk_size, plan.num_chunks, None)
        state = jax.tree.map(jnp.asarray, self.two_rounds[1][0])
        return to_numpy(evaluate(self.problem.frozen, self.algorithm.broadcast(state), *arrays, jax.random.key(2)))


@pytest.fixture(scope="module")
def cases():
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name)
        return built[name]
    return get


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_finite(tree, what: str):
    bad = [p for p, x in leaves_with_paths(tree) if not np.all(np.isfinite(np.asarray(x, np.float64)))]
    assert not bad, f"{what}: non-finite at {bad}"


# ------------------------------------------------------------------------------------------------- checks


def test_every_table_entry_has_a_problem():
    assert set(NAMES) <= set(SETUPS), "every algorithm of build.ALGORITHMS needs a problem in SETUPS"
    assert {algorithm_of(case) for case in SETUPS} == set(NAMES), "a SETUPS variant of an unknown algorithm"


@pytest.mark.parametrize("name", CASES)
def test_round_outputs_are_finite(cases, name):
    case = cases(name)
    _, (state, metrics), second, _ = case.two_rounds
    assert_finite(state, "server state after a round")
    assert_finite(second, "state and metrics after a second round")
    assert {"train_loss", "client_steps", "examples"} <= set(metrics), sorted(metrics)
    assert_finite(metrics, "train metrics")
    assert float(metrics["examples"]) == sum(SIZES[:COHORT])
    assert_finite(case.evaluation, "evaluation sums")
    assert float(case.evaluation["generalized"]["count"]) > 0


@pytest.mark.parametrize("name", CASES)
def test_round_keeps_tree_structure_shapes_and_dtypes(cases, name):
    initial, (after, _), _, _ = cases(name).two_rounds
    assert jax.tree.structure(after) == jax.tree.structure(initial)
    describe = lambda tree: [(p, np.shape(x), np.asarray(x).dtype) for p, x in leaves_with_paths(tree)]
    assert describe(after) == describe(initial)


@pytest.mark.parametrize("name", CASES)
def test_round_is_deterministic_for_a_key(cases, name):
    case = cases(name)
    first = case.two_rounds[1]
    again = case.repeated_first_round
    for (path, x), (_, y) in zip(leaves_with_paths(first), leaves_with_paths(again)):
        assert np.array_equal(x, y), f"{path} differs between two runs of the same round"
    # and the round did something: the parameters moved
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first[0].params),
                                                         jax.tree.leaves(case.two_rounds[0].params)))


# Behind `slow`: loops whose client code another default test already runs both ways (Flow in test_flow.py; these
# baselines' training round is FedAvg's client update, checked here as "fedavg").
SAME_LOOP_ELSEWHERE = {"flow", "fedavg_ft", "ditto", "lg_fedavg", "knn_per"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SAME_LOOP_ELSEWHERE else n
                                  for n in CASES])
def test_vmapped_round_equals_the_loop(cases, name):
    case = cases(name)
    vmapped, looped = case.two_rounds[1], case.looped_first_round
    assert jax.tree.structure(vmapped[0]) == jax.tree.structure(looped[0])
    for (path, x), (_, y) in zip(leaves_with_paths(vmapped[0]), leaves_with_paths(looped[0])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"state{path}")
    for k in ("train_loss", "client_steps", "examples"):
        np.testing.assert_allclose(vmapped[1][k], looped[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", CASES)
def test_vmapped_round_compiles_once(cases, name):
    assert cases(name).two_rounds[3] == 1


@pytest.mark.parametrize("name", CASES)
def test_bytes_per_round_match_the_tree(name):
    setup = SETUPS.get(name) or pytest.fail(f"no contract problem for {name!r}")
    problem = routed_problem() if setup.routed else mlp_problem()
    algorithm = build.ALGORITHMS[algorithm_of(name)](problem.model, **setup.options(problem))
    params_like = jax.eval_shape(lambda: problem.params)
    for cohort in (COHORT, 5):
        if algorithm_of(name) in ("spry", "fedavg_split") and cohort != COHORT:
            continue          # Spry's split is built for its clients_per_round
        got = algorithm.bytes_per_round(params_like, cohort)
        assert (got.down, got.up) == setup.expected_bytes(params_like, cohort), cohort


@pytest.mark.parametrize("cohort, per_chunk, share_head", [(2, 1, False), (3, 2, False), (4, 2, False),
                                                           (2, 1, True), (8, 1, True)])
@pytest.mark.parametrize("communication", ["per_epoch", "per_iteration"])
def test_spry_bytes_follow_the_paper_split(cohort, per_chunk, share_head, communication):
    """Spry on a deeper MLP (6 tensors, the last layer its head when shared) for chunk counts above, equal to and
    below the cohort size; per-iteration communication uploads K fp32 jvp scalars."""
    data = vision.digits(seed=0)
    task, params, _ = small.mlp_model(data, jax.random.key(0), hidden=(8, 8))
    head = [4, 5]                                # list layer 2's b and w
    client_optimizer = ADAM if communication == "per_epoch" else None    # per iteration takes none
    algorithm = build.ALGORITHMS["spry"](task, clients_per_round=cohort, client_optimizer=client_optimizer,
                                         server_optimizer=SERVER, batch_size=BATCH, num_tangents=3,
                                         tensors_per_chunk=per_chunk, head_tensors=head, share_head=share_head,
                                         communication=communication)
    got = algorithm.bytes_per_round(jax.eval_shape(lambda: params), cohort)
    down, up = spry_bytes(params, cohort, shared=head if share_head else (), per_chunk=per_chunk)
    assert got.down == down
    assert got.up == (4 * 3 * cohort if communication == "per_iteration" else up)
