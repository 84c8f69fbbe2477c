"""MLflow for the training stages: only global rank 0 logs; metrics go in batches.

Once a run has started, MLflow is the record, not the work: a tracking server that goes away or
a tracking database on a full disk must not end days of pretraining, nor skip its export. Every
call after the start is tried once (MLflow's own retries bounded, and none once a call has failed:
``fail_fast``); the first failure is a warning, the later ones are counted,
and ``finish`` says how many were lost (the run dir's metrics.jsonl, eval.jsonl and the stage's
own files keep every figure). The start itself is strict: a server that does not answer is
refused before the work (``check_tracking_server``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

from pipeline.engine import flat

from preprocessing.mlflow_experiment import (QuietRepeats, announce_run, experiment_name, fail_fast,
                                            tracking_errors, tracking_failure)

log = logging.getLogger(__name__)
# The loggers that repeat a failing store's error for every queued metrics batch, and from which level.
_REPEATING = {"mlflow.utils.async_logging.async_logging_queue": logging.ERROR, "mlflow.store.db.utils": logging.ERROR,
              "urllib3.connectionpool": logging.WARNING}


class Tracker:
    """One MLflow run; ``None``-safe so the loop never asks which rank it is on."""

    def __init__(self, stage: str, experiment: str | None, run_name: str | None, tags: dict[str, str]):
        import mlflow

        self._mlflow = mlflow
        # The experiment's id, explicitly: when two jobs create the experiment at once, MLflow 3's
        # set_experiment returns it to the loser of the race without making it active, and
        # start_run would then land in experiment 0.
        exp = mlflow.set_experiment(experiment_name(experiment))
        self.run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=run_name,
                                    tags={"stage": stage, **tags})
        self.run_id = self.run.info.run_id
        announce_run(log, self.run_id, stage, exp.name, mlflow.get_tracking_uri())
        self.failures = 0
        self._queued: list[tuple[int, object]] = []  # (step, future) of each metrics batch in MLflow's queue
        for name, level in _REPEATING.items():  # a fresh count for each run
            logger = logging.getLogger(name)
            for old in [f for f in logger.filters if isinstance(f, QuietRepeats)]:
                logger.removeFilter(old)
            logger.addFilter(QuietRepeats(level=level))

    def attempt(self, what: str, fn, *args, **kwargs) -> bool:
        """``fn(*args, **kwargs)``; whether it worked. A failure of the tracking store (MLflow's,
        the file system's, HTTP's, the database's errors) is warned about (the first) and counted,
        not raised; any other error is a bug, and raised."""
        try:
            fn(*args, **kwargs)
            return True
        except tracking_errors() as err:
            self._failed(what, err)
            return False

    def _failed(self, what: str, err: BaseException) -> None:
        self.failures += 1
        if self.failures == 1:
            fail_fast()  # a server gone: each later call waits seconds, not MLflow's minutes of retries
            log.warning("MLflow could not record %s in run %s (%s); the run goes on, and later failures are "
                        "counted", what, self.run_id, tracking_failure(err))

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:500] for k, v in params.items()}
        self.attempt("the parameters", self._mlflow.log_params, flat)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        # One call for the whole set, queued: training never waits on the tracking server
        # (end_run flushes the queue). A batch that fails in the queue is counted as a failed call.
        self._count_failed_batches()
        self.attempt(f"the metrics of step {step}", self._queue_metrics, values, step)

    def _queue_metrics(self, values: dict[str, float], step: int) -> None:
        queued = self._mlflow.log_metrics(values, step=step, synchronous=False)
        # RunOperations documents its futures but keeps them in this attribute alone; an MLflow
        # without it leaves queued failures to MLflow's own error line, uncounted. So does
        # MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS, which merges batches and fails the first alone.
        self._queued.extend((step, future) for future in getattr(queued, "_operation_futures", None) or ())

    def _count_failed_batches(self, wait: float = 0.0) -> None:
        """Counts the queued batches that failed, and forgets the finished ones (the list stays as
        short as the queue); ``wait``: seconds to give the unfinished ones, all together (after
        end_run, which flushes the queue)."""
        import concurrent.futures

        if wait and self._queued:
            concurrent.futures.wait([future for _, future in self._queued], timeout=wait)
        pending = []
        for step, future in self._queued:
            if not future.done():
                pending.append((step, future))
            elif future.cancelled():
                self._failed(f"the metrics of step {step}", concurrent.futures.CancelledError("cancelled"))
            elif future.exception() is not None:
                self._failed(f"the metrics of step {step}", future.exception())
        self._queued = pending

    def log_json(self, obj: dict, name: str) -> None:
        self.attempt(name, self._log_json, obj, name)  # a full temporary folder too

    def _log_json(self, obj: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=2)
            self._mlflow.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        ended = self.attempt(f"the run's end ({status})", self._mlflow.end_run, status=status)
        self._count_failed_batches(wait=5.0)  # end_run has flushed the queue: each is done, or about to be
        if self.failures:
            log.warning("MLflow run %s is missing what %d call(s) could not record (the first is warned about "
                        "above)%s; the stage's own files are complete", self.run_id, self.failures,
                        "" if ended else f", and its status still reads RUNNING; once the store is back, "
                        f"python -c \"import mlflow; mlflow.MlflowClient().set_terminated('{self.run_id}', "
                        f"'{status}')\" ends it")

    def end_stale(self, run_id: str) -> None:
        """The run a resume continues, if MLflow still shows it RUNNING (its job killed, or its store
        gone at its end): marked KILLED, so that no run reads as running for ever. Only one job
        writes a run dir at a time (its lock), so that run is over."""
        client = self._mlflow.MlflowClient()
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                log.info("MLflow run %s, which this one resumes, read RUNNING: marked KILLED", run_id)
        except tracking_errors() as err:  # another store's run, or deleted: nothing to mark
            log.info("MLflow run %s, which this one resumes, was not checked (%s)", run_id, tracking_failure(err))


# The model config's fields logged as params (model_hidden_size, …).
ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings")


def architecture_params(model_config, parameters: int) -> dict:
    """The model's shape and size, what runs are compared by: a preset's name alone (``model``)
    points at sizes in code that can change."""
    return {**{f"model_{key}": getattr(model_config, key) for key in ARCHITECTURE}, "model_parameters": parameters}


def data_params(**paths: str | None) -> dict:
    """The labelled data as a registered model's lineage needs it: each file's absolute path (a
    relative one names nothing once the working directory is forgotten) and ``data_sha256``, over
    every file's name and bytes (a saved dataset's folder: its files, in order)."""
    given = {name: path for name, path in paths.items() if path}
    digest = hashlib.sha256()
    for name, path in sorted(given.items()):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names) \
            if os.path.isdir(path) else [path]
        for file in files:
            digest.update(f"{name}\0{os.path.relpath(file, path) if file != path else ''}\0".encode())
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return {**{f"{name}_path": os.path.abspath(path) for name, path in given.items()},
            "data_sha256": digest.hexdigest()}


def config_params(config) -> dict:
    # Flat: the engine's settings under their flag names (learning_rate, not engine.learning_rate).
    return flat(config)
