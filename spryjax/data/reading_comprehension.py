"""Reading comprehension, Spry's two tasks beyond classification: SQuAD 2.0 (extractive QA that may have no answer)
and MultiRC (true/false over each answer option of a question). Their scores need the examples' text, so a
model's evaluation emits per-example predictions (`span_extraction_task`, `with_example_predictions`) and the
scores are computed from them on the host (`squad_v2_scores`, `multirc_scores`).

How per-example predictions reach the host: an example carries its index into the dataset, `batch["example_id"]`;
`evaluate` scatters each real example's prediction into a vector over all N examples. The engine adds evaluation
sums over batches and clients, and every example is evaluated at most once, so the summed vector holds each
evaluated example's own prediction (`evaluated` marks which). A dataset's `summarize` turns them into scores.

References:
- Rajpurkar, Jia & Liang, "Know What You Don't Know: Unanswerable Questions for SQuAD", ACL 2018, and its official
  evaluation script evaluate-v2.0.py: `normalize_answer`, `exact_match` (compute_exact), `f1` (compute_f1),
  `squad_v2_scores` (get_raw_scores, find_best_thresh) follow it line by line.
- Hugging Face transformers, examples/pytorch/question-answering/utils_qa.py (postprocess_qa_predictions): a
  question's answer is its windows' best span s_i + e_j (i ≤ j < i + 30, both in the context), or "" when its
  null score min over windows (s_0 + e_0) exceeds that by more than the threshold (0).
- Khashabi et al., "Looking Beyond the Surface", NAACL 2018 (MultiRC), as scored by SuperGLUE (Wang et al.,
  NeurIPS 2019): exact match per question (every answer option right) and F1a, the binary F1 over all options.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spryjax.task import Task, masked_mean

NO_ANSWER = 0            # the input position whose start and end logits score "no answer" (<s>, [CLS], BOS)
MAX_ANSWER_LENGTH = 30   # tokens, as in Hugging Face's run_qa and the BERT SQuAD recipe

# ------------------------------------------------------------------------------------------ scores (host side)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalization: lower case, punctuation removed, articles (a, an, the) removed, whitespace
    collapsed. `normalize_answer("The  Eiffel-Tower!") == "eiffeltower"`."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, prediction: str) -> int:
    """1 if the normalized answers are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1(gold: str, prediction: str) -> float:
    """Bag-of-tokens F1 of the normalized answers, 2 P R / (P + R) with P = |common| / |prediction|,
    R = |common| / |gold| (common: the multiset intersection); when either is empty (no answer), 1 if both are.

    Example: f1("the Eiffel Tower", "Eiffel tower in Paris") = 2 · (2/4 · 2/2) / (2/4 + 2/2) = 2/3.
    """
    gold_tokens, predicted_tokens = answer_tokens(gold), answer_tokens(prediction)
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    common = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(scores: Mapping[str, float], predictions: Mapping[str, str], no_answer: Mapping[str, float],
                    has_answer: Mapping[str, bool]) -> tuple[float, float]:
    """The official find_best_thresh: every question starts as "no answer" (credit 1 where that is right); in
    order of rising no-answer score, question q switches to its prediction, changing the total by its score (has an
    answer), by −1 (no answer, but something predicted) or 0. Returns (best mean score, its no-answer score)."""
    current = best = sum(1 for q in scores if not has_answer[q])
    threshold = 0.0
    for q in sorted(no_answer, key=lambda q: no_answer[q]):
        if q not in scores:
            continue
        current += scores[q] if has_answer[q] else (-1 if predictions[q] else 0)
        if current > best:
            best, threshold = current, no_answer[q]
    return best / len(scores), threshold


