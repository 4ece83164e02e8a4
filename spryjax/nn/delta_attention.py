"""Hierarchical delta-attention for multimodal fusion, and the baselines it is measured against.

References:
  - "Hierarchical Delta-Attention Method for Multimodal Fusion" (arXiv 2011.10916): per modality, self-attention
    over local differences captures each speaker's idiosyncrasies; cross-attention fuses the modalities.
  - Tsai et al. "Multimodal Transformer for Unaligned Multimodal Language Sequences" (MulT, ACL 2019): the
    state-of-the-art reference, reimplemented here as `MulT`.

Notation: modalities m = 1..M with inputs x^m ∈ R^{B×T_m×d_m} and padding masks μ^m ∈ {0,1}^{B×T_m} (1 = a real
step); e is the model width. The hierarchy is

    projection          h^m_t   = μ^m_t (x^m_t P_m + p_m)                                   ∈ R^e
    local differences   Δ_s h^m_t = μ^m_t μ^m_{t−s} (h^m_t − h^m_{t−s}),   Δ_s h^m_t = 0 for t < s
    delta embedding     z^m_t   = [N(Δ_{s_1} h^m)_t, …, N(Δ_{s_K} h^m)_t, N(h^m)_t] W_m + b_m  (raw term optional)
    stream RMS          N(y)_t  = y_t / √(Σ_τ μ_τ ‖y_τ‖² / (e Σ_τ μ_τ) + ε)                  (per sequence; optional)
    delta attention     u^m     = Block_self(z^m; keys masked by μ^m)                       (`delta_layers` blocks)
    cross-modal fusion  c^m     = Block_cross(u^m; memory [u^n + E_n]_{n≠m}, masked by μ^n)  (`fusion_layers`)
    masked pooling      g^m     = Σ_t α^m_t c^m_t,   α^m = softmax_t(c^m_t w_m) over steps with μ^m_t = 1
    head                ŷ       = MLP([g^1, …, g^M])                                        logits or a scalar

where a pre-LayerNorm block is  y = x + Attn(LN(x), LN'(mem)),  Block(x) = y + FFN(LN(y)),  FFN(y) = GELU(yW₁)W₂,
and every attention (self or cross) is multi-head with a learned relative-position bias and a key mask:

    Attn(q, k, v)_h = softmax(q_h k_hᵀ / √(e/H) + R_h[clip(i − j, −ρ, ρ)] + log μ_keys) v_h.

Because Δ_s(xP + p) = (Δ_s x)P, differencing the projected stream equals projecting the differenced inputs; the
bias cancels, so with the raw term disabled the model is exactly invariant to a constant offset of any modality.

Deviations from the paper and choices it leaves open (its released code is a non-runnable notebook export):
  - The difference operation is not explicit there; here it is x_t − x_{t−s} for a configurable set of scales s.
    It is defined only between two real steps: at the first s real steps of a sequence (and next to padding) Δ_s
    is 0 ("no change observed yet"), so padded steps never leak into a difference.
  - Its learned position term softmax(QKᵀ/√e + W_r Q) is replaced by a learned relative-position bias R_h per head
    (distances clipped to ±ρ, `relative_positions`); in cross-attention i and j are the time indices of the query
    and key in their own streams, which is meaningful for aligned streams (set ρ = 0 for unaligned ones).
  - Each stream is divided by its RMS over the sequence's real steps (`normalize_streams`, on by default): the
    speaker's overall scale of change is removed while which steps change more is kept; without it the raw stream
    (dominated by a speaker's offset) swamps the differences, and on the synthetic task training stalled.
  - The CCA step before cross-attention is left out; a learned source-modality embedding E_n tells the target which
    modality a memory step came from.
  - Padding: inputs at padded steps are zeroed first and padded keys get zero attention weight, so padded steps
    (whatever their values) change no output at a real step or the pooled result.

Every module here is used the NNX way the engine expects: `graphdef, state = nnx.split(model)`; a pure function
`nnx.merge(graphdef, params)(inputs, masks, key=key)`; so `jax.jit`, `jax.vmap` over a clients axis of parameters
and data, and `jax.jvp` (forward gradients) all apply. Dropout is functional (driven by the explicit `key`, None
for a deterministic pass), so the split state holds parameters only. `build_*_model(config, dataset, key)` turn a
`config.model` into `(Task, trainable, frozen)` for `spryjax.build.MODELS`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spryjax.data.dataset import Dataset
from spryjax.errors import InputError
from spryjax.models.layers import dropout
from spryjax.task import Task, classification_task, regression_task

PyTree = Any
MASK_PREFIX = "mask_"   # batch["mask_<modality>"] is that modality's [B, T] step mask (1 = real step)


# ----------------------------------------------------------------------------------------------------------------
# Functional pieces


def local_difference(x: jax.Array, mask: jax.Array, scale: int = 1) -> jax.Array:
    """Δ_s x_t = μ_t μ_{t−s} (x_t − x_{t−s}), and 0 for t < s.

    Args:
      x: [B, T, d] sequence. mask: [B, T], nonzero at real steps. scale: s ≥ 1.
    Returns:
      [B, T, d]; zero wherever step t or t − s is padding (so padded values never enter).

    Example:
      >>> local_difference(jnp.ones((1, 4, 2)), jnp.ones((1, 4)))      # a constant sequence: all zeros
    """
    valid = mask > 0
    pad = lambda a: jnp.pad(a, [(0, 0), (scale, 0)] + [(0, 0)] * (a.ndim - 2))[:, :a.shape[1]]
    both = valid & pad(valid)
    return jnp.where(both[..., None], x - pad(x), 0.0)


def sequence_rms_normalize(x: jax.Array, mask: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / √(Σ_t μ_t ‖x_t‖² / (d Σ_t μ_t) + ε): each sequence divided by its RMS over its real steps.

    x [B, T, d], mask [B, T] → [B, T, d]. Applied to a delta stream it removes a speaker's overall scale of
    change while keeping which steps change more than others.
    """
    m = (mask > 0).astype(x.dtype)
    power = jnp.einsum("btd,bt->b", x * x, m) / (x.shape[-1] * jnp.maximum(m.sum(1), 1.0))
    return x * jax.lax.rsqrt(power + eps)[:, None, None]


