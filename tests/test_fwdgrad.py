"""spryjax.fwdgrad against independent computations: jax.grad, closed-form expectations, finite differences."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spryjax import fwdgrad, memory


def quadratic_problem(dim=64, seed=0):
    """L(θ) = ½ (θ−θ*)ᵀ A (θ−θ*) + sin(θ)·c split into two leaves; its gradient is known through jax.grad."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = jnp.asarray(m @ m.T + np.eye(dim), jnp.float32)
    target = jnp.asarray(rng.normal(size=dim), jnp.float32)
    c = jnp.asarray(rng.normal(size=dim), jnp.float32)

    def loss(params, scale):
        theta = jnp.concatenate([params["a"], params["b"].reshape(-1)])
        d = theta - target
        return scale * (0.5 * d @ a @ d + jnp.sin(theta) @ c)

    params = {"a": jnp.asarray(rng.normal(size=dim // 2), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(dim // 4, 2)), jnp.float32)}
    return loss, params


def flat(tree):
    return ravel_pytree(tree)[0]


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def test_jvp_scalars_equal_grad_dot_tangent():
    loss, params = quadratic_problem()
    key = jax.random.key(3)
    value, scalars = jax.jit(lambda p: fwdgrad.jvp_scalars(loss, p, key, 2.0, num_tangents=6, chunk_size=2))(params)
    grad = jax.grad(loss)(params, 2.0)
    expected = [flat(grad) @ flat(fwdgrad.sample_tangent(jax.random.fold_in(key, k), params)) for k in range(6)]
    np.testing.assert_allclose(scalars, np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, loss(params, 2.0), rtol=1e-6)


def test_mask_gives_exact_zeros_and_unbiased_rest():
    loss, params = quadratic_problem()
    grad = jax.grad(loss)(params, 1.0)
    mask = {"a": False, "b": True}
    _, g = jax.jit(lambda key: fwdgrad.forward_grad(loss, params, key, 1.0, num_tangents=4000, chunk_size=500,
                                                    mask=mask))(jax.random.key(1))
    assert np.all(np.asarray(g["a"]) == 0.0)
    assert cosine(g["b"], grad["b"]) >= 0.95


def test_traced_per_client_mask_under_vmap():
    """A mask that is data (one row per client) works under vmap and matches the static mask."""
    loss, params = quadratic_problem()
    masks = {"a": jnp.array([True, False]), "b": jnp.array([False, True])}
    key = jax.random.key(2)
    fg = lambda m: fwdgrad.forward_grad(loss, params, key, 1.0, num_tangents=8, mask=m)[1]
    batched = jax.jit(jax.vmap(fg))(masks)
    for i, static in enumerate([{"a": True, "b": False}, {"a": False, "b": True}]):
        np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[i], batched)), flat(jax.jit(lambda: fg(static))()),
                                   rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(batched["b"][0]) == 0) and np.all(np.asarray(batched["a"][1]) == 0)


def test_grad_from_scalars_reproduces_value_and_grad_bitwise():
    """The seed trick: K scalars and the key give the worker's estimate, bit for bit."""
    loss, params = quadratic_problem()
    key = jax.random.key(7)
    options = dict(chunk_size=4, distribution="rademacher", mask={"a": True, "b": False})
    _, g = jax.jit(lambda p: fwdgrad.value_and_grad(loss, num_tangents=12, **options)(key, p, 1.0))(params)
    _, s = jax.jit(lambda p: fwdgrad.jvp_scalars(loss, p, key, 1.0, num_tangents=12, **options))(params)
    shapes = memory.shape_like(params)
    regenerated = jax.jit(lambda s: fwdgrad.grad_from_scalars(shapes, key, s, **options))(s)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(regenerated)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_finite_differences_converge_to_the_directional_derivative():
    with jax.enable_x64(True):
        loss, params = quadratic_problem()
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        key = jax.random.key(5)
        _, exact = fwdgrad.jvp_scalars(loss, params, key, 1.0, num_tangents=4)
        exact = np.asarray(exact, np.float64)
        errors = {}
        for scheme, order in (("central", 2), ("forward", 1)):
            errs = []
            for eps in (1e-2, 1e-3):
                _, d = jax.jit(lambda p: fwdgrad.finite_difference_scalars(loss, p, key, 1.0, num_tangents=4,
                                                                           eps=eps, scheme=scheme))(params)
                errs.append(np.max(np.abs(np.asarray(d) - exact)))
            errors[scheme] = errs
            assert errs[1] < errs[0] / (10 ** order) * 3, (scheme, errs)  # error ∝ ε^order
        assert errors["central"][1] < 1e-3


