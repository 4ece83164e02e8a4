"""The zero-order baselines in both communication shapes (fedmezo per iteration, BAFFLE+ and FwdLLM+ per epoch)
against hand computations on a linear least-squares model, the options a shape does not use, and the bytes of
each shape.

The hand computations take from the library only how a client's minibatches and keys are derived
(`local_steps`, `first_batch`, the engine's `fold_in` key tree) and how a tangent is regenerated from a key
(`fwdgrad.sample_tangent`); the losses, differences, tangent selection, K adaptation and optimizer steps are written
here in numpy (float64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spryjax import build, fwdgrad
from spryjax.data.federated import FederatedData
from spryjax.errors import InputError
from spryjax.fl import mesh as mesh_lib, simulate
from spryjax.fl.algorithm import first_batch, local_steps
from spryjax.fl.algorithms import baffle, fedmezo, fwdllm, spry
from spryjax.pytrees import tree_bytes
from spryjax.task import regression_task

DIM, BATCH, SEED = 3, 4, 2
TASK = regression_task(lambda params, frozen, batch, key=None: batch["x"] @ params["w"] + params["b"])


@pytest.fixture(scope="module")
def problem():
    """θ, one client (10 examples in 12 rows: batches of 4, 4, 2 and none), and 6 clients of various sizes."""
    rng = np.random.default_rng(0)
    sizes = [3, 6, 2, 5, 4, 7]
    n = sum(sizes)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    starts = np.cumsum([0] + sizes)
    train = FederatedData.from_partition({"x": x, "label": y},
                                         [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])])
    params = {"w": jnp.asarray(rng.normal(size=DIM) * 0.3, jnp.float32), "b": jnp.float32(0.1)}
    client = {"x": jnp.asarray(np.pad(x[:10], ((0, 2), (0, 0)))), "label": jnp.asarray(np.pad(y[:10], (0, 2)))}
    return params, client, jnp.int32(10), train


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.tree.map(np.asarray, tree))[0], np.float64)


def unflat(vector, like):
    return ravel_pytree(like)[1](jnp.asarray(vector, jnp.float32))


def tangent(key, m, params) -> np.ndarray:
    return flat(fwdgrad.sample_tangent(jax.random.fold_in(key, m), params))


def hand_loss(theta: np.ndarray, batch: dict) -> float:
    """Masked mean squared error, float64; θ in ravel_pytree order (b, then w)."""
    x, y, m = (np.asarray(batch[k], np.float64) for k in ("x", "label", "mask"))
    return float(np.sum(m * (x @ theta[1:] + theta[0] - y) ** 2) / max(np.sum(m), 1.0))


def hand_steps(data, count, key, epochs):
    """(batch, estimator key) of each real step of `local_training`'s loop, in order: the minibatches and step keys
    of `local_steps`, the estimator key the first half of each step key's split."""
    capacity = next(iter(data.values())).shape[0]
    index, mask, keys = local_steps(key, count, capacity, BATCH, epochs)
    index, mask = np.asarray(index), np.asarray(mask)
    for s in range(index.shape[0]):
        if mask[s].any():
            batch = {k: np.asarray(v)[index[s]] for k, v in data.items()}
            yield {**batch, "mask": mask[s].astype(np.float64)}, jax.random.split(keys[s])[0]


def run(algorithm, params, train, *, rounds=1, cohort=4):
    return simulate.run_simulation(algorithm, params, {}, train, train, num_rounds=rounds, clients_per_round=cohort,
                                   seed=SEED, batch_size=BATCH, strategy="vmap", eval_every=0, show_progress=False,
                                   mesh=mesh_lib.client_mesh(jax.devices()[:1])).state


# ------------------------------------------------------------------------------------- BAFFLE+ (per epoch)