def sinusoidal_positions(length: int, features: int) -> jax.Array:
    """[length, features] sine/cosine position codes (Vaswani et al.; what MulT adds to its inputs)."""
    half = features // 2
    freq = jnp.exp(-math.log(10000.0) * jnp.arange(half) / max(half - 1, 1))
    angle = jnp.arange(length)[:, None] * freq[None]
    codes = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], -1)
    return jnp.pad(codes, ((0, 0), (0, features - 2 * half)))


def _key(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks shared by every model in this file


class Attention(nnx.Module):
    """Multi-head attention with a key mask and an optional learned relative-position bias.

    out_i = Σ_h softmax_j(q_{ih}·k_{jh}/√(e/H) + R_h[clip(pos_i − pos_j, −ρ, ρ)]) v_{jh} W_o over keys j with
    mask 1; a query with no real key gets 0. Shapes: x [B, Tq, e], memory [B, Tk, e], memory_mask [B, Tk],
    positions [Tq], memory_positions [Tk] (integers).
    """

    def __init__(self, features: int, *, num_heads: int, relative_positions: int = 0, rngs: nnx.Rngs):
        if features % num_heads:
            raise InputError(f"features={features} must be a multiple of num_heads={num_heads}")
        self.num_heads = num_heads
        self.relative_positions = relative_positions
        self.query, self.key, self.value, self.out = (nnx.Linear(features, features, rngs=rngs) for _ in range(4))
        self.relative_bias = (nnx.Param(jnp.zeros((num_heads, 2 * relative_positions + 1)))
                              if relative_positions else None)

    def __call__(self, x: jax.Array, memory: jax.Array, memory_mask: jax.Array, *, positions: jax.Array,
                 memory_positions: jax.Array, dropout_rate: float = 0.0, key: jax.Array | None = None
                 ) -> jax.Array:
        split = lambda a: a.reshape(*a.shape[:2], self.num_heads, -1)
        q, k, v = split(self.query(x)), split(self.key(memory)), split(self.value(memory))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if self.relative_bias is not None:
            rho = self.relative_positions
            distance = jnp.clip(positions[:, None] - memory_positions[None, :], -rho, rho) + rho
            scores = scores + self.relative_bias[...][:, distance][None]
        valid = (memory_mask > 0)[:, None, None, :]
        # A finite fill keeps softmax finite for all-padding rows; those rows are zeroed just after.
        weights = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=-1) * valid
        weights = dropout(weights, dropout_rate, key)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out(out.reshape(*x.shape[:2], -1))


