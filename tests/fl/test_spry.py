"""Spry's split, per-tensor aggregation and communication modes, and the zero-order baselines' estimators."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spryjax import fwdgrad
from spryjax.data import partition, vision
from spryjax.data.federated import FederatedData
from spryjax.fl import simulate
from spryjax.fl.algorithms.spry import assign_tensors, spry
from spryjax.models import small


@pytest.mark.parametrize("num_slots", [2, 3, 8])  # chunks (3) > slots, = slots, < slots
def test_split_covers_every_tensor_every_round(num_slots):
    matrix = assign_tensors(6, num_slots, tensors_per_chunk=2, tensor_order=[5, 4, 3, 2, 1, 0])
    assert matrix.any(axis=0).all()                          # every tensor is trained by someone
    chunks = [{5, 4}, {3, 2}, {1, 0}]
    for slot, row in enumerate(matrix):                     # each slot trains whole consecutive chunks
        trained = set(np.flatnonzero(row))
        assert trained and all(c <= trained or not (c & trained) for c in chunks)
    if num_slots >= 3:
        assert (matrix.sum(axis=1) == 2).all()               # one chunk per client, chunks shared
    else:
        assert matrix.sum(axis=0).max() == 1                 # each tensor trained by exactly one client
    shared = assign_tensors(6, num_slots, tensors_per_chunk=2, shared_tensors=[5])
    assert shared[:, 5].all()


@pytest.fixture(scope="module")
def problem():
    data = vision.digits(seed=0)
    task, params, frozen = small.mlp_model(data, jax.random.key(0), hidden=(8, 8))
    parts = partition.dirichlet_label_skew(data.train["label"], 20, 1.0, seed=0, examples_per_client=24)
    train = FederatedData.from_partition(data.inputs(), parts)
    return task, params, frozen, train


def one_round(problem, algorithm, cohort):
    task, params, frozen, train = problem
    result = simulate.run_simulation(algorithm, params, frozen, train, train, num_rounds=1, clients_per_round=cohort, seed=1,
                          batch_size=8, strategy="vmap", eval_every=0, show_progress=False)
    return jax.tree.map(lambda a, b: a - b, params, result.state.params)  # u, since the server step is SGD(1)


@pytest.mark.parametrize("dilute", [False, True])
def test_per_tensor_aggregation_counts_only_assignees(problem, dilute):
    task, params, frozen, train = problem
    cohort = 4  # 6 tensors, chunks of 2 → 3 chunks < 4 slots: slot 3 shares chunk 0 with slot 0
    algorithm = spry(task, clients_per_round=cohort, client_optimizer=optax.adamw(1e-2),
                     server_optimizer=optax.sgd(1.0), batch_size=8, num_tangents=2, dilute_aggregation=dilute)
    u = one_round(problem, algorithm, cohort)
    # the same clients, one by one, aggregated by hand
    ids = simulate.sample_cohort(1, 1, train.num_clients, cohort)
    arrays, counts = train.gather(ids, batch_size=8)
    round_key = jax.random.fold_in(jax.random.key(1), 1)
    matrix = assign_tensors(6, cohort)
    deltas = []
    for slot in range(cohort):
        out = jax.jit(algorithm.client_update)(frozen, params, {k: v[slot] for k, v in arrays.items()}, counts[slot],
                                               jnp.int32(slot), jax.random.fold_in(round_key, slot))
        leaves = jax.tree.leaves(out.update)
        for t, leaf in enumerate(leaves):
            if not matrix[slot, t]:
                assert np.all(np.asarray(leaf) == 0), "a client changed a tensor it was not assigned"
        deltas.append(leaves)
    for t, got in enumerate(jax.tree.leaves(u)):
        weights = counts * matrix[:, t]
        expected = sum(w * d[t] for w, d in zip(weights, deltas)) / (counts.sum() if dilute else weights.sum())
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_per_iteration_equals_per_epoch_with_one_sgd_step(problem):
    """Uploading K jvp scalars and regenerating the tangents on the server gives the update that one local step of
    SGD(lr=1) on the same batch and tangents gives."""
    task, params, frozen, train = problem
    common = dict(clients_per_round=3, server_optimizer=optax.sgd(1.0), batch_size=50, num_tangents=4)
    per_epoch = spry(task, client_optimizer=optax.sgd(1.0), communication="per_epoch", **common)
    per_iteration = spry(task, client_optimizer=optax.sgd(1.0), communication="per_iteration", **common)
    # batch 50 ≥ any client: one step over the same (whole-client) batch in both modes
    a, b = one_round(problem, per_epoch, 3), one_round(problem, per_iteration, 3)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    up_epoch = per_epoch.bytes_per_round(params, 3).up
    assert per_iteration.bytes_per_round(params, 3).up == 3 * 4 * 4 < up_epoch


def quadratic():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(16, 16)) / 4
    a = jnp.asarray(m @ m.T + np.eye(16), jnp.float32)
    loss = lambda p: 0.5 * p["x"] @ a @ p["x"] + jnp.sum(p["x"])
    return loss, {"x": jnp.asarray(rng.normal(size=16), jnp.float32)}


@pytest.mark.parametrize("estimator", ["mezo_spsa", "baffle_central", "fwdllm_forward"])
def test_zero_order_estimators_are_unbiased_on_a_quadratic(estimator):
    loss, params = quadratic()
    grad = jax.grad(loss)(params)["x"]
    estimate = {
        "mezo_spsa": functools.partial(fwdgrad.spsa_grad, eps=1e-3),
        "baffle_central": functools.partial(fwdgrad.central_diff_grad, sigma=1e-2, num_tangents=10),
        "fwdllm_forward": lambda f, p, k: (None, fwdgrad.grad_from_scalars(p, k, fwdgrad.finite_difference_scalars(
            f, p, k, num_tangents=4, eps=1e-2, scheme="forward")[1])),
    }[estimator]
    keys = jax.random.split(jax.random.key(0), 20000)
    mean = jax.jit(jax.vmap(lambda k: estimate(loss, params, k)[1]["x"]))(keys).mean(0)
    cosine = float(mean @ grad / (jnp.linalg.norm(mean) * jnp.linalg.norm(grad)))
    assert cosine > 0.98, cosine
    np.testing.assert_allclose(jnp.linalg.norm(mean), jnp.linalg.norm(grad), rtol=0.1)