def squad_v2_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    no_answer: Mapping[str, float]) -> dict[str, float]:
    """SQuAD 2.0's official scores of `predictions` ({question id: answer text, "" for no answer}) against
    `references` ({question id: gold answers; none for an unanswerable question}), as fractions (the official
    script prints percentages):

      exact, f1                        the mean over questions of max over gold answers (an unanswerable question's
                                       only gold answer is "")
      has_answer_*, no_answer_*        the same over the answerable and the unanswerable questions
      best_exact, best_f1 (+ _threshold)  the scores had every question with no-answer score above the threshold
                                       answered "" (`no_answer[q]`: higher means "no answer" is likelier; here the
                                       null score minus the best span's), at the best threshold

    Only questions in `predictions` are scored.
    """
    exact, f1_scores, has_answer = {}, {}, {}
    for q, prediction in predictions.items():
        golds = [a for a in references[q] if normalize_answer(a)] or [""]
        has_answer[q] = golds != [""]
        exact[q] = max(exact_match(g, prediction) for g in golds)
        f1_scores[q] = max(f1(g, prediction) for g in golds)
    out = {"exact": float(np.mean(list(exact.values()))), "f1": float(np.mean(list(f1_scores.values()))),
           "questions": float(len(predictions))}
    for name, wanted in (("has_answer", True), ("no_answer", False)):
        chosen = [q for q in predictions if has_answer[q] == wanted]
        if chosen:
            out[f"{name}_exact"] = float(np.mean([exact[q] for q in chosen]))
            out[f"{name}_f1"] = float(np.mean([f1_scores[q] for q in chosen]))
    out["best_exact"], out["best_exact_threshold"] = _best_threshold(exact, predictions, no_answer, has_answer)
    out["best_f1"], out["best_f1_threshold"] = _best_threshold(f1_scores, predictions, no_answer, has_answer)
    return out


def answers_from_windows(question: np.ndarray, span_score: np.ndarray, null_score: np.ndarray,
                         span_text: Callable[[int], str], *, threshold: float = 0.0
                         ) -> tuple[dict[int, str], dict[int, float]]:
    """Each question's answer from its evaluated windows: the best span over its windows, or "" when its null
    score, min over windows of s_0 + e_0, exceeds that span's score s_i + e_j by more than `threshold`.

    Args:
      question: (w,) the question of each evaluated window; span_score, null_score: (w,) the window's best span
        score and null score; span_text(k): the text of window k's best span.
    Returns:
      ({question: answer}, {question: null score − best span score}) for every question in `question`.
    """
    order = np.lexsort((-span_score, question))          # by question, each question's best span first
    grouped = question[order]
    firsts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    null = np.minimum.reduceat(null_score[order], firsts)
    answers, no_answer = {}, {}
    for first, lowest_null in zip(firsts, null):
        best = order[first]
        q = int(question[best])
        no_answer[q] = float(lowest_null - span_score[best])
        answers[q] = "" if no_answer[q] > threshold else span_text(best)
    return answers, no_answer