@pytest.mark.parametrize("epochs", [1, 2])
def test_baffle_per_epoch_is_local_sgd_on_central_differences(problem, epochs):
    """θ_i after the local epochs = the hand-rolled loop θ ← θ − η ĝ with ĝ = (1/K) Σ_k (L(θ+σv_k) − L(θ−σv_k))/(2σ)
    v_k at every real minibatch; the client uploads θ − θ_i weighted by its examples."""
    params, data, count, _ = problem
    sigma, k, lr = 0.05, 3, 0.1
    algorithm = baffle.baffle(TASK, communication="per_epoch", client_optimizer=optax.sgd(lr), local_epochs=epochs,
                              server_optimizer=optax.sgd(1.0), batch_size=BATCH, sigma=sigma, num_tangents=k)
    key = jax.random.key(5)
    out = jax.jit(algorithm.client_update)({}, params, data, count, jnp.int32(0), key)

    theta, steps = flat(params), 0
    for batch, estimator_key in hand_steps(data, count, key, epochs):
        vs = [tangent(estimator_key, j, params) for j in range(k)]
        grad = sum((hand_loss(theta + sigma * v, batch) - hand_loss(theta - sigma * v, batch)) / (2 * sigma) * v
                   for v in vs) / k
        theta, steps = theta - lr * grad, steps + 1
    assert steps == 3 * epochs
    np.testing.assert_allclose(flat(out.update), flat(params) - theta, rtol=1e-4, atol=1e-6)
    assert float(out.weight) == 10.0 and float(out.metrics["steps"]) == steps


# ----------------------------------------------------------------------------- FedMeZO (per iteration)


