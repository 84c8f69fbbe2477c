"""MLflow logging for the preprocessing stage: one run, ``stage=preprocess``.

The tracking URI is MLflow's own default (``sqlite:///mlflow.db`` in the working
directory) unless ``MLFLOW_TRACKING_URI`` points elsewhere. The run id goes into the
manifest as ``data_run_id``, which the trainer copies into its own run's tags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing.mlflow_experiment import announce_run, experiment_name, fail_fast, tracking_errors, tracking_failure
from preprocessing.options import PreprocessConfig

_PARAM_MAX = 500  # MLflow's limit on a param value's length
log = logging.getLogger(__name__)


class PreprocessRun:
    """Handle on the active run; every method is a no-op when tracking is off."""

    def __init__(self, mlflow_module):
        self._mlflow = mlflow_module
        self.run_id = mlflow_module.active_run().info.run_id if mlflow_module else None

    def log_results(self, counters: dict[str, int], wall_seconds: float, output: str) -> None:
        """The counts, the manifest and the tokenizer. The data dir is finished by now and is the
        record: a tracking store that fails here (a full disk, a server gone) is warned about, and
        the data dir stands."""
        if not self._mlflow:
            return
        try:
            self._log_results(counters, wall_seconds, output)
        except tracking_errors() as err:
            fail_fast()  # the run's end, next, then waits seconds on a server gone, not minutes
            log.warning("MLflow could not record the counts, manifest or tokenizer in run %s (%s); the data dir "
                        "%s is complete", self.run_id, tracking_failure(err), output)

    def _log_results(self, counters: dict[str, int], wall_seconds: float, output: str) -> None:
        metrics = {f"count/{k}": float(v) for k, v in counters.items()}
        metrics["wall_seconds"] = wall_seconds
        tokens = counters.get("tokens", 0)
        metrics["input_tokens_per_second"] = tokens / max(wall_seconds, 1e-9)
        metrics["examples_per_second"] = counters.get("instances", 0) / max(wall_seconds, 1e-9)
        self._mlflow.log_metrics(metrics)  # one batched call, not one per metric
        with _local_copy(output, ["manifest.json"]) as local:
            self._mlflow.log_artifact(os.path.join(local, "manifest.json"))
        tokenizer = FileSystems.join(output, "tokenizer")
        names = [os.path.basename(m.path) for m in
                 FileSystems.match([FileSystems.join(tokenizer, "*")])[0].metadata_list]
        with _local_copy(tokenizer, names) as local:
            self._mlflow.log_artifacts(local, artifact_path="tokenizer")


@contextlib.contextmanager
def _local_copy(directory: str, names: list[str]) -> Iterator[str]:
    """A local folder with ``names`` from ``directory`` (which may be gs://…)."""
    if "://" not in directory:
        yield directory
        return
    with tempfile.TemporaryDirectory() as local:
        for name in names:
            with FileSystems.open(FileSystems.join(directory, name),
                                  compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(os.path.join(local, name), "wb") as dst:
                dst.write(src.read())
        yield local


def _params(config: PreprocessConfig, beam_args: list[str]) -> dict[str, str]:
    params = {}
    values = dataclasses.asdict(config)
    # One flat namespace, as the flags are: the example fields beside the rest (whole_word_mask
    # is the config's own, the segmenter, of which the example config holds a bool).
    values.update({k: v for k, v in values.pop("examples").items() if k != "whole_word_mask"})
    for key, value in values.items():
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        params[key] = text if len(text) <= _PARAM_MAX else text[:_PARAM_MAX - 3] + "..."
    params["beam_args"] = " ".join(beam_args)[:_PARAM_MAX]
    return params


@contextlib.contextmanager
def preprocess_run(config: PreprocessConfig, beam_args: list[str]) -> Iterator[PreprocessRun]:
    """Starts the run (params logged up front); an exception marks it FAILED."""
    if not config.mlflow:
        yield PreprocessRun(None)
        return
    import mlflow

    # By id: MLflow 3's set_experiment leaves the loser of a creation race without an active one.
    experiment = mlflow.set_experiment(experiment_name(config.experiment))
    run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=config.run_name,
                           tags={"stage": "preprocess"})
    announce_run(log, run.info.run_id, "preprocess", experiment.name, mlflow.get_tracking_uri())
    status = "FAILED"
    try:
        try:
            mlflow.log_params(_params(config, beam_args))
        except tracking_errors() as err:
            fail_fast()
            log.warning("MLflow could not record the flags in run %s (%s); preprocessing goes on",
                        run.info.run_id, tracking_failure(err))
        yield PreprocessRun(mlflow)
        status = "FINISHED"
    except BaseException as err:
        from preprocessing.errors import interrupted  # it imports most of the package

        status = "KILLED" if interrupted(err) else "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except tracking_errors() as err:  # the run's end is a record; the stage's outcome stands
            log.warning("MLflow could not mark run %s %s (%s)", run.info.run_id, status, tracking_failure(err))