class TransformerLayer(nnx.Module):
    """Pre-LayerNorm transformer block: y = x + Attn(LN(x), LN'(m)), out = y + FFN(LN(y)).

    Self-attention when `memory` is None (m = x); otherwise cross-attention to `memory` with its own LayerNorm
    (MulT's crossmodal block). FFN(y) = GELU(y W₁ + b₁) W₂ + b₂ with hidden width `ffn_multiplier`·e.
    """

    def __init__(self, features: int, *, num_heads: int, ffn_multiplier: int = 4, relative_positions: int = 0,
                 cross: bool = False, dropout: float = 0.0, rngs: nnx.Rngs):
        self.dropout = dropout
        self.attention_norm = nnx.LayerNorm(features, rngs=rngs)
        self.memory_norm = nnx.LayerNorm(features, rngs=rngs) if cross else None
        self.attention = Attention(features, num_heads=num_heads, relative_positions=relative_positions, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(features, rngs=rngs)
        self.ffn_in = nnx.Linear(features, ffn_multiplier * features, rngs=rngs)
        self.ffn_out = nnx.Linear(ffn_multiplier * features, features, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array, *, positions: jax.Array, memory: jax.Array | None = None,
                 memory_mask: jax.Array | None = None, memory_positions: jax.Array | None = None,
                 key: jax.Array | None = None) -> jax.Array:
        q = self.attention_norm(x)
        if memory is None:
            memory, memory_mask, memory_positions = q, mask, positions
        else:
            memory = self.memory_norm(memory)
        attended = self.attention(q, memory, memory_mask, positions=positions, memory_positions=memory_positions,
                                  dropout_rate=self.dropout, key=_key(key, 0))
        y = x + dropout(attended, self.dropout, _key(key, 1))
        hidden = dropout(jax.nn.gelu(self.ffn_in(self.ffn_norm(y))), self.dropout, _key(key, 2))
        return y + dropout(self.ffn_out(hidden), self.dropout, _key(key, 3))


class AttentionPool(nnx.Module):
    """Masked attention pooling: g = Σ_t α_t h_t, α = softmax_t(h_t w) over real steps (0 if there are none).

    h [B, T, e], mask [B, T] → [B, e]. It can act as a mean (flat scores) or a max (peaked scores); every model
    in this file pools this way so that none is favoured by its read-out (MulT's own last-step read-out would read
    a padded step under right padding).
    """

    def __init__(self, features: int, *, rngs: nnx.Rngs):
        self.score = nnx.Linear(features, 1, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        valid = mask > 0
        weights = jax.nn.softmax(jnp.where(valid, self.score(h)[..., 0], -1e30), axis=-1) * valid
        return jnp.einsum("bt,bte->be", weights, h)


class MLPHead(nnx.Module):
    """ŷ = GELU(g W₁ + b₁) W₂ + b₂: [B, in] → [B, outputs]."""

    def __init__(self, in_features: int, hidden: int, outputs: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, outputs, rngs=rngs)

    def __call__(self, g: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(g)))


def _projections(input_sizes: Mapping[str, int], features: int, *, use_bias: bool, rngs: nnx.Rngs) -> nnx.Dict:
    return nnx.Dict({m: nnx.Linear(d, features, use_bias=use_bias, rngs=rngs) for m, d in input_sizes.items()})


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x with padded steps set to 0, so that their values (even inf/nan) reach nothing."""
    return jnp.where((mask > 0)[..., None], x, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# The hierarchy


class DeltaSelfAttention(nnx.Module):
    """Self-attention over one modality's local differences (and optionally its raw stream).

    z_t = [N(Δ_{s_1} h)_t, …, N(Δ_{s_K} h)_t, N(h)_t] W + b (the raw h only with `use_raw`; N the per-sequence
    RMS normalization `sequence_rms_normalize` with `normalize_streams`, else the identity), then `layers` pre-LN
    self-attention blocks with a relative-position bias, keys masked by `mask`. h [B, T, e], mask [B, T] →
    [B, T, e]. `scales=()` with `use_raw=True` is the no-delta ablation (the raw stream alone).
    """

    def __init__(self, features: int, *, scales: Sequence[int] = (1,), use_raw: bool = True,
                 normalize_streams: bool = True, layers: int = 1, num_heads: int = 4, ffn_multiplier: int = 4,
                 relative_positions: int = 8, dropout: float = 0.0, rngs: nnx.Rngs):
        self.scales = tuple(int(s) for s in scales)
        if any(s < 1 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise InputError(f"scales must be distinct positive integers, got {tuple(scales)}")
        if not self.scales and not use_raw:
            raise InputError("DeltaSelfAttention needs at least one stream: give scales or use_raw=True")
        self.use_raw = use_raw
        self.normalize_streams = normalize_streams
        self.embed = nnx.Linear((len(self.scales) + use_raw) * features, features, rngs=rngs)
        self.layers = nnx.List([TransformerLayer(features, num_heads=num_heads, ffn_multiplier=ffn_multiplier,
                                                 relative_positions=relative_positions, dropout=dropout, rngs=rngs)
                                for _ in range(layers)])

    def __call__(self, h: jax.Array, mask: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h = _masked(h, mask)
        streams = [local_difference(h, mask, s) for s in self.scales] + ([h] if self.use_raw else [])
        if self.normalize_streams:
            streams = [sequence_rms_normalize(stream, mask) for stream in streams]
        z = self.embed(jnp.concatenate(streams, -1))
        positions = jnp.arange(h.shape[1])
        for i, layer in enumerate(self.layers):
            z = layer(z, mask, positions=positions, key=_key(key, i))
        return z


class CrossModalFusion(nnx.Module):
    """Each modality attends to all the others, then masked pooling to one global vector.

    For target m the memory is the time-concatenation of [u^n + E_n]_{n≠m} (E_n a learned source embedding);
    `layers` pre-LN cross-attention blocks (own weights per target) give c^m; g^m = AttentionPool(c^m).
    us: M arrays [B, T_m, e]; masks: M arrays [B, T_m] → [B, M·e] = [g^1, …, g^M]. With one modality there is
    nothing to attend to and the block reduces to the pooling.
    """

    def __init__(self, num_modalities: int, features: int, *, layers: int = 1, num_heads: int = 4,
                 ffn_multiplier: int = 4, relative_positions: int = 8, dropout: float = 0.0, rngs: nnx.Rngs):
        self.source_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_modalities, features)))
        cross_layers = layers if num_modalities > 1 else 0
        self.layers = nnx.List([
            nnx.List([TransformerLayer(features, num_heads=num_heads, ffn_multiplier=ffn_multiplier,
                                       relative_positions=relative_positions, cross=True, dropout=dropout,
                                       rngs=rngs) for _ in range(cross_layers)])
            for _ in range(num_modalities)])
        self.pools = nnx.List([AttentionPool(features, rngs=rngs) for _ in range(num_modalities)])

    def __call__(self, us: Sequence[jax.Array], masks: Sequence[jax.Array], *, key: jax.Array | None = None
                 ) -> jax.Array:
        sources = [u + self.source_embedding[...][n] for n, u in enumerate(us)]
        pooled = []
        for m, (u, mask) in enumerate(zip(us, masks)):
            others = [n for n in range(len(us)) if n != m]
            c = u
            if self.layers[m]:
                memory = jnp.concatenate([sources[n] for n in others], 1)
                memory_mask = jnp.concatenate([masks[n] for n in others], 1)
                memory_positions = jnp.concatenate([jnp.arange(us[n].shape[1]) for n in others])
                for i, layer in enumerate(self.layers[m]):
                    c = layer(c, mask, positions=jnp.arange(u.shape[1]), memory=memory, memory_mask=memory_mask,
                              memory_positions=memory_positions, key=_key(_key(key, m), i))
            pooled.append(self.pools[m](c, mask))
        return jnp.concatenate(pooled, -1)


class HierarchicalDeltaFusion(nnx.Module):
    """Per-modality projection → delta self-attention → cross-modal fusion → MLP head (see the module docstring).

    Args:
      input_sizes: ordered {modality: d_m}; any number of modalities, each with its own feature size.
      num_outputs: classes (logits), or 1 for regression.
      features: e. scales: the delta scales s (e.g. (1, 2, 4)); use_raw: also feed the raw stream h_t.
      delta_layers / fusion_layers: blocks per modality in each stage. relative_positions: ρ (0 = no bias).
    Call: inputs {m: [B, T_m, d_m]}, masks {m: [B, T_m]}, key (dropout; None = deterministic) → [B, num_outputs].
    """

    def __init__(self, input_sizes: Mapping[str, int], num_outputs: int, *, features: int = 64,
                 num_heads: int = 4, scales: Sequence[int] = (1,), use_raw: bool = True,
                 normalize_streams: bool = True, delta_layers: int = 1,
                 fusion_layers: int = 1, ffn_multiplier: int = 4, relative_positions: int = 8,
                 dropout: float = 0.0, rngs: nnx.Rngs):
        self.modalities = tuple(input_sizes)
        block = dict(num_heads=num_heads, ffn_multiplier=ffn_multiplier, relative_positions=relative_positions,
                     dropout=dropout, rngs=rngs)
        self.projections = _projections(input_sizes, features, use_bias=True, rngs=rngs)
        self.delta = nnx.Dict({m: DeltaSelfAttention(features, scales=scales, use_raw=use_raw,
                                                     normalize_streams=normalize_streams, layers=delta_layers,
                                                     **block) for m in self.modalities})
        self.fusion = CrossModalFusion(len(self.modalities), features, layers=fusion_layers, **block)
        self.head = MLPHead(len(self.modalities) * features, features, num_outputs, rngs=rngs)

    def __call__(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array], *,
                 key: jax.Array | None = None) -> jax.Array:
        us = [self.delta[m](self.projections[m](_masked(inputs[m], masks[m])), masks[m], key=_key(key, i))
              for i, m in enumerate(self.modalities)]
        g = self.fusion(us, [masks[m] for m in self.modalities], key=_key(key, len(us)))
        return self.head(g)


# ----------------------------------------------------------------------------------------------------------------
# Baselines


class LateFusion(nnx.Module):
    """Late fusion: per-modality encoders (projection, `layers` self-attention blocks, masked pooling), then the
    pooled vectors are concatenated and classified by an MLP; modalities never see each other's time steps.

    ŷ = MLP([Pool(Enc_1(x^1)), …, Pool(Enc_M(x^M))]). Same call signature as `HierarchicalDeltaFusion`.
    """

    def __init__(self, input_sizes: Mapping[str, int], num_outputs: int, *, features: int = 64, num_heads: int = 4,
                 layers: int = 2, ffn_multiplier: int = 4, relative_positions: int = 8, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.modalities = tuple(input_sizes)
        self.projections = _projections(input_sizes, features, use_bias=True, rngs=rngs)
        self.encoders = nnx.Dict({m: nnx.List([
            TransformerLayer(features, num_heads=num_heads, ffn_multiplier=ffn_multiplier,
                             relative_positions=relative_positions, dropout=dropout, rngs=rngs)
            for _ in range(layers)]) for m in self.modalities})
        self.pools = nnx.Dict({m: AttentionPool(features, rngs=rngs) for m in self.modalities})
        self.head = MLPHead(len(self.modalities) * features, features, num_outputs, rngs=rngs)

    def __call__(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array], *,
                 key: jax.Array | None = None) -> jax.Array:
        pooled = []
        for i, m in enumerate(self.modalities):
            h = self.projections[m](_masked(inputs[m], masks[m]))
            for j, layer in enumerate(self.encoders[m]):
                h = layer(h, masks[m], positions=jnp.arange(h.shape[1]), key=_key(_key(key, i), j))
            pooled.append(self.pools[m](h, masks[m]))
        return self.head(jnp.concatenate(pooled, -1))


class MulT(nnx.Module):
    """MulT-style crossmodal transformer (Tsai et al. 2019), for aligned or unaligned streams.

    Per modality: ĥ^m = √d · x^m P_m + PE (a bias-free projection = MulT's kernel-1 conv, sinusoidal positions).
    For each ordered pair n → m, a crossmodal transformer CT_{n→m} of `layers` pre-LN blocks, queries from the
    target stream, keys/values the source's ĥ^n at every block, then a final LayerNorm. Per target m the
    M − 1 outputs are concatenated (width (M−1)d) and pass through a self-attention transformer of
    max(layers, 3) blocks; the pooled targets are concatenated (width M(M−1)d) and read out by MulT's residual
    head ŷ = (r + W₂ ReLU(W₁ r)) W_o. MulT's defaults: d = 30, 5 heads, layers = 5, FFN 4d.
    Deviations: the last-step read-out is replaced by `AttentionPool` (padding masks; see that class); key
    padding masks (MulT has none); GELU instead of ReLU in the FFN, pre-LN blocks as in MulT.
    """

    def __init__(self, input_sizes: Mapping[str, int], num_outputs: int, *, features: int = 30, num_heads: int = 5,
                 layers: int = 5, ffn_multiplier: int = 4, dropout: float = 0.0, rngs: nnx.Rngs):
        self.modalities = tuple(input_sizes)
        self.features = features
        self.dropout = dropout
        names = self.modalities
        block = dict(num_heads=num_heads, ffn_multiplier=ffn_multiplier, dropout=dropout, rngs=rngs)
        memory_width = (len(names) - 1) * features
        self.projections = _projections(input_sizes, features, use_bias=False, rngs=rngs)
        self.crossmodal = nnx.Dict({f"{n}_to_{m}": nnx.List(
            [TransformerLayer(features, cross=True, **block) for _ in range(layers)]) for m in names
            for n in names if n != m})
        self.crossmodal_norms = nnx.Dict({f"{n}_to_{m}": nnx.LayerNorm(features, rngs=rngs) for m in names
                                          for n in names if n != m})
        self.memory = nnx.Dict({m: nnx.List([TransformerLayer(memory_width, **block)
                                             for _ in range(max(layers, 3))]) for m in names})
        self.memory_norms = nnx.Dict({m: nnx.LayerNorm(memory_width, rngs=rngs) for m in names})
        self.pools = nnx.Dict({m: AttentionPool(memory_width, rngs=rngs) for m in names})
        combined = len(names) * memory_width
        self.proj1 = nnx.Linear(combined, combined, rngs=rngs)
        self.proj2 = nnx.Linear(combined, combined, rngs=rngs)
        self.out = nnx.Linear(combined, num_outputs, rngs=rngs)

    def __call__(self, inputs: Mapping[str, jax.Array], masks: Mapping[str, jax.Array], *,
                 key: jax.Array | None = None) -> jax.Array:
        embed_key, cross_key, memory_key, head_key = (_key(key, i) for i in range(4))
        embedded = {}
        for i, m in enumerate(self.modalities):
            h = self.projections[m](_masked(inputs[m], masks[m]))
            h = math.sqrt(self.features) * h + sinusoidal_positions(h.shape[1], self.features)
            embedded[m] = dropout(h, self.dropout, _key(embed_key, i))
        pooled = []
        for i, m in enumerate(self.modalities):
            positions = jnp.arange(embedded[m].shape[1])
            streams = []
            for j, source in enumerate(self.modalities):
                if source == m:
                    continue
                pair = f"{source}_to_{m}"
                c = embedded[m]
                for k, layer in enumerate(self.crossmodal[pair]):
                    c = layer(c, masks[m], positions=positions, memory=embedded[source], memory_mask=masks[source],
                              memory_positions=jnp.arange(embedded[source].shape[1]),
                              key=_key(_key(_key(cross_key, i), j), k))
                streams.append(self.crossmodal_norms[pair](c))
            h = jnp.concatenate(streams, -1)
            for k, layer in enumerate(self.memory[m]):
                h = layer(h, masks[m], positions=positions, key=_key(_key(memory_key, i), k))
            pooled.append(self.pools[m](self.memory_norms[m](h), masks[m]))
        r = jnp.concatenate(pooled, -1)
        r = r + self.proj2(dropout(jax.nn.relu(self.proj1(r)), self.dropout, head_key))
        return self.out(r)


# ----------------------------------------------------------------------------------------------------------------
# Modules → (Task, trainable, frozen), for trainers


def modalities_of(dataset: Dataset) -> tuple[str, ...]:
    """The dataset's modalities: the inputs m with a step mask "mask_<m>", in the dataset's order."""
    names = tuple(k for k in dataset.train if MASK_PREFIX + k in dataset.train)
    if not names:
        raise InputError(f"dataset {dataset.name!r} has no modality inputs (arrays 'm' with a 'mask_m' beside)")
    return names


def create(model_class: type[nnx.Module], *args, key: jax.Array, **options) -> tuple[nnx.GraphDef, PyTree]:
    """`model_class(*args, **options, rngs=nnx.Rngs(params=key))` split into (graphdef, params as a pure dict);
    `nnx.merge(graphdef, params)` gives the module back.

    Initialization stays eager: under `jax.jit` the whole initializer graph compiled 2–7× slower on a 2-core CPU.
    """
    graphdef, state = nnx.split(model_class(*args, **options, rngs=nnx.Rngs(params=key)))
    return graphdef, nnx.to_pure_dict(state)


def module_task(graphdef: nnx.GraphDef, params: PyTree, modalities: Sequence[str], num_classes: int
                ) -> tuple[Task, PyTree, PyTree]:
    """A pure Task over an NNX model's parameters: trainable = `params` (all of them, a pure dict), frozen = {}.

    The task's function of (trainable, frozen, batch, key) merges `graphdef` with `trainable` and calls the model
    on batch[m] and batch["mask_" + m] for each modality m. `num_classes` 0 means regression on the single output.
    """
    def outputs(trainable, frozen, batch, key=None):
        model = nnx.merge(graphdef, trainable)
        return model({m: batch[m] for m in modalities}, {m: batch[MASK_PREFIX + m] for m in modalities}, key=key)

    if num_classes:
        return classification_task(outputs, num_classes), params, {}
    return regression_task(lambda *args: outputs(*args)[:, 0]), params, {}


def fusion_task(model_class: type[nnx.Module], dataset: Dataset, key: jax.Array, **options
                ) -> tuple[Task, PyTree, PyTree]:
    """`model_class(input sizes of dataset's modalities, classes (1 for regression), **options)` as a pure Task
    (`module_task`): `HierarchicalDeltaFusion`, its no-delta ablation (`scales=(), use_raw=True`), `LateFusion`
    or `MulT`, with that class's keyword options (features, num_heads, ...).

    Example:
      >>> task, params, frozen = fusion_task(HierarchicalDeltaFusion, dataset, key, features=32, scales=(1, 2))
    """
    modalities = modalities_of(dataset)
    input_sizes = {m: int(dataset.train[m].shape[-1]) for m in modalities}
    graphdef, params = create(model_class, input_sizes, dataset.num_classes or 1, key=key, **options)
    return module_task(graphdef, params, modalities, dataset.num_classes)