def test_fedmezo_per_iteration_regenerates_the_spsa_estimate(problem):
    """The client's update is the server's regeneration (1/K) Σ_k d_k z_k of its K uploaded differences
    d_k = (L(θ+εz_k) − L(θ−εz_k))/(2ε) on FedSGD's first minibatch; a round is one server step on their
    minibatch-weighted mean."""
    params, data, count, train = problem
    eps, k, lr = 0.05, 4, 0.5
    algorithm = fedmezo.fedmezo(TASK, communication="per_iteration", server_optimizer=optax.sgd(lr),
                                batch_size=BATCH, eps=eps, num_tangents=k)

    def hand_estimate(theta, data, count, key):
        batch, tangent_key, _ = first_batch(data, count, key, BATCH)
        zs = [tangent(tangent_key, j, params) for j in range(k)]
        d = [(hand_loss(theta + eps * z, batch) - hand_loss(theta - eps * z, batch)) / (2 * eps) for z in zs]
        return sum(dk * z for dk, z in zip(d, zs)) / k, float(np.sum(np.asarray(batch["mask"])))

    key = jax.random.key(7)
    out = jax.jit(algorithm.client_update)({}, params, data, count, jnp.int32(0), key)
    expected, examples = hand_estimate(flat(params), data, count, key)
    np.testing.assert_allclose(flat(out.update), expected, rtol=1e-4, atol=1e-6)
    assert float(out.weight) == examples == BATCH and float(out.metrics["steps"]) == 1

    state = run(algorithm, params, train)
    ids = simulate.sample_cohort(SEED, 1, train.num_clients, 4)
    arrays, counts = train.gather(ids, batch_size=BATCH)
    round_key = jax.random.fold_in(jax.random.key(SEED), 1)
    estimates = [hand_estimate(flat(params), {n: jnp.asarray(v[s]) for n, v in arrays.items()},
                               jnp.int32(counts[s]), jax.random.fold_in(round_key, s)) for s in range(4)]
    mean = sum(w * g for g, w in estimates) / sum(w for _, w in estimates)
    np.testing.assert_allclose(flat(state.params), flat(params) - lr * mean, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- FwdLLM+ (per epoch)


def hand_fwdllm_per_epoch(theta, towards, k, data, count, key, *, num_tangents, candidates, eps, lr, threshold,
                          epochs, params_like):
    """FwdLLM+'s client by hand: at every real minibatch, the pool v_m (m < candidates·K_max, from fold_in(estimator
    key, m)), the K_max most cosine-similar to the steering direction (ties, as with a zero direction, in index
    order), ĝ = (1/K) Σ_{k<K} (L(θ + ε v_k) − L(θ)) / ε v_k, an SGD step; the next minibatch steers towards ĝ and
    uses 2K (≤ K_max) if ((1/K) Σ ‖d_k v_k‖² − ‖ĝ‖²) / ‖ĝ‖² > threshold. Returns (θ, [(K, chosen) per step])."""
    history = []
    for batch, estimator_key in hand_steps(data, count, key, epochs):
        pool = np.stack([tangent(estimator_key, m, params_like) for m in range(candidates * num_tangents)])
        norm = np.linalg.norm(towards)
        similarity = pool @ towards / (np.linalg.norm(pool, axis=1) * norm) if norm > 0 else np.zeros(len(pool))
        chosen = np.argsort(-similarity, kind="stable")[:num_tangents]
        base = hand_loss(theta, batch)
        terms = [(hand_loss(theta + eps * pool[m], batch) - base) / eps * pool[m] for m in chosen[:k]]
        grad = sum(terms) / k
        spread = (np.mean([t @ t for t in terms]) - grad @ grad) / (grad @ grad)
        history.append((k, list(chosen)))
        k = min(2 * k, num_tangents) if spread > threshold else k
        theta, towards = theta - lr * grad, grad
    return theta, history


def test_fwdllm_per_epoch_steers_each_minibatch_and_doubles_k_per_minibatch(problem):
    """Two local epochs (6 minibatches). The first minibatch steers towards u_{r−1}, built close to its pool tangent
    9; each later one towards the previous minibatch's estimate; K starts at K_1 = 2 and doubles after a minibatch
    whose own K estimates spread more than the threshold: here after the third and the fourth."""
    params, data, count, _ = problem
    options = dict(num_tangents=8, candidates=3, eps=0.05)
    lr, threshold, epochs, key = 0.1, 1.5, 2, jax.random.key(3)
    algorithm = fwdllm.fwdllm(TASK, communication="per_epoch", client_optimizer=optax.sgd(lr), local_epochs=epochs,
                              server_optimizer=optax.sgd(1.0), batch_size=BATCH, initial_tangents=2,
                              variance_threshold=threshold, **options)
    steps = list(hand_steps(data, count, key, epochs))
    previous = 0.8 * tangent(steps[0][1], 9, params) + 0.1 * np.random.default_rng(1).normal(size=DIM + 1)
    state = fwdllm.FwdLLMState(unflat(previous, params), jnp.int32(2))
    out = jax.jit(algorithm.client_update)({}, (params, state), data, count, jnp.int32(0), key)

    theta, history = hand_fwdllm_per_epoch(flat(params), previous, 2, data, count, key, lr=lr, threshold=threshold,
                                           epochs=epochs, params_like=params, **options)
    ks = [k for k, _ in history]
    assert ks == [2, 2, 2, 4, 8, 8], "the setup should hold K, then double it twice within the client's loop"
    assert history[0][1][0] == 9, "the first minibatch steers towards u_{r-1}"
    # the second minibatch steers towards the first one's estimate: u_{r−1} would have chosen otherwise
    pool = np.stack([tangent(steps[1][1], m, params) for m in range(24)])
    by_previous_round = np.argsort(-(pool @ previous) / np.linalg.norm(pool, axis=1), kind="stable")[:8]
    assert history[1][1] != list(by_previous_round)
    np.testing.assert_allclose(flat(out.update), flat(params) - theta, rtol=1e-4, atol=1e-6)
    assert float(out.metrics["steps"]) == len(history) == 6
    np.testing.assert_allclose(float(out.metrics["tangents"]), np.mean(ks), rtol=1e-6)


def test_fwdllm_per_epoch_round_keeps_the_mean_update_and_k1(problem):
    """The server steps on the examples-weighted mean Δ, keeps it as u_r for the next round's first minibatches and
    leaves K at K_1; the client update matches the hand loop from u_0 = 0."""
    params, _, _, train = problem
    options = dict(num_tangents=4, candidates=2, eps=0.05)
    lr_c, lr_s = 0.1, 0.5
    algorithm = fwdllm.fwdllm(TASK, communication="per_epoch", client_optimizer=optax.sgd(lr_c),
                              server_optimizer=optax.sgd(lr_s), batch_size=BATCH, initial_tangents=2,
                              variance_threshold=1.0, **options)
    state = run(algorithm, params, train)
    ids = simulate.sample_cohort(SEED, 1, train.num_clients, 4)
    arrays, counts = train.gather(ids, batch_size=BATCH)
    round_key = jax.random.fold_in(jax.random.key(SEED), 1)
    deltas = [flat(params) - hand_fwdllm_per_epoch(
        flat(params), np.zeros(DIM + 1), 2, {n: jnp.asarray(v[s]) for n, v in arrays.items()}, jnp.int32(counts[s]),
        jax.random.fold_in(round_key, s), lr=lr_c, threshold=1.0, epochs=1, params_like=params, **options)[0]
        for s in range(4)]
    mean = sum(n * d for n, d in zip(counts, deltas)) / counts.sum()
    np.testing.assert_allclose(flat(state.extra.previous_update), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(state.params), flat(params) - lr_s * mean, rtol=1e-4, atol=1e-6)
    assert int(state.extra.num_tangents) == 2


# ------------------------------------------------------------------------------ options and bytes per shape


SGD = optax.sgd(0.1)
FACTORIES = {
    "spry": lambda **options: spry.spry(TASK, clients_per_round=2, **options),
    "fedmezo": lambda **options: fedmezo.fedmezo(TASK, **options),
    "baffle": lambda **options: baffle.baffle(TASK, **options),
    "fwdllm": lambda **options: fwdllm.fwdllm(TASK, **options),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_options_a_shape_does_not_use_are_errors(name):
    make = lambda **options: FACTORIES[name](server_optimizer=SGD, batch_size=BATCH, **options)
    with pytest.raises(InputError, match="^client_optimizer: not used by per_iteration communication$"):
        make(communication="per_iteration", client_optimizer=SGD)
    with pytest.raises(InputError, match="^client_optimizer is required for per_epoch communication$"):
        make(communication="per_epoch")
    with pytest.raises(InputError, match="^local_epochs=2: not used by per_iteration communication"):
        make(communication="per_iteration", local_epochs=2)
    with pytest.raises(InputError, match="communication must be"):
        make(communication="per_round")
    make(communication="per_iteration")
    make(communication="per_epoch", client_optimizer=SGD, local_epochs=2)


def test_shape_specific_options_of_fedmezo_and_spry():
    """FedMeZO per iteration rejects FedAvg's other local-training options; Spry's finetuned evaluation uses the
    client optimizer in either shape, so per iteration takes one exactly when finetune_epochs > 0."""
    common = dict(server_optimizer=SGD, batch_size=BATCH)
    for option, value in (("proximal_mu", 0.1), ("unroll", 2)):
        with pytest.raises(InputError, match=f"^{option}: not used by per_iteration communication$"):
            fedmezo.fedmezo(TASK, communication="per_iteration", **{option: value}, **common)
    make_spry = FACTORIES["spry"]
    with pytest.raises(InputError, match="^client_optimizer is required for finetune_epochs > 0$"):
        make_spry(communication="per_iteration", finetune_epochs=1, **common)
    make_spry(communication="per_iteration", finetune_epochs=1, client_optimizer=SGD, **common)


@pytest.mark.parametrize("name, default", [("fedmezo", "per_epoch"), ("baffle", "per_iteration"),
                                           ("fwdllm", "per_iteration"), ("spry", "per_epoch")])
def test_config_layer_names_the_field(name, default):
    """Defaults keep existing configs: spry and fedmezo per epoch (a client optimizer given), baffle and fwdllm per
    iteration (none); the other shape's option is an InputError naming config.algorithm."""
    section = {"name": name, "batch_size": BATCH, "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}}
    params = {"w": jnp.zeros(DIM), "b": jnp.float32(0)}
    optimizer = {"client_optimizer": {"name": "sgd", "learning_rate": 0.1}}
    fits, misfit = (optimizer, {}) if default == "per_epoch" else ({}, optimizer)
    build.algorithm({**section, **fits}, TASK, params, 2)
    message = ("client_optimizer is required for per_epoch" if default == "per_epoch"
               else "client_optimizer: not used by per_iteration")
    with pytest.raises(InputError, match=f"^config.algorithm: {message}"):
        build.algorithm({**section, **misfit}, TASK, params, 2)


K = 3


@pytest.mark.parametrize("name, communication, up_per_client", [
    ("fedmezo", "per_epoch", None), ("fedmezo", "per_iteration", 4 * K),            # K fp32 differences
    ("baffle", "per_epoch", None), ("baffle", "per_iteration", 4 * K),
    ("fwdllm", "per_epoch", None), ("fwdllm", "per_iteration", 8 * K),              # K scalars, K indices
])
def test_bytes_per_round_of_each_shape(problem, name, communication, up_per_client):
    """Every client downloads the whole trainable tree; per epoch it uploads it too (None), per iteration only what
    the server needs to regenerate its estimate."""
    params = problem[0]
    optimizer = {"client_optimizer": SGD} if communication == "per_epoch" else {}
    algorithm = FACTORIES[name](communication=communication, num_tangents=K, server_optimizer=SGD,
                                batch_size=BATCH, **optimizer)
    size = tree_bytes(params)
    for cohort in (1, 5):
        got = algorithm.bytes_per_round(jax.eval_shape(lambda: params), cohort)
        assert (got.down, got.up) == (size * cohort, (up_per_client or size) * cohort)
