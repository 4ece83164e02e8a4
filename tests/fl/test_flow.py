"""Flow and its baselines (spryjax.fl.algorithms.flow, apfl, ditto, fedavg_ft, fedrep, hypcluster, knn_per,
lg_fedavg, personalization) against independent computations: forced routing through the evaluation path, the
router's phase, statelessness, vmap == loop, APFL's update rule, kNN-Per's interpolation, HypCluster's choice."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from spryjax import build
from spryjax.data import vision
from spryjax.data.federated import FederatedData
from spryjax.errors import InputError
from spryjax.fl import simulate
from spryjax.fl.algorithms import apfl, ditto, fedavg_ft, fedrep, flow, hypcluster, knn_per, lg_fedavg
from spryjax.fl.algorithms.personalization import compare, global_path_task
from spryjax.nn import routed_models, routing
from spryjax.task import classification_objective, classification_task

CLASSES, LR, LAMBDA, BETA = 4, 0.1, 0.05, 0.5
BASELINES = {"fedavg_ft": fedavg_ft.fedavg_ft, "apfl": apfl.apfl, "ditto": ditto.ditto, "fedrep": fedrep.fedrep,
             "lg_fedavg": lg_fedavg.lg_fedavg, "hypcluster": hypcluster.hypcluster, "knn_per": knn_per.knn_per}


def tiny_model(seed=0):
    """A routed CNN on 8×8 images without dropout (so keys do not matter), states drawn with numpy (compiling Flax's
    initializers costs seconds on a loaded CPU)."""
    module = nnx.eval_shape(lambda: routed_models.RoutedCNN((8, 8), CLASSES, channels=(2, 4), dense=8,
                                                      router_hidden=(8, 8, 8), dropout_rates=(0.0, 0.0),
                                                      router_dropout=0.0, rngs=nnx.Rngs(0)))
    model = routing.routed_model(module, objective=classification_objective, num_points=4,
                                 make_task=functools.partial(classification_task, num_classes=CLASSES))
    rng = np.random.default_rng(seed)
    draw = lambda s: jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(max(np.prod(s.shape[:-1]), 4)), s.shape), s.dtype)
    return model._replace(states=jax.tree.map(draw, model.states))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)
    sizes = [8, 8, 7, 8, 5, 8]
    n = sum(sizes) * 2
    arrays = {"x": rng.uniform(size=(n, 8, 8)).astype(np.float32), "label": rng.integers(0, CLASSES, n)}
    starts = np.cumsum([0] + sizes)
    train = FederatedData.from_partition(arrays, [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])])
    test = FederatedData.from_partition(arrays, [np.arange(a, b) + sum(sizes) for a, b in zip(starts[:-1],
                                                                                              starts[1:])])
    return tiny_model(), train, test


@pytest.fixture(scope="module")
def flow_algorithm(setup):
    """One Flow algorithm for the module's tests, so that its jitted client update compiles once."""
    return flow.flow(setup[0], regularization=LAMBDA, **options())


def options(**extra):
    return dict(client_optimizer=optax.sgd(LR, momentum=0.9), server_optimizer=optax.sgd(1.0), batch_size=4,
                local_epochs=1, **extra)


def client(data: FederatedData, i: int, batch_size: int = 4):
    arrays, counts = data.gather([i], batch_size=batch_size)
    return {k: jnp.asarray(v[0]) for k, v in arrays.items()}, jnp.int32(counts[0])


def force(phi, column):
    """Router state whose every exit prefers `column` (0 global, 1 local) by a wide margin (p = e^−100 elsewhere:
    gradients through the saturated softmax vanish, so personalization keeps it forced)."""
    heads = {k: {"kernel": jnp.zeros_like(h["kernel"]), "bias": jnp.zeros(2).at[column].set(100.0)}
             for k, h in phi["router"]["heads"].items()}
    return {"router": {**phi["router"], "heads": heads}}


def cross_entropy(logits, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.sum(losses * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)


def full_batch(data, count):
    return {**data, "mask": (jnp.arange(data["label"].shape[0]) < count).astype(jnp.float32)}


def assert_trees_close(a, b, **tolerance):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance), a, b)


