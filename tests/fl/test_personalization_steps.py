"""The baselines of Flow's table (fedavg_ft, apfl, ditto, fedrep, lg_fedavg, hypcluster, knn_per) against
hand-written steps of what each module's docstring says the algorithm does: one client's update and its
personalized evaluation, on a tiny routed CNN with plain SGD and full-batch steps (batch 8 ≥ every client).

The hand computations use their own forward pass of the CNN's global path (`features`, `logits`), their own
cross-entropy and jax.grad, and score the personalized model's held-out predictions themselves (`scores`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spryjax.data.federated import FederatedData
from spryjax.fl import simulate
from spryjax.fl.algorithms import apfl, ditto, fedavg_ft, fedrep, hypcluster, knn_per, lg_fedavg
from spryjax.nn import routed_models, routing
from spryjax.task import classification_objective, classification_task

CLASSES, LR, BATCH = 4, 0.2, 8
TRAIN_CLIENT, TEST_CLIENT = 2, 4          # 7 of 8 training rows real; 5 of 8 held-out rows real


@pytest.fixture(scope="module")
def setup():
    """A routed CNN on 8×8 images without dropout, its states drawn with numpy (as tests/fl/test_flow.py builds
    it), and one client's padded training and held-out splits."""
    module = nnx.eval_shape(lambda: routed_models.RoutedCNN((8, 8), CLASSES, channels=(2, 4), dense=8,
                                                             router_hidden=(8, 8, 8), dropout_rates=(0.0, 0.0),
                                                             router_dropout=0.0, rngs=nnx.Rngs(0)))
    model = routing.routed_model(module, objective=classification_objective, num_points=4,
                                 make_task=functools.partial(classification_task, num_classes=CLASSES))
    rng = np.random.default_rng(0)
    draw = lambda s: jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(max(np.prod(s.shape[:-1]), 4)), s.shape), s.dtype)
    model = model._replace(states=jax.tree.map(draw, model.states))
    sizes = [8, 8, 7, 8, 5, 8]
    n = sum(sizes)
    data = np.random.default_rng(1)
    arrays = {"x": data.uniform(size=(2 * n, 8, 8)).astype(np.float32),
              "label": data.integers(0, CLASSES, 2 * n)}
    starts = np.cumsum([0] + sizes)
    parts = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
    train = FederatedData.from_partition(arrays, parts)
    test = FederatedData.from_partition(arrays, [p + n for p in parts])
    one = lambda split, i: (lambda a, c: ({k: jnp.asarray(v[0]) for k, v in a.items()}, jnp.int32(c[0])))(
        *split.gather([i], batch_size=BATCH))
    return model, one(train, TRAIN_CLIENT), one(test, TEST_CLIENT)


def options(**extra):
    return dict(client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0), batch_size=BATCH, local_epochs=1,
                **extra)


# ------------------------------------------------------------------------------------------ hand-written model


def features(theta, x):
    """The global path up to the head: conv 3×3, relu, conv 3×3, relu, max-pool 2, flatten, dense, relu."""
    conv = lambda h, p: jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    h = jax.nn.relu(conv(x[..., None], theta["conv1"]["global_"]))
    h = jax.nn.relu(conv(h, theta["conv2"]["global_"]))
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    dense1 = theta["dense1"]["global_"]
    return jax.nn.relu(h.reshape(x.shape[0], -1) @ dense1["kernel"] + dense1["bias"])


def logits(theta, x):
    return features(theta, x) @ theta["dense2"]["global_"]["kernel"] + theta["dense2"]["global_"]["bias"]


def mean_ce(theta, data, count):
    """The mean cross-entropy over the first `count` rows."""
    log_p = jax.nn.log_softmax(logits(theta, data["x"]))
    picked = jnp.take_along_axis(log_p, data["label"][:, None], 1)[:, 0]
    mask = jnp.arange(picked.shape[0]) < count
    return -jnp.sum(jnp.where(mask, picked, 0.0)) / count


grad = jax.jit(jax.grad(mean_ce))


def sgd(tree, gradient, lr=LR):
    return jax.tree.map(lambda p, g: p - lr * g, tree, gradient)


def on(tree, keys):
    """The gradient restricted to θ_g's top-level `keys` (zero elsewhere)."""
    return {k: jax.tree.map(lambda x: x if k in keys else jnp.zeros_like(x), v) for k, v in tree.items()}


