"""Evaluation metrics, in numpy (the tests check each against scikit-learn and scipy).

Classification: accuracy, macro F1 (the mean of per-class F1, every class counting the
same: the headline for imbalanced or multi-class data), binary F1 of the positive class
(label id 1) for two-class tasks, Matthews correlation (multi-class form), confusion
matrix, and the per-class report (precision, recall, F1, support; macro and weighted
averages: what scikit-learn's ``classification_report`` prints). Regression: Pearson and
Spearman (Pearson of average ranks, ties included) correlations, and the mean squared error.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return m


def one_class_warning(m: np.ndarray, labels: list[str], split: str = "test") -> str | None:
    """What to say when a classifier gives every row the same label while the rows hold several:
    its accuracy is then the label's share, which reads like learning (0.58 on a split with 58%
    of one class) though the model ignores its input."""
    predicted, actual = m.sum(axis=0), m.sum(axis=1)
    if m.sum() == 0 or np.count_nonzero(predicted) != 1 or np.count_nonzero(actual) < 2:
        return None
    label = int(np.argmax(predicted))
    return (f"the model predicts {labels[label]!r} for every {split} row ({int(m.sum()):,} rows, "
            f"{actual[label] / m.sum():.1%} of them labelled so): it learned the labels' counts, not the text; "
            "try more --epochs, another --learning-rate, or a model pretrained longer")


def constant_prediction_warning(predictions: np.ndarray, labels: np.ndarray, split: str = "test") -> str | None:
    """What to say when a regression model gives every row about the same value while the labels
    spread: its correlations are then noise, and its error that of a constant (a collapsed model
    chose its best epoch by Pearson on near-constant outputs)."""
    predictions, labels = np.asarray(predictions, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    if (len(labels) < 2 or not np.isfinite(predictions).all() or not np.std(labels) > 0
            or np.std(predictions) >= 0.01 * np.std(labels)):
        return None  # non-finite outputs are no constant
    return (f"the model predicts about {np.mean(predictions):.4g} for every {split} row (spread "
            f"{np.std(predictions):.2g}, against the labels' {np.std(labels):.3g}): it learned a constant, not the "
            "text; try more --epochs, another --learning-rate, or a model pretrained longer")


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


def _in_play(m: np.ndarray) -> np.ndarray:
    """The classes among the labels or the predictions: those a macro average counts, as scikit-
    learn's does by default (a class a split lacks and the model never predicts, e.g. a rare one a
    seeded split could not give a row, would add an F1 of 0 for nothing the model did)."""
    return (m.sum(axis=0) + m.sum(axis=1)) > 0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    m = confusion_matrix(labels, predictions, num_classes)
    f1 = _f1_per_class(m)
    counted = _in_play(m)
    out = {"accuracy": float(np.trace(m) / max(m.sum(), 1)),
           "f1_macro": float(f1[counted].mean()) if counted.any() else 0.0,
           "mcc": matthews_corrcoef(m)}
    if num_classes == 2:
        out["f1_binary"] = float(f1[1])  # positive class = label id 1
    return out


def per_class_report(m: np.ndarray, label_names: list[str]) -> dict:
    """Precision, recall, F1 and support per class, and their macro and weighted averages.

    From the confusion matrix ``m[true, predicted]``. A class never predicted has precision 0
    and one absent from the labels recall 0 (scikit-learn's ``zero_division=0``, without its
    warning); the macro average counts the classes among the labels or the predictions, as
    scikit-learn's does without ``labels``.
    Returns ``{"classes": {label: {...}}, "macro_avg": {...}, "weighted_avg": {...}}``.
    """
    m = np.asarray(m, dtype=np.float64)
    tp = np.diag(m)
    predicted, support = m.sum(axis=0), m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = _f1_per_class(m)
    total = support.sum()
    weights = support / total if total > 0 else np.zeros_like(support)

    def averages(w: np.ndarray, n: float) -> dict:
        return {"precision": float(precision @ w), "recall": float(recall @ w), "f1": float(f1 @ w),
                "support": int(n)}

    classes = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                      "support": int(support[i])} for i, name in enumerate(label_names)}
    counted = _in_play(m)
    return {"classes": classes, "macro_avg": averages(counted / max(counted.sum(), 1), total),
            "weighted_avg": averages(weights, total)}


def metric_name_part(name: str) -> str:
    """``name`` as one part of an MLflow metric name: MLflow allows only letters, digits, ``_-. /:``
    (and a part of dots alone would resolve to another path), so the rest become ``_``."""
    part = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:100]
    return "_" * len(part) if set(part) <= {"."} else part


def per_class_metric_names(label_names: list[str]) -> list[str]:
    """Distinct MLflow-safe names for the labels: ``a:b`` and ``a?b`` become ``a_b_0`` and ``a_b_1``."""
    parts = [metric_name_part(n) or "_" for n in label_names]
    clashes = {p for p in parts if parts.count(p) > 1}
    return [f"{p}_{i}" if p in clashes else p for i, p in enumerate(parts)]


def per_class_metrics(report: dict, prefix: str) -> dict[str, float]:
    """A :func:`per_class_report` as flat MLflow metrics: ``PREFIX/f1/<label>`` … and
    ``PREFIX/f1_weighted`` … (macro F1 is already ``PREFIX/f1_macro``)."""
    names = per_class_metric_names(list(report["classes"]))
    out = {}
    for name, values in zip(names, report["classes"].values()):
        out.update({f"{prefix}/{key}/{name}": float(values[key]) for key in ("precision", "recall", "f1", "support")})
    for average in ("macro", "weighted"):
        values = report[f"{average}_avg"]
        out.update({f"{prefix}/{key}_{average}": values[key] for key in ("precision", "recall", "f1")
                    if not (average == "macro" and key == "f1")})
    return out


def format_per_class(report: dict, title: str = "") -> str:
    """The report as an aligned table, as scikit-learn's ``classification_report`` prints it."""
    names = list(report["classes"]) + ["macro avg", "weighted avg"]
    width = max(12, *(len(n) for n in names))
    header = f"{title:<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"
    rows = [*report["classes"].items(), None, ("macro avg", report["macro_avg"]),
            ("weighted avg", report["weighted_avg"])]
    lines = [header]
    for row in rows:
        if row is None:
            lines.append("")
            continue
        name, v = row
        lines.append(f"{name:>{width}}  {v['precision']:>9.4f}  {v['recall']:>9.4f}  {v['f1']:>9.4f}  "
                     f"{v['support']:>9d}")
    return "\n".join(lines)


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
    if not np.isfinite(predictions).all():  # a diverged model: no score, not a pearson of 0.0
        return {"pearson": math.nan, "spearman": math.nan, "mse": math.nan}
    return {"pearson": pearson(targets, predictions), "spearman": spearman(targets, predictions),
            "mse": float(np.mean((targets - predictions) ** 2))}