# ------------------------------------------------------------------------------------------------- Flow


def test_routing_regularizer_values():
    p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]], [[0.3, 0.7]]])          # 4 instances, 1 point
    for i, expected in enumerate([-np.log(1 + 1e-6), -np.log(BETA + 1e-6), -np.log(0.25 * (1 + BETA) + 1e-6)]):
        weights = jnp.zeros(4).at[i].set(1.0)
        np.testing.assert_allclose(flow.routing_regularizer(p, weights, local_discount=BETA), expected, rtol=1e-6,
                                   atol=1e-7)
    # β = 0 is the paper's −log(p² + ε) on the global column; padding (weight 0) does not count
    np.testing.assert_allclose(flow.routing_regularizer(p, jnp.array([0.0, 0.0, 1.0, 1.0]), local_discount=0.0),
                               -np.mean(np.log(np.array([0.25, 0.09]) + 1e-6)), rtol=1e-6)


def test_split_halves_is_a_partition_of_the_real_rows():
    data = {"label": jnp.arange(10) + 100}
    for count in (0, 1, 7, 10):
        (local, n_local), (glob, n_global) = flow.split_halves(data, jnp.int32(count), jax.random.key(count))
        assert local["label"].shape == glob["label"].shape == (5,)
        assert (int(n_local), int(n_global)) == (count - count // 2, count // 2)
        rows = np.concatenate([local["label"][:int(n_local)], glob["label"][:int(n_global)]])
        assert sorted(rows.tolist()) == list(range(100, 100 + count))


@pytest.mark.parametrize("beta", [0.5, 1.0, 0.0])
def test_regularizer_gradient_pushes_towards_a_confident_decision_on_either_side(beta):
    """As documented: descent on R lowers p^l (towards global) below t = 1/(1 + β) and raises it (towards local)
    above t, through the probability and through the router's logits; R is smallest at the global end."""
    threshold = 1.0 / (1.0 + beta)
    regularizer = lambda p_local: flow.routing_regularizer(jnp.stack([1 - p_local, p_local])[None, None],
                                                           jnp.ones(1), local_discount=beta)
    slope = jax.grad(regularizer)
    for p_local in np.linspace(0.02, 0.98, 25):
        grad = float(slope(jnp.float32(p_local)))
        if p_local < threshold - 0.02:
            assert grad > 0, (beta, p_local, grad)            # descent moves p^l down: towards global
        elif p_local > threshold + 0.02 and p_local < 1 - 1e-2:
            assert grad < 0, (beta, p_local, grad)            # descent moves p^l up: towards local
    # the same through a 2-way softmax exit: one descent step on the logits moves p^l away from the threshold
    for p_local in (0.1, 0.4, 0.8, 0.95):
        if abs(p_local - threshold) < 0.05 or (beta == 0.0 and p_local > 0.9):
            continue
        z = jnp.log(jnp.array([1 - p_local, p_local], jnp.float32))
        loss = lambda z: flow.routing_regularizer(jax.nn.softmax(z)[None, None], jnp.ones(1), local_discount=beta)
        moved = float(jax.nn.softmax(z - 0.1 * jax.grad(loss)(z))[1])
        assert (moved < p_local) == (p_local < threshold), (beta, p_local, moved)
    assert float(regularizer(jnp.float32(0.0))) == pytest.approx(0.0, abs=1e-5)
    assert float(regularizer(jnp.float32(1.0))) == pytest.approx(-np.log(beta + 1e-6), rel=1e-5, abs=1e-6)


def test_regularizer_counts_every_routing_point_on_the_local_column():
    """Defined once: every routing point counts equally, column 1 is local (the released EMNIST code regularized
    point 2's pair only)."""
    p = jnp.array([[[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.0, 1.0]]])           # 1 instance, 4 points
    r = lambda q: -np.log((1 - q) ** 2 + BETA * q ** 2 + 1e-6)
    expected = np.mean([r(0.0), r(0.8), r(0.5), r(1.0)])
    np.testing.assert_allclose(flow.routing_regularizer(p, jnp.ones(1), local_discount=BETA), expected, rtol=1e-6)


def test_fixed_split_is_the_even_and_odd_minibatches_every_time():
    data = {"label": jnp.arange(12) + 100}
    for count in (0, 3, 7, 9, 12):
        halves = [flow.split_halves(data, jnp.int32(count), jax.random.key(k), split="fixed", batch_size=3)
                  for k in (0, 1)]
        (local, n_local), (glob, n_global) = halves[0]
        rows = np.arange(count)
        expected_local, expected_global = rows[(rows // 3) % 2 == 0], rows[(rows // 3) % 2 == 1]
        assert (int(n_local), int(n_global)) == (len(expected_local), len(expected_global))
        np.testing.assert_array_equal(local["label"][:int(n_local)], expected_local + 100)
        np.testing.assert_array_equal(glob["label"][:int(n_global)], expected_global + 100)
        assert local["label"].shape == glob["label"].shape == (6,)
        assert_trees_close(halves[0], halves[1], rtol=0, atol=0)      # the key does not matter
    with pytest.raises(ValueError, match="batch size"):
        flow.split_halves(data, jnp.int32(4), jax.random.key(0), split="fixed")


def test_fixed_split_trains_on_the_same_halves_each_round(setup):
    """With the fixed split the local phase sees the same rows whatever the round key: from the same state, two
    keys give the same ζ_l, so training with plain SGD on one full batch gives the same θ_l."""
    model, train, _ = setup
    data, count = client(train, 0)
    run = jax.jit(lambda s, k, split: flow.client_training(
        model, s, data, count, k, optimizer=optax.sgd(LR), batch_size=4, epochs=1, regularization=LAMBDA,
        local_discount=BETA, split=split)[0][1], static_argnums=2)
    assert_trees_close(run(model.states, jax.random.key(1), "fixed"), run(model.states, jax.random.key(2), "fixed"),
                       rtol=1e-6, atol=1e-7)
    shuffled = [run(model.states, jax.random.key(k), "shuffled") for k in (1, 2)]
    assert not np.allclose(shuffled[0]["dense2"]["local"]["kernel"], shuffled[1]["dense2"]["local"]["kernel"])


def test_local_init_options(setup):
    """at_creation: the server's initial θ_l is θ_g's copy (the local path computes the global path); every_round:
    a client's training starts from θ_l := θ_g whatever the server's θ_l; independent: the model's θ_l."""
    model, train, test = setup
    g, l, r = model.states
    init = lambda local_init: flow.flow(model, local_init=local_init, **options()).init(model.states,
                                                                                         jax.random.key(0)).params
    assert_trees_close(init("independent"), model.states, rtol=0, atol=0)
    created = init("at_creation")
    assert_trees_close(created[1], routing.local_from_global(g, l), rtol=0, atol=0)
    assert_trees_close((created[0], created[2]), (g, r), rtol=0, atol=0)
    batch = full_batch(*client(test, 0))
    apply = jax.jit(model.apply, static_argnames=("mode", "hard"))
    np.testing.assert_allclose(apply(created, batch, mode="local")[0], apply(created, batch, mode="global")[0],
                               rtol=1e-6, atol=1e-6)

    data, count = client(train, 1)
    run = jax.jit(lambda s, local_init: flow.client_training(
        model, s, data, count, jax.random.key(4), optimizer=optax.sgd(LR, momentum=0.9), batch_size=4, epochs=1,
        regularization=LAMBDA, local_discount=BETA, local_init=local_init)[0], static_argnums=1)
    every = run(model.states, "every_round")
    assert_trees_close(every, run((g, routing.local_from_global(g, l), r), "independent"), rtol=1e-6, atol=1e-7)
    other_local = jax.tree.map(lambda x: x + 1.0, l)
    assert_trees_close(run((g, other_local, r), "every_round"), every, rtol=1e-6, atol=1e-7)
    assert not np.allclose(run(model.states, "independent")[1]["dense1"]["local"]["kernel"],
                           every[1]["dense1"]["local"]["kernel"])
    with pytest.raises(InputError, match="local_init"):
        flow.flow(model, local_init="never", **options())


def test_client_adapted_evaluation_is_the_released_protocol(setup):
    """evaluation="client_adapted": after the local phase, φ and θ_g train together along the routed path
    (one batch, plain SGD: one step from the same point with the routed loss's gradients); the generalized model is
    θ_g after the first epoch (here the only one) and the personalized one is routed with hard decisions, not the
    server's θ_g (which the server-model protocol scores: test_forced_routing_evaluates_as_the_pure_paths)."""
    model, train, test = setup
    (tr, trn), (te, ten) = client(train, 0, batch_size=8), client(test, 0, batch_size=8)
    key = jax.random.key(6)
    sgd = dict(client_optimizer=optax.sgd(LR), server_optimizer=optax.sgd(1.0), batch_size=4, local_epochs=1)
    adapted = flow.flow(model, regularization=LAMBDA, evaluation="client_adapted", **sgd)
    groups = jax.jit(adapted.evaluate_client)({}, model.states, tr, trn, te, ten, jnp.int32(0), key)

    g, l, r = model.states
    (local_half, n_local), (global_half, n_global) = flow.split_halves(tr, trn, jax.random.split(key, 3)[0])
    local_batch, global_batch = full_batch(local_half, n_local), full_batch(global_half, n_global)

    def routed_loss(gp, l):
        logits, probs = model.apply((gp[0], l, gp[1]), global_batch, mode="routed")
        regularizer = jnp.sum(global_batch["mask"][:, None] * -jnp.log(
            probs[..., 0] ** 2 + BETA * probs[..., 1] ** 2 + 1e-6)) / (4 * jnp.sum(global_batch["mask"]))
        return cross_entropy(logits, global_batch) + LAMBDA * regularizer

    @jax.jit
    def expected():
        l_grad = jax.grad(lambda l: cross_entropy(model.apply((g, l, r), local_batch, mode="local")[0],
                                                  local_batch))(l)
        l1 = jax.tree.map(lambda p, d: p - LR * d, l, l_grad)
        g1, r1 = jax.tree.map(lambda p, d: p - LR * d, (g, r), jax.grad(routed_loss)((g, r), l1))
        batch = full_batch(te, ten)
        return (model.apply((g1, l1, r1), batch, mode="global")[0],
                model.apply((g1, l1, r1), batch, mode="routed", hard=True)[0], model.apply(model.states, batch,
                                                                                            mode="global")[0])

    adapted_global, personal, server_global = expected()
    labels, real = np.asarray(te["label"]), np.arange(8) < int(ten)
    right = lambda logits: float(np.sum((np.argmax(logits, -1) == labels) & real))
    assert float(groups["generalized"]["correct"]) == right(adapted_global)
    assert float(groups["personalized"]["correct"]) == right(personal)
    loss = lambda logits: float(cross_entropy(logits, full_batch(te, ten)) * ten)
    np.testing.assert_allclose(float(groups["generalized"]["loss"]), loss(adapted_global), rtol=1e-4)
    assert not np.isclose(float(groups["generalized"]["loss"]), loss(server_global))


def test_client_adapted_generalized_model_is_the_copy_after_the_first_epoch(setup):
    """With several epochs, the generalized model is θ_g after the first epoch of the adaptation, not the last
    (with one epoch they coincide)."""
    model, train, _ = setup
    data, count = client(train, 3)
    run = jax.jit(lambda s, epochs: flow.client_training(
        model, s, data, count, jax.random.key(2), optimizer=optax.sgd(LR, momentum=0.9), batch_size=4,
        epochs=epochs, regularization=LAMBDA, local_discount=BETA, phase2="adapt"), static_argnums=1)
    kernel = lambda theta_g: np.asarray(theta_g["dense2"]["global_"]["kernel"])
    three, metrics = run(model.states, 3)
    assert not np.allclose(kernel(metrics["adapted_global"]), kernel(three[0]))
    assert not np.allclose(kernel(metrics["adapted_global"]), kernel(model.states[0]))
    one, metrics = run(model.states, 1)
    assert_trees_close(metrics["adapted_global"], one[0], rtol=0, atol=0)


def test_routing_groups_count_local_decisions_per_kind_of_instance():
    rng = np.random.default_rng(0)
    decisions = jax.nn.one_hot(rng.integers(0, 2, (6, 4)), 2)                  # [B, P, 2]
    weights = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)                         # last row is padding
    batch = {"changed": jnp.array([1, 0, 1, 0, 1, 1], jnp.float32)}
    groups = flow.routing_groups(decisions, weights, batch, ("changed",))
    local = np.asarray(decisions[..., 1])
    tagged = np.asarray(weights) * np.asarray(batch["changed"])
    assert float(groups["routing_changed"]["count"]) == 3.0
    for k in range(4):
        assert float(groups["routing"][f"local_{k}"]) == float(np.sum(np.asarray(weights) * local[:, k]))
        assert float(groups["routing_changed"][f"local_{k}"]) == float(np.sum(tagged * local[:, k]))
    with pytest.raises(InputError, match="rare"):
        flow.routing_groups(decisions, weights, batch, ("rare",))


def test_forced_routing_evaluates_as_the_pure_paths(setup, flow_algorithm):
    """Through evaluate_client (personalization included): every decision forced global gives exactly the global
    model's sums; forced local gives the local path with the personalized local parameters."""
    model, train, test = setup
    evaluate = jax.jit(flow_algorithm.evaluate_client)
    (tr, trn), (te, ten) = client(train, 2), client(test, 2)
    key = jax.random.key(3)
    g, l, r = model.states
    batch = full_batch(te, ten)
    correct = lambda logits: float(np.sum((np.argmax(logits, -1) == np.asarray(batch["label"])) * batch["mask"]))
    apply = jax.jit(model.apply, static_argnames=("mode", "hard"))

    forced = (g, l, force(r, 0))
    groups = evaluate({}, forced, tr, trn, te, ten, jnp.int32(0), key)
    assert_trees_close(groups["personalized"], groups["generalized"], rtol=0, atol=0)
    assert float(groups["generalized"]["correct"]) == correct(apply(model.states, batch, mode="global")[0])
    assert float(groups["versus_global"]["helped"]) == float(groups["versus_global"]["harmed"]) == 0.0
    assert all(float(groups["routing"][f"local_{k}"]) == 0.0 for k in range(4))

    forced = (g, l, force(r, 1))
    groups = evaluate({}, forced, tr, trn, te, ten, jnp.int32(0), key)
    personal, _ = jax.jit(lambda s: flow.client_training(
        model, s, tr, trn, key, optimizer=options()["client_optimizer"], batch_size=4, epochs=1,
        regularization=LAMBDA, local_discount=BETA, phase2="router"))(forced)
    assert not np.allclose(personal[1]["dense2"]["local"]["kernel"], l["dense2"]["local"]["kernel"])
    local_logits = apply((g, personal[1], r), batch, mode="local")[0]
    np.testing.assert_allclose(float(groups["personalized"]["correct"]), correct(local_logits))
    np.testing.assert_allclose(float(groups["personalized"]["loss"]),
                               float(cross_entropy(local_logits, batch) * ten), rtol=1e-5)
    assert all(float(groups["routing"][f"local_{k}"]) == float(ten) for k in range(4))


def test_router_changes_only_in_its_step(setup):
    """One client, one batch per phase, plain SGD: the result equals the paper's three sequential steps written with
    full-state gradients, each applied to its own group only (the routed loss has non-zero gradients for θ_g and
    θ_l, which must not be applied; the local and global losses have exactly zero gradient for φ)."""
    model, train, _ = setup
    data, count = client(train, 0)                       # 8 examples: halves of 4, one batch each
    key = jax.random.key(5)
    trained, _ = jax.jit(lambda s: flow.client_training(
        model, s, data, count, key, optimizer=optax.sgd(LR), batch_size=4, epochs=1, regularization=LAMBDA,
        local_discount=BETA))(model.states)

    (local_half, n_local), (global_half, n_global) = flow.split_halves(data, count, jax.random.split(key, 3)[0])
    local_batch, global_batch = full_batch(local_half, n_local), full_batch(global_half, n_global)
    step = lambda tree, grad: jax.tree.map(lambda p, d: p - LR * d, tree, grad)

    def local_loss(states):
        return cross_entropy(model.apply(states, local_batch, mode="local")[0], local_batch)

    def routed_loss(states):
        logits, probs = model.apply(states, global_batch, mode="routed")
        m = global_batch["mask"][:, None]
        regularizer = jnp.sum(m * -jnp.log(probs[..., 0] ** 2 + BETA * probs[..., 1] ** 2 + 1e-6)) / (
            4 * jnp.sum(global_batch["mask"]))
        return cross_entropy(logits, global_batch) + LAMBDA * regularizer

    def global_loss(states):
        return cross_entropy(model.apply(states, global_batch, mode="global")[0], global_batch)

    @jax.jit
    def sequential(states):
        g, l, r = states
        local_grads = jax.grad(local_loss)(states)
        l = step(l, local_grads[1])
        routed_grads = jax.grad(routed_loss)((g, l, r))
        r = step(r, routed_grads[2])
        global_grads = jax.grad(global_loss)((g, l, r))
        return (step(g, global_grads[0]), l, r), (local_grads[2], routed_grads[0], global_grads[2])

    expected, (local_on_router, routed_on_global, global_on_router) = sequential(model.states)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves((local_on_router, global_on_router)))
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(routed_on_global))
    assert not np.allclose(expected[2]["router"]["layers"][0]["kernel"],
                           model.states[2]["router"]["layers"][0]["kernel"])
    assert_trees_close(trained, expected, rtol=2e-5, atol=1e-6)