def scores(log_p, data, count):
    """{"loss": Σ −log p_y, "correct": Σ [argmax p = y]} over the first `count` rows of log-probabilities."""
    log_p, y = np.asarray(log_p, np.float64), np.asarray(data["label"])
    real = np.arange(len(y)) < int(count)
    return {"loss": -np.sum(log_p[np.arange(len(y)), y][real]), "correct": np.sum((log_p.argmax(-1) == y)[real])}


def model_scores(theta, data, count):
    return scores(jax.nn.log_softmax(logits(theta, data["x"])), data, count)


def assert_scores(group, expected, rtol=1e-5):
    assert float(group["count"]) == float(expected.get("count", group["count"]))
    np.testing.assert_allclose(float(group["loss"]), expected["loss"], rtol=rtol)
    assert float(group["correct"]) == expected["correct"]


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def evaluate(algorithm, broadcast, setup, key=3):
    _, (train, train_count), (test, test_count) = setup
    return jax.jit(algorithm.evaluate_client)({}, broadcast, train, train_count, test, test_count, jnp.int32(0),
                                              jax.random.key(key))


def client_update(algorithm, broadcast, setup, key=5):
    _, (train, count), _ = setup
    return jax.jit(algorithm.client_update)({}, broadcast, train, count, jnp.int32(0), jax.random.key(key))


def test_hand_written_forward_pass_is_the_global_path(setup):
    model, (train, _), _ = setup
    np.testing.assert_allclose(logits(model.states[0], train["x"]),
                               model.apply(model.states, train, mode="global")[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("factory", [fedavg_ft.fedavg_ft, ditto.ditto, lg_fedavg.lg_fedavg, knn_per.knn_per],
                         ids=lambda f: f.__name__)
def test_training_round_is_a_fedavg_step(setup, factory):
    """fedavg_ft, ditto, lg_fedavg and knn_per train θ_g by FedAvg: one full-batch step, u = η ∇L(θ), weight n."""
    model, (train, count), _ = setup
    theta = model.states[0]
    out = client_update(factory(model, **options()), theta, setup)
    assert_trees_close(out.update, jax.tree.map(lambda g: LR * g, grad(theta, train, count)))
    assert float(out.weight) == float(count) == 7.0


def test_fedavg_ft_personalizes_by_finetuning(setup):
    """Personalized: θ after `finetune_epochs` = 2 full-batch SGD steps on the training split; generalized: θ."""
    model, (train, count), (test, test_count) = setup
    theta = model.states[0]
    groups = evaluate(fedavg_ft.fedavg_ft(model, finetune_epochs=2, **options()), theta, setup)
    tuned = theta
    for _ in range(2):
        tuned = sgd(tuned, grad(tuned, train, count))
    assert_scores(groups["generalized"], {**model_scores(theta, test, test_count), "count": 5.0})
    assert_scores(groups["personalized"], model_scores(tuned, test, test_count))
    assert float(groups["clients"]["count"]) == 1.0


def test_fedavg_ft_without_finetuning_evaluates_the_global_model(setup):
    model, _, (test, test_count) = setup
    theta = model.states[0]
    groups = evaluate(fedavg_ft.fedavg_ft(model, finetune_epochs=0, **options()), theta, setup)
    expected = model_scores(theta, test, test_count)
    assert_scores(groups["personalized"], expected)
    assert_scores(groups["generalized"], expected)
    assert float(groups["versus_global"]["helped"]) == float(groups["versus_global"]["harmed"]) == 0.0


def test_ditto_personal_model_is_proximal_sgd_from_w(setup):
    """v_0 = w, v_{t+1} = v_t − η (∇F(v_t) + λ (v_t − w)), two steps (the first has no proximal pull)."""
    model, (train, count), (test, test_count) = setup
    w, lam = model.states[0], 2.0
    groups = evaluate(ditto.ditto(model, proximal_lambda=lam, personal_epochs=2, **options()), w, setup)
    v, plain = w, w
    for _ in range(2):
        v = jax.tree.map(lambda p, g, a: p - LR * (g + lam * (p - a)), v, grad(v, train, count), w)
        plain = sgd(plain, grad(plain, train, count))
    expected = model_scores(v, test, test_count)
    assert_scores(groups["personalized"], expected)
    assert_scores(groups["generalized"], model_scores(w, test, test_count))
    assert abs(expected["loss"] - model_scores(plain, test, test_count)["loss"]) > 1e-3   # λ matters here


def hand_apfl(w, v, alpha, data, count, steps):
    """APFL's local steps, as the APFL paper and its released code: with v̄ = α v + (1 − α) w,
    w ← w − η ∇f(w),  v ← v − η α ∇f(v̄),  α ← clip(α − η ⟨v − w, ∇f(v̄)⟩, 0, 1)  (all from the same point)."""
    for _ in range(steps):
        mixed = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v, w)
        g_w, g_mixed = grad(w, data, count), grad(mixed, data, count)
        inner = sum(float(jnp.sum((a - b) * g)) for a, b, g in
                    zip(jax.tree.leaves(v), jax.tree.leaves(w), jax.tree.leaves(g_mixed)))
        w, v = sgd(w, g_w), sgd(v, jax.tree.map(lambda g: alpha * g, g_mixed))
        alpha = float(np.clip(alpha - LR * inner, 0.0, 1.0))
    return w, v, alpha


def apfl_state(model, scale):
    w = model.states[0]
    return w, jax.tree.map(lambda x: x + scale * jnp.sign(x), w)


def test_apfl_client_update_and_personalized_mixture(setup):
    """Client update: u = (w, v) − (w', v') after one step; evaluation: α v + (1 − α) w after two steps, α adapted
    inside [0, 1]."""
    model, (train, count), (test, test_count) = setup
    w, v = apfl_state(model, 0.3)
    algorithm = apfl.apfl(model, alpha=0.25, personal_epochs=2, **options())
    out = client_update(algorithm, (w, v), setup)
    w1, v1, _ = hand_apfl(w, v, 0.25, train, count, 1)
    assert_trees_close(out.update, (jax.tree.map(jnp.subtract, w, w1), jax.tree.map(jnp.subtract, v, v1)))

    groups = evaluate(algorithm, (w, v), setup)
    w2, v2, alpha = hand_apfl(w, v, 0.25, train, count, 2)
    assert 0.0 < alpha < 1.0 and abs(alpha - 0.25) > 1e-3
    personal = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v2, w2)
    assert_scores(groups["personalized"], model_scores(personal, test, test_count), rtol=1e-4)
    assert_scores(groups["generalized"], model_scores(w, test, test_count))


