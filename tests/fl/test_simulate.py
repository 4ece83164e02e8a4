"""The round engine against independent computations: a hand-written FedAvg loop, other strategies, shardings,
an uninterrupted run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spryjax.models import small
from spryjax.data import partition, vision
from spryjax.data.federated import FederatedData
from spryjax.errors import Diverged, InputError
from spryjax.fl import mesh as mesh_lib, server_opt, simulate
from spryjax.fl.algorithms.fedavg import fedavg


@pytest.fixture(scope="module")
def problem():
    data = vision.digits(seed=0)
    task, params, frozen = small.mlp_model(data, jax.random.key(0), hidden=(16,))
    parts = partition.dirichlet_label_skew(data.train["label"], 40, 0.5, seed=0, examples_per_client=30)
    train_parts, test_parts = partition.train_test_split(parts, 0.2, seed=0)
    train = FederatedData.from_partition(data.inputs(), train_parts)
    test = FederatedData.from_partition(data.inputs(), test_parts)
    return task, params, frozen, train, test


def run(problem, **options):
    task, params, frozen, train, test = problem
    algorithm = fedavg(task, client_optimizer=optax.sgd(options.pop("lr", 0.5)),
                       server_optimizer=options.pop("server", optax.sgd(1.0)), batch_size=options.pop("batch", 8))
    defaults = dict(num_rounds=2, clients_per_round=8, seed=3, batch_size=8, eval_every=0, show_progress=False)
    return simulate.run_simulation(algorithm, params, frozen, train, test, **{**defaults, **options})


def flat(tree):
    return np.asarray(ravel_pytree(jax.tree.map(np.asarray, tree))[0])


def test_round_equals_hand_written_fedavg(problem):
    """One round, full-batch local gradient descent: θ' = θ − Σ n_i lr ∇L_i(θ) / Σ n_i, written independently."""
    task, params, frozen, train, _ = problem
    lr = 0.5
    result = run(problem, num_rounds=1, batch=32, lr=lr, strategy="vmap")
    cohort = simulate.sample_cohort(3, 1, train.num_clients, 8)
    expected, total = jax.tree.map(jnp.zeros_like, params), 0
    for c in cohort:
        client = train.client(int(c))
        batch = {**client, "mask": np.ones(len(client["label"]), np.float32)}
        local = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(task.loss)(params, frozen, batch, None))
        expected = jax.tree.map(lambda e, l: e + len(client["label"]) * l, expected, local)
        total += len(client["label"])
    expected = jax.tree.map(lambda e: e / total, expected)
    np.testing.assert_allclose(flat(result.state.params), flat(expected), rtol=1e-5, atol=1e-6)


def test_strategies_and_shardings_agree(problem):
    """vmap (8 devices) == chunked (4 devices, 2 chunks) == vmap (1 device) == chunks of 1 == per-client loop ==
    the loop with clients on threads."""
    reference = run(problem, strategy="loop")
    assert reference.plan.strategy == "loop"
    variants = {
        "vmap, 8 devices": run(problem, strategy="vmap"),
        "chunked, 4 devices": run(problem, strategy="chunked", client_chunk_size=4,
                                  mesh=mesh_lib.client_mesh(jax.devices()[:4])),
        "vmap, 1 device": run(problem, strategy="vmap", mesh=mesh_lib.client_mesh(jax.devices()[:1])),
        "sequential scan": run(problem, strategy="chunked", client_chunk_size=1,
                               mesh=mesh_lib.client_mesh(jax.devices()[:1])),
        "loop, 3 clients in flight": run(problem, strategy="loop", client_chunk_size=3),
    }
    assert variants["chunked, 4 devices"].plan.num_chunks == 2 and variants["sequential scan"].plan.chunk_size == 1
    for name, result in variants.items():
        np.testing.assert_allclose(flat(result.state.params), flat(reference.state.params), rtol=2e-5, atol=1e-6,
                                   err_msg=name)


def test_resume_equals_uninterrupted(problem, tmp_path):
    options = dict(strategy="chunked", client_chunk_size=8, checkpoint_every=1, eval_every=2,
                   server=server_opt.fedyogi())
    full = run(problem, num_rounds=4, workdir=str(tmp_path / "full"), **options)
    run(problem, num_rounds=2, workdir=str(tmp_path / "cut"), **options)  # "killed" after round 2
    resumed = run(problem, num_rounds=4, workdir=str(tmp_path / "cut"), **options)
    assert np.array_equal(flat(resumed.state), flat(full.state))
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]["generalized_accuracy"] == full.history[-1]["generalized_accuracy"]


