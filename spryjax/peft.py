"""Parameter-efficient finetuning: LoRA, IA3, BitFit and classifier-only, as a trainable pytree kept apart from the
frozen model (`spryjax.lm_tasks` wires model, head and adapters into one `logits_fn`).

References:
  - Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models" (2021): W x + (α/r) B A x with A random, B = 0.
  - Liu et al. "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (2022):
    IA3 rescales keys, values and the feed-forward activation by learned vectors initialised to one.
  - Ben Zaken et al. "BitFit: Simple Parameter-efficient Fine-tuning" (2022): only the bias terms train.
  - Panchal et al. "Thinking Forward" (Spry, NeurIPS 2024): LoRA r=1, α=1, dropout 0.1 on RoBERTa-large / Llama2 /
    OPT, classifier head trainable; the server deals the trainable tensors to clients in layer order, LoRA A before
    B, head last (`ordered_leaves`). The PEFT ablation compares LoRA, IA3, BitFit and classifier-only.

The trainable tree mirrors the frozen tree's structure but holds only adapter leaves, e.g. for LoRA on query/value:

    {"layers": [{"query": {"lora_a": [D, r], "lora_b": [r, D]}, "value": {...}}, ...], "head": {...}}

`merge(frozen, trainable)` is a structural union (no array is copied), and the model's `dense` applies whatever
adapter leaves sit beside a kernel on the fly. Adapters are never folded into W: a merged W + (α/r) A B would make the
jvp tangent, and so forward-mode activation memory, as large as the weight. Gradient estimators therefore see only
the trainable tree: `fwdgrad.forward_grad(loss, trainable, key, frozen, batch)`.

Adapters are fp32 whatever the base dtype (they are cast to the activation dtype where used).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Literal

import jax
import jax.numpy as jnp

from spryjax.errors import InputError
from spryjax.models.layers import AdapterOptions
from spryjax.pytrees import count_params, leaf_paths

PyTree = Any
Params = dict[str, Any]
METHODS = ("lora", "ia3", "bitfit", "classifier")
DEFAULT_TARGETS = {"lora": ("query", "value"), "ia3": ("key", "value", "ffn_out", "down")}
FEEDFORWARD_DOWN = ("ffn_out", "down")  # IA3 scales their input (the activation), not their output
# Hugging Face module names (peft's target_modules) -> spryjax's.
TARGET_ALIASES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attn_out",
                  "out_proj": "attn_out", "q_lin": "query", "k_lin": "key", "v_lin": "value", "out_lin": "attn_out",
                  "fc1": "ffn_in", "fc2": "ffn_out", "lin1": "ffn_in", "lin2": "ffn_out", "gate_proj": "gate",
                  "up_proj": "up", "down_proj": "down"}
# Module order of a layer and of the model, for `ordered_leaves`: the order the forward pass meets them
# (pre-norm decoders: attn_norm, ffn_norm; post-norm encoders: attn_out_norm, ffn_out_norm). Inside a node:
# weights, then adapters, LoRA A before B.
ORDER = {name: i for i, name in enumerate((
    "embeddings", "word", "position", "token_type", "norm", "layers",
    "attn_norm", "query", "key", "value", "attn_out", "attn_out_norm",
    "ffn_norm", "gate", "up", "ffn_in", "down", "ffn_out", "ffn_out_norm",
    "final_norm", "pooler", "lm_head", "head", "dense", "out",
    "kernel", "scale", "bias", "ia3_in", "ia3_out", "lora_a", "lora_b"))}


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Which parameters train. Defaults are Spry's: LoRA r = 1, α = 1, dropout 0.1 on query and value.

    method: "lora" | "ia3" | "bitfit" | "classifier" (the head only).
    target_modules: modules of each layer that get adapters (LoRA, IA3), spryjax names ("query", "value", ...) or
      Hugging Face ones ("q_proj", ...); None is the method's default (IA3: key, value and the FFN down projection).
    train_head: the task head trains with every method; False freezes it (at its initialisation).
    """
    method: Literal["lora", "ia3", "bitfit", "classifier"] = "lora"
    rank: int = 1
    alpha: float = 1.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    train_head: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"peft method {self.method!r} is not one of {METHODS}")
        if self.rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.method == "classifier" and not self.train_head:
            raise InputError("peft method 'classifier' with train_head=False trains nothing")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


