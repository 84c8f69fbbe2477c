"""The fine-tuning report: JSON, a confusion-matrix PNG, and the MLflow run's artifacts and model."""

from __future__ import annotations

import contextlib
import json
import logging
import os

from pipeline.metrics import finite_or_null, format_per_class, per_class_metrics
from pipeline.output_path import file_beside

REPORT = "report.json"
CONFUSION_PNG = "confusion_matrix.png"


def write_report(report: dict, output_dir: str) -> list[str]:
    """``report.json`` and, for classification, ``confusion_matrix.png``; returns the paths.
    Classification also prints the test split's per-class table (rank 0 alone calls this)."""
    path = os.path.join(output_dir, REPORT)
    # a full disk leaves no report cut short under its name
    with file_beside(path) as temp, open(temp, "w") as f:
        json.dump(finite_or_null(report), f, indent=2)  # strict JSON: a metric that is not finite is null
    paths = [path]
    if "per_class" in report:
        print(format_per_class(report["per_class"]["test"], "test"), flush=True)
    if "confusion_matrix" in report:
        paths.append(plot_confusion_matrix(report["confusion_matrix"], report["labels"],
                                           os.path.join(output_dir, CONFUSION_PNG),
                                           f"test: accuracy {report['test']['accuracy']:.3f}, "
                                           f"MCC {report['test']['mcc']:.3f}"))
    return paths


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix)
    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(m, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    try:
        with file_beside(path) as temp:
            fig.savefig(temp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path


def log_per_class_metrics(tracker, report_path: str) -> None:
    """The kept model's figures from the report just written, at the best epoch's step as the test
    metrics: ``best_epoch``, its validation metrics as ``best_validation/accuracy`` …, and
    ``test/f1/<label>``, ``best_validation/recall/<label>``, ``test/precision_weighted`` …. Under
    ``validation/`` they mixed with the epochs' series, whose latest value (the one MLflow's run
    table shows and sorts by) is the last epoch's, not the kept one's."""
    with open(report_path) as f:
        report = json.load(f)
    values = {"best_epoch": float(report["best_epoch"]),
              **{f"best_validation/{k}": v for k, v in (report.get("validation") or {}).items()
                 if isinstance(v, (int, float))}}
    for split, per_class in report.get("per_class", {}).items():
        values.update(per_class_metrics(per_class, "best_validation" if split == "validation" else split))
    tracker.log_metrics(values, report["best_epoch"])


def pip_requirements() -> list[str]:
    """What the logged model needs to load. Given explicitly: MLflow's inference of them
    imports torchvision and fails offline (MLflow 3.x's transformers flavour)."""
    import tokenizers
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"tokenizers=={tokenizers.__version__}"]


def log_to_mlflow(tracker, paths: list[str], model_dir: str | None, task: str, register_name: str | None,
                  max_length: int, convert: str | None = None, predictions: list[str] = (),
                  version: tuple[str, dict[str, str]] | None = None) -> None:
    """Report files as artifacts (``predictions`` under predictions/); the saved model with MLflow's transformers flavour (registered if named).

    A registered version gets ``version``'s description and tags (``describe_version``).

    Served through ``mlflow.pyfunc``, texts are cut to ``max_length`` tokens, the length the
    model was fine-tuned and tested at: the pipeline does not truncate by default, and a text
    longer than the position embeddings would fail (MLflow's native ``load_model`` gives the
    plain pipeline: pass it ``truncation=True``). A model whose pretraining text was converted
    (``convert``, e.g. t2s) is logged as a pyfunc model that converts its input the same way
    (``served_model.py``): the transformers flavour would pass Traditional text to a Simplified
    vocabulary."""
    import mlflow

    for path in paths:
        mlflow.log_artifact(path)
    for path in predictions:
        mlflow.log_artifact(path, "predictions")
    log_per_class_metrics(tracker, paths[0])
    if model_dir is None:
        return
    # MLflow looks the model's name_or_path up on the Hugging Face Hub for a model card and a
    # licence: a relative path of two parts ("ft/model" from --output-dir ft) is a valid repo id,
    # so it asked huggingface.co (47 s of retries offline, and a stranger's card and licence
    # when such a repo exists). An absolute path is never a repo id.
    model_dir = os.path.abspath(model_dir)
    with _quiet_model_logging():
        _log_model(model_dir, task, max_length, convert, register_name, tracker, version)


@contextlib.contextmanager
def _quiet_model_logging():
    """MLflow's model logging, without a progress bar for each artifact it downloads again to check
    the model. (Its warning that predict has no type hints is answered by the type hint itself:
    MLflow resets warning filters around that check, so a filter here would not hold.)"""
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def _log_model(model_dir: str, task: str, max_length: int, convert: str | None, register_name: str | None,
               tracker, version) -> None:
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if convert:
        import opencc

        info = mlflow.pyfunc.log_model(
            name="model", python_model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "served_model.py"),
            artifacts={"model": model_dir}, model_config={"convert": convert, "max_length": max_length, "task": task},
            pip_requirements=[*pip_requirements(), f"opencc=={opencc.__version__}", "pandas"],
            registered_model_name=register_name)
        describe_version(tracker, register_name, info.registered_model_version, version)
        return
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hub_lookup = logging.getLogger("mlflow.transformers")
    hub_lookup.addFilter(_no_hub_card_warnings)
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-classification",  # regression too: one score per text (function_to_apply none)
            model_config={"truncation": True, "max_length": max_length},
            pip_requirements=pip_requirements(), registered_model_name=register_name)
    finally:
        hub_lookup.removeFilter(_no_hub_card_warnings)
    describe_version(tracker, register_name, info.registered_model_version, version)


def describe_version(tracker, name: str | None, version: int | None,
                     description_tags: tuple[str, dict[str, str]] | None) -> None:
    """The registry's page of a version says what it is without opening its run: the task, its
    test scores, the labelled data's hash and the runs it came from. Its own attempt: the model is
    registered by now, and a failure here is counted, not reported as a failed registration."""
    if not name or version is None or description_tags is None:
        return
    import mlflow

    description, tags = description_tags

    def describe():
        client = mlflow.MlflowClient()
        client.update_model_version(name, str(version), description=description)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)

    tracker.attempt(f"the description and tags of {name} version {version}", describe)


def _no_hub_card_warnings(record: logging.LogRecord) -> bool:
    """MLflow looks every model up on the Hub for its card and licence, and warns twice on each
    fine-tune that it found neither: a model of one's own, at a local path, has none there."""
    message = record.getMessage()
    return not message.startswith(("The model card could not be retrieved from the hub",
                                   "Unable to find license information for this model"))
