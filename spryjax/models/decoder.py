"""Causal transformer decoders: Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention) and OPT
(LayerNorm, learned positions offset by 2, ReLU), both pre-LayerNorm.

References:
  - Touvron et al. "Llama 2: Open Foundation and Fine-Tuned Chat Models" (2023); Su et al. "RoFormer" (2021) for
    rotary embeddings; Shazeer "GLU Variants Improve Transformer" (2020) for SwiGLU.
  - Zhang et al. "OPT: Open Pre-trained Transformer Language Models" (2022).
  - Hugging Face transformers' LlamaModel / OPTModel: the reference the parity tests compare against
    (tests/models/test_decoder.py), including its conventions (rotate-half RoPE, OPT's position offset 2).

One layer, for x: [B, S, D] and the causal-and-padding mask:

    x = x + dropout(Attention(N(x) W_q, N(x) W_k, N(x) W_v) W_o)
    x = x + dropout(FFN(N(x))),   FFN(h) = (silu(h W_gate) ⊙ h W_up) W_down   (Llama)
                                  FFN(h) = relu(h W_1) W_2                    (OPT)

followed by a final norm. Parameters:

    {"embeddings": {"word": [V, D], "position": [P + 2, D] (OPT)},
     "layers": [{"attn_norm", "query", "key", "value", "attn_out", "ffn_norm", and "gate", "up", "down" (Llama)
                 or "ffn_in", "ffn_out" (OPT)}, ...],
     "final_norm": {scale, bias (OPT)}, "lm_head": {kernel [D, V]} (only when not tied to the word embedding)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.models.layers import (AdapterOptions, CheckpointEntry, Init, activation, attention, dense, dense_entries,
                                   dropout, init_dense, init_norm, layer_norm, materialize, norm_entries, rematerialized,
                                   rms_norm, split_key)

Params = dict[str, Any]
DECODER_ARCHS = ("llama", "opt")
OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 extra rows; position p reads row p + 2


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and behaviour of a Llama- or OPT-layout decoder."""
    arch: Literal["llama", "opt"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    num_kv_heads: int | None = None    # grouped-query attention (Llama); None: num_heads (see `kv_heads`)
    head_dim: int | None = None        # None: hidden_size // num_heads (see `head_size`)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0        # Llama only
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # OPT: True
    mlp_bias: bool = False             # OPT: True
    pad_token_id: int | None = None
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self):
        if self.arch not in DECODER_ARCHS:
            raise InputError(f"decoder arch {self.arch!r} is not one of {DECODER_ARCHS}")
        if self.num_heads % self.kv_heads:
            raise InputError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        activation(self.activation)

    # Derived rather than filled in, so that `dataclasses.replace(config, num_heads=...)` stays consistent.
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim


