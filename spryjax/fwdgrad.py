"""Forward-gradient and zero-order gradient estimators over parameter pytrees, shaped like `jax.value_and_grad`.

References:
  - Baydin, Pearlmutter, Syme, Wood, Torr. "Gradients without Backpropagation" (2022): the forward gradient
    (∇L·v) v with v ~ N(0, I) is an unbiased estimate of ∇L.
  - Panchal et al. "Thinking Forward: Memory-Efficient Federated Finetuning of Language Models" (Spry, NeurIPS 2024):
    clients estimate gradients with forward-mode AD over their share of the adapter weights.
  - Malladi et al. "Fine-Tuning Language Models with Just Forward Passes" (MeZO, 2023): SPSA with the perturbation
    regenerated from a seed, never stored.
  - Feng et al. "Does Federated Learning Really Need Backpropagation?" (BAFFLE, 2023): K central differences; its
    step σ is the central difference's ε.

Every estimator here has the same shape. For tangents v_1..v_K drawn from `key` (tangent k from
`fold_in(key, k)`, so the server can regenerate them), a directional derivative d_k ≈ ∇L(θ)·v_k is measured, and

    ĝ = (1/K) Σ_k d_k v_k,      E[ĝ] = E[v vᵀ] ∇L = ∇L   for v ~ N(0, I) or Rademacher,
    E‖ĝ − ∇L‖² = (d + 1) ‖∇L‖² / K   (Gaussian),   (d − 1) ‖∇L‖² / K   (Rademacher)

for exact d_k and d scalars (with a mask: the d masked-in scalars, and M∇L, the masked-in part, for ∇L;
docs/fwdgrad.md derives both). `value_and_grad` and `grad` are transforms like JAX's, with the key first:
`value_and_grad(f)(key, *args)`. Their estimator "jvp" measures d_k exactly with `jax.jvp` (`jvp_scalars`);
"central_difference" and "forward_difference" measure it with two or one extra loss evaluations
(`finite_difference_scalars`); `grad_from_scalars` turns the K scalars back into ĝ. So a client can upload K scalars
instead of a gradient and the server reproduces its estimate exactly. `forward_grad` and `spsa_grad` are the
transform applied once, parameters first, as the algorithms call it.

Precision. The scalars are float32 and the K-term sum ĝ accumulates in float32 (float64 for float64 parameters),
and is cast to each leaf's dtype at the end: a bf16 accumulator has an 8-bit significand, so once it holds a
partial sum, terms much smaller than it are rounded away.

Memory. The K tangents are processed in sequential chunks of `chunk_size`; inside a chunk they are vmapped with
unbatched primals, so the primal pass is shared and the chunk costs about `chunk_size` times one tangent's
activations. The chunk loop's loop-invariant inputs (parameters and loss arguments) go through
`jax.lax.optimization_barrier` together with the loop counter: without it XLA hoists the primal pass out of the
loop and keeps all its activations alive (measured: 1600 MiB of temp for 10 tangents vs 50 MiB for one on a
RoBERTa-large-shaped LoRA loss). `tests/test_fwdgrad.py::test_memory_*` guard this.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
Distribution = Literal["gaussian", "rademacher"]
DISTRIBUTIONS = ("gaussian", "rademacher")


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _wide_dtype(dtype) -> jnp.dtype:
    """float32, or `dtype` where that is wider (float64): the precision sums and differences are taken in."""
    return jnp.promote_types(dtype, jnp.float32)


def _wide(x: jax.Array) -> jax.Array:
    return x.astype(_wide_dtype(x.dtype))


def _first(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[0], tree)


# ----------------------------------------------------------------------------------------------------------------
# Tangents


def broadcast_mask(mask: PyTree | None, params: PyTree) -> PyTree | None:
    """Expands a mask given as a prefix of `params` (a bool, or a bool per subtree) to one entry per leaf.

    Entries may be Python bools or traced boolean scalars/arrays broadcastable to the leaf (a per-client mask
    under vmap is data, not structure).
    """
    if mask is None:
        return None
    return jax.tree.broadcast(mask, params)


def sample_tangent(key: jax.Array, params: PyTree, *, distribution: Distribution = "gaussian",
                   mask: PyTree | None = None) -> PyTree:
    """One tangent v with the structure, shapes and dtypes of `params` (arrays or ShapeDtypeStructs).

    v ~ N(0, I) ("gaussian") or uniform on {-1, +1} ("rademacher"); leaves where `mask` is False are exact zeros.
    The values of a leaf do not depend on which leaves are masked. Drawn in float32, then cast to each leaf's dtype.

    Example:
      >>> v = sample_tangent(jax.random.key(0), {"w": jnp.zeros(3)}, distribution="rademacher")
    """
    _check_distribution(distribution)
    leaves, treedef = jax.tree.flatten(params)
    masks = jax.tree.leaves(broadcast_mask(mask, params)) if mask is not None else [True] * len(leaves)
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    # One draw for the whole tree (one RNG kernel instead of one per leaf: XLA compiles much faster).
    if distribution == "gaussian":
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    else:
        flat = jax.random.rademacher(key, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for leaf, size, keep in zip(leaves, sizes, masks):
        v = flat[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype)
        offset += size
        out.append(v if keep is True else jnp.where(keep, v, jnp.zeros_like(v)))
    return jax.tree.unflatten(treedef, out)


def _tangent_chunk(key, params, first, size, distribution, mask):
    """Tangents first..first+size-1 stacked on a leading axis: tangent k is `sample_tangent(fold_in(key, k))`."""
    ks = first + jnp.arange(size)
    return jax.vmap(lambda k: sample_tangent(jax.random.fold_in(key, k), params,
                                             distribution=distribution, mask=mask))(ks)


def _varying_axes(x) -> frozenset:
    """Mesh axes over which `x` varies inside `shard_map` (empty outside it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9; older releases call it `vma`
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _vary_like(tree: PyTree, *refs) -> PyTree:
    """Inside `shard_map`, marks `tree` as varying over every mesh axis that one of `refs` varies over.

    Tangents drawn from a per-device key vary across devices; a replicated θ does not, and jvp needs both alike.
    (Left unmarked, gradients with respect to a replicated value would also be summed across devices.)
    """
    axes = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x
    return jax.tree.map(cast, tree)


def _num_chunks(num_tangents: int, chunk_size: int | None) -> tuple[int, int]:
    chunk = num_tangents if chunk_size is None else chunk_size
    if num_tangents < 1 or chunk < 1 or num_tangents % chunk:
        raise ValueError(f"num_tangents={num_tangents} must be a positive multiple of chunk_size={chunk_size}")
    return num_tangents // chunk, chunk


def _scan_chunks(chunk_fn, num_chunks, invariants):
    """Runs `chunk_fn(invariants, c)` for c = 0..num_chunks-1 sequentially and stacks the results.

    The invariants pass through an optimization barrier tied to the loop counter so that XLA cannot hoist
    the (tangent-independent) primal computation out of the loop and keep its activations alive.
    """
    def body(_, c):
        inv, c = jax.lax.optimization_barrier((invariants, c))
        return None, chunk_fn(inv, c)
    return jax.lax.scan(body, None, jnp.arange(num_chunks))[1]


def _check_scalar(values: jax.Array, num_chunks: int) -> None:
    """`values` holds one loss per chunk: anything more is a non-scalar loss."""
    if values.shape != (num_chunks,):
        raise TypeError(f"the loss must return a scalar (as for jax.grad), got shape {values.shape[1:]}")


# ----------------------------------------------------------------------------------------------------------------
# Directional derivatives


def jvp_scalars(loss_fn: Callable[..., Any], params: PyTree, key: jax.Array, *args, num_tangents: int = 1,
                chunk_size: int | None = None, distribution: Distribution = "gaussian",
                mask: PyTree | None = None, has_aux: bool = False):
    """Exact directional derivatives d_k = ∇L(θ)·v_k by forward-mode AD, one primal pass per chunk.

    Args:
      loss_fn: `loss_fn(params, *args) -> scalar` (or `(scalar, aux)` with `has_aux`).
      params: θ, any pytree of float arrays.
      key: tangent k is drawn from `fold_in(key, k)`.
      num_tangents: K. chunk_size: tangents pushed through at once (default K); must divide K.
      mask: prefix pytree of booleans; v_k is zero outside it.

    Returns:
      `(loss, d)` with d of shape [K] (float32), or `((loss, aux), d)` with `has_aux`; loss is L(θ).

    Example:
      >>> loss, d = jvp_scalars(lambda p, x: jnp.sum((p * x) ** 2), jnp.ones(3), key, x, num_tangents=4)
    """
    num_chunks, chunk = _num_chunks(num_tangents, chunk_size)
    params, args = _vary_like((params, args), key)

    def chunk_fn(inv, c):
        p, a = inv
        vs = _tangent_chunk(key, p, c * chunk, chunk, distribution, mask)
        f = lambda q: loss_fn(q, *a)
        jvp = lambda v: jax.jvp(f, (p,), (v,), has_aux=has_aux)
        out_axes = (None, 0, None) if has_aux else (None, 0)
        return jax.vmap(jvp, out_axes=out_axes)(vs)

    out = _scan_chunks(chunk_fn, num_chunks, (params, args))
    _check_scalar(out[0], num_chunks)
    scalars = out[1].reshape(num_tangents).astype(jnp.float32)
    if has_aux:
        return (_first(out[0]), _first(out[2])), scalars
    return _first(out[0]), scalars


def _shift(params: PyTree, tangent: PyTree, step: float) -> PyTree:
    """θ + step·v, formed in float32 (or wider) and rounded once to each leaf's dtype."""
    return jax.tree.map(lambda p, v: (_wide(p) + step * _wide(v)).astype(p.dtype), params, tangent)


def finite_difference_scalars(loss_fn: Callable[..., Any], params: PyTree, key: jax.Array, *args,
                              num_tangents: int = 1, eps: float = 1e-3, scheme: Literal["central", "forward"] =
                              "central", chunk_size: int | None = None, distribution: Distribution = "gaussian",
                              mask: PyTree | None = None, has_aux: bool = False):
    """Directional derivatives by finite differences, with the tangents of `jvp_scalars` for the same key.

        central: d_k = (L(θ + ε v_k) − L(θ − ε v_k)) / (2ε) = ∇L·v_k + O(ε²)   (MeZO's SPSA; BAFFLE's σ is ε)
        forward: d_k = (L(θ + ε v_k) − L(θ)) / ε = ∇L·v_k + (ε/2) v_kᵀ H v_k + O(ε²)   (FwdLLM)

    2K loss evaluations (central) or K plus one per chunk (forward: L(θ) once per chunk). Perturbations are
    regenerated from the key inside the loop, never stored beside θ; θ ± ε v_k is formed in float32 and rounded
    once to each leaf's dtype, and the differences are taken in float32 (a bf16 θ still rounds θ ± ε v_k to its
    8-bit significand: ε must exceed that spacing).

    Returns:
      `(loss, d)` with d of shape [K] (float32), or `((loss, aux), d)` with `has_aux`. For "forward", loss and
      aux are those of L(θ); for "central", loss is MeZO's (L(θ + ε v_1) + L(θ − ε v_1)) / 2 = L(θ) + O(ε²) and
      aux that of L(θ + ε v_1) (no extra evaluation at θ).

    Example:
      >>> loss, d = finite_difference_scalars(loss_fn, params, key, batch, num_tangents=4, eps=1e-3)
    """
    if scheme not in ("central", "forward"):
        raise ValueError(f"scheme must be 'central' or 'forward', got {scheme!r}")
    num_chunks, chunk = _num_chunks(num_tangents, chunk_size)
    params, args = _vary_like((params, args), key)
    evaluate = (lambda p, a: loss_fn(p, *a)) if has_aux else (lambda p, a: (loss_fn(p, *a), ()))

    def chunk_fn(inv, c):
        p, a = inv
        vs = _tangent_chunk(key, p, c * chunk, chunk, distribution, mask)
        # Sequential within the chunk too (lax.map): each evaluation is a full forward pass.
        if scheme == "forward":
            base, aux = evaluate(p, a)
            plus = jax.lax.map(lambda v: evaluate(_shift(p, v, eps), a)[0], vs)
            return base, aux, (_wide(plus) - _wide(base)) / eps

        def central(v):
            (plus, aux), (minus, _) = evaluate(_shift(p, v, eps), a), evaluate(_shift(p, v, -eps), a)
            return (plus + minus) / 2, aux, (_wide(plus) - _wide(minus)) / (2 * eps)
        values, aux, d = jax.lax.map(central, vs)
        return values[0], _first(aux), d

    values, aux, scalars = _scan_chunks(chunk_fn, num_chunks, (params, args))
    _check_scalar(values, num_chunks)
    scalars = scalars.reshape(num_tangents).astype(jnp.float32)
    if has_aux:
        return (_first(values), _first(aux)), scalars
    return _first(values), scalars


# ----------------------------------------------------------------------------------------------------------------
# From scalars to gradient estimates


def grad_from_scalars(params_like: PyTree, key: jax.Array, scalars: jax.Array, *, chunk_size: int | None = None,
                      distribution: Distribution = "gaussian", mask: PyTree | None = None) -> PyTree:
    """ĝ = (1/K) Σ_k d_k v_k with the tangents regenerated from `key` (the seed trick).

    Args:
      params_like: pytree of arrays or `jax.ShapeDtypeStruct`s with θ's structure, shapes and dtypes.
      key, chunk_size, distribution, mask: as given to the estimator that produced the scalars.
      scalars: d, shape [K].

    The sum accumulates in float32 (float64 for float64 leaves) and each leaf is cast to its dtype at the end.
    With the same arguments this reproduces `value_and_grad`'s estimate exactly (it is the same code path).
    Costs K tangent draws of |θ| numbers each, `chunk_size` of them alive at once.

    Example:
      >>> g = grad_from_scalars(jax.ShapeDtypeStruct((3,), jnp.float32), key, jnp.array([0.5, -1.0]))
    """
    num_tangents = scalars.shape[0]
    num_chunks, chunk = _num_chunks(num_tangents, chunk_size)
    scalars = scalars.reshape(num_chunks, chunk)

    def body(acc, c):
        vs = _tangent_chunk(key, params_like, c * chunk, chunk, distribution, mask)
        acc = jax.tree.map(lambda g, v: g + jnp.tensordot(scalars[c].astype(g.dtype), v.astype(g.dtype), axes=1),
                           acc, vs)
        return acc, None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _wide_dtype(p.dtype)), params_like)
    total, _ = jax.lax.scan(body, _vary_like(zeros, key, scalars), jnp.arange(num_chunks))
    return jax.tree.map(lambda g, p: (g / num_tangents).astype(p.dtype), total, params_like)


