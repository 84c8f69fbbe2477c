"""MLflow for the training stages: only global rank 0 logs; metrics go in batches."""

from __future__ import annotations

import json
import os
import tempfile

from pipeline.engine import flat

from preprocessing.mlflow_experiment import experiment_name


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

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:500] for k, v in params.items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        # One call for the whole set, queued: training never waits on the tracking server
        # (end_run flushes the queue).
        self._mlflow.log_metrics(values, step=step, synchronous=False)

    def log_json(self, obj: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=2)
            self._mlflow.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def config_params(config) -> dict:
    # Flat: the engine's settings under their flag names (learning_rate, not engine.learning_rate).
    return flat(config)
