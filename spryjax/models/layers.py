"""Building blocks shared by the encoder and decoder families: adapter-aware dense, norms, attention, dropout.

References:
  - Vaswani et al. "Attention Is All You Need" (2017): scaled dot-product multi-head attention.
  - Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models" (2021): y = x W + b + (α/r) x A B.
  - Liu et al. "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (IA3, 2022):
    learned vectors rescale keys, values and the feed-forward activation.
  - Zhang & Sennrich "Root Mean Square Layer Normalization" (2019), Ba et al. "Layer Normalization" (2016).

Adapters are never merged into the frozen weights. A dense node is a dict that holds the frozen `kernel` [in, out]
(and `bias` [out]) plus whatever adapter leaves `spryjax.peft.merge` put beside them; `dense` applies them on the fly.
Merging W + (α/r) A B into one matrix would make the jvp tangent of the weight as large as W itself, which is exactly
the memory forward-mode finetuning is meant to save.

Compute runs in the dtype of the activations, which is the dtype of the frozen base (bf16 or fp32). Adapter leaves
are stored in fp32 for the optimizer and cast to the activation dtype where they are used, so a bf16 base stays
bf16 end to end. Norm statistics and softmax are computed in fp32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.models import quant

Params = dict[str, Any]


class AdapterOptions(NamedTuple):
    """Hyperparameters of the adapters that live in the trainable tree (set by `spryjax.peft.adapter_options`)."""
    lora_scale: float = 1.0   # α / r
    lora_dropout: float = 0.0  # dropout on the LoRA branch input, applied only when a key is given


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # Hugging Face's "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` in Hugging Face configs."""
    if name not in ACTIVATIONS:
        raise InputError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """`num` independent keys from `key`, or `num` Nones when `key` is None (deterministic mode)."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: x ⊙ m / (1 − rate), m ~ Bernoulli(1 − rate); the identity when key is None or rate is 0.

    Each call is one RNG kernel: on CPU every dropout site adds noticeably to XLA compile time (measured: a one-layer
    MiniLM forward pass compiled in 0.7 s without dropout, 5.3 s with its 12 dropout sites, on a busy 2-core CPU).
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dense(p: Params, x: jax.Array, *, adapter: AdapterOptions = AdapterOptions(),
          key: jax.Array | None = None) -> jax.Array:
    """An affine map with the adapters present in `p` applied on the fly.

        y = ((x ⊙ s_in) W + b) ⊙ s_out + (α/r) · dropout(x) A B

    with W = p["kernel"] [in, out], b = p["bias"] [out] (optional), LoRA factors p["lora_a"] [in, r] and
    p["lora_b"] [r, out], IA3 scales p["ia3_in"] [in] (feed-forward down projections) or p["ia3_out"] [out]
    (keys, values); absent leaves drop their term. W may be a `quant.QuantizedWeight` (a quantized frozen base),
    dequantized here by `quant.matmul`. x: [..., in] -> y: [..., out], in x's dtype.
    """
    dtype = x.dtype
    cast = lambda name: p[name].astype(dtype)
    y = quant.matmul(x * cast("ia3_in") if "ia3_in" in p else x, p["kernel"])
    if "bias" in p:
        y = y + cast("bias")
    if "ia3_out" in p:
        y = y * cast("ia3_out")
    if "lora_a" in p:
        lora_x = dropout(x, adapter.lora_dropout, key)
        y = y + adapter.lora_scale * ((lora_x @ cast("lora_a")) @ cast("lora_b"))
    return y


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """(x − mean) / sqrt(var + eps) · scale + bias over the last axis, statistics in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · scale (Llama); statistics in fp32, cast back before the scale as Hugging Face
    does."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return y * p["scale"].astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, dropout_rate: float = 0.0,
              key: jax.Array | None = None) -> jax.Array:
    """softmax(q kᵀ / √d + mask) v per head.

    q: [B, Q, H, d]; k, v: [B, K, H_kv, d] with H a multiple of H_kv (grouped-query attention repeats each key/value
    head H / H_kv times); mask: boolean, broadcastable to [B, H, Q, K], True where attending is allowed.
    Scores and softmax in fp32. Returns [B, Q, H, d] in q's dtype.
    """
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(q.shape[-1]))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, key).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Init(NamedTuple):
    """A leaf of an initialisation spec: its shape and how `materialize` fills it."""
    shape: tuple[int, ...]
    kind: str = "normal"  # "normal": N(0, std²); "zeros"; "ones"