def adapter_options(peft_config: PeftConfig) -> AdapterOptions:
    """What the model's dense layers need to apply the adapters: LoRA's α/r and dropout."""
    if peft_config.method != "lora":
        return AdapterOptions()
    return AdapterOptions(lora_scale=peft_config.alpha / peft_config.rank, lora_dropout=peft_config.dropout)


def target_modules(params: Params, peft_config: PeftConfig) -> tuple[str, ...]:
    """The dense modules of each layer that get adapters, validated against the model."""
    if peft_config.method not in DEFAULT_TARGETS:
        return ()
    dense_modules = [name for name, node in params["layers"][0].items() if "kernel" in node]
    if peft_config.target_modules is None:
        return tuple(m for m in DEFAULT_TARGETS[peft_config.method] if m in dense_modules)
    targets = tuple(TARGET_ALIASES.get(m, m) for m in peft_config.target_modules)
    for given, name in zip(peft_config.target_modules, targets):
        if name not in dense_modules:
            raise InputError(f"peft target module {given!r} is not in the model (its modules: "
                             f"{', '.join(dense_modules)})")
    return targets


# ----------------------------------------------------------------------------------------------------------------
# Trainable tree


def _lora(node: Params, rank: int, key: jax.Array) -> Params:
    """A ~ U(−1/√in, 1/√in) (PyTorch's kaiming_uniform(a=√5), as in Hugging Face peft), B = 0, both fp32."""
    fan_in, fan_out = node["kernel"].shape
    bound = 1.0 / math.sqrt(fan_in)
    return {"lora_a": jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound),
            "lora_b": jnp.zeros((rank, fan_out), jnp.float32)}


def _ia3(node: Params, name: str) -> Params:
    fan_in, fan_out = node["kernel"].shape
    if name in FEEDFORWARD_DOWN:
        return {"ia3_in": jnp.ones((fan_in,), jnp.float32)}
    return {"ia3_out": jnp.ones((fan_out,), jnp.float32)}


def _biases(tree: PyTree) -> PyTree | None:
    """The sub-tree of every "bias" leaf (fp32), or None where there is none."""
    if isinstance(tree, list):
        return [_biases(t) or {} for t in tree] if tree else None
    if not isinstance(tree, dict):
        return None
    out = {}
    for name, sub in tree.items():
        if name == "bias":
            out[name] = sub.astype(jnp.float32)
        elif (found := _biases(sub)) is not None:
            out[name] = found
    return out or None


def init_trainable(params: Params, peft_config: PeftConfig, key: jax.Array) -> Params:
    """The trainable tree for `params` (a base model tree, with a "head" if the task has one).

        lora:       {"layers": [{m: {"lora_a": [in, r], "lora_b": [r, out]} for m in targets}, ...]}
        ia3:        {"layers": [{m: {"ia3_out": ones [out]} or {"ia3_in": ones [in]} (FFN down)}, ...]}
        bitfit:     every "bias" of the base (dense and norm), cast to fp32
        classifier: nothing but the head
    plus {"head": params["head"]} when `peft_config.train_head`. Works on ShapeDtypeStructs under `jax.eval_shape`.
    """
    method, trainable = peft_config.method, {}
    targets = target_modules(params, peft_config)
    if method in ("lora", "ia3"):
        layer_keys = jax.random.split(key, len(params["layers"]))
        layers = []
        for layer, layer_key in zip(params["layers"], layer_keys):
            module_keys = jax.random.split(layer_key, len(targets))
            layers.append({m: _lora(layer[m], peft_config.rank, k) if method == "lora" else _ia3(layer[m], m)
                           for m, k in zip(targets, module_keys)})
        trainable["layers"] = layers
    elif method == "bitfit":
        trainable.update(_biases({k: v for k, v in params.items() if k != "head"}) or {})
    if peft_config.train_head and "head" in params:
        trainable["head"] = jax.tree.map(lambda x: x.astype(jnp.float32), params["head"])
    if not jax.tree.leaves(trainable):
        raise InputError(f"peft method {method!r} finds nothing to train in this model")
    return trainable