def test_client_update_is_stateless_and_the_server_state_determines_the_next_round(setup, flow_algorithm):
    """The same inputs give the same client output, and a round run again from the same server state, after an
    unrelated round in between, gives the same next state: nothing is carried but the server state."""
    model, train, _ = setup
    data, count = client(train, 1)
    update = jax.jit(flow_algorithm.client_update)
    first = update({}, model.states, data, count, jnp.int32(0), jax.random.key(7))
    second = update({}, model.states, data, count, jnp.int32(0), jax.random.key(7))
    assert_trees_close(first, second, rtol=0, atol=0)
    assert flow_algorithm.init(model.states, jax.random.key(0)).extra == ()

    round_fn = simulate.build_round(flow_algorithm, simulate.RoundPlan("loop", 1, 3), None)
    fresh = lambda: flow_algorithm.init(jax.tree.map(jnp.array, model.states), jax.random.key(0))
    cohort = lambda ids: train.gather(ids, batch_size=4, pad_to=8)
    key = jax.random.key(4)
    again = lambda: round_fn(round_fn(fresh(), {}, *cohort([0, 1, 2]), key)[0], {}, *cohort([0, 3, 4]),
                             jax.random.fold_in(key, 2))[0]
    before = again()
    round_fn(fresh(), {}, *cohort([5, 4, 3]), jax.random.fold_in(key, 9))           # an unrelated round
    assert_trees_close(again(), before, rtol=0, atol=0)
    assert not np.allclose(before.params[1]["dense2"]["local"]["kernel"],
                           model.states[1]["dense2"]["local"]["kernel"])


