"""Delta-attention and its baselines: the delta operation against numpy, offset invariance, padding, and the pure
(graphdef, params) path the engine uses: jit, vmap over a clients axis, jvp and forward gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from spryjax import build, fwdgrad
from spryjax.data.dataset import Dataset
from spryjax.errors import InputError
from spryjax.nn import delta_attention as da
from spryjax.pytrees import count_params, count_params_by_part

# These tests check values, not speed: XLA:CPU's backend optimization level 0 halves their compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SIZES = {"text": 5, "audio": 3, "vision": 4}
B, T = 3, 8
SMALL = dict(features=8, num_heads=2)
MODELS = {
    "delta": lambda **kw: da.create(da.HierarchicalDeltaFusion, SIZES, 3, scales=(1, 2), **SMALL, **kw,
                                    key=jax.random.key(0)),
    "late_fusion": lambda: da.create(da.LateFusion, SIZES, 3, layers=1, **SMALL, key=jax.random.key(1)),
    "mult": lambda: da.create(da.MulT, SIZES, 3, layers=1, **SMALL, key=jax.random.key(2)),
}


def jitted(graphdef, params):
    """model(inputs, masks) through the engine's path: merge (graphdef, params) inside one jitted pure function."""
    apply = jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m))
    return lambda inputs, masks: apply(params, inputs, masks)


def batch(seed=0, lengths=(8, 5, 3)):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    inputs = {m: rng.standard_normal((B, T, d)).astype(np.float32) for m, d in SIZES.items()}
    return inputs, {m: mask for m in SIZES}


def test_local_difference_matches_numpy_and_is_zero_for_constants():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], np.float32)   # right and left padding
    for s in (1, 2, 3):
        expected = np.zeros_like(x)
        for b in range(2):
            for t in range(s, 7):
                if mask[b, t] and mask[b, t - s]:
                    expected[b, t] = x[b, t] - x[b, t - s]
        np.testing.assert_allclose(da.local_difference(x, mask, s), expected, atol=1e-6)
    constant = np.broadcast_to(rng.standard_normal(3), (2, 7, 3))
    assert np.all(np.asarray(da.local_difference(constant, mask, 1)) == 0)


