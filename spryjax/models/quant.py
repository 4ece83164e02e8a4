"""Weight-only round-to-nearest (RTN) quantization of a frozen base: int8 per output channel, and 4-bit (int4 or
NF4) in groups along the input dimension, each with its scales.

References:
  - Dettmers et al. "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022): symmetric absmax
    int8 with one scale per output channel (vector-wise quantization; its outlier decomposition is not used here).
  - Dettmers et al. "QLoRA: Efficient Finetuning of Quantized LLMs" (2023): the NF4 code book (Appendix E), absmax
    blocks of 64, a frozen 4-bit base under fp32 LoRA adapters (its double quantization of the scales is not used).
  - Frantar et al. "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2023): what
    the Spry paper's 4-bit bases were; int4 in groups of 128 is GPTQ's usual storage layout. GPTQ's rounding
    (second-order, column by column, compensating each column's error in the remaining ones) is not implemented:
    RTN rounds every weight independently (docs/models.md, "Quantization").

A kernel W [in, out] becomes a `QuantizedWeight` (a pytree of two arrays) with

    int8:  q = clip(round(W / s), −127, 127) ∈ int8 [in, out],   s = max_i |W_i,o| / 127   [1, out]
    int4:  q = clip(round(W / s), −7, 7) + 8 ∈ {1..15},          s = max_group |W| / 7     [in/128, out]
    nf4:   q = argmin_k |W / s − NF4_k|,                         s = max_group |W|         [in/64, out]

and Ŵ = s ⊙ q (int8, int4: q − 8; nf4: NF4[q]) with each scale repeated over its group. 4-bit codes are packed two
to a byte along the input dimension (rows 2i and 2i+1 of W, low nibble first): uint8 [in/2, out]. Scales are stored
in the dtype the weight dequantizes to (the base's compute dtype, fp32 or bf16), and q is rounded against the stored
scale, so Ŵ is exactly the RTN reconstruction in that dtype.

The quantized weights are frozen inputs like any other array of the frozen tree: `jax.jvp`, `jax.vmap` over clients
and sharding see two plain arrays. `matmul(x, W)` dequantizes inside the caller's jitted computation; on a backend
that does not fuse the dequantization into the matrix product (XLA:CPU), the compiled step holds one dequantized
weight at a time as a temporary (the largest kernel's size in the compute dtype).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spryjax.errors import InputError

Params = dict[str, Any]
SCHEMES = ("int8", "int4", "nf4")
# Inputs per scale of the 4-bit schemes: GPTQ's usual 128 for int4, QLoRA's blocks of 64 for NF4.
GROUP_SIZE = {"int4": 128, "nf4": 64}
INT8_MAX, INT4_MAX = 127, 7
# QLoRA's NF4 code book (quantiles of N(0, 1) scaled to [−1, 1], with an exact zero).
NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], np.float32)
NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
# Host-side quantization works on column blocks of about this many weights, so its temporaries stay small next to
# the full-precision tensor being read.
HOST_BLOCK = 1 << 20
# Tensors of a model tree that are quantized: every dense kernel of the transformer layers, and with `embeddings`
# the vocabulary tables (the word embedding, quantized per token row, and an untied LM head).
TABLES = (("embeddings", "word"),)
VOCABULARY = (("embeddings", "word"), ("lm_head", "kernel"))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scale"],
                   meta_fields=["scheme", "transposed"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized kernel W [in, out] (module docstring), or with `transposed` the matrix Wᵀ [out, in] (an embedding
    table [V, D] is stored as the kernel [D, V] it is the transpose of, so each token row gets its own scales).

    values: int8 [in, out] (int8) or uint8 [in/2, out] (two 4-bit codes per byte).
    scale: [1, out] (int8) or [in/group, out] (4-bit), in the dtype the weight dequantizes to.
    """
    values: Any
    scale: Any
    scheme: str
    transposed: bool = False

    @property
    def kernel_shape(self) -> tuple[int, int]:
        rows, cols = self.values.shape
        return (rows if self.scheme == "int8" else 2 * rows, cols)

    @property
    def shape(self) -> tuple[int, int]:
        """The logical shape: W's [in, out], or [out, in] when transposed."""
        return self.kernel_shape[::-1] if self.transposed else self.kernel_shape

    @property
    def dtype(self) -> Any:
        """The dtype it dequantizes to."""
        return self.scale.dtype

    ndim = 2

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (self.values, self.scale))

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802 (numpy's name)
        return dataclasses.replace(self, transposed=not self.transposed)

    def __getitem__(self, index: Any) -> jax.Array:
        """Rows of a transposed weight (embedding lookup, label-word rows of an LM head), dequantized:
        `table[ids]` with ids [...] -> [..., in] in `self.dtype`; only the gathered rows are dequantized."""
        if not self.transposed:
            raise TypeError("only rows of a transposed QuantizedWeight (an embedding table) can be indexed")
        index = jnp.asarray(index)
        levels = _levels(jnp.take(self.values, index, axis=1), self.scheme, self.dtype)    # [in, ...]
        return jnp.moveaxis(_scaled(levels, jnp.take(self.scale, index, axis=1)), 0, -1)

    def __jax_array__(self) -> jax.Array:
        """Ŵ wherever the weight is used as a plain array (e.g. `decoder.lm_logits`' full-vocabulary product)."""
        return dequantize(self)

    def __repr__(self) -> str:
        if not (hasattr(self.values, "shape") and hasattr(self.scale, "dtype")):   # leaves mapped to other things
            return (f"QuantizedWeight(values={self.values!r}, scale={self.scale!r}, scheme={self.scheme!r}, "
                    f"transposed={self.transposed})")
        return (f"QuantizedWeight({self.scheme}, shape={list(self.shape)}, dtype={np.dtype(self.dtype).name}"
                f"{', transposed' if self.transposed else ''})")


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"quantize={scheme!r} is not a quantization scheme (schemes: {', '.join(SCHEMES)})")


