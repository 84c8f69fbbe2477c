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
    assert out["f1_macro"] == pytest.approx(sk.f1_score(labels, predictions, average="macro"))
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
    # A diverged model's NaN scores: no correlation at all, where pearson said 0.0 and spearman 0.5.
    diverged = metrics.regression_metrics([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0])
    assert all(np.isnan(v) for v in diverged.values())


def test_a_diverged_epoch_is_never_the_best_and_the_report_stays_strict_json(tmp_path):
    import json

    from pipeline.finetuning.report import write_report
    from pipeline.finetuning.trainer import EpochResult, Finetuner

    finetuner = Finetuner.__new__(Finetuner)  # only the choice of the best epoch, no model
    finetuner.metric, finetuner.best = "mse", None
    assert finetuner._improved(float("nan"))
    finetuner.best = EpochResult(1, 1.0, {"mse": float("nan")}, 1.0, 1)
    assert finetuner._improved(0.5)  # a NaN first epoch kept every later one from counting as better
    finetuner.best = EpochResult(2, 1.0, {"mse": 0.5}, 1.0, 1)
    assert not finetuner._improved(float("nan"))
    path = write_report({"task": "regression", "test": {"pearson": float("nan"), "mse": 0.5}}, str(tmp_path))[0]
    assert json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{c} in report.json")) == {
        "task": "regression", "test": {"pearson": None, "mse": 0.5}}


def test_task_metrics_take_model_outputs():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0]])
    assert metrics.task_metrics("classification", np.array([0, 1, 0]), logits, 2)["accuracy"] == pytest.approx(2 / 3)
    scores = np.array([[0.5], [1.5], [2.5]])
    assert metrics.task_metrics("regression", np.array([1.0, 2.0, 3.0]), scores, 0)["pearson"] == pytest.approx(1.0)


def _sklearn_report(labels, predictions, classes):
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predictions, labels=range(classes), zero_division=0)
    return precision, recall, f1, support


