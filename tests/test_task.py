import numpy as np
from sklearn.metrics import f1_score

from spryjax.task import summarize


def test_f1_scores_match_scikit_learn():
    """Macro, weighted and per-class F1 from the summed confusion matrix equal scikit-learn's on the same labels."""
    rng = np.random.default_rng(0)
    truth = np.concatenate([np.arange(4), rng.integers(0, 4, 200)])
    predicted = np.where(rng.random(truth.size) < 0.6, truth, rng.integers(0, 4, truth.size))
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (truth, predicted), 1)
    metrics = summarize({"count": truth.size, "correct": np.sum(truth == predicted), "confusion": confusion})
    assert metrics["accuracy"] == np.mean(truth == predicted)
    np.testing.assert_allclose(metrics["macro_f1"], f1_score(truth, predicted, average="macro"))
    np.testing.assert_allclose(metrics["weighted_f1"], f1_score(truth, predicted, average="weighted"))
    np.testing.assert_allclose([metrics[f"f1_class_{k}"] for k in range(4)], f1_score(truth, predicted, average=None))
