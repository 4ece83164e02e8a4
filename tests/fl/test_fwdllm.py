"""FwdLLM (spryjax.fl.algorithms.fwdllm) and the other FedSGD-shaped and zero-order algorithms (fedsgd, fedfgd,
fedmezo, baffle) against hand computations on a linear least-squares model.

The hand computations take from the library only how a client's batch and keys are derived (`first_batch`, the
engine's `fold_in` key tree, `sample_cohort`, `FederatedData.gather`) and how a tangent is regenerated from a key
(`fwdgrad.sample_tangent`); the losses, the tangent selection, the estimates, the aggregation and the server steps
are written here in numpy (float64) or with jax.grad.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spryjax import fwdgrad
from spryjax.data.federated import FederatedData
from spryjax.fl import mesh as mesh_lib, simulate
from spryjax.fl.algorithm import ClientOutput, first_batch
from spryjax.fl.algorithms import baffle, fedfgd, fedmezo, fedsgd, fwdllm
from spryjax.task import regression_task

DIM, SEED = 3, 4
SIZES = [3, 6, 2, 5, 4, 7]       # below, at and above the batch sizes used


def predict(params, frozen, batch, key=None):
    return batch["x"] @ params["w"] + params["b"]


TASK = regression_task(predict)


def hand_loss(theta: np.ndarray, batch: dict) -> float:
    """Masked mean squared error of the linear model, float64; θ = ravel_pytree order (b, then w)."""
    x, y, m = (np.asarray(batch[k], np.float64) for k in ("x", "label", "mask"))
    error = x @ theta[1:] + theta[0] - y
    return float(np.sum(m * error ** 2) / max(np.sum(m), 1.0))


def hand_grad(theta: np.ndarray, batch: dict) -> np.ndarray:
    """∇ of `hand_loss`, written out: (2/Σm) Σ m e (1, x)."""
    x, y, m = (np.asarray(batch[k], np.float64) for k in ("x", "label", "mask"))
    error = m * (x @ theta[1:] + theta[0] - y)
    return 2 * np.concatenate([[error.sum()], x.T @ error]) / max(np.sum(m), 1.0)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    n = sum(SIZES)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    starts = np.cumsum([0] + SIZES)
    train = FederatedData.from_partition({"x": x, "label": y},
                                         [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])])
    params = {"w": jnp.asarray(rng.normal(size=DIM) * 0.3, jnp.float32), "b": jnp.float32(0.1)}
    return params, train


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.tree.map(np.asarray, tree))[0], np.float64)


def tangent(key, m, params) -> np.ndarray:
    return flat(fwdgrad.sample_tangent(jax.random.fold_in(key, m), params))


def client_inputs(train, seed, round_, cohort_size, batch_size):
    """What the engine hands each client of round `round_`: (data, count, key) per slot."""
    ids = simulate.sample_cohort(seed, round_, train.num_clients, cohort_size)
    arrays, counts = train.gather(ids, batch_size=batch_size)
    round_key = jax.random.fold_in(jax.random.key(seed), round_)
    return [({k: jnp.asarray(v[s]) for k, v in arrays.items()}, jnp.int32(counts[s]), jax.random.fold_in(round_key, s))
            for s in range(cohort_size)]


def run(algorithm, params, train, *, rounds=1, cohort=4, batch_size=4):
    return simulate.run_simulation(algorithm, params, {}, train, train, num_rounds=rounds, clients_per_round=cohort,
                                   seed=SEED, batch_size=batch_size, strategy="vmap", eval_every=0,
                                   show_progress=False, mesh=mesh_lib.client_mesh(jax.devices()[:1])).state


# ---------------------------------------------------------------------------------------------------- FwdLLM


def hand_fwdllm_client(theta, previous, k_r, data, count, key, *, num_tangents, candidates, eps, batch_size,
                       params_like):
    """FwdLLM's client by hand: pool of candidates·K_max tangents v_m (from fold_in(tangent key, m)), the K_max
    most cosine-similar to u_{r−1} in decreasing similarity (ties, as with u_{r−1} = 0, in index order), and
    ĝ = (1/K_r) Σ_{k<K_r} (L(θ + ε v_k) − L(θ)) / ε · v_k. Returns (ĝ, chosen indices, batch examples)."""
    batch, tangent_key, _ = first_batch(data, count, key, batch_size)
    pool = np.stack([tangent(tangent_key, m, params_like) for m in range(candidates * num_tangents)])
    norm = np.linalg.norm(previous)
    similarity = pool @ previous / (np.linalg.norm(pool, axis=1) * norm) if norm > 0 else np.zeros(len(pool))
    chosen = np.argsort(-similarity, kind="stable")[:num_tangents]
    base = hand_loss(theta, batch)
    d = [(hand_loss(theta + eps * pool[m], batch) - base) / eps for m in chosen[:k_r]]
    estimate = sum(dk * pool[m] for dk, m in zip(d, chosen[:k_r])) / k_r
    return estimate, chosen, float(np.sum(np.asarray(batch["mask"])))


@pytest.mark.parametrize("steered", [False, True])
def test_fwdllm_client_selects_candidates_and_averages_the_first_k(problem, steered):
    """u_{r−1} = 0 (round 1): the first K_max tangents, estimate over the first K_r. u_{r−1} close to pool tangent
    9: the selection must lead with 9 and differ from index order."""
    params, train = problem
    num_tangents, candidates, eps, k_r = 4, 3, 0.05, 2
    algorithm = fwdllm.fwdllm(TASK, server_optimizer=optax.sgd(1.0), batch_size=4, num_tangents=num_tangents,
                              candidates=candidates, eps=eps)
    arrays, counts = train.gather([1], batch_size=4)          # 6 examples in 8 rows: the first batch is 4 of 6
    data, count, key = {k: jnp.asarray(v[0]) for k, v in arrays.items()}, jnp.int32(counts[0]), jax.random.key(11)
    theta = flat(params)
    previous = np.zeros_like(theta)
    if steered:
        tangent_key = first_batch(data, count, key, 4)[1]
        previous = 0.7 * tangent(tangent_key, 9, params) + 0.2 * np.random.default_rng(1).normal(size=theta.size)
    unflatten = ravel_pytree(params)[1]
    state = fwdllm.FwdLLMState(unflatten(jnp.asarray(previous, jnp.float32)), jnp.int32(k_r))
    out = jax.jit(algorithm.client_update)({}, (params, state), data, count, jnp.int32(0), key)

    expected, chosen, examples = hand_fwdllm_client(theta, previous, k_r, data, count, key,
                                                    num_tangents=num_tangents, candidates=candidates, eps=eps,
                                                    batch_size=4, params_like=params)
    if steered:
        assert chosen[0] == 9 and list(chosen[:k_r]) != [0, 1]
    else:
        assert list(chosen) == [0, 1, 2, 3]
    np.testing.assert_allclose(flat(out.update.grad), expected, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(out.update.sq_norm), expected @ expected, rtol=5e-4)
    assert float(out.weight) == examples == 4.0
    # the estimate averages K_r = 2, not K_max = 4, and depends on which tangents were chosen
    first_two = hand_fwdllm_client(theta, np.zeros_like(theta), k_r, data, count, key, num_tangents=num_tangents,
                                   candidates=candidates, eps=eps, batch_size=4, params_like=params)[0]
    assert steered == (not np.allclose(expected, first_two))


def hand_server(theta, k, grads, weights, *, lr, num_tangents, threshold):
    """u = Σ n_i ĝ_i / Σ n_i; relative variance (Σ n_i ‖ĝ_i‖² / Σ n_i − ‖u‖²) / ‖u‖²; K doubles (≤ K_max) above
    the threshold; θ ← θ − lr u."""
    weights = np.asarray(weights, np.float64)
    u = sum(w * g for w, g in zip(weights, grads)) / weights.sum()
    mean_sq = sum(w * (g @ g) for w, g in zip(weights, grads)) / weights.sum()
    relative_variance = (mean_sq - u @ u) / (u @ u)
    return theta - lr * u, u, (min(2 * k, num_tangents) if relative_variance > threshold else k), relative_variance


@pytest.mark.parametrize("spread, k, expected_k", [("wide", 3, 6), ("wide", 7, 10), ("wide", 10, 10),
                                                   ("narrow", 3, 3), ("narrow", 10, 10)])
def test_fwdllm_server_doubles_k_above_the_variance_threshold(problem, spread, k, expected_k):
    """Client uploads built by hand, aggregated by the engine (accumulate, finish), then FwdLLM's server step."""
    params, _ = problem
    lr, threshold, num_tangents = 0.5, 1.0, 10
    algorithm = fwdllm.fwdllm(TASK, server_optimizer=optax.sgd(lr), batch_size=4, num_tangents=num_tangents,
                              variance_threshold=threshold)
    unflatten = ravel_pytree(params)[1]
    rng = np.random.default_rng(2)
    direction = rng.normal(size=DIM + 1)
    noise = 3.0 if spread == "wide" else 0.1
    grads = [direction + noise * rng.normal(size=DIM + 1) for _ in range(3)]
    weights = [4.0, 2.0, 3.0]
    outputs = ClientOutput(
        fwdllm.FwdLLMUpload(jax.tree.map(lambda *x: jnp.stack(x), *[unflatten(jnp.asarray(g, jnp.float32))
                                                                      for g in grads]),
                            jnp.asarray([g @ g for g in grads], jnp.float32)),
        jnp.asarray(weights, jnp.float32), {"loss": jnp.zeros(3)})
    state = algorithm.init(params, jax.random.key(0))._replace(
        extra=fwdllm.FwdLLMState(jax.tree.map(jnp.zeros_like, params), jnp.int32(k)))
    new_state, _ = simulate.finish(algorithm, state, simulate.accumulate(None, outputs, jnp.asarray(weights)))

    theta, u, k_next, relative_variance = hand_server(flat(params), k, grads, weights, lr=lr,
                                                      num_tangents=num_tangents, threshold=threshold)
    assert (relative_variance > threshold) == (spread == "wide")
    assert k_next == expected_k
    assert int(new_state.extra.num_tangents) == expected_k
    np.testing.assert_allclose(flat(new_state.extra.previous_update), u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(new_state.params), theta, rtol=1e-5, atol=1e-6)