def test_vmapped_round_equals_the_loop(setup, flow_algorithm):
    model, train, _ = setup
    arrays, counts = train.gather([0, 2, 4, 5], batch_size=4, pad_to=8)
    key = jax.random.key(2)
    state = lambda: flow_algorithm.init(jax.tree.map(jnp.array, model.states), key)
    looped = simulate.build_round(flow_algorithm, simulate.RoundPlan("loop", 1, 4), None)(
        state(), {}, arrays, counts, key)[0]
    plan = simulate.RoundPlan("vmap", 4, 1)
    vmapped = simulate.build_round(flow_algorithm, plan, None)(state(), {}, *simulate.chunked(arrays, counts, plan),
                                                                key)[0]
    assert_trees_close(vmapped.params, looped.params, rtol=2e-5, atol=1e-6)
    assert not np.allclose(looped.params[2]["router"]["layers"][0]["kernel"],
                           model.states[2]["router"]["layers"][0]["kernel"])


# -------------------------------------------------------------------------------------------- baselines


def test_compare_counts_the_two_by_two_table(setup):
    model, _, test = setup
    data, count = client(test, 2)                                  # 7 real rows of 8
    rng = np.random.default_rng(0)
    g, p = (jnp.asarray(rng.normal(size=(8, CLASSES)), jnp.float32) for _ in range(2))
    groups = compare(model, lambda batch: (g, p, {}), data, count, batch_size=8)
    y, real = np.asarray(data["label"]), np.arange(8) < 7
    right_g, right_p = (np.argmax(g, -1) == y) & real, (np.argmax(p, -1) == y) & real
    expected = {"both_correct": right_g & right_p, "helped": ~right_g & right_p & real,
                "harmed": right_g & ~right_p, "both_wrong": ~right_g & ~right_p & real}
    for name, hits in expected.items():
        assert float(groups["versus_global"][name]) == hits.sum()
    assert float(groups["clients"]["helped"]) == float(right_p.sum() > right_g.sum())
    assert float(groups["clients"]["harmed"]) == float(right_p.sum() < right_g.sum())
    assert float(groups["personalized"]["correct"]) == right_p.sum()


