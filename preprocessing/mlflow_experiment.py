"""The MLflow experiment of every stage's run, resolved in one place: ``--experiment`` if
given, else ``MLFLOW_EXPERIMENT_NAME`` (MLflow's own variable), else ``bert-pipeline``.

It lives in preprocessing, which the training stages import and not the reverse (a Beam
worker installs preprocessing alone); it imports nothing, so neither stage pays for it.
"""

from __future__ import annotations

import os

DEFAULT_EXPERIMENT = "bert-pipeline"
ENV = "MLFLOW_EXPERIMENT_NAME"
# The --experiment flags' help (the empty format: no "(default: None)" after the real default).
HELP = f"MLflow experiment (default: ${ENV}, else {DEFAULT_EXPERIMENT})%(default).0s"


def experiment_name(given: str | None) -> str:
    return given or os.environ.get(ENV) or DEFAULT_EXPERIMENT