def test_fwdllm_two_rounds_end_to_end(problem):
    """Two engine rounds: round 1 from u_0 = 0 with K_1 = 1, K doubled for round 2, whose tangents are chosen by
    their similarity to round 1's update; all by hand."""
    params, train = problem
    options = dict(num_tangents=4, candidates=3, eps=0.05, batch_size=4)
    lr, cohort = 0.3, 4
    algorithm = fwdllm.fwdllm(TASK, server_optimizer=optax.sgd(lr), initial_tangents=1, variance_threshold=0.5,
                              **options)
    state = run(algorithm, params, train, rounds=2, cohort=cohort)

    theta, previous, k = flat(params), np.zeros(DIM + 1), 1
    history = []
    for round_ in (1, 2):
        results = [hand_fwdllm_client(theta, previous, k, data, count, key, params_like=params, **options)
                   for data, count, key in client_inputs(train, SEED, round_, cohort, 4)]
        grads, chosen, examples = zip(*results)
        theta, previous, k, _ = hand_server(theta, k, grads, examples, lr=lr, num_tangents=4, threshold=0.5)
        history.append((k, chosen))
    assert history[0][0] == 2, "the setup should double K after round 1"
    assert any(list(c) != [0, 1, 2, 3] for c in history[1][1]), "round 2 should steer the selection"
    assert int(state.extra.num_tangents) == k
    np.testing.assert_allclose(flat(state.extra.previous_update), previous, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(flat(state.params), theta, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ FedSGD, BAFFLE, FedFGD, FedMeZO


def hand_round(params, train, estimate, *, server_lr, cohort, batch_size, weight="batch"):
    """θ − server_lr · Σ w_i ĝ_i / Σ w_i over the engine's cohort of round 1, ĝ_i = estimate(θ, batch, tangent key)
    on each client's first batch; w_i = the batch's examples."""
    theta = flat(params)
    total, weights = 0.0, 0.0
    for data, count, key in client_inputs(train, SEED, 1, cohort, batch_size):
        batch, tangent_key, _ = first_batch(data, count, key, batch_size)
        w = float(np.sum(np.asarray(batch["mask"]))) if weight == "batch" else float(count)
        total = total + w * estimate(theta, batch, tangent_key)
        weights += w
    return theta - server_lr * total / weights


def central_difference_estimate(num_tangents, eps, params_like):
    """(1/K) Σ_k (L(θ + ε v_k) − L(θ − ε v_k)) / (2ε) v_k, v_k from fold_in(tangent key, k)."""
    def estimate(theta, batch, key):
        vs = [tangent(key, k, params_like) for k in range(num_tangents)]
        return sum((hand_loss(theta + eps * v, batch) - hand_loss(theta - eps * v, batch)) / (2 * eps) * v
                   for v in vs) / num_tangents
    return estimate


def test_fedsgd_round_is_the_weighted_mean_first_batch_gradient(problem):
    params, train = problem
    state = run(fedsgd.fedsgd(TASK, server_optimizer=optax.sgd(0.5), batch_size=4), params, train)
    expected = hand_round(params, train, lambda theta, batch, key: hand_grad(theta, batch), server_lr=0.5, cohort=4,
                          batch_size=4)
    np.testing.assert_allclose(flat(state.params), expected, rtol=1e-5, atol=1e-6)


def test_baffle_round_is_fedsgd_with_central_differences(problem):
    params, train = problem
    sigma, k = 0.05, 3
    state = run(baffle.baffle(TASK, server_optimizer=optax.sgd(0.5), batch_size=4, sigma=sigma, num_tangents=k),
                params, train)
    expected = hand_round(params, train, central_difference_estimate(k, sigma, params), server_lr=0.5, cohort=4,
                          batch_size=4)
    np.testing.assert_allclose(flat(state.params), expected, rtol=1e-4, atol=1e-5)
    # a quadratic loss: the central difference is the directional derivative, so ĝ is the forward gradient
    forward = hand_round(params, train, lambda theta, batch, key: sum(
        (hand_grad(theta, batch) @ v) * v for v in (tangent(key, j, params) for j in range(k))) / k,
        server_lr=0.5, cohort=4, batch_size=4)
    np.testing.assert_allclose(expected, forward, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["fedfgd", "fedmezo"])
def test_one_step_fedavg_with_an_estimator_is_one_estimated_sgd_step(problem, name):
    """Batch 8 ≥ every client: one local step on the client's whole data, the first batch's keys. Client:
    θ_i = θ − η_c ĝ_i; server SGD(η_s) on u = Σ n_i (θ − θ_i) / Σ n_i."""
    params, train = problem
    k, eps, client_lr, server_lr = 3, 0.05, 0.2, 0.5
    options = dict(client_optimizer=optax.sgd(client_lr), server_optimizer=optax.sgd(server_lr), batch_size=8,
                   num_tangents=k)
    if name == "fedfgd":
        algorithm = fedfgd.fedfgd(TASK, **options)
        estimate = lambda theta, batch, key: sum((hand_grad(theta, batch) @ v) * v
                                                 for v in (tangent(key, j, params) for j in range(k))) / k
    else:
        algorithm = fedmezo.fedmezo(TASK, eps=eps, **options)
        estimate = central_difference_estimate(k, eps, params)
    state = run(algorithm, params, train, batch_size=8)
    expected = hand_round(params, train, lambda theta, batch, key: client_lr * estimate(theta, batch, key),
                          server_lr=server_lr, cohort=4, batch_size=8, weight="count")
    np.testing.assert_allclose(flat(state.params), expected, rtol=1e-4, atol=1e-5)
