"""spryjax.nn.routing against independent computations: a hand-written CNN and policy MLP over the split states,
forced routing decisions, per-group gradients, vmap over clients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spryjax.data.dataset import Dataset
from spryjax.nn import routed_models, routing
from spryjax.task import classification_objective, classification_task, next_word_objective, objective_task, summarize

SMALL_CNN = dict(channels=(4, 8), dense=16, router_hidden=(16, 8, 8))
ROUTED_LAYERS = ("conv1", "conv2", "dense1", "dense2")


def image_dataset(n=6, shape=(8, 8), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    split = {"x": rng.uniform(size=(n, *shape)).astype(np.float32), "label": rng.integers(0, classes, n)}
    return Dataset("toy", split, split, classes)


def batch_of(data):
    return {"x": jnp.asarray(data.train["x"]), "label": jnp.asarray(data.train["label"], jnp.int32),
            "mask": jnp.ones(len(data.train["label"]))}


def filled(model, seed=0):
    """The model with random states: kernels N(0, 1/fan_in), biases N(0, 0.1²). Tests build modules abstractly
    (nnx.eval_shape) and fill them with numpy draws, since compiling Flax's initializers costs a second each
    on a loaded 2-core CPU; `test_builders_initialize_real_models` (slow) runs the real ones."""
    rng = np.random.default_rng(seed)

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 100
        return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), s.shape), s.dtype)

    return model._replace(states=jax.tree.map(draw, model.states))


def abstract_model(build, **kwargs):
    return filled(routing.routed_model(nnx.eval_shape(lambda: build(nnx.Rngs(0))), **kwargs))


def jitted(model):
    return jax.jit(model.apply, static_argnames=("mode", "hard"))


@pytest.fixture(scope="module")
def cnn():
    data = image_dataset()
    model = abstract_model(lambda rngs: routed_models.RoutedCNN((8, 8), 10, rngs=rngs, **SMALL_CNN),
                           objective=classification_objective, num_points=4,
                           make_task=functools.partial(classification_task, num_classes=10))
    return model._replace(apply=jitted(model)), batch_of(data)


# ------------------------------------------------------------------------------- independent reference CNN


def conv(x, p):
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]


def reference_cnn(theta_g, theta_l, w, x):
    """The routed CNN written out by hand: layer k's output is w[:, k, 0]·global + w[:, k, 1]·local."""
    def routed(k, fn, h):
        name = ROUTED_LAYERS[k]
        g, l = fn(h, theta_g[name]["global_"]), fn(h, theta_l[name]["local"])
        shape = (-1,) + (1,) * (g.ndim - 1)
        return w[:, k, 0].reshape(shape) * g + w[:, k, 1].reshape(shape) * l

    dense = lambda h, p: h @ p["kernel"] + p["bias"]
    h = jax.nn.relu(routed(0, conv, x[..., None]))
    h = jax.nn.relu(routed(1, conv, h))
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(routed(2, dense, h.reshape(h.shape[0], -1)))
    return routed(3, dense, h)


def reference_policy(phi, x):
    """p_k = softmax(V_k relu-activation_{e_k} + c_k) with the paper's exits (1, 2, 3, 3) of a 3-layer MLP."""
    layers, heads = phi["router"]["layers"], phi["router"]["heads"]
    a, activations = x.reshape(x.shape[0], -1), []
    for j in range(3):
        a = jax.nn.relu(a @ layers[j]["kernel"] + layers[j]["bias"])
        activations.append(a)
    return jnp.stack([jax.nn.softmax(activations[e] @ heads[k]["kernel"] + heads[k]["bias"])
                      for k, e in enumerate((0, 1, 2, 2))], 1)


def force(phi, column):
    """Router state whose every exit prefers `column` (0 global, 1 local) by a wide margin."""
    heads = {k: {"kernel": jnp.zeros_like(h["kernel"]), "bias": jnp.zeros(2).at[column].set(50.0)}
             for k, h in phi["router"]["heads"].items()}
    return {"router": {**phi["router"], "heads": heads}}