def test_cohort_larger_than_population_is_a_clear_error(problem):
    with pytest.raises(InputError, match="clients_per_round=41 must be between 1 and the population of 40"):
        run(problem, clients_per_round=41)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(problem, tmp_path):
    task, params, frozen, train, test = problem
    workdir = str(tmp_path / "nan")
    run(problem, num_rounds=1, checkpoint_every=1, workdir=workdir, strategy="vmap")
    with pytest.raises(Diverged, match=r"diverged at round 2 \(non-finite training loss\); the last good checkpoint is round 1"):
        run(problem, num_rounds=3, checkpoint_every=1, workdir=workdir, strategy="vmap", lr=1e30)
    from spryjax.checkpoint import Checkpointer
    assert Checkpointer(workdir).latest_round() == 1


def test_chunks_sized_from_device_memory():
    """On an accelerator, "auto" vmaps as many clients as fit in 70% of the free memory: shared inputs once
    (arguments less the client's data), then each client's data, temporaries and outputs."""
    from spryjax.memory import MemoryReport
    mib = 2**20
    step = simulate.StepCost(1e9, MemoryReport(argument=100 * mib, output=2 * mib, temp=30 * mib, alias=0),
                             data_bytes=4 * mib)
    per_client, shared = 36 * mib, 96 * mib
    plan = simulate.plan_round("auto", 4096, 2, step=step, backend="gpu", free_bytes=10 * 2**30)
    expected = int((0.7 * 10 * 2**30 - shared) // per_client) * 2
    assert plan.strategy == "chunked" and plan.chunk_size == expected == 392
    assert "196 clients per device" in plan.reason and "96 MiB shared + 36.0 MiB per client" in plan.reason
    small = simulate.plan_round("auto", 10, 2, step=step, backend="gpu", free_bytes=10 * 2**30)
    assert small.chunk_size == 10 and small.num_chunks == 1                   # the whole cohort fits
    tight = simulate.plan_round("auto", 100, 1, step=step, backend="gpu", free_bytes=120 * mib)
    assert tight.chunk_size == 1                                               # at least one client
    assert simulate.plan_round("auto", 100, 1, step=step, backend="gpu", free_bytes=None,
                               client_chunk_size=8).chunk_size == 8           # unknown memory: as configured


def test_plan_round():
    assert simulate.plan_round("vmap", 10, 8) == simulate.RoundPlan("vmap", 16, 1)
    assert simulate.plan_round("chunked", 4096, 8, client_chunk_size=100) == simulate.RoundPlan("chunked", 104, 40)
    assert simulate.plan_round("auto", 1000, 1, step=simulate.StepCost(1e9, None), backend="cpu").strategy == "loop"
    assert simulate.plan_round("auto", 1000, 1, step=simulate.StepCost(1e5, None), backend="cpu").strategy == "chunked"
    with pytest.raises(InputError, match="strategy"):
        simulate.plan_round("threads", 10, 1)


def test_dispatched_local_training_equals_the_compiled_scan(problem):
    """dispatched_local_training (one jitted step per real batch) must equal local_training's traced lax.scan
    (two epochs, a count that leaves padding batches, a Spry-style per-client tensor mask), and per-client masks
    must not recompile the step."""
    import functools
    from spryjax import fwdgrad
    from spryjax.fl import algorithm
    task, params, frozen, train, _ = problem
    client = train.client(0)
    data = {k: np.concatenate([v, v[:9]]) for k, v in client.items()}   # 9 padding rows
    count = np.int32(len(client["label"]))
    optimizer = optax.adam(1e-2)   # built once, as algorithms do: it is part of the step's compilation key

    estimator = functools.partial(fwdgrad.forward_grad, num_tangents=2)   # one object, as algorithms build it

    def train_client(leaf_on, key, eager):
        leaves, structure = jax.tree.flatten(params)
        mask = jax.tree.unflatten(structure, [jnp.bool_(i == 0 or leaf_on) for i in range(len(leaves))])
        options = dict(optimizer=optimizer, batch_size=4, epochs=2, update_mask=mask, gradient_fn=estimator)
        if eager:
            return algorithm.dispatched_local_training(task, params, frozen, data, count, key, **options)
        fn = lambda p, d, c, k: algorithm.local_training(task, p, frozen, d, c, k, **options)
        return jax.jit(fn)(params, data, count, key)

    for leaf_on, seed in ((True, 0), (False, 1)):
        (eager, eager_metrics), (traced, traced_metrics) = (train_client(leaf_on, jax.random.key(seed), e)
                                                            for e in (True, False))
        np.testing.assert_allclose(flat(eager), flat(traced), rtol=1e-5, atol=1e-6)
        assert float(eager_metrics["steps"]) == float(traced_metrics["steps"]) == 2 * -(-int(count) // 4)
        np.testing.assert_allclose(eager_metrics["loss"], traced_metrics["loss"], rtol=1e-5)
        if leaf_on:
            compiled = algorithm._dispatched_step._cache_size()
    assert algorithm._dispatched_step._cache_size() == compiled