# Larger is better for all but these.
LOWER_IS_BETTER = {"mse", "loss"}
# The metrics fine-tuning's --metric can pick the best epoch by (loss: the validation loss).
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "f1_binary", "mcc")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS + ("loss",)


def task_metrics(task: str, labels: np.ndarray, outputs: np.ndarray, num_classes: int) -> dict:
    """Metrics from the model's outputs: logits (classification) or scores (regression)."""
    if task == "classification":
        return classification_metrics(labels, outputs.argmax(axis=-1), num_classes)
    return regression_metrics(labels, outputs.reshape(-1))


def finite_or_null(value):
    """``value`` with every float that is not finite, at any depth, as None: JSON has no NaN
    (json.dumps writes it, and JSON parsers and jq refuse it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One line of a metrics/eval .jsonl file: strict JSON (``finite_or_null``)."""
    return json.dumps(finite_or_null(record)) + "\n"


def keep_steps_up_to(path: str, step: int) -> int:
    """Rewrites a metrics/eval .jsonl file without its lines past ``step`` (and any torn last line):
    a resume from ``step`` continues the history from there, where appending left the abandoned
    steps' lines (a crash past the checkpoint, ``--resume`` of an earlier tag) before the new ones.
    Returns the lines removed; a missing file is left alone."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the crash
    if len(kept) < len(lines):
        temp = f"{path}.tmp"
        with open(temp, "w") as f:
            f.writelines(kept)
        os.replace(temp, path)
    return len(lines) - len(kept)