def test_identical_under_jit_vmap_and_shard_map():
    """Mapped keys (one per client) under vmap and shard_map, and one key shared across a vmapped batch."""
    loss, params = quadratic_problem()
    value_and_grad = fwdgrad.value_and_grad(loss, num_tangents=4, chunk_size=2)
    keys = jax.random.split(jax.random.key(0), 8)
    fg = lambda k: value_and_grad(k, params, 1.0)[1]
    jitted = jax.jit(fg)
    vmapped = jax.jit(jax.vmap(fg))(keys)
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 host devices"
    mesh = Mesh(np.array(devices), ("clients",))
    sharded_keys = jax.device_put(keys, NamedSharding(mesh, P("clients")))
    sharded = jax.jit(jax.shard_map(jax.vmap(fg), mesh=mesh, in_specs=P("clients"), out_specs=P("clients")))(
        sharded_keys)
    for i in range(8):
        # The eager (op by op) result is the reference for two clients only, as it is slow; jit for the rest.
        jitted_i = jitted(keys[i])
        reference = fg(keys[i]) if i < 2 else jitted_i
        others = [jax.tree.map(lambda x: x[i], vmapped), jax.tree.map(lambda x: x[i], sharded)]
        for other in others + ([jitted_i] if i < 2 else []):
            np.testing.assert_allclose(flat(other), flat(reference), rtol=1e-5, atol=1e-6)
    # One key for the whole batch (in_axes None): every row uses the same tangents.
    scales = jnp.array([0.5, 1.0, 2.0])
    shared = jax.jit(jax.vmap(value_and_grad, in_axes=(None, None, 0)))(keys[0], params, scales)
    one = jax.jit(value_and_grad)
    for i, scale in enumerate(scales):
        value, g = one(keys[0], params, scale)
        np.testing.assert_allclose(shared[0][i], value, rtol=1e-6)
        np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[i], shared[1])), flat(g), rtol=1e-5, atol=1e-6)


def lora_residual_stack(layers=24, batch=8, seq=64, width=256, rank=1):
    """A 24-layer residual loss with frozen weights and LoRA-style adapters, as shapes only (nothing allocated).
    Layers are unrolled in Python, which is where XLA's loop-invariant code motion bites."""
    s = jax.ShapeDtypeStruct
    frozen = [{"w": s((width, width), jnp.float32), "w2": s((width, width), jnp.float32)} for _ in range(layers)]
    lora = [{"a": s((width, rank), jnp.float32), "b": s((rank, width), jnp.float32)} for _ in range(layers)]
    x = s((batch, seq, width), jnp.float32)

    def loss(lora, frozen, x):
        h = x
        for f, a in zip(frozen, lora):
            h = h + jnp.tanh(h @ f["w"] + (h @ a["a"]) @ a["b"]) @ f["w2"]
        return jnp.mean(h ** 2)
    return loss, lora, frozen, x


def test_memory_flat_in_number_of_tangents():
    loss, lora, frozen, x = lora_residual_stack()

    def temp(k, chunk):
        fn = lambda l, f, x: fwdgrad.forward_grad(loss, l, jax.random.key(0), f, x, num_tangents=k,
                                                  chunk_size=chunk)[1]
        return memory.compiled_memory(fn, lora, frozen, x).temp

    k1, k4, k64_1, k64_4 = temp(1, 1), temp(4, 4), temp(64, 1), temp(64, 4)
    backprop = memory.compiled_memory(jax.grad(loss), lora, frozen, x).temp
    assert k64_1 <= 1.5 * k1, (k64_1, k1)
    assert k64_4 <= 1.5 * k4, (k64_4, k4)
    assert k64_1 <= backprop / 5, (k64_1, backprop)