def test_apfl_step_is_the_mixture_rule(setup):
    """One batch, plain SGD: w' = w − η∇f(w); v' = v − η α ∇f(v̄); α' = α − η ⟨v − w, ∇f(v̄)⟩, v̄ = α v + (1−α) w."""
    model, train, _ = setup
    task = global_path_task(model)
    data, count = client(train, 3)
    w = model.states[0]
    v = jax.tree.map(lambda x: x + 0.3 * jnp.sign(x), w)
    (w1, v1, a1), _ = jax.jit(lambda w, v: apfl.apfl_steps(task, w, v, data, count, jax.random.key(0), alpha=0.25,
                                                           adapt_alpha=True, optimizer=optax.sgd(LR),
                                                           batch_size=8, epochs=1))(w, v)
    batch = full_batch(data, count)
    f = lambda theta: task.loss(theta, {}, batch, None)
    mixed = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, v, w)
    grad_w, grad_mixed = jax.jit(lambda w, mixed: (jax.grad(f)(w), jax.grad(f)(mixed)))(w, mixed)
    assert_trees_close(w1, jax.tree.map(lambda x, d: x - LR * d, w, grad_w), rtol=1e-5, atol=1e-6)
    assert_trees_close(v1, jax.tree.map(lambda x, d: x - LR * 0.25 * d, v, grad_mixed), rtol=1e-5, atol=1e-6)
    inner = sum(jnp.sum((a - b) * d) for a, b, d in zip(*map(jax.tree.leaves, (v, w, grad_mixed))))
    np.testing.assert_allclose(float(a1), 0.25 - LR * float(inner), rtol=1e-4)
    assert abs(float(a1) - 0.25) > 1e-4