def init(config: DecoderConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> Params:
    """Random parameters (N(0, 0.02²) weights, zero biases, unit norms), in `dtype` (the frozen base's dtype)."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_size
    q_dim, kv_dim = config.num_heads * hd, config.kv_heads * hd
    opt = config.arch == "opt"
    attn = lambda i, o: init_dense(i, o, bias=config.attention_bias)
    mlp = lambda i, o: init_dense(i, o, bias=config.mlp_bias)
    layer = {"attn_norm": init_norm(d, bias=opt), "query": attn(d, q_dim), "key": attn(d, kv_dim),
             "value": attn(d, kv_dim), "attn_out": attn(q_dim, d), "ffn_norm": init_norm(d, bias=opt)}
    if opt:
        layer.update(ffn_in=mlp(d, f), ffn_out=mlp(f, d))
    else:
        layer.update(gate=mlp(d, f), up=mlp(d, f), down=mlp(f, d))
    embeddings = {"word": Init((config.vocab_size, d))}
    if opt:
        embeddings["position"] = Init((config.max_positions + OPT_POSITION_OFFSET, d))
    spec = {"embeddings": embeddings, "layers": [layer] * config.num_layers, "final_norm": init_norm(d, bias=opt)}
    if not config.tie_word_embeddings:
        spec["lm_head"] = init_dense(d, config.vocab_size, bias=False)
    return materialize(spec, key, dtype=dtype)


def default_position_ids(attention_mask: jax.Array, config: DecoderConfig) -> jax.Array:
    """Hugging Face's default positions [B, S]: 0..S−1 for Llama; for OPT the running count of attended tokens
    minus one (−1 on left padding), so that left- and right-padded sequences get the same positions."""
    if config.arch == "llama":
        return jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)
    m = attention_mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate-half convention: x cos(pθ) + rotate_half(x) sin(pθ).

    x: [B, S, H, d]; positions: [B, S]; frequencies θ_i = theta^(−2i/d), angles in fp32, product in x's dtype.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                   # [B, S, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]              # [B, S, 1, d]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def layer(p: Params, x: jax.Array, mask: jax.Array, positions: jax.Array, *, config: DecoderConfig,
          adapter: AdapterOptions = AdapterOptions(), key: jax.Array | None = None) -> jax.Array:
    """One pre-norm decoder layer (module docstring). x: [B, S, D]; mask: [B, 1, S, S] boolean; positions: [B, S]."""
    b, s, _ = x.shape
    norm = ((lambda q, h: rms_norm(q, h, config.norm_eps)) if config.arch == "llama"
            else (lambda q, h: layer_norm(q, h, config.norm_eps)))
    ks = split_key(key, 10)
    h = norm(p["attn_norm"], x)
    q = dense(p["query"], h, adapter=adapter, key=ks[0]).reshape(b, s, config.num_heads, config.head_size)
    k = dense(p["key"], h, adapter=adapter, key=ks[1]).reshape(b, s, config.kv_heads, config.head_size)
    v = dense(p["value"], h, adapter=adapter, key=ks[2]).reshape(b, s, config.kv_heads, config.head_size)
    if config.arch == "llama":
        q, k = rotary(q, positions, config.rope_theta), rotary(k, positions, config.rope_theta)
    a = attention(q, k, v, mask, dropout_rate=config.attention_dropout, key=ks[3]).reshape(b, s, -1)
    x = x + dropout(dense(p["attn_out"], a, adapter=adapter, key=ks[4]), config.hidden_dropout, ks[5])
    h = norm(p["ffn_norm"], x)
    if config.arch == "llama":
        gate = activation(config.activation)(dense(p["gate"], h, adapter=adapter, key=ks[6]))
        f = dense(p["down"], gate * dense(p["up"], h, adapter=adapter, key=ks[7]), adapter=adapter, key=ks[8])
    else:
        f = activation(config.activation)(dense(p["ffn_in"], h, adapter=adapter, key=ks[6]))
        f = dense(p["ffn_out"], f, adapter=adapter, key=ks[7])
    return x + dropout(f, config.hidden_dropout, ks[9])


def apply(params: Params, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array | None = None,
          *, config: DecoderConfig, adapter: AdapterOptions = AdapterOptions(), key: jax.Array | None = None,
          remat: str | None = None) -> jax.Array:
    """Final-norm hidden states [B, S, D] (Hugging Face's `last_hidden_state`) for ids [B, S] and mask [B, S].

    Position i attends to positions j ≤ i with attention_mask[j] = 1. `position_ids` default to
    `default_position_ids`. Adapters merged into `params` apply in every dense node; `key` turns dropout on;
    `remat` ("full", "dots") rematerializes each layer under backprop (`layers.rematerialized`).
    """
    positions = default_position_ids(attention_mask, config) if position_ids is None else position_ids
    emb = params["embeddings"]
    x = emb["word"][input_ids]
    if config.arch == "opt":
        x = x + emb["position"][positions + OPT_POSITION_OFFSET]
    s = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    one_layer = rematerialized(lambda p, x, k: layer(p, x, mask, positions, config=config, adapter=adapter, key=k),
                               remat)
    for p, k in zip(params["layers"], split_key(key, len(params["layers"]))):
        x = one_layer(p, x, k)
    final = rms_norm if config.arch == "llama" else layer_norm
    return final(params["final_norm"], x, config.norm_eps)


def output_embedding(params: Params, config: DecoderConfig) -> jax.Array:
    """The LM head as [V, D]: the tied word embedding, or the `lm_head` kernel transposed."""
    if config.tie_word_embeddings:
        return params["embeddings"]["word"]
    if "lm_head" not in params:
        raise InputError("this decoder has no LM head (its checkpoint had no lm_head.weight)")
    return params["lm_head"]["kernel"].T


def lm_logits(params: Params, hidden: jax.Array, *, config: DecoderConfig) -> jax.Array:
    """Next-token logits [B, S, V] = hidden [B, S, D] · E_outᵀ, in fp32."""
    return jnp.einsum("bsd,vd->bsv", hidden, output_embedding(params, config), preferred_element_type=jnp.float32)


def checkpoint_names(config: DecoderConfig) -> tuple[str, list[CheckpointEntry]]:
    """(anchor, entries): every tensor of the base model in Hugging Face naming (prefix-free; the anchor is the
    word embedding, used by `spryjax.models.hf` to find the prefix such as "model.decoder."), in spryjax's tree
    paths. The LM head of an untied decoder is named from the checkpoint root ("lm_head.weight") by the loader."""
    entries: list[CheckpointEntry] = []
    anchor = "embed_tokens.weight"
    entries.append(CheckpointEntry(anchor, ("embeddings", "word"), False))
    opt = config.arch == "opt"
    if opt:
        entries.append(CheckpointEntry("embed_positions.weight", ("embeddings", "position"), False))
    for i in range(config.num_layers):
        hf, at = f"layers.{i}", ("layers", i)
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                             ("attn_out", "out_proj" if opt else "o_proj")):
            entries += dense_entries(f"{hf}.self_attn.{theirs}", (*at, ours), config.attention_bias)
        if opt:
            entries += [*norm_entries(f"{hf}.self_attn_layer_norm", (*at, "attn_norm")),
                        *norm_entries(f"{hf}.final_layer_norm", (*at, "ffn_norm")),
                        *dense_entries(f"{hf}.fc1", (*at, "ffn_in")), *dense_entries(f"{hf}.fc2", (*at, "ffn_out"))]
        else:
            entries += [*norm_entries(f"{hf}.input_layernorm", (*at, "attn_norm"), False),
                        *norm_entries(f"{hf}.post_attention_layernorm", (*at, "ffn_norm"), False)]
            for ours in ("gate", "up", "down"):
                entries += dense_entries(f"{hf}.mlp.{ours}_proj", (*at, ours), config.mlp_bias)
    entries += norm_entries("final_layer_norm" if opt else "norm", ("final_norm",), opt)
    return anchor, entries
