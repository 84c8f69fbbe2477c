"""A tracking server that does not answer stops every stage at once with one line: MLflow's client
retried for minutes, then failed with five chained tracebacks after the stage's whole start-up."""

import os
import subprocess
import sys
import time

import pytest

from pipeline.engine import free_port
from preprocessing.mlflow_experiment import TrackingServerError, check_tracking_server

from .conftest import REPO


def test_a_server_that_does_not_answer_is_named(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingServerError, match=rf"MLflow tracking server {uri} does not answer \(.*\): start it"):
        check_tracking_server(uri, timeout=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///nowhere/mlflow.db")
    check_tracking_server()  # a local store needs no server


@pytest.mark.parametrize("stage, args", [
    ("preprocessing/run_beam.py", ["--output", "{tmp}/data"]),
    ("pipeline/pretrain.py", ["--data", "{tmp}/data", "--run-dir", "{tmp}/run"]),
    ("pipeline/finetune.py", ["--model", "{tmp}/model", "--data", "{tmp}/d.csv"]),
    ("pipeline/embed.py", ["--model", "{tmp}/model", "--input", "{tmp}/d.csv", "--out", "{tmp}/e.parquet"]),
])
def test_every_stage_stops_before_its_work_with_one_line(stage, args, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(REPO, stage), *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=300, env={**env, "MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: MLflow tracking server {uri} does not answer ([Errno 111] Connection refused): "
                      "start it, set MLFLOW_TRACKING_URI to one that runs, or pass --no-mlflow"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 120
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