def init_dense(fan_in: int, fan_out: int, *, bias: bool = True) -> Params:
    """Spec of a dense node {kernel: N(0, std²) [in, out], bias: zeros [out]} (BERT's and Llama's initializer)."""
    p = {"kernel": Init((fan_in, fan_out))}
    if bias:
        p["bias"] = Init((fan_out,), "zeros")
    return p


def init_norm(dim: int, *, bias: bool = True) -> Params:
    """Spec of a norm node {scale: ones [dim], bias: zeros [dim]} (no bias for RMSNorm)."""
    p = {"scale": Init((dim,), "ones")}
    if bias:
        p["bias"] = Init((dim,), "zeros")
    return p


def materialize(spec: Any, key: jax.Array, *, dtype: Any = jnp.float32, std: float = 0.02) -> Any:
    """Arrays in `dtype` for a pytree of `Init` leaves. All normal leaves are slices of one N(0, std²) draw: one RNG
    kernel instead of one per leaf keeps compile times of deep models short (as in `fwdgrad.sample_tangent`)."""
    leaves, treedef = jax.tree.flatten(spec, is_leaf=lambda x: isinstance(x, Init))
    sizes = [math.prod(leaf.shape) if leaf.kind == "normal" else 0 for leaf in leaves]
    flat = std * jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes):
        if leaf.kind == "normal":
            out.append(flat[offset:offset + size].reshape(leaf.shape).astype(dtype))
            offset += size
        else:
            out.append((jnp.zeros if leaf.kind == "zeros" else jnp.ones)(leaf.shape, dtype))
    return jax.tree.unflatten(treedef, out)


class CheckpointEntry(NamedTuple):
    """One tensor of a Hugging Face checkpoint: its name without the model prefix, where it goes in spryjax's
    tree, and whether it is a torch Linear weight ([out, in] -> kernel [in, out])."""
    name: str
    path: tuple[str | int, ...]
    transpose: bool


def dense_entries(name: str, path: tuple, bias: bool = True) -> list[CheckpointEntry]:
    """The entries of a torch Linear `name` stored at `path` as {kernel, bias}."""
    return [CheckpointEntry(f"{name}.weight", (*path, "kernel"), True)] + (
        [CheckpointEntry(f"{name}.bias", (*path, "bias"), False)] if bias else [])


def norm_entries(name: str, path: tuple, bias: bool = True) -> list[CheckpointEntry]:
    """The entries of a torch LayerNorm / RMSNorm `name` stored at `path` as {scale, bias}."""
    return [CheckpointEntry(f"{name}.weight", (*path, "scale"), False)] + (
        [CheckpointEntry(f"{name}.bias", (*path, "bias"), False)] if bias else [])


# Rematerialization (`jax.checkpoint`) of a transformer layer under reverse-mode AD: "full" keeps only the layer's
# inputs and recomputes everything in the backward pass; "dots" also keeps the outputs of its matrix products.
REMAT_POLICIES = ("full", "dots")


def rematerialized(layer_fn: Callable[..., jax.Array], remat: str | None) -> Callable[..., jax.Array]:
    """`layer_fn` wrapped in `jax.checkpoint` with the policy `remat` names (None: unchanged). Only backprop's
    memory changes: values and gradients are the same, forward-mode AD and plain evaluation are unaffected."""
    if remat is None:
        return layer_fn
    if remat not in REMAT_POLICIES:
        raise InputError(f"remat={remat!r}: must be None or one of {', '.join(REMAT_POLICIES)}")
    policy = jax.checkpoint_policies.nothing_saveable if remat == "full" else jax.checkpoint_policies.dots_saveable
    return jax.checkpoint(layer_fn, policy=policy)