# ----------------------------------------------------------------------------------------------------------------
# Transforms


# estimator name -> (function measuring the K scalars, its options with their defaults)
ESTIMATORS = {
    "jvp": (jvp_scalars, {}),
    "central_difference": (functools.partial(finite_difference_scalars, scheme="central"), {"eps": 1e-3}),
    "forward_difference": (functools.partial(finite_difference_scalars, scheme="forward"), {"eps": 1e-3}),
}


def value_and_grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False, *,
                   estimator: str = "jvp", num_tangents: int = 1, chunk_size: int | None = None,
                   distribution: Distribution = "gaussian", mask: PyTree | None = None,
                   **estimator_options: float) -> Callable[..., Any]:
    """`jax.value_and_grad` with a gradient estimate: returns `value_and_grad_fn(key, *args)`.

        ĝ = (1/K) Σ_k d_k v_k,   v_k = sample_tangent(fold_in(key, k), θ, mask),   d_k ≈ ∇L(θ)·v_k

    with θ = `args[argnums]` (a tuple of them for a tuple `argnums`) and d_k by `estimator`:
      "jvp":                d_k = ∇L·v_k exactly (`jvp_scalars`). With M the mask and d the masked-in scalars,
                            E ĝ = M∇L and E‖ĝ − M∇L‖² = (d + 1)‖M∇L‖²/K (Gaussian v) or (d − 1)‖M∇L‖²/K
                            (Rademacher v).
      "central_difference": d_k = (L(θ + εv_k) − L(θ − εv_k)) / 2ε (MeZO's SPSA; BAFFLE's σ is this ε); option
                            `eps` (default 1e-3).
      "forward_difference": d_k = (L(θ + εv_k) − L(θ)) / ε (FwdLLM); option `eps` (default 1e-3).

    Args:
      fun: `fun(*args) -> scalar`, or `(scalar, aux)` with `has_aux`.
      argnums, has_aux: as in `jax.value_and_grad`.
      estimator: one of `ESTIMATORS`; **estimator_options: its options (an unknown one is a TypeError).
      num_tangents: K. chunk_size: tangents pushed through at once (default K; must divide K): memory grows with
        it, time falls.
      distribution: "gaussian" or "rademacher".
      mask: a prefix pytree of booleans of θ (for a tuple `argnums`, a tuple of them, None meaning all): v_k and
        ĝ are exact zeros outside it. May be traced (a per-client mask under vmap).

    Returns:
      `value_and_grad_fn(key, *args, **kwargs) -> (value, ĝ)` or `((value, aux), ĝ)`, ĝ shaped like θ (a tuple for
      a tuple `argnums`) in θ's dtypes; keyword arguments go to `fun` undifferentiated, as in JAX. The key comes
      first, as in `jax.random`: `jax.vmap(f, in_axes=(None, 0))` shares it (and the tangents) across a batch,
      `in_axes=(0, 0)` maps it. value is L(θ), except "central_difference"'s MeZO mean
      (L(θ + εv_1) + L(θ − εv_1)) / 2 = L(θ) + O(ε²), whose aux is that of L(θ + εv_1).

    Example:
      >>> loss_and_grad = value_and_grad(loss_fn, num_tangents=10)        # was: jax.value_and_grad(loss_fn)
      >>> loss, g = loss_and_grad(key, params, batch)
      >>> updates, opt_state = optimizer.update(g, opt_state, params)
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: one of {tuple(ESTIMATORS)}")
    scalars_fn, defaults = ESTIMATORS[estimator]
    unknown = sorted(set(estimator_options) - set(defaults))
    if unknown:
        takes = f"options {tuple(defaults)}" if defaults else "no options"
        raise TypeError(f"estimator {estimator!r} takes {takes}, got {unknown}")
    options = {**defaults, **estimator_options}
    _num_chunks(num_tangents, chunk_size)
    _check_distribution(distribution)
    several = isinstance(argnums, (tuple, list))
    positions = tuple(argnums) if several else (argnums,)
    if several and mask is not None and (not isinstance(mask, (tuple, list)) or len(mask) != len(positions)):
        raise ValueError(f"with argnums={argnums}, mask must be a tuple of {len(positions)} mask prefixes, got "
                         f"{mask!r}")
    masks = None if mask is None else tuple(True if m is None else m for m in mask) if several else (mask,)

    def value_and_grad_fn(key: jax.Array, *args, **kwargs):
        if any(not -len(args) <= i < len(args) for i in positions):
            raise TypeError(f"argnums={argnums} needs more than {len(args)} positional arguments after the key")
        wrt = [i % len(args) for i in positions]
        params = tuple(args[i] for i in wrt)
        others = tuple(None if i in wrt else a for i, a in enumerate(args))   # None: an empty pytree

        def loss(params, kwargs, *others):
            args = list(others)
            for i, p in zip(wrt, params):
                args[i] = p
            return fun(*args, **kwargs)

        value, scalars = scalars_fn(loss, params, key, kwargs, *others, num_tangents=num_tangents,
                                    chunk_size=chunk_size, distribution=distribution, mask=masks, has_aux=has_aux,
                                    **options)
        grads = grad_from_scalars(params, key, scalars, chunk_size=chunk_size, distribution=distribution,
                                  mask=masks)
        return value, (grads if several else grads[0])

    return value_and_grad_fn


def grad(fun: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False,
         **options: Any) -> Callable[..., Any]:
    """`jax.grad` with a gradient estimate: `grad_fn(key, *args, **kwargs) -> ĝ`, or `(ĝ, aux)` with `has_aux`.

    `options` are `value_and_grad`'s keyword-only ones (estimator, num_tangents, chunk_size, distribution, mask,
    the estimator's options); ĝ is the same estimate.

    Example:
      >>> g = grad(loss_fn, estimator="central_difference", eps=1e-3, num_tangents=8)(key, params, batch)
    """
    value_and_grad_fn = value_and_grad(fun, argnums, has_aux, **options)

    def grad_fn(key: jax.Array, *args, **kwargs):
        value, grads = value_and_grad_fn(key, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return grad_fn


def forward_grad(loss_fn: Callable[..., Any], params: PyTree, key: jax.Array, *args, num_tangents: int = 1,
                 chunk_size: int | None = None, distribution: Distribution = "gaussian",
                 mask: PyTree | None = None, has_aux: bool = False):
    """Forward gradient: ĝ = (1/K) Σ_k (∇L(θ)·v_k) v_k with exact jvps (Baydin et al. 2022; Spry's client step).

    `value_and_grad(loss_fn, has_aux=has_aux, estimator="jvp", ...)(key, params, *args)`, parameters first:
    returns `(loss, ĝ)` or `((loss, aux), ĝ)`. Leaves outside `mask` get exact zeros; ĝ is unbiased on the others.

    Example:
      >>> loss, g = forward_grad(loss_fn, params, key, batch, num_tangents=10, chunk_size=5)
      >>> updates, opt_state = optimizer.update(g, opt_state, params)
    """
    return value_and_grad(loss_fn, has_aux=has_aux, num_tangents=num_tangents, chunk_size=chunk_size,
                          distribution=distribution, mask=mask)(key, params, *args)


def spsa_grad(loss_fn: Callable[..., Any], params: PyTree, key: jax.Array, *args, eps: float = 1e-3,
              num_tangents: int = 1, chunk_size: int | None = None, distribution: Distribution = "gaussian",
              mask: PyTree | None = None):
    """MeZO's SPSA estimate: ĝ = (1/K) Σ_k (L(θ+εz_k) − L(θ−εz_k)) / (2ε) · z_k, z regenerated from `key`.

    `value_and_grad(loss_fn, estimator="central_difference", eps=eps, ...)(key, params, *args)`, parameters first.
    Returns `(loss, ĝ)`, loss being MeZO's (L(θ+εz_1) + L(θ−εz_1)) / 2. BAFFLE's estimate is this one with
    K = 10, σ = ε = 1e-4 (the textbook formula: BAFFLE's released code divides by 2 and multiplies by σ through
    an operator-precedence bug; not copied).

    Example:
      >>> loss, g = spsa_grad(loss_fn, params, key, batch, eps=1e-3, num_tangents=2)
    """
    return value_and_grad(loss_fn, estimator="central_difference", eps=eps, num_tangents=num_tangents,
                          chunk_size=chunk_size, distribution=distribution, mask=mask)(key, params, *args)
