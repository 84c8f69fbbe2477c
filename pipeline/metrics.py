"""Evaluation metrics, in numpy (the tests check each against scikit-learn and scipy).

Classification: accuracy, macro F1 (the mean of per-class F1, every class counting the
same: the headline for imbalanced or multi-class data), binary F1 of the positive class
(label id 1) for two-class tasks, Matthews correlation (multi-class form), confusion
matrix. Regression: Pearson and Spearman (Pearson of average ranks, ties included)
correlations, and the mean squared error.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return m


def _f1_per_class(m: np.ndarray) -> np.ndarray:
    tp = np.diag(m).astype(np.float64)
    predicted, actual = m.sum(axis=0), m.sum(axis=1)
    denominator = predicted + actual
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual); 0 where a class is never seen nor predicted
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def matthews_corrcoef(m: np.ndarray) -> float:
    """Gorodkin's multi-class MCC from the confusion matrix; 0 when undefined."""
    m = m.astype(np.float64)
    n, correct = m.sum(), np.trace(m)
    predicted, actual = m.sum(axis=0), m.sum(axis=1)
    numerator = correct * n - predicted @ actual
    denominator = np.sqrt((n * n - predicted @ predicted) * (n * n - actual @ actual))
    return float(numerator / denominator) if denominator > 0 else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    m = confusion_matrix(labels, predictions, num_classes)
    f1 = _f1_per_class(m)
    out = {"accuracy": float(np.trace(m) / max(m.sum(), 1)), "f1_macro": float(f1.mean()),
           "mcc": matthews_corrcoef(m)}
    if num_classes == 2:
        out["f1_binary"] = float(f1[1])  # positive class = label id 1
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # runs of equal values share the mean of their 1-based positions
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denominator) if denominator > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64)))


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict:
    targets, predictions = np.asarray(targets, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    return {"pearson": pearson(targets, predictions), "spearman": spearman(targets, predictions),
            "mse": float(np.mean((targets - predictions) ** 2))}


# Larger is better for all but these.
LOWER_IS_BETTER = {"mse", "loss"}


def task_metrics(task: str, labels: np.ndarray, outputs: np.ndarray, num_classes: int) -> dict:
    """Metrics from the model's outputs: logits (classification) or scores (regression)."""
    if task == "classification":
        return classification_metrics(labels, outputs.argmax(axis=-1), num_classes)
    return regression_metrics(labels, outputs.reshape(-1))
