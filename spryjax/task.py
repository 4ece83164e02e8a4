"""A supervised problem as two pure functions, the contract between models and every trainer (centralized or
federated, backprop or forward gradient).

    loss(trainable, frozen, batch, key) -> scalar
        the mean loss over the batch's real examples: Σ_i m_i ℓ_i / max(Σ_i m_i, 1), m = batch["mask"];
        `key` drives dropout and is None for a deterministic pass.
    evaluate(trainable, frozen, batch) -> {name: sum over the batch's real examples}
        always includes "count" (Σ m_i); sums add up across batches and clients, `summarize` turns them into
        means, accuracy, F1.

`trainable` is what gradients are taken of (adapters, a head, a whole small model); `frozen` is everything else
(a pretrained base); either may be an empty dict. A batch is a dict of arrays with a leading example axis.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class Task(NamedTuple):
    loss: Callable[[PyTree, PyTree, dict, jax.Array | None], jax.Array]
    evaluate: Callable[[PyTree, PyTree, dict], dict[str, jax.Array]]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ m v / max(Σ m, 1): the mean over real examples (0 for an all-padding batch)."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_task(logits_fn: Callable[..., jax.Array], num_classes: int, *,
                        label_key: str = "label") -> Task:
    """Softmax cross-entropy classification from `logits_fn(trainable, frozen, batch, key) -> [B, num_classes]`.

    evaluate() returns sums: count, loss, correct, and the confusion matrix [true, predicted] from which
    `summarize` derives accuracy and per-class / weighted F1.
    """
    def per_example(trainable, frozen, batch, key):
        logits = logits_fn(trainable, frozen, batch, key).astype(jnp.float32)
        return logits, optax.softmax_cross_entropy_with_integer_labels(logits, batch[label_key])

    def loss(trainable, frozen, batch, key=None):
        return masked_mean(per_example(trainable, frozen, batch, key)[1], batch["mask"])

    def evaluate(trainable, frozen, batch):
        logits, losses = per_example(trainable, frozen, batch, None)
        mask = batch["mask"]
        predicted = jnp.argmax(logits, -1)
        confusion = jnp.zeros((num_classes, num_classes)).at[batch[label_key], predicted].add(mask)
        return {"count": jnp.sum(mask), "loss": jnp.sum(losses * mask),
                "correct": jnp.sum((predicted == batch[label_key]) * mask), "confusion": confusion}

    return Task(loss, evaluate)


def regression_task(predict_fn: Callable[..., jax.Array], *, label_key: str = "label") -> Task:
    """Mean-squared-error regression from `predict_fn(trainable, frozen, batch, key) -> [B]`.

    evaluate() returns the sums behind MAE and Pearson correlation (Σŷ, Σy, Σŷy, Σŷ², Σy²).
    """
    def loss(trainable, frozen, batch, key=None):
        error = predict_fn(trainable, frozen, batch, key).astype(jnp.float32) - batch[label_key]
        return masked_mean(error ** 2, batch["mask"])

    def evaluate(trainable, frozen, batch):
        pred = predict_fn(trainable, frozen, batch, None).astype(jnp.float32)
        y, m = batch[label_key].astype(jnp.float32), batch["mask"]
        s = lambda v: jnp.sum(v * m)
        return {"count": jnp.sum(m), "loss": s((pred - y) ** 2), "abs_error": s(jnp.abs(pred - y)),
                "pred": s(pred), "target": s(y), "pred_target": s(pred * y), "pred_sq": s(pred ** 2),
                "target_sq": s(y ** 2)}

    return Task(loss, evaluate)


def summarize(sums: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Turns summed evaluation outputs into metrics: loss (mean), accuracy, macro/weighted/per-class F1 (from the
    confusion matrix C[true, predicted]), MAE, correlation;
    any other scalar sum s is reported as s / count (a per-example mean or fraction)."""
    sums = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}
    n = max(float(sums["count"]), 1.0)
    out = {"count": float(sums["count"])}
    if "loss" in sums:
        out["loss"] = float(sums["loss"]) / n
    if "correct" in sums:
        out["accuracy"] = float(sums["correct"]) / n
    if "confusion" in sums:
        c = sums["confusion"]
        tp, support = np.diag(c), c.sum(1)
        precision = np.divide(tp, c.sum(0), out=np.zeros_like(tp), where=c.sum(0) > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                       where=precision + recall > 0)
        present = support > 0
        out["macro_f1"] = float(f1[present].mean()) if present.any() else 0.0
        out["weighted_f1"] = float((f1 * support).sum() / max(support.sum(), 1.0))
        out.update({f"f1_class_{k}": float(v) for k, v in enumerate(f1)})
    if "abs_error" in sums:
        out["mae"] = float(sums["abs_error"]) / n
        cov = sums["pred_target"] / n - sums["pred"] * sums["target"] / n ** 2
        var_p = sums["pred_sq"] / n - (sums["pred"] / n) ** 2
        var_t = sums["target_sq"] / n - (sums["target"] / n) ** 2
        out["correlation"] = float(cov / np.sqrt(max(var_p * var_t, 1e-30)))
    known = {"count", "loss", "correct", "confusion", "abs_error", "pred", "target", "pred_target", "pred_sq",
             "target_sq"}
    out.update({k: float(v) / n for k, v in sums.items() if k not in known and v.ndim == 0})  # other sums: means
    return {prefix + k: v for k, v in out.items()}


def add_sums(a: dict | None, b: dict) -> dict:
    """Elementwise sum of two evaluation-sum dicts (a may be None)."""
    return b if a is None else jax.tree.map(lambda x, y: x + y, a, b)


# --------------------------------------------------------------------------------------------------------------
# Objectives: per-item (loss, correct, weight), for models whose items are examples or tokens


def classification_objective(logits: jax.Array, batch: dict, *, label_key: str = "label"
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per example: (cross-entropy ℓ_i [B], correct_i [B], weight m_i = batch["mask"] [B])."""
    logits = logits.astype(jnp.float32)
    labels = batch[label_key]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, (jnp.argmax(logits, -1) == labels).astype(jnp.float32), batch["mask"].astype(jnp.float32)


def next_word_objective(logits: jax.Array, batch: dict, *, pad_id: int = 0, label_key: str = "label"
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token: (cross-entropy [B, T], correct [B, T], weight [B, T] = example mask × (label ≠ pad_id)).

    Padding targets count for nothing, as in the released code (CrossEntropyLoss(ignore_index=0)); out-of-vocabulary
    and end-of-sentence targets count like any word."""
    logits = logits.astype(jnp.float32)
    labels = batch[label_key]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    weights = batch["mask"].astype(jnp.float32)[:, None] * (labels != pad_id)
    return losses, (jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights


Objective = Callable[[jax.Array, dict], tuple[jax.Array, jax.Array, jax.Array]]


def objective_task(logits_fn: Callable[..., jax.Array], objective: Objective) -> Task:
    """A `Task` from per-item (loss, correct, weight): loss = Σ w ℓ / max(Σ w, 1); evaluate sums count = Σ w,
    loss = Σ w ℓ, correct = Σ w·correct (so accuracy is per token for next-word prediction)."""
    def loss(trainable, frozen, batch, key=None):
        losses, _, weights = objective(logits_fn(trainable, frozen, batch, key), batch)
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def evaluate(trainable, frozen, batch):
        losses, correct, weights = objective(logits_fn(trainable, frozen, batch, None), batch)
        return {"count": jnp.sum(weights), "loss": jnp.sum(losses * weights), "correct": jnp.sum(correct * weights)}

    return Task(loss, evaluate)