def _without(tree: PyTree, removed: PyTree) -> PyTree:
    """`tree` minus the leaves at the paths of `removed`'s leaves (drops emptied dicts)."""
    if isinstance(tree, list):
        return [_without(t, r) for t, r in zip(tree, removed)]
    out = {}
    for name, sub in tree.items():
        if name not in removed:
            out[name] = sub
        elif isinstance(sub, (dict, list)):
            if (kept := _without(sub, removed[name])) or isinstance(sub, list):
                out[name] = kept
    return out


def split(params: Params, peft_config: PeftConfig, key: jax.Array) -> tuple[Params, Params]:
    """(frozen, trainable): `init_trainable`, and `params` without the leaves that moved to the trainable tree
    (BitFit's biases, the head), so that no value is held twice. `merge(frozen, trainable)` gives the model tree."""
    trainable = init_trainable(params, peft_config, key)
    return _without(params, trainable), trainable


def merge(frozen: PyTree, trainable: PyTree) -> PyTree:
    """The structural union of two trees, `trainable` winning where both have a leaf. No array is copied: the
    result holds the very arrays (or tracers) of its inputs, so this is free inside jit and jvp."""
    if isinstance(frozen, list) and isinstance(trainable, list):
        if len(frozen) != len(trainable):
            raise ValueError(f"merge: lists of {len(frozen)} and {len(trainable)} layers")
        return [merge(f, t) for f, t in zip(frozen, trainable)]
    if isinstance(frozen, dict) and isinstance(trainable, dict):
        return {**frozen, **{k: merge(frozen[k], v) if k in frozen else v for k, v in trainable.items()}}
    return trainable


# ----------------------------------------------------------------------------------------------------------------
# Layer order and counts


def _ordered(tree: PyTree, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(tree, list):
        for i, sub in enumerate(tree):
            yield from _ordered(sub, f"{prefix}{i}/")
    elif isinstance(tree, dict):
        unknown = [k for k in tree if k not in ORDER]
        if unknown:
            raise ValueError(f"ordered_leaves: no place in the layer order for {prefix}{unknown[0]}")
        for name in sorted(tree, key=ORDER.__getitem__):
            yield from _ordered(tree[name], f"{prefix}{name}/")
    elif tree is not None:
        yield prefix[:-1], tree


def ordered_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """[(path, leaf)] in the order the forward pass meets them: embeddings, layer 0 .. L−1 (attention norm, query,
    key, value, attention output, feed-forward, in that order), final norm, pooler, LM head, task head; inside a
    node weights before adapters and LoRA A before B. Paths read "layers/3/query/lora_a".

    `jax.tree.leaves` sorts dict keys alphabetically (and optax returns such trees), which is not this order:
    Spry deals tensors to clients by this list.
    """
    return list(_ordered(tree, ""))


def paths_mask(tree: PyTree, paths: Iterable[str]) -> PyTree:
    """A boolean pytree like `tree`, True at the leaves whose `ordered_leaves` path is in `paths` (for
    `fwdgrad.forward_grad(mask=...)`: e.g. one client's chunk of Spry's ordered tensors)."""
    wanted = set(paths)
    known = {path for path, _ in ordered_leaves(tree)}
    if wanted - known:
        raise ValueError(f"paths_mask: {sorted(wanted - known)[0]!r} is not a leaf path of the tree")
    masks = [path in wanted for path in leaf_paths(tree)]
    return jax.tree.unflatten(jax.tree.structure(tree), masks)


def summary(frozen: PyTree, trainable: PyTree) -> str:
    """A small table of frozen and trainable parameter counts per top-level group, and the trainable share."""
    groups = sorted(set(frozen) | set(trainable), key=lambda k: ORDER.get(k, len(ORDER)))
    rows = [f"{'':12s} {'frozen':>14s} {'trainable':>12s}"]
    for g in groups:
        rows.append(f"{g:12s} {count_params(frozen.get(g, {})):>14,d} {count_params(trainable.get(g, {})):>12,d}")
    n_frozen, n_train = count_params(frozen), count_params(trainable)
    rows.append(f"{'total':12s} {n_frozen:>14,d} {n_train:>12,d}  "
                f"({100 * n_train / max(n_frozen + n_train, 1):.3f}% trainable)")
    return "\n".join(rows)