@pytest.mark.parametrize("classes,seed", [(2, 0), (3, 1), (7, 2), (7, 3)])
def test_per_class_report_matches_sklearn(classes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 400)
    predictions = np.where(rng.random(400) < 0.5, labels, rng.integers(0, classes, 400))
    names = [f"class {i}" for i in range(classes)]
    report = metrics.per_class_report(metrics.confusion_matrix(labels, predictions, classes), names)
    precision, recall, f1, support = _sklearn_report(labels, predictions, classes)
    assert list(report["classes"]) == names
    for i, name in enumerate(names):
        row = report["classes"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision[i], recall[i], f1[i]))
        assert row["support"] == support[i]
    for average in ("macro", "weighted"):
        expected = sk.precision_recall_fscore_support(labels, predictions, average=average, zero_division=0)
        got = report[f"{average}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected[:3])
        assert got["support"] == 400
    # and what sklearn's classification_report prints
    printed = sk.classification_report(labels, predictions, labels=range(classes), target_names=names,
                                       output_dict=True, zero_division=0)
    assert report["weighted_avg"]["f1"] == pytest.approx(printed["weighted avg"]["f1-score"])


def test_a_class_never_predicted_and_one_never_seen_give_zeros_without_warnings(recwarn):
    labels = np.array([0, 0, 1, 1, 1, 0])
    predictions = np.array([0, 0, 0, 0, 3, 0])  # class 1 never predicted, class 2 in neither, 3 never true
    report = metrics.per_class_report(metrics.confusion_matrix(labels, predictions, 4), ["a", "b", "c", "d"])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no 0/0 from numpy
    values = [v for row in report["classes"].values() for v in row.values()]
    assert not np.isnan(values).any()
    assert report["classes"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert report["classes"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["classes"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    precision, recall, f1, support = _sklearn_report(labels, predictions, 4)
    for i, name in enumerate("abcd"):
        row = report["classes"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[i], recall[i], f1[i], support[i]))
    # The macro average counts the classes among the labels or the predictions (a, b, d), as
    # scikit-learn's does unless told ``labels``; c, in neither, does not pull it down.
    expected = sk.precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    assert report["macro_avg"]["f1"] == pytest.approx(expected[2]) == pytest.approx((f1[0] + f1[1] + f1[3]) / 3)
    assert metrics.classification_metrics(labels, predictions, 4)["f1_macro"] == pytest.approx(expected[2])
    # no rows at all: zeros, not NaN
    empty = metrics.per_class_report(np.zeros((2, 2), dtype=int), ["a", "b"])
    assert empty["weighted_avg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_per_class_metric_names_are_mlflow_safe_and_distinct():
    from mlflow.utils.validation import _validate_metric_name

    labels = ["fresh", "not good/bad", "a:b", "a?b", "..", "ünïcode", "x" * 300]
    report = metrics.per_class_report(np.eye(len(labels), dtype=int), labels)
    values = metrics.per_class_metrics(report, "test")
    for name in values:
        _validate_metric_name(name)  # raises on a bad character or a path that resolves elsewhere
        assert len(name) <= 250
    f1_names = [n for n in values if n.startswith("test/f1/")]
    assert len(set(f1_names)) == len(labels)
    assert "test/f1/fresh" in values and "test/f1/not_good_bad" in values
    assert {"test/f1/a_b_2", "test/f1/a_b_3"} <= set(values)
    assert {"test/precision_macro", "test/recall_weighted", "test/f1_weighted"} <= set(values)
    assert "test/f1_macro" not in values  # classification_metrics already has it


def test_per_class_table_is_aligned():
    report = metrics.per_class_report(np.array([[5, 1], [2, 12]]), ["fresh", "rotten"])
    table = metrics.format_per_class(report, "test").splitlines()
    assert table[0].split() == ["test", "precision", "recall", "f1", "support"]
    assert table[1].split() == ["fresh", "0.7143", "0.8333", "0.7692", "6"]
    assert table[-1].split()[:2] == ["weighted", "avg"]
    rows = [line for line in table if line]
    assert len({len(line) for line in rows}) == 1  # every row as wide as the header


def test_the_reports_per_class_figures_are_logged_as_metrics(tmp_path):
    import json

    from pipeline.finetuning.report import log_per_class_metrics

    report = {"best_epoch": 3, "validation": {"accuracy": 0.85, "loss": 0.4}, "per_class": {
        split: metrics.per_class_report(np.array([[5, 1], [2, 12]]), ["fresh", "rot ten"]) for split in
        ("validation", "test")}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))

    class Tracker:
        logged = []

        def log_metrics(self, values, step):
            self.logged.append((values, step))

    tracker = Tracker()
    log_per_class_metrics(tracker, str(path))
    (values, step), = tracker.logged
    assert step == 3
    assert values["test/f1/fresh"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 2))
    assert values["best_validation/recall/rot_ten"] == pytest.approx(12 / 14) and values["test/support/rot_ten"] == 14
    # the kept epoch's own figures, apart from the epochs' validation/ series (whose latest is the last epoch's)
    assert values["best_epoch"] == 3 and values["best_validation/accuracy"] == 0.85
    assert not any(name.startswith("validation/") for name in values)
    path.write_text(json.dumps({"best_epoch": 1, "validation": {"mse": 0.5, "pearson": None}}))  # regression
    log_per_class_metrics(tracker, str(path))
    assert tracker.logged[1] == ({"best_epoch": 1.0, "best_validation/mse": 0.5}, 1)


def test_a_classifier_that_gives_every_row_one_label_is_warned_about():
    from pipeline.metrics import confusion_matrix, one_class_warning

    labels = ["fresh", "rotten"]
    truth = np.array([0] * 58 + [1] * 42)
    collapsed = confusion_matrix(truth, np.zeros(100, dtype=int), 2)  # accuracy 0.58: the label's share
    assert one_class_warning(collapsed, labels) == (
        "the model predicts 'fresh' for every test row (100 rows, 58.0% of them labelled so): it learned the "
        "labels' counts, not the text; try more --epochs, another --learning-rate, or a model pretrained longer")
    assert one_class_warning(confusion_matrix(truth, np.r_[np.zeros(99, int), [1]], 2), labels) is None
    assert one_class_warning(confusion_matrix(np.zeros(10, int), np.zeros(10, int), 2), labels) is None  # one label only
    assert one_class_warning(np.zeros((2, 2), dtype=np.int64), labels) is None  # no rows


def test_a_regression_model_that_predicts_a_constant_is_named():
    from pipeline.metrics import constant_prediction_warning

    labels = np.linspace(0, 5, 40)
    # what a collapsed fine-tune gave: every prediction within 1.5e-5 of 0.8874
    flat = 0.8874 + np.tile([-1.5e-5, 1.5e-5], 20)
    assert constant_prediction_warning(flat, labels) == (
        "the model predicts about 0.8874 for every test row (spread 1.5e-05, against the labels' 1.48): it learned a "
        "constant, not the text; try more --epochs, another --learning-rate, or a model pretrained longer")
    assert constant_prediction_warning(labels * 0.05 + 1, labels) is None  # a narrow spread, but a spread
    assert constant_prediction_warning(flat, np.full(40, 2.0)) is None  # labels that do not spread either
    assert constant_prediction_warning(flat[:1], labels[:1]) is None
    assert constant_prediction_warning(np.full(40, np.nan), labels) is None  # not a constant