def test_offset_invariant_without_raw_stream_and_not_with_it():
    inputs, masks = batch()
    shifted = {**inputs, "audio": inputs["audio"] + np.float32([3.0, -2.0, 5.0])}
    for use_raw, invariant in ((False, True), (True, False)):
        model = jitted(*MODELS["delta"](use_raw=use_raw))
        a, b = model(inputs, masks), model(shifted, masks)
        assert np.allclose(a, b, atol=1e-4) == invariant, (use_raw, np.abs(a - b).max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_steps_change_nothing(name):
    model = jitted(*MODELS[name]())
    inputs, masks = batch()
    padded = {m: np.where(masks[m][..., None] > 0, x, 1e4 * np.random.default_rng(7).standard_normal(x.shape))
              for m, x in inputs.items()}
    out = model(inputs, masks)
    np.testing.assert_allclose(model(padded, masks), out, rtol=1e-5, atol=1e-5)
    # ... while a real step does matter (example 1 has 5 real steps).
    touched = {**inputs, "vision": inputs["vision"].copy()}
    touched["vision"][1, 4] += 1.0
    assert np.abs(model(touched, masks)[1] - out[1]).max() > 1e-4


def dataset(num_classes=3, n=6, modalities=("audio", "vision")):
    """A tiny Dataset in the multimodal format (two modalities keep the compiled graphs small)."""
    inputs, masks = batch()
    rng = np.random.default_rng(3)
    split = {**{m: np.concatenate([inputs[m]] * 2)[:n] for m in modalities},
             **{f"mask_{m}": np.concatenate([masks[m]] * 2)[:n] for m in modalities},
             "label": (rng.integers(0, num_classes, n) if num_classes else rng.standard_normal(n)).astype(
                 np.int32 if num_classes else np.float32)}
    return Dataset("tiny", split, split, num_classes)


TINY = {"features": 8, "num_heads": 2, "scales": (1, 2)}


@pytest.fixture(scope="module")
def tiny():
    """A small delta model as the engine sees it, with one jitted value_and_grad shared by the tests below (one
    compile), and three clients' batches of two examples each."""
    data = dataset()
    task, params, frozen = build.model(ConfigDict({"name": "delta_attention", **TINY}), data, jax.random.key(0))
    batches = [{**{k: v[2 * c:2 * c + 2] for k, v in data.train.items()}, "mask": np.ones(2, np.float32)}
               for c in range(3)]
    return task, params, frozen, batches, jit(jax.value_and_grad(task.loss))


def test_vmap_over_clients_matches_a_loop_under_jit(tiny):
    task, params, frozen, batches, value_and_grad = tiny
    noise = fwdgrad.sample_tangent(jax.random.key(1), params)
    clients = [jax.tree.map(lambda p, n: p + 0.1 * c * n, params, noise) for c in range(3)]
    stacked, stacked_batch = (jax.tree.map(lambda *leaves: jnp.stack(leaves), *xs) for xs in (clients, batches))
    losses, grads = jit(jax.vmap(jax.value_and_grad(task.loss), in_axes=(0, None, 0)))(stacked, frozen,
                                                                                           stacked_batch)
    for c in range(3):
        loss, grad = value_and_grad(clients[c], frozen, batches[c])
        np.testing.assert_allclose(losses[c], loss, rtol=1e-5)
        jax.tree.map(lambda g, v: np.testing.assert_allclose(v[c], g, rtol=1e-4, atol=1e-6), grad, grads)
    assert len({float(l) for l in losses}) == 3


def test_jvp_through_the_model_matches_grad_dot_tangent(tiny):
    task, params, frozen, batches, value_and_grad = tiny
    loss, grad = value_and_grad(params, frozen, batches[0])
    jvp = jit(lambda p, v: jax.jvp(lambda q: task.loss(q, frozen, batches[0]), (p,), (v,)))
    for k in range(2):
        v = fwdgrad.sample_tangent(jax.random.key(10 + k), params)
        primal, tangent = jvp(params, v)
        expected = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
        np.testing.assert_allclose(primal, loss, rtol=1e-5)
        np.testing.assert_allclose(tangent, expected, rtol=2e-3, atol=1e-5)


@pytest.mark.slow   # compiles fwdgrad's chunked tangent scan around the model (~20 s on a loaded 2-core CPU)
def test_forward_gradient_through_the_model_matches_backprop(tiny):
    task, params, frozen, batches, value_and_grad = tiny
    key, k = jax.random.key(5), 3
    _, grad = value_and_grad(params, frozen, batches[0])
    loss, estimate = jit(lambda p: fwdgrad.forward_grad(task.loss, p, key, frozen, batches[0],
                                                            num_tangents=k))(params)
    # ĝ = (1/K) Σ_k (∇L·v_k) v_k with v_k = sample_tangent(fold_in(key, k)): every jvp must equal ∇L·v_k.
    tangents = [fwdgrad.sample_tangent(jax.random.fold_in(key, i), params) for i in range(k)]
    dots = [sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grad), jax.tree.leaves(v))) for v in tangents]
    expected = jax.tree.map(lambda *vs: sum(d * v for d, v in zip(dots, vs)) / k, *tangents)
    jax.tree.map(lambda e, g: np.testing.assert_allclose(g, e, rtol=2e-3, atol=1e-5), expected, estimate)


def test_regression_dropout_and_config_errors():
    data = dataset(num_classes=0)
    task, params, frozen = build.model(ConfigDict({"name": "late_fusion", "features": 8, "num_heads": 2,
                                                   "layers": 1, "dropout": 0.5}), data, jax.random.key(0))
    b = {**data.train, "mask": np.ones(6, np.float32)}
    assert set(jax.eval_shape(task.evaluate, params, frozen, b)) >= {"abs_error", "pred_target"}
    loss = jit(task.loss)
    with_dropout = [loss(params, frozen, b, jax.random.key(k)) for k in (0, 1)]
    assert with_dropout[0] != with_dropout[1] and loss(params, frozen, b, None) == loss(params, frozen, b, None)
    with pytest.raises(InputError, match="featurez"):
        build.model(ConfigDict({"name": "delta_attention", "featurez": 3}), data, jax.random.key(0))
    with pytest.raises(InputError, match="at least one stream"):
        build.model(ConfigDict({"name": "delta_attention", "scales": (), "use_raw": False}), data, jax.random.key(0))


def test_no_delta_ablation_and_parameter_counts():
    data = dataset()
    counts = {}
    for name in ("delta_attention", "delta_no_delta", "late_fusion", "mult"):
        options = TINY if name.startswith("delta") else {"features": 8, "num_heads": 2, "layers": 1}
        if name == "delta_no_delta":   # the ablation fixes scales=() and use_raw=True: a config may not set them
            options = {k: v for k, v in options.items() if k not in ("scales", "use_raw")}
        _, params, _ = build.model(ConfigDict({"name": name, **options}), data, jax.random.key(0))
        counts[name] = count_params(params)
    # the ablation drops the two delta streams (scales 1, 2) of each modality's e×e embedding
    assert counts["delta_attention"] - counts["delta_no_delta"] == 2 * 2 * 8 * 8
    model = nnx.merge(*MODELS["delta"]())
    parts = count_params_by_part(model)
    assert parts["total"] == count_params(model) == sum(v for k, v in parts.items() if k != "total")