def test_apfl_alpha_is_projected_back_into_0_1(setup):
    """v = w − 10 ∇f(w): f along the segment falls steeply then rises, so from α = 0.5 the first step overshoots
    below 0; projected to 0, the second step's gradient at α = 0 (f decreasing towards v) brings α back inside."""
    model, (train, count), (test, test_count) = setup
    w = model.states[0]
    v = jax.tree.map(lambda x, g: x - 10.0 * g, w, grad(w, train, count))
    w2, v2, alpha = hand_apfl(w, v, 0.5, train, count, 2)
    assert hand_apfl(w, v, 0.5, train, count, 1)[2] == 0.0 and 0.1 < alpha < 1.0    # the scenario, by hand
    task = apfl.global_path_task(model)
    (_, _, code_alpha), _ = jax.jit(lambda w, v: apfl.apfl_steps(
        task, w, v, train, count, jax.random.key(0), alpha=0.5, adapt_alpha=True, optimizer=optax.sgd(LR),
        batch_size=BATCH, epochs=2))(w, v)
    groups = evaluate(apfl.apfl(model, alpha=0.5, personal_epochs=2, **options()), (w, v), setup)
    personal = jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, v2, w2)
    assert_scores(groups["personalized"], model_scores(personal, test, test_count), rtol=1e-4)
    np.testing.assert_allclose(float(code_alpha), alpha, rtol=1e-4)


def test_fedrep_fits_the_head_then_the_body(setup):
    """Head phase: `head_epochs` = 2 steps on h with φ fixed; body phase: 1 step on φ with the new head fixed;
    u = θ − (φ', h''). Personalized: (φ, h'') from the head phase alone."""
    model, (train, count), (test, test_count) = setup
    theta = model.states[0]
    algorithm = fedrep.fedrep(model, head=("dense2",), head_epochs=2, **options())
    head = theta
    for _ in range(2):
        head = sgd(head, on(grad(head, train, count), ("dense2",)))
    body = sgd(head, on(grad(head, train, count), ("conv1", "conv2", "dense1")))
    out = client_update(algorithm, theta, setup)
    assert_trees_close(out.update, jax.tree.map(jnp.subtract, theta, body))
    groups = evaluate(algorithm, theta, setup)
    assert_scores(groups["personalized"], model_scores(head, test, test_count))
    assert_scores(groups["generalized"], model_scores(theta, test, test_count))


