"""Bidirectional transformer encoders with the BERT layout: BERT, RoBERTa, MiniLM, DistilBERT (post-LayerNorm).

References:
  - Devlin et al. "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding" (2019).
  - Liu et al. "RoBERTa: A Robustly Optimized BERT Pretraining Approach" (2019): same layout, positions counted
    from padding_idx + 1 over non-padding tokens, one token type.
  - Wang et al. "MiniLM" (2020) and Sanh et al. "DistilBERT" (2019): the same layout with fewer/smaller layers.
  - Hugging Face transformers' BertModel / RobertaModel / DistilBertModel: the reference implementation the
    parity tests compare against (tests/models/test_encoder.py).

One layer, for x: [B, S, D] and padding mask m: [B, S]:

    a = Attention(x W_q, x W_k, x W_v; m) W_o;   x = LN(x + dropout(a))
    f = act(x W_1) W_2;                          x = LN(x + dropout(f))

Parameters are a nested dict; `layers` is a Python list of per-layer dicts so that the layer order is explicit
(Spry deals tensors to clients in this order) and adapters can sit beside each dense node:

    {"embeddings": {"word": [V, D], "position": [P, D], "token_type": [T, D] (T > 0), "norm": {scale, bias}},
     "layers": [{"query", "key", "value", "attn_out", "ffn_in", "ffn_out": {kernel [in, out], bias},
                 "attn_out_norm", "ffn_out_norm": {scale, bias}}, ...],
     "pooler": {kernel [D, D], bias} (BERT checkpoints that have one)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.models.layers import (AdapterOptions, CheckpointEntry, Init, activation, attention, dense, dense_entries,
                                   dropout, init_dense, init_norm, layer_norm, materialize, norm_entries, rematerialized,
                                   split_key)

Params = dict[str, Any]
ENCODER_ARCHS = ("bert", "roberta", "distilbert")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape and behaviour of a BERT-layout encoder (fields named after Hugging Face's BertConfig)."""
    arch: Literal["bert", "roberta", "distilbert"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2           # 0: no token-type embedding (DistilBERT)
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0              # RoBERTa counts positions from pad_token_id + 1
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pooler: bool = True                # a BERT pooler (dense + tanh on the first token) is part of the base

    def __post_init__(self):
        if self.arch not in ENCODER_ARCHS:
            raise InputError(f"encoder arch {self.arch!r} is not one of {ENCODER_ARCHS}")
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        activation(self.activation)


def init(config: EncoderConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> Params:
    """Random parameters (N(0, 0.02²) weights, zero biases, unit norms), in `dtype` (the frozen base's dtype)."""
    d, f = config.hidden_size, config.intermediate_size
    embeddings = {"word": Init((config.vocab_size, d)), "position": Init((config.max_positions, d))}
    if config.type_vocab_size:
        embeddings["token_type"] = Init((config.type_vocab_size, d))
    embeddings["norm"] = init_norm(d)
    layer = {"query": init_dense(d, d), "key": init_dense(d, d), "value": init_dense(d, d),
             "attn_out": init_dense(d, d), "attn_out_norm": init_norm(d), "ffn_in": init_dense(d, f),
             "ffn_out": init_dense(f, d), "ffn_out_norm": init_norm(d)}
    spec = {"embeddings": embeddings, "layers": [layer] * config.num_layers}
    if config.pooler:
        spec["pooler"] = init_dense(d, d)
    return materialize(spec, key, dtype=dtype)


def position_ids(input_ids: jax.Array, config: EncoderConfig) -> jax.Array:
    """[B, S] positions: 0..S−1, or for RoBERTa pad_token_id + (running count of non-padding tokens), pad on padding.

    RoBERTa decides padding from the token ids, not the attention mask (as Hugging Face does).
    """
    if config.arch != "roberta":
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    real = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + config.pad_token_id


def embed(params: Params, input_ids: jax.Array, token_type_ids: jax.Array | None, *, config: EncoderConfig,
          key: jax.Array | None = None) -> jax.Array:
    """LN(E_word[ids] + E_pos[positions] + E_type[types]), dropout: [B, S] -> [B, S, D] in the embeddings' dtype."""
    emb = params["embeddings"]
    x = emb["word"][input_ids] + emb["position"][position_ids(input_ids, config)]
    if "token_type" in emb:
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = x + emb["token_type"][types]
    return dropout(layer_norm(emb["norm"], x, config.layer_norm_eps), config.hidden_dropout, key)


def layer(p: Params, x: jax.Array, mask: jax.Array, *, config: EncoderConfig,
          adapter: AdapterOptions = AdapterOptions(), key: jax.Array | None = None) -> jax.Array:
    """One post-LN encoder layer (module docstring). x: [B, S, D]; mask: [B, 1, 1, S] boolean."""
    b, s, d = x.shape
    heads = lambda t: t.reshape(b, s, config.num_heads, d // config.num_heads)
    ks = split_key(key, 9)
    q = heads(dense(p["query"], x, adapter=adapter, key=ks[0]))
    k = heads(dense(p["key"], x, adapter=adapter, key=ks[1]))
    v = heads(dense(p["value"], x, adapter=adapter, key=ks[2]))
    a = attention(q, k, v, mask, dropout_rate=config.attention_dropout, key=ks[3]).reshape(b, s, d)
    a = dropout(dense(p["attn_out"], a, adapter=adapter, key=ks[4]), config.hidden_dropout, ks[5])
    x = layer_norm(p["attn_out_norm"], x + a, config.layer_norm_eps)
    f = activation(config.activation)(dense(p["ffn_in"], x, adapter=adapter, key=ks[6]))
    f = dropout(dense(p["ffn_out"], f, adapter=adapter, key=ks[7]), config.hidden_dropout, ks[8])
    return layer_norm(p["ffn_out_norm"], x + f, config.layer_norm_eps)


def apply(params: Params, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None,
          *, config: EncoderConfig, adapter: AdapterOptions = AdapterOptions(), key: jax.Array | None = None,
          remat: str | None = None) -> jax.Array:
    """Last hidden states [B, S, D] (Hugging Face's `last_hidden_state`) for token ids [B, S] and mask [B, S].

    Adapter leaves merged into `params` (spryjax.peft.merge) are applied in every dense node; `key` turns on
    dropout (hidden, attention and LoRA), None is deterministic (evaluation, parity tests). `remat` ("full",
    "dots") rematerializes each layer under backprop (`layers.rematerialized`).
    """
    k_emb, k_layers = split_key(key, 2)
    one_layer = rematerialized(lambda p, x, mask, k: layer(p, x, mask, config=config, adapter=adapter, key=k), remat)
    x = embed(params, input_ids, token_type_ids, config=config, key=k_emb)
    mask = attention_mask.astype(bool)[:, None, None, :]
    layer_keys = split_key(k_layers, len(params["layers"]))
    for p, k in zip(params["layers"], layer_keys):
        x = one_layer(p, x, mask, k)
    return x


def checkpoint_names(config: EncoderConfig) -> tuple[str, list[CheckpointEntry]]:
    """(anchor, entries): every tensor of the base model in Hugging Face naming (prefix-free; the anchor is the
    word embedding, used by `spryjax.models.hf` to find the prefix such as "bert."), in spryjax's tree paths."""
    entries: list[CheckpointEntry] = []
    if config.arch == "distilbert":
        anchor = "embeddings.word_embeddings.weight"
        entries += [CheckpointEntry(anchor, ("embeddings", "word"), False),
                    CheckpointEntry("embeddings.position_embeddings.weight", ("embeddings", "position"), False),
                    *norm_entries("embeddings.LayerNorm", ("embeddings", "norm"))]
        for i in range(config.num_layers):
            hf, at = f"transformer.layer.{i}", ("layers", i)
            for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin"), ("attn_out", "out_lin")):
                entries += dense_entries(f"{hf}.attention.{theirs}", (*at, ours))
            entries += [*norm_entries(f"{hf}.sa_layer_norm", (*at, "attn_out_norm")),
                        *dense_entries(f"{hf}.ffn.lin1", (*at, "ffn_in")),
                        *dense_entries(f"{hf}.ffn.lin2", (*at, "ffn_out")),
                        *norm_entries(f"{hf}.output_layer_norm", (*at, "ffn_out_norm"))]
        return anchor, entries
    anchor = "embeddings.word_embeddings.weight"
    entries += [CheckpointEntry(anchor, ("embeddings", "word"), False),
                CheckpointEntry("embeddings.position_embeddings.weight", ("embeddings", "position"), False)]
    if config.type_vocab_size:
        entries.append(CheckpointEntry("embeddings.token_type_embeddings.weight", ("embeddings", "token_type"),
                                       False))
    entries += norm_entries("embeddings.LayerNorm", ("embeddings", "norm"))
    for i in range(config.num_layers):
        hf, at = f"encoder.layer.{i}", ("layers", i)
        for ours in ("query", "key", "value"):
            entries += dense_entries(f"{hf}.attention.self.{ours}", (*at, ours))
        entries += [*dense_entries(f"{hf}.attention.output.dense", (*at, "attn_out")),
                    *norm_entries(f"{hf}.attention.output.LayerNorm", (*at, "attn_out_norm")),
                    *dense_entries(f"{hf}.intermediate.dense", (*at, "ffn_in")),
                    *dense_entries(f"{hf}.output.dense", (*at, "ffn_out")),
                    *norm_entries(f"{hf}.output.LayerNorm", (*at, "ffn_out_norm"))]
    if config.pooler:
        entries += dense_entries("pooler.dense", ("pooler",))
    return anchor, entries