def test_pure_paths_equal_the_reference_model(cnn):
    model, batch = cnn
    g, l, r = model.states
    b = batch["x"].shape[0]
    for mode, theta_w in (("global", [1.0, 0.0]), ("local", [0.0, 1.0])):
        logits, probs = model.apply(model.states, batch, mode=mode)
        w = jnp.broadcast_to(jnp.asarray(theta_w), (b, 4, 2))
        np.testing.assert_allclose(logits, reference_cnn(g, l, w, batch["x"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(probs, w)


@pytest.mark.parametrize("column, mode", [(0, "global"), (1, "local")])
def test_hard_routing_forced_to_one_path_equals_that_path(cnn, column, mode):
    model, batch = cnn
    g, l, r = model.states
    forced = (g, l, force(r, column))
    logits, probs = model.apply(forced, batch, mode="routed", hard=True)
    np.testing.assert_array_equal(probs[..., column], 1.0)
    np.testing.assert_allclose(logits, model.apply(model.states, batch, mode=mode)[0], rtol=1e-6, atol=1e-6)
    # soft routing with p ≈ one-hot is also (nearly) the same path
    np.testing.assert_allclose(model.apply(forced, batch, mode="routed")[0], logits, rtol=1e-4, atol=1e-4)


def test_soft_and_hard_routing_equal_the_reference_mixture(cnn):
    model, batch = cnn
    g, l, r = model.states
    p = reference_policy(r, batch["x"])
    assert 0.05 < float(p[..., 0].min()) and float(p[..., 0].max()) < 0.95     # a real mixture, not a corner
    logits, probs = model.apply(model.states, batch, mode="routed")
    np.testing.assert_allclose(probs, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, reference_cnn(g, l, p, batch["x"]), rtol=1e-5, atol=1e-5)
    hard_logits, hard_probs = model.apply(model.states, batch, mode="routed", hard=True)
    decisions = jax.nn.one_hot(jnp.argmax(p, -1), 2)
    np.testing.assert_array_equal(hard_probs, decisions)
    np.testing.assert_allclose(hard_logits, reference_cnn(g, l, decisions, batch["x"]), rtol=1e-5, atol=1e-5)


def test_local_from_global_makes_every_path_the_global_path(cnn):
    """After θ_l := θ_g (Flow's local_init), the local path and every routed mixture compute the global path; the
    global copies, the router and θ_l's structure are unchanged, and each local leaf is its global counterpart."""
    model, batch = cnn
    g, l, r = model.states
    copied = routing.local_from_global(g, l)
    assert jax.tree.structure(copied) == jax.tree.structure(l)
    for name in ROUTED_LAYERS:
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(copied[name]["local"][leaf], g[name]["global_"][leaf])
    states = (g, copied, r)
    global_logits = model.apply(states, batch, mode="global")[0]
    np.testing.assert_allclose(model.apply(states, batch, mode="local")[0], global_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.apply(states, batch, mode="routed")[0], global_logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model.apply(model.states, batch, mode="local")[0], global_logits)
    with pytest.raises(ValueError, match="no global counterpart"):
        routing.local_from_global({"conv1": g["conv1"]}, l)
    wrong = {**g, "dense2": {"global_": {**g["dense2"]["global_"], "bias": jnp.zeros(3)}}}
    with pytest.raises(ValueError, match="differ"):
        routing.local_from_global(wrong, l)


def test_local_from_global_reaches_layers_inside_lists():
    """ResNet stages live in an nnx.List (integer keys in the pure dicts); the stem norm is shared (global only)."""
    resnet = abstract_model(lambda rngs: routed_models.RoutedResNet((8, 8, 3), 10, widths=(4, 8), blocks=(1, 1),
                                                              stem="cifar", router_hidden=(8, 8, 4), rngs=rngs),
                            objective=classification_objective, num_points=4, make_task=objective_task)
    g, l, _ = resnet.states
    copied = routing.local_from_global(g, l)
    assert set(copied) == set(l) == {"stem", "stages", "fc"}
    for stage in l["stages"]:
        jax.tree.map(np.testing.assert_array_equal, copied["stages"][stage]["local"], g["stages"][stage]["global_"])


def test_routed_wrapper_mixes_any_layer():
    layer = routing.Routed(lambda r: nnx.Linear(5, 3, rngs=r), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    p = rng.dirichlet([1.0, 1.0], 4).astype(np.float32)
    _, g, l, r = nnx.split(layer, *routing.GROUPS)
    g, l = nnx.to_pure_dict(g)["global_"], nnx.to_pure_dict(l)["local"]
    assert nnx.to_pure_dict(r) == {}
    expected = p[:, :1] * (x @ g["kernel"] + g["bias"]) + p[:, 1:] * (x @ l["kernel"] + l["bias"])
    np.testing.assert_allclose(layer(x, p=p, mode="routed"), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(x, mode="local"), x @ l["kernel"] + l["bias"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        layer(x, mode="personalized")


def test_as_group_retypes_plain_params_only_and_keeps_sharing():
    shared = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    seq = nnx.Sequential(shared, routing.as_group(nnx.Linear(2, 2, rngs=nnx.Rngs(1)), routing.LocalParam), shared)
    routing.as_group(seq, routing.GlobalParam)
    layers = seq.layers
    assert type(layers[0].kernel) is routing.GlobalParam and type(layers[1].kernel) is routing.LocalParam
    assert layers[0].kernel is layers[2].kernel


def loss_of(model, states, batch, mode):
    logits, _ = model.apply(states, batch, mode=mode)
    losses, _, weights = model.objective(logits, batch)
    return jnp.sum(losses * weights) / jnp.sum(weights)


@pytest.fixture(scope="module")
def value_and_grads(cnn):
    """states -> {mode: (loss, gradient with respect to all three groups)}, all modes in one compile."""
    model, batch = cnn
    return jax.jit(lambda states: {mode: jax.value_and_grad(loss_of, argnums=1)(model, states, batch, mode)
                                   for mode in routing.MODES})


def test_pure_paths_give_exactly_zero_gradients_outside_their_groups(cnn, value_and_grads):
    model, _ = cnn
    is_zero = lambda tree: all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(tree))
    grads = {mode: grad for mode, (_, grad) in value_and_grads(model.states).items()}
    assert not is_zero(grads["global"][0]) and is_zero(grads["global"][1]) and is_zero(grads["global"][2])
    assert is_zero(grads["local"][0]) and not is_zero(grads["local"][1]) and is_zero(grads["local"][2])
    assert all(not is_zero(group) for group in grads["routed"])


@pytest.mark.parametrize("phase, mode", [(0, "global"), (1, "local"), (2, "routed")])
def test_a_phase_updates_only_its_group(cnn, value_and_grads, phase, mode):
    """Flow's phase pattern: a step on one group's gradient; the other groups stay bit-identical."""
    model, _ = cnn
    before, grads = value_and_grads(model.states)[mode]
    updated = tuple(jax.tree.map(lambda w, d: w - 0.05 * d, s, grads[i]) if i == phase else s
                    for i, s in enumerate(model.states))
    for i, (old, new) in enumerate(zip(model.states, updated)):
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
        assert same == (i != phase)
    assert value_and_grads(updated)[mode][0] < before


def test_vmap_over_clients_equals_a_loop(cnn):
    model, batch = cnn
    clients = 3
    noise = lambda c, tree: jax.tree.map(lambda a: a + 0.05 * c * jnp.sin(a * 7.0 + c), tree)
    per_client_states = [tuple(noise(c, s) for s in model.states) for c in range(clients)]
    stacked_states = jax.tree.map(lambda *a: jnp.stack(a), *per_client_states)
    batches = [jax.tree.map(lambda a: jnp.roll(a, c, axis=0), batch) for c in range(clients)]
    stacked_batch = jax.tree.map(lambda *a: jnp.stack(a), *batches)
    fn = lambda s, b: model.apply(s, b, mode="routed")
    logits, probs = jax.jit(jax.vmap(fn))(stacked_states, stacked_batch)
    for c in range(clients):
        ref_logits, ref_probs = fn(per_client_states[c], batches[c])
        np.testing.assert_allclose(logits[c], ref_logits, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(probs[c], ref_probs, rtol=1e-5, atol=1e-6)


def test_dropout_only_with_a_key(cnn):
    model, batch = cnn
    a = model.apply(model.states, batch, mode="routed")[0]
    np.testing.assert_array_equal(a, model.apply(model.states, batch, mode="routed")[0])
    # rbg keys: the same dropout code, without compiling threefry (seconds on a loaded 2-core CPU)
    b = model.apply(model.states, batch, mode="routed", key=jax.random.key(0, impl="rbg"))[0]
    c = model.apply(model.states, batch, mode="routed", key=jax.random.key(1, impl="rbg"))[0]
    assert not np.allclose(b, c) and not np.allclose(a, b)


def test_global_task_trains_the_global_path(cnn, value_and_grads):
    model, batch = cnn
    task, trainable, frozen = routing.global_task(model)
    assert frozen == {} and jax.tree.structure(trainable) == jax.tree.structure(model.states[0])
    expected, full = value_and_grads(model.states)["global"]
    value, grad = jax.jit(jax.value_and_grad(task.loss))(trainable, frozen, batch, None)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, full[0])
    metrics = summarize(task.evaluate(trainable, frozen, batch))
    assert metrics["count"] == 6 and 0 <= metrics["accuracy"] <= 1


def test_paper_sizes():
    """About 1.2M parameters per copy of the EMNIST CNN (paper), 9216 inputs to dense1, a 784-input policy."""
    module = nnx.eval_shape(lambda: routed_models.RoutedCNN((28, 28), 62, rngs=nnx.Rngs(0)))
    _, g, l, r = nnx.split(module, *routing.GROUPS)
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))
    assert count(g) == count(l) == 1_206_590
    assert module.dense1.global_.kernel.shape == (9216, 128) and module.router.layers[0].kernel.shape == (784, 350)
    assert module.router.exits == (0, 1, 2, 2)
    lstm = nnx.eval_shape(lambda: routed_models.RoutedLSTM(10_004, rngs=nnx.Rngs(0)))
    assert lstm.cell.global_.dense_h.kernel.shape == (670, 4 * 670)
    assert lstm.dense2.local.kernel.shape == (96, 10_004) and lstm.step_router.layers[0].kernel.shape == (1436, 500)
    assert lstm.step_router.exits == (3,) and lstm.output_router.exits == (1, 2)
    resnet = nnx.eval_shape(lambda: routed_models.RoutedResNet((32, 32, 3), 100, rngs=nnx.Rngs(0)))
    assert resnet.router.num_points == 6 and resnet.router.exits == (0, 1, 2, 3, 4, 4)


def test_lstm_and_resnet_forced_routing_and_shapes():
    tokens = np.random.default_rng(0).integers(1, 30, (3, 7)).astype(np.int32)
    images = image_dataset(n=3, shape=(8, 8, 3))
    lstm = abstract_model(lambda rngs: routed_models.RoutedLSTM(30, embed=6, hidden=8, step_router_hidden=(8, 4),
                                                          output_router_hidden=(6, 4, 4), rngs=rngs),
                          objective=next_word_objective, num_points=3, make_task=objective_task)
    resnet = abstract_model(lambda rngs: routed_models.RoutedResNet((8, 8, 3), 10, widths=(4, 8), blocks=(1, 1),
                                                              stem="cifar", router_hidden=(8, 8, 4), rngs=rngs),
                            objective=classification_objective, num_points=4,
                            make_task=objective_task)
    text_batch = {"x": jnp.asarray(tokens), "label": jnp.asarray(np.roll(tokens, -1, 1)), "mask": jnp.ones(3)}
    for model, batch, probs_shape in ((lstm, text_batch, (3, 7, 3, 2)), (resnet, batch_of(images), (3, 4, 2))):
        forced = [{name: force({"router": router}, column)["router"] for name, router in model.states[2].items()}
                  for column in (0, 1)]

        @jax.jit
        def outputs(states, forced):
            pure = [model.apply(states, batch, mode=mode)[0] for mode in ("global", "local")]
            hard = [model.apply((states[0], states[1], f), batch, mode="routed", hard=True) for f in forced]
            return pure, hard, model.apply(states, batch, mode="routed")

        pure, hard, (soft, probs) = outputs(model.states, forced)
        assert not np.allclose(pure[0], pure[1])
        for column in (0, 1):
            logits, decisions = hard[column]
            assert decisions.shape == probs_shape and bool(jnp.all(decisions[..., column] == 1.0))
            np.testing.assert_allclose(logits, pure[column], rtol=1e-5, atol=1e-5)
        assert soft.shape == pure[0].shape and bool(jnp.all((probs > 0) & (probs < 1)))
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_next_word_objective_ignores_padding():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    batch = {"label": jnp.array([[1, 2, 0], [3, 0, 0]]), "mask": jnp.array([1.0, 0.0])}
    losses, correct, weights = next_word_objective(logits, batch)
    np.testing.assert_array_equal(weights, [[1, 1, 0], [0, 0, 0]])
    expected = -jax.nn.log_softmax(logits)[0, 0, 1]
    np.testing.assert_allclose(losses[0, 0], expected, rtol=1e-6)


@pytest.mark.slow
def test_builders_initialize_real_models():
    """The builders with Flax's own initializers: the global path as a Task for plain trainers."""
    data = image_dataset(n=4)
    cnn = routed_models.emnist_cnn(data, jax.random.key(0), channels=(2, 2), dense=4, router_hidden=(4, 4, 4))
    assert cnn.num_points == 4 and all(jax.tree.leaves(s) for s in cnn.states)
    tokens = np.random.default_rng(0).integers(1, 20, (4, 6)).astype(np.int32)
    text = Dataset("toy", {"x": tokens, "label": np.roll(tokens, -1, 1)}, {}, 20)
    lstm = routed_models.so_lstm(text, jax.random.key(0), embed=4, hidden=6, step_router_hidden=(6, 4),
                           output_router_hidden=(4, 4))
    images = image_dataset(n=4, shape=(8, 8, 3))
    resnet = routed_models.resnet_gn(images, jax.random.key(1), widths=(4, 8), blocks=(1, 1), stem="cifar",
                               router_hidden=(8, 4))
    text_batch = {"x": jnp.asarray(tokens), "label": jnp.asarray(np.roll(tokens, -1, 1)), "mask": jnp.ones(4)}
    for model, batch in ((cnn, batch_of(data)), (lstm, text_batch), (resnet, batch_of(images))):
        task, trainable, frozen = routing.global_task(model)
        assert np.isfinite(float(jax.jit(task.loss)(trainable, frozen, batch, None)))
        metrics = summarize(jax.jit(task.evaluate)(trainable, frozen, batch))
        assert metrics["count"] > 0 and 0 <= metrics["accuracy"] <= 1