def test_lg_fedavg_fits_a_local_representation_under_the_global_head(setup):
    """Personalized (r_k, h): r_k after `personal_epochs` = 2 steps on the representation, the head fixed."""
    model, (train, count), (test, test_count) = setup
    theta = model.states[0]
    groups = evaluate(lg_fedavg.lg_fedavg(model, head=("dense2",), personal_epochs=2, **options()), theta, setup)
    local = theta
    for _ in range(2):
        local = sgd(local, on(grad(local, train, count), ("conv1", "conv2", "dense1")))
    assert np.array_equal(local["dense2"]["global_"]["kernel"], theta["dense2"]["global_"]["kernel"])
    assert_scores(groups["personalized"], model_scores(local, test, test_count))
    assert_scores(groups["generalized"], model_scores(theta, test, test_count))


def test_hypcluster_trains_evaluates_and_aggregates_the_best_fitting_model(setup):
    """k* = argmin_k L(θ_k) on the training split; the client steps θ_{k*} only (weight n there, 0 elsewhere);
    personalized = θ_{k*}; global = log of the uniform ensemble (1/K) Σ_k softmax(f(x; θ_k)). The server moves
    only the chosen model."""
    model, (train, count), (test, test_count) = setup
    algorithm = hypcluster.hypcluster(model, num_models=3, **options())
    models = algorithm.init(model.states, jax.random.key(0)).params
    losses = [float(mean_ce(m, train, count)) for m in models]
    best = int(np.argmin(losses))
    if best == 0:                       # make the choice something other than the first model
        models, best = (models[1], models[0], models[2]), 1
    out = client_update(algorithm, models, setup)
    for k in range(3):
        expected = jax.tree.map(lambda g: LR * g if k == best else jnp.zeros_like(g),
                                grad(models[k], train, count))
        assert_trees_close(out.update[k], expected)
        assert all(float(x) == (7.0 if k == best else 0.0) for x in jax.tree.leaves(out.weight[k]))

    groups = evaluate(algorithm, models, setup)
    assert_scores(groups["personalized"], model_scores(models[best], test, test_count))
    ensemble = np.mean([np.asarray(jax.nn.softmax(logits(m, test["x"])), np.float64) for m in models], axis=0)
    assert_scores(groups["generalized"], scores(np.log(ensemble), test, test_count))

    state = algorithm.init(model.states, jax.random.key(0))._replace(params=models)
    state = state._replace(opt_state=optax.sgd(1.0).init(models))
    stacked = jax.tree.map(lambda x: x[None], out)
    new, _ = simulate.finish(algorithm, state, simulate.accumulate(None, stacked, count[None]))
    for k in range(3):
        expected = jax.tree.map(jnp.subtract, models[k], out.update[k]) if k == best else models[k]
        assert_trees_close(new.params[k], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [3, 10])     # 10 > the 7 training examples: all of them are neighbours
def test_knn_per_interpolates_the_model_and_the_neighbours(setup, k):
    """p = λ p_kNN + (1 − λ) softmax(f(x)), p_kNN from the k nearest training features in squared distance with
    weights exp(−d / T), the datastore being the client's 7 real training rows."""
    model, (train, count), (test, test_count) = setup
    theta = model.states[0]
    lam, temperature = 0.4, 2.0
    groups = evaluate(knn_per.knn_per(model, neighbors=k, interpolation=lam, temperature=temperature,
                                      **options()), theta, setup)
    store = np.asarray(features(theta, train["x"]), np.float64)[:int(count)]
    store_labels = np.asarray(train["label"])[:int(count)]
    queries = np.asarray(features(theta, test["x"]), np.float64)
    p_model = np.asarray(jax.nn.softmax(logits(theta, test["x"])), np.float64)
    p = np.empty_like(p_model)
    for i, q in enumerate(queries):
        d = ((store - q) ** 2).sum(-1)
        nearest = np.argsort(d)[:k]
        weights = np.exp(-d[nearest] / temperature)
        p_knn = np.bincount(store_labels[nearest], weights=weights / weights.sum(), minlength=CLASSES)
        p[i] = lam * p_knn + (1 - lam) * p_model[i]
    assert_scores(groups["personalized"], scores(np.log(p), test, test_count), rtol=1e-4)
    assert_scores(groups["generalized"], model_scores(theta, test, test_count))
