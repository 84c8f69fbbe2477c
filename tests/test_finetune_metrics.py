"""Fine-tuning metrics against scikit-learn and scipy on known and random inputs."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from pipeline import metrics


def test_binary_metrics_on_a_known_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    predictions = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 1])
    # TP (class 1) = 5, FN = 1, FP = 2, TN = 2
    out = metrics.classification_metrics(labels, predictions, 2)
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["f1_binary"] == pytest.approx(2 * 5 / (2 * 5 + 2 + 1))
    assert out["f1_macro"] == pytest.approx((2 * 2 / (2 * 2 + 1 + 2) + 10 / 13) / 2)
    mcc = (5 * 2 - 2 * 1) / np.sqrt((5 + 2) * (5 + 1) * (2 + 2) * (2 + 1))
    assert out["mcc"] == pytest.approx(mcc)
    assert metrics.confusion_matrix(labels, predictions, 2).tolist() == [[2, 2], [1, 5]]


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_classification_metrics_match_sklearn(classes):
    rng = np.random.default_rng(classes)
    labels = rng.integers(0, classes, 500)
    # a better-than-chance classifier with some classes under-predicted
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, max(1, classes - 1), 500))
    out = metrics.classification_metrics(labels, predictions, classes)
    assert out["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions))
    assert out["f1_macro"] == pytest.approx(sk.f1_score(labels, predictions, average="macro", labels=range(classes)))
    assert out["mcc"] == pytest.approx(sk.matthews_corrcoef(labels, predictions))
    if classes == 2:
        assert out["f1_binary"] == pytest.approx(sk.f1_score(labels, predictions, average="binary", pos_label=1))
    else:
        assert "f1_binary" not in out
    assert (metrics.confusion_matrix(labels, predictions, classes)
            == sk.confusion_matrix(labels, predictions, labels=range(classes))).all()


def test_degenerate_predictions_give_zero_not_nan():
    labels = np.array([0, 1, 0, 1])
    constant = np.zeros(4, dtype=int)
    out = metrics.classification_metrics(labels, constant, 2)
    assert out["mcc"] == 0.0 == sk.matthews_corrcoef(labels, constant)
    assert out["f1_binary"] == 0.0
    assert out["f1_macro"] == pytest.approx(sk.f1_score(labels, constant, average="macro", zero_division=0))


def test_regression_metrics_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 6, 300).astype(float)  # STS-B-like scores with many ties
    predictions = targets + rng.normal(0, 1.5, 300)
    predictions[:40] = np.round(predictions[:40])  # ties in the predictions too
    out = metrics.regression_metrics(targets, predictions)
    assert out["pearson"] == pytest.approx(stats.pearsonr(targets, predictions)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(targets, predictions)[0])
    assert out["mse"] == pytest.approx(sk.mean_squared_error(targets, predictions))
    assert metrics.pearson(targets, -targets) == pytest.approx(-1.0)
    assert metrics.spearman(targets, np.exp(targets)) == pytest.approx(1.0)  # monotone → rank correlation 1
    assert metrics.pearson(targets, np.ones(300)) == 0.0  # undefined: no variance


def test_task_metrics_take_model_outputs():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0]])
    assert metrics.task_metrics("classification", np.array([0, 1, 0]), logits, 2)["accuracy"] == pytest.approx(2 / 3)
    scores = np.array([[0.5], [1.5], [2.5]])
    assert metrics.task_metrics("regression", np.array([1.0, 2.0, 3.0]), scores, 0)["pearson"] == pytest.approx(1.0)