def test_knn_distribution_matches_numpy():
    rng = np.random.default_rng(0)
    queries, keys = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
    labels, valid = rng.integers(0, 4, 9), np.arange(9) < 7
    got = knn_per.knn_distribution(jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(labels), jnp.asarray(valid),
                                   neighbors=3, temperature=2.0, num_classes=4)
    for q, row in zip(queries, np.asarray(got)):
        d = ((keys[:7] - q) ** 2).sum(-1)
        nearest = np.argsort(d)[:3]
        w = np.exp(-d[nearest] / 2.0)
        expected = np.bincount(labels[nearest], weights=w / w.sum(), minlength=4)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-6)
    assert not np.asarray(knn_per.knn_distribution(jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(labels),
                                                   jnp.zeros(9, bool), neighbors=3, temperature=1.0,
                                                   num_classes=4)).any()


def test_knn_per_features_are_the_head_input(setup):
    model, train, _ = setup
    data, count = client(train, 0)
    theta = model.states[0]
    features = knn_per.head_input(routing.global_logits(model), theta, "dense2")(theta, {}, data)
    conv = lambda x, p: jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    h = jax.nn.relu(conv(data["x"][..., None], theta["conv1"]["global_"]))
    h = jax.nn.relu(conv(h, theta["conv2"]["global_"]))
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID").reshape(8, -1)
    dense1 = theta["dense1"]["global_"]
    np.testing.assert_allclose(features, jax.nn.relu(h @ dense1["kernel"] + dense1["bias"]), rtol=1e-5, atol=1e-6)