# ----------------------------------------------------------------------------------------------------------------
# value_and_grad / grad: the transforms


def reference_estimate(grads, key, params, num_tangents):
    """(1/K) Σ_k (∇L·v_k) v_k from jax.grad's gradient and the tangents sample_tangent(fold_in(key, k), θ)."""
    tangents = [flat(fwdgrad.sample_tangent(jax.random.fold_in(key, k), params)) for k in range(num_tangents)]
    return sum((flat(grads) @ v) * v for v in tangents) / num_tangents


def three_argument_loss(has_aux):
    def f(a, b, c, scale):
        value = scale * (jnp.sum(jnp.sin(a["x"]) * b) + jnp.sum(a["y"] ** 2) * jnp.sum(c ** 3) + b @ c)
        return (value, {"b_norm": jnp.sum(b ** 2), "count": jnp.int32(3)}) if has_aux else value
    args = ({"x": jnp.linspace(-1.0, 1.0, 3), "y": jnp.array([0.5, -2.0])}, jnp.array([1.0, -1.0, 0.3]),
            jnp.array([0.2, 0.7, -0.4]), 2.0)
    return f, args


@pytest.mark.parametrize("has_aux", [False, True])
@pytest.mark.parametrize("argnums", [0, 1, (0, 2), (2, 0)])
def test_value_and_grad_has_the_semantics_of_jax_value_and_grad(argnums, has_aux):
    """Same value and aux as jax.value_and_grad, gradients of the same tree structure (a tuple for tuple argnums),
    and ĝ = (1/K) Σ (∇L·v_k) v_k with v_k drawn over the differentiated arguments together; keyword arguments
    pass through undifferentiated; grad likewise."""
    f, args = three_argument_loss(has_aux)
    key, k = jax.random.key(4), 3
    args, scale = args[:3], args[3]                        # the scale goes by keyword, undifferentiated
    value, g = jax.jit(fwdgrad.value_and_grad(f, argnums, has_aux, num_tangents=k))(key, *args, scale=scale)
    expected_value, expected_grads = jax.value_and_grad(f, argnums, has_aux)(*args, scale=scale)
    for x, y in zip(jax.tree.leaves(value), jax.tree.leaves(expected_value)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(value) == jax.tree.structure(expected_value)
    assert jax.tree.structure(g) == jax.tree.structure(expected_grads)
    params = tuple(args[i] for i in argnums) if isinstance(argnums, tuple) else args[argnums]
    np.testing.assert_allclose(flat(g), reference_estimate(expected_grads, key, params, k), rtol=1e-5, atol=1e-6)
    out = jax.jit(fwdgrad.grad(f, argnums, has_aux, num_tangents=k))(key, *args, scale=scale)
    np.testing.assert_array_equal(flat(out[0] if has_aux else out), flat(g))
    if has_aux:
        np.testing.assert_array_equal(out[1]["b_norm"], value[1]["b_norm"])


def test_tuple_argnums_take_a_tuple_of_masks():
    f, args = three_argument_loss(False)
    g = jax.jit(fwdgrad.grad(f, (0, 1), num_tangents=2, mask=({"x": True, "y": False}, None)))(jax.random.key(0),
                                                                                                *args)
    assert np.all(np.asarray(g[0]["y"]) == 0) and np.all(np.asarray(g[0]["x"]) != 0)
    assert np.all(np.asarray(g[1]) != 0)


def closed_form_quadratic(dim=32, seed=0):
    """L(θ) = ½ θᵀAθ − bᵀθ over two leaves, with ∇L = Aθ − b and the Hessian A (float64, in ravel order)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a, b = m @ m.T + np.eye(dim), rng.normal(size=dim)
    theta = rng.normal(size=dim)
    params = {"u": jnp.asarray(theta[:dim // 2], jnp.float32),
              "w": jnp.asarray(theta[dim // 2:].reshape(dim // 8, 4), jnp.float32)}
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def loss(params):
        t = jnp.concatenate([params["u"], params["w"].reshape(-1)])
        return 0.5 * t @ a32 @ t - b32 @ t
    theta = np.asarray(flat(params), np.float64)
    return loss, params, a @ theta - b, a


@pytest.mark.parametrize("estimator,distribution", [("jvp", "gaussian"), ("jvp", "rademacher"),
                                                    ("central_difference", "gaussian")])
def test_mean_over_keys_is_the_gradient_within_five_standard_errors(estimator, distribution):
    """E ĝ = ∇L and E‖ĝ − ∇L‖² = (d ± 1)‖∇L‖²/K on a quadratic, whose central differences are exact.

    One coordinate of the K-tangent estimate has variance (‖g‖² + g_i²)/K for Gaussian v ((gᵀv) v_i =
    g_i v_i² + Σ_{j≠i} g_j v_j v_i, and Var v_i² = 2) and (‖g‖² − g_i²)/K for Rademacher v (v_i² = 1); summed over
    the d coordinates, (d + 1)‖g‖²/K and (d − 1)‖g‖²/K. The mean of N estimates must lie within 5 standard
    errors √(Var/N) of g in every coordinate, and the mean squared error within 5 of its own standard errors of
    the formula (a chance failure has probability below 1e-5)."""
    loss, params, g, _ = closed_form_quadratic()
    d, k, n = g.size, 4, 5000
    options = {"eps": 0.1} if estimator == "central_difference" else {}
    estimate = fwdgrad.grad(loss, estimator=estimator, num_tangents=k, distribution=distribution, **options)
    keys = jax.random.split(jax.random.key(11), n)
    samples = np.asarray(jax.jit(jax.vmap(lambda key: flat(estimate(key, params))))(keys), np.float64)
    sign = 1 if distribution == "gaussian" else -1
    standard_error = np.sqrt((g @ g + sign * g ** 2) / k / n)
    assert np.all(np.abs(samples.mean(0) - g) < 5 * standard_error), np.abs(samples.mean(0) - g) / standard_error
    squared_errors = np.sum((samples - g) ** 2, axis=1)
    expected = (d + sign) * (g @ g) / k
    assert abs(squared_errors.mean() - expected) < 5 * squared_errors.std() / np.sqrt(n), (
        squared_errors.mean(), expected)


def test_zero_order_estimators_behind_the_same_interface():
    """On a quadratic: central differences are exact (d_k = gᵀv_k, value L(θ) + ε²/2 v_1ᵀAv_1), forward
    differences carry the curvature term (d_k = gᵀv_k + ε/2 v_kᵀAv_k, value L(θ)); spsa_grad is the central
    difference."""
    loss, params, g, a = closed_form_quadratic()
    key, k, eps = jax.random.key(5), 6, 0.1
    with_aux = lambda p: (loss(p), p["u"][0])
    tangents = np.stack([flat(fwdgrad.sample_tangent(jax.random.fold_in(key, i), params)) for i in range(k)])
    curvature = np.einsum("ki,ij,kj->k", tangents, a, tangents)
    exact = tangents.T @ (tangents @ g) / k
    run = lambda estimator: jax.jit(fwdgrad.value_and_grad(with_aux, has_aux=True, estimator=estimator, eps=eps,
                                                           num_tangents=k, chunk_size=3))(key, params)
    ((central_value, central_aux), central) = run("central_difference")
    np.testing.assert_allclose(flat(central), exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(central_value, loss(params) + eps ** 2 / 2 * curvature[0], rtol=1e-5)
    np.testing.assert_allclose(central_aux, params["u"][0] + eps * tangents[0, 0], rtol=1e-6)
    ((forward_value, forward_aux), forward) = run("forward_difference")
    np.testing.assert_allclose(flat(forward), exact + tangents.T @ (eps / 2 * curvature) / k, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(forward_value, loss(params), rtol=1e-6)
    assert forward_aux == params["u"][0]
    spsa = jax.jit(lambda p: fwdgrad.spsa_grad(loss, p, key, eps=eps, num_tangents=k, chunk_size=3))(params)
    np.testing.assert_array_equal(flat(spsa[1]), flat(central))


def test_unknown_estimator_or_option_is_a_clear_error():
    f, args = three_argument_loss(False)
    with pytest.raises(ValueError, match="unknown estimator 'spsa'.*central_difference"):
        fwdgrad.value_and_grad(f, estimator="spsa")
    with pytest.raises(TypeError, match="'jvp' takes no options, got \\['eps'\\]"):
        fwdgrad.value_and_grad(f, eps=1e-3)
    with pytest.raises(TypeError, match="takes options \\('eps',\\), got \\['sigma'\\]"):
        fwdgrad.value_and_grad(f, estimator="central_difference", sigma=1e-4)
    with pytest.raises(ValueError, match="mask must be a tuple of 2"):
        fwdgrad.value_and_grad(f, (0, 1), mask={"x": True})
    with pytest.raises(ValueError, match="distribution"):
        fwdgrad.grad(f, distribution="uniform")
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        fwdgrad.grad(f, num_tangents=10, chunk_size=3)
    with pytest.raises(TypeError, match="scalar"):
        fwdgrad.grad(lambda x: x ** 2, num_tangents=2)(jax.random.key(0), jnp.ones(3))


def test_flax_nnx_state_through_split_and_merge():
    """An NNX model's state is a pytree like any other: same value and State structure as jax.value_and_grad."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.out = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jax.random.normal(jax.random.key(2), (5, 3))
    loss = lambda state, x, y: jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)
    key = jax.random.key(3)
    value, g = jax.jit(fwdgrad.value_and_grad(loss, num_tangents=3))(key, state, x, y)
    expected_value, expected = jax.value_and_grad(loss)(state, x, y)
    assert isinstance(g, nnx.State) and jax.tree.structure(g) == jax.tree.structure(expected)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    np.testing.assert_allclose(flat(g), reference_estimate(expected, key, state, 3), rtol=1e-5, atol=1e-6)


