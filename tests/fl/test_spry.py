"""Spry's split, per-tensor aggregation and communication modes, its finetuned evaluation, the gradient-share
diagnostic, and the zero-order baselines' estimators."""
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
from spryjax.fl.algorithm import local_steps
from spryjax.fl.algorithms.spry import assign_tensors, chunk_gradient_shares, spry
from spryjax.models import small
from spryjax.task import regression_task


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
    per_iteration = spry(task, communication="per_iteration", **common)
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
        "baffle_central": functools.partial(fwdgrad.spsa_grad, eps=1e-2, num_tangents=10),
        "fwdllm_forward": lambda f, p, k: (None, fwdgrad.grad_from_scalars(p, k, fwdgrad.finite_difference_scalars(
            f, p, k, num_tangents=4, eps=1e-2, scheme="forward")[1])),
    }[estimator]
    keys = jax.random.split(jax.random.key(0), 20000)
    mean = jax.jit(jax.vmap(lambda k: estimate(loss, params, k)[1]["x"]))(keys).mean(0)
    cosine = float(mean @ grad / (jnp.linalg.norm(mean) * jnp.linalg.norm(grad)))
    assert cosine > 0.98, cosine
    np.testing.assert_allclose(jnp.linalg.norm(mean), jnp.linalg.norm(grad), rtol=0.1)


# ------------------------------------------------------------------------------ finetuned evaluation


def revealing(task):
    """`task` whose evaluate also returns Σ_i m_i θ: with one held-out example, the evaluated parameters exactly."""
    def evaluate(params, frozen, batch):
        return {**task.evaluate(params, frozen, batch),
                "params": jax.tree.map(lambda x: jnp.sum(batch["mask"]) * x, params)}
    return task._replace(evaluate=evaluate)


def hand_finetune(task, params, frozen, data, count, key, *, optimizer, mask, epochs, batch_size, num_tangents):
    """`finetune_epochs` of forward-gradient training written out: at each real minibatch of `local_steps`,
    ĝ = fwdgrad.forward_grad(loss, θ, estimator key, ...) with tangents on `mask` only, an optimizer step whose
    update is zeroed outside `mask`."""
    @jax.jit
    def step(params, opt_state, batch, step_key):
        estimator_key, dropout_key = jax.random.split(step_key)
        _, grad = fwdgrad.forward_grad(task.loss, params, estimator_key, frozen, batch, dropout_key,
                                       num_tangents=num_tangents, mask=mask)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        if mask is not None:
            updates = jax.tree.map(lambda u, keep: u * keep, updates, mask)
        return optax.apply_updates(params, updates), opt_state

    index, batch_mask, keys = local_steps(key, count, next(iter(data.values())).shape[0], batch_size, epochs)
    opt_state = optimizer.init(params)
    for s in range(index.shape[0]):
        if np.asarray(batch_mask[s]).any():
            batch = {k: jnp.asarray(np.asarray(v)[np.asarray(index[s])]) for k, v in data.items()}
            params, opt_state = step(params, opt_state, {**batch, "mask": jnp.asarray(batch_mask[s], jnp.float32)},
                                     keys[s])
    return params