def multirc_scores(question: np.ndarray, predicted: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """MultiRC's scores over answer options: exact_match, the share of questions whose options are all predicted
    right, and f1a, the binary F1 of "correct" over all options, 2 TP / (2 TP + FP + FN).

    Args: question, predicted, label: (n,) the question of each option, the predicted and the true label (0/1).
    """
    right = predicted == label
    questions = np.unique(question)
    all_right = np.ones(question.max(initial=0) + 1, bool)
    np.logical_and.at(all_right, question, right)
    true_positive = np.sum((predicted == 1) & (label == 1))
    wrong = np.sum(~right)
    return {"exact_match": float(all_right[questions].mean()) if questions.size else 0.0,
            "f1a": float(2 * true_positive / max(2 * true_positive + wrong, 1))}


# ------------------------------------------------------------------------------------------ tasks (device side)


def best_spans(start_logits: jax.Array, end_logits: jax.Array, first: jax.Array, last: jax.Array, *,
               max_answer_length: int = MAX_ANSWER_LENGTH) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best valid span of each row: argmax over i ≤ j < i + max_answer_length, first ≤ i, j ≤ last, of
    s_i + e_j.

    Args:
      start_logits, end_logits: [B, S]; first, last: [B] the first and last input position of the context.
    Returns:
      (start [B], end [B], score [B]) in input positions; score is −inf for a row whose context is empty.
    """
    s = start_logits.shape[1]
    position = jnp.arange(s)
    allowed = (position >= first[:, None]) & (position <= last[:, None])                       # [B, S]
    # scores[d, b, i] = s_i + e_{i+d}: the spans of d + 1 tokens starting at i
    shifted = jnp.stack([jnp.roll(end_logits, -d, axis=1) for d in range(max_answer_length)])    # [L, B, S]
    ends_allowed = jnp.stack([jnp.roll(allowed, -d, axis=1) & (position + d < s) for d in range(max_answer_length)])
    scores = jnp.where(allowed[None] & ends_allowed, start_logits[None] + shifted, -jnp.inf)
    flat = jnp.moveaxis(scores, 0, 2).reshape(scores.shape[1], -1)                            # [B, S·L]
    best = jnp.argmax(flat, axis=1)
    start, length = best // max_answer_length, best % max_answer_length
    return start, start + length, jnp.max(flat, axis=1)


def _by_example(values: jax.Array, batch: dict, num_examples: int) -> jax.Array:
    """[num_examples] vector holding each real example's value at its batch["example_id"] (0 elsewhere)."""
    real = batch["mask"] > 0
    return jnp.zeros(num_examples, jnp.float32).at[batch["example_id"]].add(jnp.where(real, values, 0.0))


SPAN_VECTORS = ("span_start", "span_end", "span_score", "null_score", "evaluated")


def span_extraction_task(logits_fn: Callable[..., jax.Array], num_examples: int, *,
                         max_answer_length: int = MAX_ANSWER_LENGTH) -> Task:
    """Extractive QA on windows from `logits_fn(trainable, frozen, batch, key) -> [B, S, 2]` start/end logits.

    batch: the model inputs plus "start_position", "end_position" (the answer's input positions, both `NO_ANSWER`
    when the window holds no answer), "context_first", "context_last" and "example_id".
    loss: ½ (CE(s, start_position) + CE(e, end_position)), the softmax over the window's positions (BERT's SQuAD
    objective), averaged over real windows.
    evaluate: count, loss, and per window (`SPAN_VECTORS`, scattered to its example_id): the best valid span's
    input positions and score s_i + e_j (`best_spans`), the null score s_0 + e_0, and evaluated = 1.
    """
    def per_example(trainable, frozen, batch, key):
        logits = logits_fn(trainable, frozen, batch, key).astype(jnp.float32)
        start, end = logits[..., 0], logits[..., 1]
        loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(start, batch["start_position"]) +
                      optax.softmax_cross_entropy_with_integer_labels(end, batch["end_position"]))
        return start, end, loss

    def loss(trainable, frozen, batch, key=None):
        return masked_mean(per_example(trainable, frozen, batch, key)[2], batch["mask"])

    def evaluate(trainable, frozen, batch):
        start, end, losses = per_example(trainable, frozen, batch, None)
        span_start, span_end, span_score = best_spans(start, end, batch["context_first"], batch["context_last"],
                                                      max_answer_length=max_answer_length)
        null = start[:, NO_ANSWER] + end[:, NO_ANSWER]
        vectors = dict(zip(SPAN_VECTORS, (span_start, span_end, span_score, null, jnp.ones_like(null))))
        return {"count": jnp.sum(batch["mask"]), "loss": jnp.sum(losses * batch["mask"]),
                **{k: _by_example(v.astype(jnp.float32), batch, num_examples) for k, v in vectors.items()}}

    return Task(loss, evaluate)


PREDICTION_VECTORS = ("predicted", "evaluated")


def with_example_predictions(task: Task, logits_fn: Callable[..., jax.Array], num_examples: int) -> Task:
    """A classification `task` whose evaluate also returns, per example (scattered to batch["example_id"]), its
    predicted class argmax logits_fn(...) and evaluated = 1 (`PREDICTION_VECTORS`): what MultiRC's per-question
    exact match needs. The logits are the ones `task.evaluate` computes: the same pure computation, which XLA
    computes once (the compiled evaluation's flops are those of `task.evaluate` alone)."""
    def evaluate(trainable, frozen, batch):
        predicted = jnp.argmax(logits_fn(trainable, frozen, batch, None), axis=-1).astype(jnp.float32)
        return {**task.evaluate(trainable, frozen, batch),
                "predicted": _by_example(predicted, batch, num_examples),
                "evaluated": _by_example(jnp.ones_like(predicted), batch, num_examples)}

    return task._replace(evaluate=evaluate)