def test_bf16_parameters_accumulate_in_float32():
    """ĝ = (1/K) Σ_k d_k v_k over K = 2048 tangents, one per chunk (the memory-flat setting), for bf16 θ: the
    result is the float64 sum rounded once to bf16 (relative error ≤ 2⁻⁸). A bf16 accumulator fails this: once the
    partial sum is ~K·|g_i|, its spacing exceeds the terms |d_k v_k| ~ ‖g‖ and they are rounded away."""
    c = jnp.linspace(-1.0, 1.0, 16)
    params = {"w": jnp.zeros(16, jnp.bfloat16)}
    loss = lambda p: jnp.dot(p["w"].astype(jnp.float32), c)
    key, k = jax.random.key(0), 2048
    value_and_grad = fwdgrad.value_and_grad(loss, num_tangents=k, chunk_size=1)
    _, g = jax.jit(value_and_grad)(key, params)
    assert g["w"].dtype == jnp.bfloat16
    _, scalars = jax.jit(lambda p: fwdgrad.jvp_scalars(loss, p, key, num_tangents=k, chunk_size=1))(params)
    tangents = jax.jit(jax.vmap(lambda i: fwdgrad.sample_tangent(jax.random.fold_in(key, i), params)["w"]))(
        jnp.arange(k))
    exact = np.asarray(scalars, np.float64) @ np.asarray(tangents.astype(jnp.float32), np.float64) / k
    error = np.abs(np.asarray(g["w"].astype(jnp.float32), np.float64) - exact)
    assert np.all(error <= 2.0 ** -8 * np.abs(exact) + 1e-6), np.max(error / np.abs(exact))
