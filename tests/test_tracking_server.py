"""A tracking server that does not answer stops every stage at once with one line: MLflow's client
retried for minutes, then failed with five chained tracebacks after the stage's whole start-up."""

import os
import signal
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


@pytest.mark.parametrize("uri", ["127.0.0.1:5000", "/data/mlruns", "file:///data/mlruns"])
def test_a_folder_as_the_tracking_uri_is_refused_in_one_line(uri):
    """MLflow 3 keeps no runs in a folder: before, each stage failed with MLflow's traceback about
    its file store, after its whole start-up; "host:port" without http:// reads as a folder."""
    with pytest.raises(TrackingServerError, match=rf"MLFLOW_TRACKING_URI {uri}: a folder, where MLflow 3 keeps no "
                                                   r"runs; name a server \(http://HOST:PORT\) or a database"):
        check_tracking_server(uri)
    for fine in ("sqlite:////data/mlflow.db", "databricks", "postgresql://db/mlflow"):
        check_tracking_server(fine)  # no server to ask


def test_a_database_file_named_by_its_path_is_told_its_uri(tmp_path):
    from pipeline.report import ReportError, report

    database = tmp_path / "mlflow.db"
    database.write_bytes(b"")
    # before: "MLFLOW_TRACKING_URI …: a folder, …, or pass --no-mlflow", a flag report.py lacks
    with pytest.raises(ReportError, match=rf"--tracking-uri {database}: a file's path; name a database by its URI: "
                                          rf"sqlite:///{database}$"):
        report("0123abcd", out=str(tmp_path / "r.png"), tracking_uri=str(database))


@pytest.mark.e2e
def test_a_server_gone_mid_run_costs_the_run_seconds_not_minutes(data_dir, tmp_path):
    """The tracking server dies while pretraining runs: the run finishes and exports, the calls
    that could not be recorded are counted, and the process ends soon after its last step (before:
    MLflow's 7 retries with doubling waits, about 4 minutes a call, for each call after it)."""
    from .conftest import start_mlflow_server

    (tmp_path / "mlflow").mkdir()
    uri, server, server_log = start_mlflow_server(tmp_path / "mlflow")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                            "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    env.update(MLFLOW_TRACKING_URI=uri, MASTER_PORT=str(free_port()))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "pipeline", "pretrain.py"), "--data", data_dir,
                             "--run-dir", str(run_dir), "--steps", "40", "--global-batch-size", "8",
                             "--micro-batch-size", "8", "--log-every", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the command and the server process it started
        server.wait()
        server_log.close()
    out, _ = proc.communicate(timeout=400)
    last_step = (run_dir / "metrics.jsonl").stat().st_mtime
    assert proc.returncode == 0, out[-3000:]
    assert "MLflow could not record" in out and "is missing what" in out, out[-3000:]
    assert out.count("urllib3.connectionpool: Retrying") < 5, out[-3000:]  # before: one line a retry, 43 here
    assert os.path.isfile(run_dir / "hf" / "step00000040" / "config.json"), sorted(os.listdir(run_dir))
    assert time.time() - last_step < 90, f"{time.time() - last_step:.0f} s after the last step:\n{out[-3000:]}"


def test_a_deleted_experiment_is_refused_in_one_line_before_the_work(tmp_path, monkeypatch):
    import mlflow

    from preprocessing.mlflow_experiment import check_tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(TrackingServerError, match=r"MLflow experiment 'gone' is deleted: restore it \(mlflow "
                                                   r"experiments restore --experiment-id \d+\) or name another"):
        check_tracking("gone")
    check_tracking("new")  # one that does not exist yet: the stage makes it
    check_tracking(None)


def test_a_metrics_batch_that_fails_in_mlflow_s_queue_is_counted(tmp_path, monkeypatch, caplog):
    """Metrics are queued (training never waits on the store), so a batch the store refuses fails
    after log_metrics has returned: it is counted with the other lost calls, not only in MLflow's
    own error line, and the batches around it are recorded."""
    import logging

    import mlflow

    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracker = Tracker("pretrain", "queued", None, {})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_metrics({"bad/../name": 1.0}, 2)  # a name the store refuses, in the queue's thread
    tracker.log_metrics({"loss": 0.5}, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        tracker.finish()
    assert tracker.failures == 1
    assert "MLflow could not record the metrics of step 2 in run" in caplog.text, caplog.text
    assert f"MLflow run {tracker.run_id} is missing what 1 call(s) could not record" in caplog.text, caplog.text
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(tracker.run_id, "loss")] == [1, 3]


def test_a_server_whose_api_fails_behind_a_live_health_check_is_refused_in_one_line(monkeypatch):
    """MLflow's /health does not ask its database, and a server behind a login answers /health but
    401 to the API: before, each stage's start-up ran, then MLflow's chained tracebacks."""
    import http.server
    import threading

    from preprocessing.mlflow_experiment import check_tracking

    class LoginWall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 401)
            self.end_headers()
            self.wfile.write(b"OK" if self.path == "/health" else b"Unauthorized")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoginWall)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://user:secret@127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with pytest.raises(TrackingServerError) as caught:
            check_tracking("any")
    finally:
        server.shutdown()
    message = str(caught.value)
    assert message.startswith(f"MLflow tracking store http://127.0.0.1:{server.server_port} fails (") and "401" in message
    assert message.endswith("fix it, set MLFLOW_TRACKING_URI to one that works, or pass --no-mlflow")
    assert "secret" not in message and "\n" not in message


def test_a_resume_marks_the_run_it_continues_killed_if_it_still_reads_running(tmp_path, monkeypatch):
    """A job killed (kill -9, a node lost) or whose store was gone at its end left its run RUNNING
    for ever; the resume knows that run's id, and the run dir's lock says no one else writes it."""
    import mlflow

    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("stale")
    killed, finished = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(finished, "FINISHED")
    tracker = Tracker("pretrain", "stale", None, {})
    for run_id in (killed, finished, "0123456789abcdef0123456789abcdef"):  # the last: no such run
        tracker.end_stale(run_id)
    tracker.finish()
    assert [client.get_run(r).info.status for r in (killed, finished, tracker.run_id)] == [
        "KILLED", "FINISHED", "FINISHED"]
    assert tracker.failures == 0


def test_a_password_is_taken_out_of_a_uri_with_its_host_as_written():
    from preprocessing.mlflow_experiment import _without_password

    assert _without_password("http://user:secret@[::1]:5000/x") == "http://[::1]:5000/x"  # brackets kept
    assert _without_password("https://me@Tracking.Example.com") == "https://Tracking.Example.com"
    assert _without_password("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