@pytest.mark.parametrize("scope", ["slot_chunk", "all"])
def test_finetuned_evaluation_trains_the_evaluated_clients_chunk(problem, scope):
    """Client 4 of a 3-slot cohort takes slot 1's chunk (tensors 2, 3 of 6; an index past the last slot would
    clamp to slot 2): finetuning changes those and leaves the others bitwise unchanged (weight decay included),
    equal to the hand loop; "all" trains every tensor. "generalized" stays the global model. Only the final
    evaluation finetunes."""
    task, params, frozen, train = problem
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    algorithm = spry(revealing(task), clients_per_round=3, client_optimizer=optimizer,
                     server_optimizer=optax.sgd(1.0), batch_size=8, num_tangents=2, finetune_epochs=2,
                     finetune_scope=scope)
    arrays, counts = train.gather([0], batch_size=8)
    data = {k: jnp.asarray(v[0]) for k, v in arrays.items()}
    key, client = jax.random.key(4), jnp.int32(4)
    groups = jax.jit(algorithm.evaluate_client_final)(frozen, params, data, jnp.int32(counts[0]), data,
                                                      jnp.int32(1), client, key)
    interim = jax.jit(algorithm.evaluate_client)(frozen, params, data, jnp.int32(counts[0]), data, jnp.int32(1),
                                                 client, key)
    assert set(interim) == {"generalized"}   # finetuning runs at the last evaluation only, unless asked

    row = assign_tensors(6, 3)[4 % 3]
    assert list(np.flatnonzero(row)) == [2, 3]
    mask = jax.tree.unflatten(jax.tree.structure(params), list(row)) if scope == "slot_chunk" else None
    expected = hand_finetune(task, params, frozen, data, jnp.int32(counts[0]), key, optimizer=optimizer, mask=mask,
                             epochs=2, batch_size=8, num_tangents=2)
    finetuned = jax.tree.leaves(groups["finetuned"]["params"])
    for t, (got, want, start) in enumerate(zip(finetuned, jax.tree.leaves(expected), jax.tree.leaves(params))):
        if scope == "slot_chunk" and not row[t]:
            assert np.array_equal(got, start), f"tensor {t} is outside the client's chunk"
        else:
            assert not np.array_equal(got, start), f"tensor {t} was not finetuned"
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, start in zip(jax.tree.leaves(groups["generalized"]["params"]), jax.tree.leaves(params)):
        assert np.array_equal(got, start)


# ------------------------------------------------------------------------------ where the gradient lives


def test_chunk_gradient_shares_are_the_chunks_share_of_the_squared_gradient_norm():
    """y ≈ x[:3]·w + x[3:]·a + b on two batches (4 and 2 real examples): the mean-loss gradient written out,
    g = (2/N) Σ_i e_i (x_i[3:], 1, x_i[:3]) in leaf order (a, b, w), shares Σ_{t ∈ chunk} ‖g_t‖² / ‖g‖²."""
    rng = np.random.default_rng(0)
    task = regression_task(lambda p, f, batch, key=None: batch["x"][:, :3] @ p["w"] + batch["x"][:, 3:] @ p["a"]
                           + p["b"])
    params = {"a": jnp.asarray(rng.normal(size=2), jnp.float32), "b": jnp.float32(0.3),
              "w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    batches = []
    for real in (4, 2):
        batches.append({"x": rng.normal(size=(4, 5)).astype(np.float32), "label": rng.normal(size=4).astype(np.float32),
                        "mask": (np.arange(4) < real).astype(np.float32)})
    x = np.concatenate([b["x"][b["mask"] > 0] for b in batches]).astype(np.float64)
    y = np.concatenate([b["label"][b["mask"] > 0] for b in batches]).astype(np.float64)
    error = x[:, :3] @ np.asarray(params["w"], np.float64) + x[:, 3:] @ np.asarray(params["a"], np.float64) + 0.3 - y
    grads = [2 * x[:, 3:].T @ error / 6, 2 * error.sum() / 6, 2 * x[:, :3].T @ error / 6]   # a, b, w
    squares = np.array([np.sum(np.square(g)) for g in grads])

    chunks = np.array([[True, True, False], [False, False, True]])
    shares = chunk_gradient_shares(task, params, {}, batches, chunks)
    np.testing.assert_allclose(shares, [squares[:2].sum() / squares.sum(), squares[2] / squares.sum()], rtol=1e-5)
    np.testing.assert_allclose(chunk_gradient_shares(task, params, {}, batches, np.eye(3, dtype=bool)),
                               squares / squares.sum(), rtol=1e-5)
    assert shares.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exactly one chunk"):
        chunk_gradient_shares(task, params, {}, batches, np.array([[True, True, False], [False, True, True]]))
