"""spryjax.fwdgrad against independent computations: jax.grad, closed-form expectations, finite differences."""
import functools

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


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_forward_grad_is_unbiased_and_error_shrinks_like_inverse_sqrt_k(distribution):
    loss, params = quadratic_problem()
    grad = jax.grad(loss)(params, 1.0)
    estimate = jax.jit(lambda key, k: fwdgrad.forward_grad(loss, params, key, 1.0, num_tangents=k, chunk_size=100,
                                                           distribution=distribution)[1], static_argnums=1)
    assert cosine(estimate(jax.random.key(0), 4000), grad) >= 0.95
    errors = []
    for k in (100, 400, 1600):
        errs = [float(jnp.linalg.norm(flat(estimate(jax.random.key(s), k)) - flat(grad))) for s in range(6)]
        errors.append(np.sqrt(np.mean(np.square(errs))))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])  # 4x the tangents: error / 2
    assert np.all((ratios > 1.5) & (ratios < 2.7)), (errors, ratios)


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


def test_grad_from_scalars_reproduces_forward_grad_bitwise():
    loss, params = quadratic_problem()
    key = jax.random.key(7)
    options = dict(chunk_size=4, distribution="rademacher", mask={"a": True, "b": False})
    _, g = jax.jit(lambda p: fwdgrad.forward_grad(loss, p, key, 1.0, num_tangents=12, **options))(params)
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
    # spsa_grad and central_diff_grad are those scalars times the same tangents
    loss, params = quadratic_problem()
    key = jax.random.key(5)
    _, fg = fwdgrad.forward_grad(loss, params, key, 1.0, num_tangents=10)
    _, cd = fwdgrad.central_diff_grad(loss, params, key, 1.0, sigma=1e-2, num_tangents=10)
    _, sp = fwdgrad.spsa_grad(loss, params, key, 1.0, eps=1e-2, num_tangents=10)
    np.testing.assert_allclose(flat(cd), flat(fg), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(flat(sp), flat(cd), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["forward", "spsa"])
def test_zero_order_and_forward_estimators_are_unbiased_on_a_quadratic(estimator):
    """E[ĝ] = ∇L: averaged over many keys, the estimate lines up with the true gradient."""
    loss, params = quadratic_problem()
    grad = jax.grad(loss)(params, 1.0)
    fn = {"forward": functools.partial(fwdgrad.forward_grad, num_tangents=1),
          "spsa": functools.partial(fwdgrad.spsa_grad, eps=1e-2, num_tangents=1)}[estimator]
    keys = jax.random.split(jax.random.key(11), 20000)
    mean = jax.jit(lambda ks: jax.tree.map(lambda x: x.mean(0),
                                           jax.vmap(lambda k: fn(loss, params, k, 1.0)[1])(ks)))(keys)
    assert cosine(mean, grad) >= 0.95


def test_identical_under_jit_vmap_and_shard_map():
    loss, params = quadratic_problem()
    keys = jax.random.split(jax.random.key(0), 8)
    fg = lambda k: fwdgrad.forward_grad(loss, params, k, 1.0, num_tangents=4, chunk_size=2)[1]
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
