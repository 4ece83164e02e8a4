"""Pure-function language models over nested-dict parameter pytrees (transformers 5.x has no Flax models, so
spryjax owns them): the BERT-layout encoder family and the Llama/OPT decoder family, task heads, and loading of
Hugging Face checkpoints (`spryjax.models.hf`).

References: see `encoder.py` (BERT, RoBERTa, MiniLM, DistilBERT), `decoder.py` (Llama 2, OPT), `heads.py`.

    params = init(config, key, dtype=jnp.bfloat16)                # or hf.load_pretrained(folder).params
    hidden = apply(params, {"input_ids": ids, "attention_mask": m}, config=config)   # [B, S, D]

`PRESETS` holds the shapes of the paper's models (and tiny ones) for compile-only work such as
`scripts/bench_memory.py`: `jax.eval_shape(init, ...)` gives their parameters without allocating them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.models import decoder, encoder
from spryjax.models.decoder import DecoderConfig
from spryjax.models.encoder import EncoderConfig
from spryjax.models.layers import AdapterOptions

ModelConfig = EncoderConfig | DecoderConfig
Params = dict[str, Any]

PRESETS: dict[str, ModelConfig] = {
    "tiny": EncoderConfig(arch="bert", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                          intermediate_size=128, max_positions=128),
    "minilm-l6": EncoderConfig(arch="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                               intermediate_size=1536, max_positions=512),
    # RobertaForSequenceClassification drops the pooler, so the preset has none.
    "roberta-large": EncoderConfig(arch="roberta", vocab_size=50265, hidden_size=1024, num_layers=24, num_heads=16,
                                   intermediate_size=4096, max_positions=514, type_vocab_size=1,
                                   layer_norm_eps=1e-5, pad_token_id=1, pooler=False),
    "tiny-llama": DecoderConfig(arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=128, max_positions=128),
    "llama2-7b": DecoderConfig(arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                               intermediate_size=11008, max_positions=4096, pad_token_id=0),
    "tiny-opt": DecoderConfig(arch="opt", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_positions=128, activation="relu", tie_word_embeddings=True,
                              attention_bias=True, mlp_bias=True, pad_token_id=1, hidden_dropout=0.1),
    "opt-6.7b": DecoderConfig(arch="opt", vocab_size=50272, hidden_size=4096, num_layers=32, num_heads=32,
                              intermediate_size=16384, max_positions=2048, activation="relu",
                              tie_word_embeddings=True, attention_bias=True, mlp_bias=True, pad_token_id=1,
                              hidden_dropout=0.1),
    "opt-13b": DecoderConfig(arch="opt", vocab_size=50272, hidden_size=5120, num_layers=40, num_heads=40,
                             intermediate_size=20480, max_positions=2048, activation="relu",
                             tie_word_embeddings=True, attention_bias=True, mlp_bias=True, pad_token_id=1,
                             hidden_dropout=0.1),
}


def preset(name: str) -> ModelConfig:
    """The config of a preset shape (no weights), e.g. `preset("roberta-large")`."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def config_from_dict(fields: Mapping[str, Any]) -> ModelConfig:
    """A config from a plain or ml-collections dict whose "arch" picks the family ("bert", "roberta",
    "distilbert" -> EncoderConfig; "llama", "opt" -> DecoderConfig); other keys are the config's fields."""
    fields = dict(fields.to_dict() if hasattr(fields, "to_dict") else fields)
    arch = fields.get("arch")
    cls = EncoderConfig if arch in encoder.ENCODER_ARCHS else DecoderConfig if arch in decoder.DECODER_ARCHS else None
    if cls is None:
        raise InputError(f"model arch {arch!r} is not one of {encoder.ENCODER_ARCHS + decoder.DECODER_ARCHS}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise InputError(f"model config for arch {arch!r} has no field {unknown[0]!r} "
                         f"(fields: {', '.join(sorted(known))})")
    return cls(**fields)


def is_decoder(config: ModelConfig) -> bool:
    """True for the causal decoder family (Llama, OPT), False for encoders."""
    return isinstance(config, DecoderConfig)


def init(config: ModelConfig, key: jax.Array, *, dtype: Any = jnp.float32) -> Params:
    """Random base parameters of either family in `dtype` (bf16 or fp32)."""
    return (decoder if is_decoder(config) else encoder).init(config, key, dtype=dtype)


def apply(params: Params, batch: Mapping[str, jax.Array], *, config: ModelConfig,
          adapter: AdapterOptions = AdapterOptions(), key: jax.Array | None = None,
          remat: str | None = None) -> jax.Array:
    """Hidden states [B, S, D] for `batch` = {"input_ids": [B, S], "attention_mask": [B, S], optional
    "token_type_ids" (encoders) or "position_ids" (decoders)}; `key` None is deterministic; `remat` rematerializes
    each layer under backprop ("full" or "dots", see `layers.rematerialized`)."""
    if is_decoder(config):
        return decoder.apply(params, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                             config=config, adapter=adapter, key=key, remat=remat)
    return encoder.apply(params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                         config=config, adapter=adapter, key=key, remat=remat)