def test_hypcluster_trains_only_the_model_that_fits_best(setup):
    model, train, _ = setup
    algorithm = hypcluster.hypcluster(model, num_models=3, **options())
    models = jax.jit(algorithm.init)(model.states, jax.random.key(0)).params
    assert not np.allclose(models[1]["dense1"]["global_"]["kernel"], models[0]["dense1"]["global_"]["kernel"])
    data, count = client(train, 0)
    out = jax.jit(algorithm.client_update)({}, models, data, count, jnp.int32(0), jax.random.key(1))
    task = global_path_task(model)
    chosen = int(np.argmin(jax.jit(lambda ms: jnp.stack([task.loss(m, {}, full_batch(data, count), None)
                                                          for m in ms]))(models)))
    for k in range(3):
        weights, moved = jax.tree.leaves(out.weight[k]), jax.tree.leaves(out.update[k])
        assert all(float(w) == (float(count) if k == chosen else 0.0) for w in weights)
        assert any(np.any(np.asarray(u) != 0) for u in moved) == (k == chosen)


def test_table_entries_build_from_a_config(setup):
    model = setup[0]
    config = ml_collections.ConfigDict({
        "name": "ditto", "batch_size": 4, "local_epochs": 1, "proximal_lambda": 0.1,
        "client_optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
        "server_optimizer": {"name": "fedavg", "learning_rate": 1.0}})
    assert build.algorithm(config, model, model.states, 2).name == "ditto"
    config.name = "flow"
    with pytest.raises(InputError, match="proximal_lambda"):
        build.algorithm(config, model, model.states, 2)
    data = vision.digits(seed=0)
    with pytest.raises(InputError, match="needs a routed model"):
        build.model(ml_collections.ConfigDict({"name": "mlp"}), data, jax.random.key(0), routed=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_runs_a_round_through_the_engine(setup, name):
    model, train, test = setup
    result = simulate.run_simulation(BASELINES[name](model, **options()), model.states, {}, train, test, num_rounds=1,
                          clients_per_round=3, seed=0, batch_size=4, strategy="loop", eval_every=1,
                          show_progress=False)
    record = result.history[-1]
    for group in ("generalized", "personalized", "versus_global", "clients"):
        assert any(k.startswith(group + "_") for k in record), group
    assert all(np.isfinite(v) for v in record.values())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(result.state.params))


def test_local_training_without_skipping_padding_is_the_same_training():
    """skip_padding=False (a select instead of a cond, used by Flow's straight-line loops) trains identically."""
    from spryjax.fl.algorithm import local_training
    from spryjax.task import regression_task
    task = regression_task(lambda w, frozen, batch, key=None: batch["x"] @ w)
    rng = np.random.default_rng(0)
    data = {"x": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), "label": jnp.asarray(rng.normal(size=16))}
    train = lambda skip: local_training(task, jnp.zeros(3), {}, data, jnp.int32(5), jax.random.key(0),
                                        optimizer=optax.sgd(0.1, momentum=0.9), batch_size=4, epochs=2,
                                        skip_padding=skip, unroll=not skip)
    (with_cond, cond_metrics), (with_select, select_metrics) = train(True), train(False)
    np.testing.assert_allclose(with_select, with_cond, rtol=1e-6)
    assert float(select_metrics["steps"]) == float(cond_metrics["steps"]) == 4.0
    np.testing.assert_allclose(select_metrics["loss"], cond_metrics["loss"], rtol=1e-6)