def group_size(scheme: str, fan_in: int, *, name: str = "kernel") -> int:
    """Inputs per scale: all of them for int8, else the scheme's group (a whole column when it is shorter)."""
    if scheme == "int8":
        return fan_in
    group = min(GROUP_SIZE[scheme], fan_in)
    if fan_in % group or group % 2:
        raise InputError(f"{name}: input dimension {fan_in} is not a multiple of {scheme}'s group size "
                         f"{GROUP_SIZE[scheme]}, so this model cannot be quantized with {scheme} (int8 works)")
    return group


# ----------------------------------------------------------------------------------------------------------------
# Quantizing


def _reciprocal(s: Any, xp: Any) -> Any:
    """1 / s, and 1 where s = 0 (an all-zero column). Multiplying by it rather than dividing by s makes numpy and
    XLA (which rewrites a division by a broadcast as such a product) round every weight the same way."""
    return 1.0 / xp.where(s == 0, 1.0, s)


def _quantize_block(w: Any, scheme: str, group: int, dtype: Any) -> tuple[Any, Any]:
    """(values, scale) of a kernel block [in, c]; numpy in, numpy out, or jax in, jax out."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(np.float32) if w.dtype != np.float32 else w
    fan_in, cols = w.shape
    if scheme == "int8":
        scale = (xp.max(xp.abs(w), axis=0, keepdims=True) * np.float32(1 / INT8_MAX)).astype(dtype)            # [1, c]
        s = scale.astype(np.float32)
        q = xp.clip(xp.round(w * _reciprocal(s, xp)), -INT8_MAX, INT8_MAX)
        return q.astype(np.int8), scale
    blocks = w.reshape(fan_in // group, group, cols)
    absmax = xp.max(xp.abs(blocks), axis=1)                                                    # [G, c]
    scale = (absmax * np.float32(1 / INT4_MAX) if scheme == "int4" else absmax).astype(dtype)
    x = blocks * _reciprocal(scale.astype(np.float32), xp)[:, None, :]
    if scheme == "int4":
        codes = (xp.clip(xp.round(x), -INT4_MAX, INT4_MAX) + 8).astype(np.uint8)
    else:   # the nearest code: the number of midpoints below x (15 fused comparisons, no [N, 16] distances)
        codes = sum((x > m).astype(np.uint8) for m in NF4_MIDPOINTS.tolist()).astype(np.uint8)
    codes = codes.reshape(fan_in, cols)
    return codes[0::2] | (codes[1::2] << 4), scale


def quantize(kernel: Any, scheme: str, *, dtype: Any = None, name: str = "kernel") -> QuantizedWeight:
    """RTN quantization of a kernel [in, out] (module docstring) with scales in `dtype` (default: the kernel's).

    A numpy kernel (a tensor read from a checkpoint, possibly a transposed view) is quantized on the host in
    column blocks of about `HOST_BLOCK` weights, so the temporaries stay far below the tensor itself; the result
    holds numpy arrays. A jax kernel (also a tracer, e.g. under `jax.eval_shape`) is quantized in one traced call.

    Example:
      >>> q = quantize(jnp.ones((128, 4)), "int4")
      >>> q.values.shape, q.scale.shape, dequantize(q).shape
      ((64, 4), (1, 4), (128, 4))
    """
    check_scheme(scheme)
    if kernel.ndim != 2:
        raise InputError(f"{name}: only 2-D kernels can be quantized, got shape {list(kernel.shape)}")
    dtype = np.dtype(kernel.dtype if dtype is None else dtype)
    fan_in, fan_out = kernel.shape
    group = group_size(scheme, fan_in, name=name)
    if not isinstance(kernel, np.ndarray):
        values, scale = _quantize_block(kernel, scheme, group, dtype)
        return QuantizedWeight(values, scale, scheme)
    rows = fan_in if scheme == "int8" else fan_in // 2
    values = np.empty((rows, fan_out), np.int8 if scheme == "int8" else np.uint8)
    scale = np.empty((fan_in // group, fan_out), dtype)
    step = max(1, HOST_BLOCK // fan_in)
    for start in range(0, fan_out, step):
        values[:, start:start + step], scale[:, start:start + step] = _quantize_block(
            kernel[:, start:start + step], scheme, group, dtype)
    return QuantizedWeight(values, scale, scheme)


def quantize_tensor(path: tuple, array: Any, scheme: str, *, dtype: Any = None) -> QuantizedWeight:
    """The tensor at `path` of a model tree quantized: kernels [in, out] as they are, embedding tables [V, D] per
    row (stored as the transposed kernel [D, V])."""
    name = "/".join(map(str, path))
    if tuple(path) in TABLES:
        return quantize(array.T, scheme, dtype=dtype, name=name).T
    return quantize(array, scheme, dtype=dtype, name=name)


def targets(path: tuple, embeddings: bool = False) -> bool:
    """Whether the tensor at `path` (e.g. ("layers", 3, "query", "kernel")) is quantized: every dense kernel of the
    transformer layers; with `embeddings` also the word embedding and an untied LM head."""
    path = tuple(path)
    return (path[0] == "layers" and path[-1] == "kernel") or (embeddings and path in VOCABULARY)


def quantize_params(params: Params, scheme: str, *, embeddings: bool = False) -> Params:
    """A copy of a base model tree (`models.init`, `hf.load_pretrained`) with the `targets` quantized, scales in
    each tensor's own dtype; works under `jax.eval_shape` (compile-only studies get the quantized shapes). Tensors
    already quantized with `scheme` are kept; another scheme is an InputError."""
    check_scheme(scheme)

    def walk(tree: Any, path: tuple) -> Any:
        if isinstance(tree, dict):
            return {k: walk(v, (*path, k)) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v, (*path, i)) for i, v in enumerate(tree)]
        if is_quantized(tree):
            if tree.scheme != scheme:
                raise InputError(f"{'/'.join(map(str, path))} is already quantized with {tree.scheme}, not {scheme}")
            return tree
        return quantize_tensor(path, tree, scheme) if targets(path, embeddings) else tree

    if not any(targets(path, embeddings) for path in _paths(params)):
        raise InputError("this model has no transformer-layer dense kernels to quantize")
    return walk(params, ())


def _paths(tree: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _paths(v, (*path, k))]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in _paths(v, (*path, i))]
    return [path]


def cast(params: Params, dtype: Any) -> Params:
    """The tree in compute dtype `dtype`: float arrays cast, quantized weights keep their codes and cast their
    scales (what they dequantize to)."""
    dtype = np.dtype(dtype)

    def one(x):
        if is_quantized(x):
            return x if x.dtype == dtype else dataclasses.replace(x, scale=x.scale.astype(dtype))
        return x if x.dtype == dtype else x.astype(dtype)

    return jax.tree.map(one, params, is_leaf=is_quantized)


# ----------------------------------------------------------------------------------------------------------------
# Dequantizing


def _levels(values: jax.Array, scheme: str, dtype: Any) -> jax.Array:
    """The unscaled levels [in, ...] in `dtype` of stored values [in or in/2, ...]."""
    if scheme == "int8":
        return values.astype(dtype)
    codes = jnp.stack([values & 0xF, values >> 4], axis=1).reshape(2 * values.shape[0], *values.shape[1:])
    if scheme == "int4":
        return (codes.astype(jnp.int8) - 8).astype(dtype)
    return jnp.asarray(NF4_CODE, dtype)[codes]


def _scaled(levels: jax.Array, scale: jax.Array) -> jax.Array:
    """levels [in, ...] ⊙ scale [G, ...], each scale row repeated over its in/G inputs."""
    groups = scale.shape[0]
    grouped = levels.reshape(groups, levels.shape[0] // groups, *levels.shape[1:])
    return (grouped * scale[:, None]).reshape(levels.shape)


def dequantize(w: QuantizedWeight) -> jax.Array:
    """Ŵ [in, out] (or Ŵᵀ when transposed) in `w.dtype`."""
    kernel = _scaled(_levels(w.values, w.scheme, w.dtype), w.scale)
    return kernel.T if w.transposed else kernel


def matmul(x: jax.Array, w: Any) -> jax.Array:
    """x [..., in] · W [in, out] in x's dtype, W a float array or a (non-transposed) `QuantizedWeight`.

    int8 applies its per-output-channel scale after the product, (x · q) ⊙ s, which lets backends that fuse an
    int8→float conversion into the matrix product (XLA:GPU) skip the dequantized copy; the 4-bit schemes
    dequantize first. Under reverse-mode AD the dequantization is rematerialized (`jax.checkpoint`): otherwise
    every layer's dequantized weight would be kept as a residual for the backward pass, i.e. the whole base in
    full precision. On CPU the product also runs in a scope of its own (`_scoped`). Values and derivatives are
    those of x · Ŵ; forward-mode AD and vmap see ordinary operations.
    """
    if not is_quantized(w):
        return x @ w.astype(x.dtype)
    if w.transposed:
        raise TypeError("matmul takes a kernel [in, out]; this QuantizedWeight is transposed")
    return jax.lax.platform_dependent(x, w, cpu=_scoped, default=_rematerialized)


def _product(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    if w.scheme == "int8":
        return (x @ w.values.astype(x.dtype)) * w.scale[0].astype(x.dtype)
    return x @ dequantize(w).astype(x.dtype)


_rematerialized = jax.checkpoint(_product, policy=jax.checkpoint_policies.nothing_saveable)


def _scoped(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """`_rematerialized` inside a conditional whose two branches are the same function. XLA:CPU's default
    (concurrency-optimized) scheduler starts every weight conversion of a program at once, since they depend on
    parameters only, and its CSE merges a rematerialized conversion back into the forward one: either way the
    compiled step would hold every layer's dequantized weight, the whole base in full precision (measured on
    MiniLM-L6: 40 MiB of temporaries instead of 2.3). A conditional's branch is scheduled as a unit when its
    operands (the layer's input among them) are ready, and its temporaries die with it, so one dequantized weight
    is alive at a time. The predicate depends on the weights, not on x, so under vmap over clients it stays
    unbatched and the conditional stays a conditional (a batched predicate would turn it into a select of both
    branches)."""
    always = w.scale[0, 0] == w.scale[0, 0]   # not foldable (a NaN scale compares unequal), and either way
    return jax.lax.cond(always, _rematerialized, _rematerialized, x, w)
